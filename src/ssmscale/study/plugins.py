"""The ladder's side of plugin families: admit each one before anything trains, and say when the code under
a study changed.

Called by run_ladder once the plan is known (the plan itself imported each plugin: sizing builds its mixer
and its FLOPs are measured), dry runs included: a dry run plans training, so it runs the plugin's code as
training would. `ssmscale fit` and `report` never come here: they read results and run nothing.

A plugin's file is hashed (sha256) into every result.json it trains (`mixer_sha256`, and into the run's
config_hash). A ladder resumed over changed code says how many finished runs were trained with other code;
it keeps them (they are valid runs of the code they record) and trains the rest with the code there now.
"""

from __future__ import annotations

import sys
from pathlib import Path


def preflight(cfg, out_dir: Path, planned: list) -> None:
    from ..models.admission import admit_plugin
    for family, spec in cfg.mixers().items():
        widths = [r.d_model for r in planned if r.family == family and not r.skip] or \
                 [r.d_model for r in planned if r.family == family]
        if not widths:
            continue
        sha = spec.sha256()
        report = admit_plugin(spec, min(widths), family)
        generate = "" if report.can_generate else "; no allocate_cache: it trains but cannot generate"
        print(f"plugin family {family}: {spec.class_name} from {spec.source_path()} (sha256 {sha[:12]}) admitted, "
              f"{len(report.lines)} checks passed ({report.dtype}){generate}")
        changed = other_code_runs(out_dir, family, sha)
        if changed:
            shas = sorted({s[:12] for s in changed.values()})
            print(f"plugin family {family}: THE CODE CHANGED: {len(changed)} finished run(s) were trained with "
                  f"{spec.source_path().name} at sha256 {', '.join(shas)}, it is {sha[:12]} now "
                  f"({', '.join(sorted(changed)[:3])}{', ...' if len(changed) > 3 else ''}); they are kept as "
                  f"they are: delete their folders under {out_dir / 'runs'} to train them with this code",
                  file=sys.stderr)


def other_code_runs(out_dir: Path, family: str, sha: str) -> dict[str, str]:
    """{run_id: the sha256 it recorded} for the study's finished runs of `family` trained with other code
    (result.json read through safeload from inside the study: a link out of it or a FIFO is passed over)."""
    from ..fsutil import is_plain_name
    from ..safeload import read_result
    out = {}
    runs = Path(out_dir) / "runs"
    if not runs.is_dir():
        return out
    for path in sorted(runs.glob("*/result.json")):
        if not is_plain_name(path.parent.name):
            continue
        res = read_result(path, within=out_dir)[0]
        if res and res.get("family") == family and res.get("status") in ("ok", "diverged"):
            recorded = res.get("mixer_sha256")
            if recorded != sha:
                out[path.parent.name] = str(recorded)
    return out
