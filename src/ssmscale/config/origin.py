"""Where a config's plugin code may come from: the rule that keeps a study folder from someone else from
pointing the tool at code outside it.

A config the user wrote names their own code: a `custom_families.*.mixer` file anywhere (relative to the
config's folder, `../examples/gla.py` included, or absolute) or a module on sys.path. A config that lies in
a study or run folder (one holding what the ladder or train writes there) may have come with that folder
from someone else; its plugins must be files inside that folder. A module path, or a file elsewhere (an
absolute path, a `..` path, a link that leaves the folder), is refused in one line before anything is
imported, and the line says how to run that code anyway: name it yourself with `--set
custom_families.NAME.mixer=...` (a mixer given on the command line is the user's own choice).

The same distinction holds for `ladder --dry-run`: a dry run sizes plugin families, which runs their code,
so a dry run of a study or run folder's own config with plugins is refused (training it, or resuming it,
runs the code on purpose). The tool's own re-reads of a study's config.yaml (the worker of a planned run,
the resume check) are not checked here: the ladder wrote that file from the user's config, checked then.
Nothing here reads a plugin file or imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

# what the tool writes in a study folder (study/) and in a run folder (train.py); a config beside them
# was saved there by the tool, or came with the folder from whoever handed it over
STUDY_FILES = ("results.csv", "plan.csv", "runs", ".ladder.lock", "fit.json")
RUN_FILES = ("result.json", "metrics.csv", "checkpoints", "model.pt", ".run.lock")


def shared_folder(config_path: str | os.PathLike) -> Path | None:
    """The study or run folder a config file lies in (a run inside a study: the study), or None when its
    folder holds nothing the tool writes there. The path as given, not its link target: a config.yaml that
    is a link out of a study still lies in the study."""
    folder = Path(os.path.abspath(config_path)).parent
    if folder.parent.name == "runs" and _holds(folder.parent.parent, STUDY_FILES):
        return folder.parent.parent
    return folder if _holds(folder, STUDY_FILES + RUN_FILES) else None


def _holds(folder: Path, names: tuple[str, ...]) -> bool:
    return any(os.path.lexists(folder / name) for name in names)


def set_by_user(name: str, overrides: dict | None) -> bool:
    """Whether --set gave plugin family `name`'s mixer (the whole entry or the mixer key)."""
    return any(key in ("custom_families", f"custom_families.{name}", f"custom_families.{name}.mixer")
               for key in overrides or {})


def check_plugin_origin(cfg, config_path: str | os.PathLike, overrides: dict | None = None) -> None:
    """Refuse (UserError) a plugin that a config from a study or run folder names outside that folder.
    `cfg`: the validated config, its file mixers already absolute (load.resolve_mixer_paths)."""
    from ..models.plugin import split_target
    folder = shared_folder(config_path)
    if folder is None:
        return
    root = os.path.realpath(folder)
    for name, family in cfg.custom_families.items():
        if set_by_user(name, overrides):
            continue
        kind, where, _ = split_target(family.mixer)
        if kind == "file" and os.path.commonpath([os.path.realpath(where), root]) == root:
            continue
        what = f"the module {where}" if kind == "module" else f"{where}, outside that folder"
        raise UserError(
            f"{config_path}: custom_families.{name}.mixer: this config lies in the study or run folder {folder}, "
            f"which may have come from someone else, and names {what}: a config there may name plugin code inside "
            f"its folder only. To run that code, name it yourself: --set custom_families.{name}.mixer="
            f"{family.mixer}")


def dry_run_plugins(cfg, config_path: str | os.PathLike, overrides: dict | None = None) -> list[str]:
    """The plugin families a dry run of this ladder config would have to import to size, whose code a study
    or run folder's own config names (not the user): a dry run refuses them."""
    if shared_folder(config_path) is None:
        return []
    return [name for name in cfg.mixers() if not set_by_user(name, overrides)]
