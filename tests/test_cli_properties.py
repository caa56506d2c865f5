"""Property: whatever YAML, CSV or argument list a user gives, `ssmscale` succeeds or exits 2 with exactly
one line on stderr and no traceback, and a refused command leaves no new file behind.

Hypothesis generates the inputs (random nested documents, mutations of a valid config, bytes; CSVs with
random columns, cells and row widths; argument lists from each subcommand's flags and hostile values).
Each case runs `ssmscale.cli.main` in-process in a fresh temporary folder that is the working directory,
so nothing escapes. Only commands that finish in milliseconds run for real: `ladder --dry-run` on MQAR
data, `sizes`, `fit` (with a 9-start Approach 3 grid), `report` on folders that are no study; what
`train` and `profile` would start (training, measuring) is replaced by a stub after their checks.
Generation is derandomized (seeded by each test, no example database), so a run does not depend on a
random seed or on what an earlier run found; hypothesis may still vary a few cases from run to run.
Study folders are generated too (results.csv with hostile run ids and cells, result.json, fit.json and
config.yaml of every shape, FIFOs and links among them): `fit` and `report` on them answer or refuse in one
line, within a bound of time, and write nothing outside their output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hang import alarm  # noqa: E402
from ssmscale.cli import main  # noqa: E402

SETTINGS = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CASES: dict[str, list] = {}       # test -> [cases run, cases accepted, seconds], printed at the end

SYNTHETIC = {"source": "synthetic", "synthetic": {"vocab_size": 64, "num_kv_pairs": 2, "num_examples": 64}}
LADDER = {"name": "h", "families": ["transformer", "mamba"], "budgets": [4.0e6, 8.0e6], "sizes": [2.0e3, 4.0e3],
          "min_steps": 1, "data": SYNTHETIC, "model": {"head_dim": 8},
          "train": {"seq_len": 16, "batch_size": 2, "eval_tokens": 32, "progress": False}, "fit": False}
RUN = {"name": "r", "data": SYNTHETIC, "model": {"family": "mamba", "params": 2.0e3},
       "train": {"seq_len": 16, "batch_size": 2, "tokens": 128.0, "eval_tokens": 32}}

# the data sources that would read the network or the whole standard library never appear as values
_AVOID = {"hf", "stdlib", "files"}
_text = st.text(max_size=12).filter(lambda t: t not in _AVOID)
HOSTILE = st.sampled_from([0, -1, 1, 2, 3, 16, 2 ** 31, 2 ** 80, 1e300, -1e300, float("nan"), float("inf"), 1e-300,
                           0.5, True, False, None, "", "1e5", "128", "true", "../../x", "/tmp/x", "a/b", "\x00",
                           "transformer", "mamba", "ddp", "auto", [], {}, [1, 2], {"a": 1}])
SCALARS = st.one_of(HOSTILE, st.integers(-2 ** 40, 2 ** 40), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), _text)
DOCS = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                    st.dictionaries(_text, kids, max_size=4)), max_leaves=12)


def _key_paths(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _key_paths(v, prefix + (k,))
    return out


def plausible(value):
    """A value of the same kind as `value`: what a careless edit would give (often still valid)."""
    if isinstance(value, bool) or value is None:
        return st.booleans()
    if isinstance(value, (int, float)):
        return st.sampled_from([0.5, 1, 2, 10, 0.1, 1000]).map(lambda k: type(value)(value * k) or value)
    if isinstance(value, list):
        return st.lists(st.one_of(*[plausible(v) for v in value]) if value else SCALARS, max_size=3)
    if isinstance(value, str):
        return st.sampled_from([value, value + "x", "transformer", "mamba", "auto"])
    return DOCS


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with a few keys set to plausible or generated values, removed, or added; `data` and
    `data.source` stay (without them the source would default to the whole standard library)."""
    import copy
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _key_paths(doc) if p not in (("data",), ("data", "source"))]
        path = draw(st.sampled_from(paths)) if paths else ("name",)
        parent = doc
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["edit", "edit", "edit", "set", "delete", "add"]))
        if action == "delete":
            parent.pop(path[-1], None)
        elif action == "add":
            parent[draw(_text)] = draw(DOCS)
        elif action == "edit" and path[-1] in parent:
            parent[path[-1]] = draw(plausible(parent[path[-1]]))
        else:
            parent[path[-1]] = draw(DOCS)
    return doc


def yaml_texts(base: dict):
    dumped = mutated(base).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    return st.one_of(
        dumped, dumped, dumped,
        dumped.map(lambda t: t + "name: twice\n"),                          # a duplicate key
        DOCS.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        st.binary(max_size=64),
        st.text(max_size=64))


@contextlib.contextmanager
def fresh_folder():
    """A new temporary folder as the working directory; yields its path."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="ssmscale-prop-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def run_cli(argv: list[str], folder: Path, inputs: set[str]) -> int:
    """main(argv) -> exit code, asserting the property: 0, or 2 with one line, no traceback, no new file."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:              # argparse: --help, --version, bad arguments
            code = exc.code if isinstance(exc.code, int) else 2
    lines = err.getvalue().strip().splitlines()
    assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
    if code == 2:
        assert len(lines) == 1 and "Traceback" not in lines[0], (argv, err.getvalue()[-2000:])
        new = {str(p.relative_to(folder)) for p in folder.rglob("*")} - inputs
        assert not new, (argv, lines, sorted(new))
    return code


@pytest.fixture
def quiet_heavy_work(monkeypatch, tmp_path_factory):
    """Stubs for what would train or measure; a tiny Approach 3 grid; caches outside the case folders."""
    import numpy as np

    from ssmscale import train
    from ssmscale.bench import loop, profile
    from ssmscale.bench import scan as bench_scan
    from ssmscale.fit import laws
    monkeypatch.setattr(laws, "CHINCHILLA_GRID", np.asarray(laws.CHINCHILLA_GRID)[::500])
    monkeypatch.setenv("SSMSCALE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = {"status": "ok", "family": "mamba", "d_model": 8, "n_layer": 2, "params": 1, "tokens": 1, "flops": 1.0,
              "loss": 1.0, "bpb": 1.0, "tokens_per_s": 1.0, "wall_s": 0.0}
    monkeypatch.setattr(train, "run_training", lambda cfg, out, **k: result)
    monkeypatch.setattr(profile, "run_profile", lambda *a, **k: [])
    monkeypatch.setattr(loop, "loop_overhead", lambda *a, **k: pytest.fail("--op loop would train"))
    monkeypatch.setattr(bench_scan, "run_benchmark", lambda *a, **k: [])


def _count(name: str, start: float, code: int):
    stats = CASES.setdefault(name, [0, 0, 0.0])
    stats[0] += 1
    stats[1] += code == 0
    stats[2] += time.perf_counter() - start


# ------------------------------------------------------------------------------------------ YAML
@settings(SETTINGS, max_examples=70)
@given(text=yaml_texts(LADDER))
def test_any_ladder_config_is_planned_or_refused_in_one_line(quiet_heavy_work, text):
    start = time.perf_counter()
    with fresh_folder() as folder:
        (folder / "cfg.yaml").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        code = run_cli(["ladder", "cfg.yaml", "--dry-run", "--out", "study", "--no-progress"], folder, {"cfg.yaml"})
    _count("ladder yaml", start, code)


@settings(SETTINGS, max_examples=30)
@given(text=yaml_texts(RUN))
def test_any_run_config_is_accepted_or_refused_in_one_line(quiet_heavy_work, text):
    start = time.perf_counter()
    with fresh_folder() as folder:
        (folder / "run.yaml").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        code = run_cli(["train", "run.yaml"], folder, {"run.yaml"})
    _count("run yaml", start, code)


# ------------------------------------------------------------------------------------------- CSV
COLUMNS = ["params", "tokens", "flops", "loss", "family", "budget", "status", "lr", "seed", "Model Size", "x"]
HOSTILE_CELLS = st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "", "1e300", "abc", '"', "1,2", "ok"]), _text)
GOOD_CELLS = {"family": st.sampled_from(["mamba", "transformer"]), "status": st.sampled_from(["ok", "ok", "failed"]),
              "loss": st.floats(1.5, 5.0).map(lambda v: f"{v:.4f}"), "lr": st.sampled_from(["1e-3", "3e-3"]),
              "seed": st.sampled_from(["0", "1"]), "budget": st.sampled_from(["1e15", "1e16", "1e17"])}


@st.composite
def csv_files(draw) -> bytes:
    """Mostly CSVs a fit accepts (the right columns, numbers where numbers go); a few cells, rows or files not."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80))
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=6, unique=True))
    if draw(st.integers(0, 3)):
        header = ["params", "tokens", "loss"] + [c for c in header if c not in ("params", "tokens", "loss")]
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        width = len(header) + (draw(st.sampled_from([-1, 1])) if draw(st.integers(0, 29)) == 0 else 0)
        cells = [draw(HOSTILE_CELLS if draw(st.integers(0, 49)) == 0 else
                      GOOD_CELLS.get(col, st.floats(1e5, 1e18).map(lambda v: f"{v:.4g}")))
                 for col in (header + ["x"])[:max(width, 0)]]
        rows.append(",".join(c.replace("\n", " ") for c in cells))
    text = "\n".join([",".join(header)] + rows) + draw(st.sampled_from(["\n", "\n", ""]))
    return text.encode("utf-8", "surrogatepass")


@settings(SETTINGS, max_examples=60)
@given(data=csv_files(), as_study=st.booleans(), extra=st.sampled_from([[], ["--n-boot", "2"], ["--ci", "2"],
                                                                        ["--columns", "params=x"]]))
def test_any_csv_is_fitted_or_refused_in_one_line(quiet_heavy_work, data, as_study, extra):
    start = time.perf_counter()
    with fresh_folder() as folder:
        (folder / "s").mkdir()
        path = folder / "s" / "results.csv" if as_study else folder / "runs.csv"
        path.write_bytes(data)
        inputs = {"s", "s/results.csv"} if as_study else {"s", "runs.csv"}
        code = run_cli(["fit", "s" if as_study else "runs.csv", "--out", "fitted", "--n-boot", "0", "--jobs", "1",
                 "--no-progress", *extra], folder, inputs)
    _count("csv", start, code)


# ---------------------------------------------------------------------------------- study folders
RUN_IDS = st.one_of(st.sampled_from(["../x", "/tmp/x", "a/b", "", ".hidden", "-x", "r" * 300]),
                    st.from_regex(r"[a-z][a-z0-9_.+=-]{0,12}", fullmatch=True))
GOOD_RESULT = {"status": "ok", "loss": 3.0, "params": 1e6, "tokens": 1e7, "flops": 6e13, "lr": 1e-3,
               "eval_curve": {"subset_tokens": 64, "step": [1, 2], "tokens": [8, 16], "flops": [1e12, 2e12],
                              "loss": [4.0, 3.5]}, "val_loss_by_position": [4.0, None, 3.0]}
RESULT_FILES = st.one_of(
    st.just(json.dumps(GOOD_RESULT).encode()),
    st.sampled_from([b"[1, 2]", b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000, b"", b"{", b"1e400", "FIFO", "LINK"]),
    st.builds(lambda k, v: json.dumps({**GOOD_RESULT, k: v}).encode(),
              st.sampled_from(["eval_curve", "val_loss_by_position", "status", "loss"]), DOCS))


@st.composite
def study_folders(draw) -> dict:
    """{relative path: bytes, or "FIFO" / "LINK" (a link leaving the study)}: a study folder as a collaborator
    might hand it over: mostly what the ladder writes, with hostile run ids, result.json, fit.json, config."""
    pair = ["mamba", "transformer"]
    families = draw(st.sampled_from([pair, pair, pair, ["mamba"], [f"f{i}" for i in range(11)]]))
    n_rows = 9 * len(families)
    bad_id = draw(st.integers(0, n_rows - 1)) if draw(st.integers(0, 3)) == 0 else None     # one hostile run id
    bad_cell = draw(st.integers(0, n_rows - 1)) if draw(st.integers(0, 3)) == 0 else None   # one hostile cell
    rows, files = [], {}
    for fam in families:
        for c in (1e15, 1e16, 1e17):
            for n in (1e6, 3e6, 1e7):
                run_id = draw(RUN_IDS) if len(rows) == bad_id else f"{fam}_N{n:.3g}_C{c:.3g}"
                loss = 2 + 100 / n ** 0.3 + 50 / (c / (6 * n)) ** 0.3
                cells = [run_id, fam, f"{n:g}", f"{c / (6 * n):g}", f"{c:g}", f"{loss:.5f}", f"{c:g}", "ok", "0.003"]
                if len(rows) == bad_cell:
                    cells[draw(st.integers(1, 8))] = draw(HOSTILE_CELLS)
                rows.append(",".join(cell.replace(",", " ").replace("\n", " ") for cell in cells))
                if draw(st.integers(0, 3)) == 0 and is_plain(run_id):
                    files[f"runs/{run_id}/result.json"] = draw(RESULT_FILES)
    csv = ("run_id,family,params,tokens,flops,loss,budget,status,lr\n" + "\n".join(rows) + "\n").encode()
    files["results.csv"] = csv
    fit_kind = draw(st.sampled_from(["none", "garbage", "shape", "FIFO"]))
    if fit_kind == "garbage":
        files["fit.json"] = draw(st.binary(max_size=40))
    elif fit_kind == "shape":             # the right source, any families and settings
        files["fit.json"] = json.dumps({"schema": 1, "source": {"sha256": hashlib.sha256(csv).hexdigest()},
                                        "families": draw(st.dictionaries(_text, DOCS, max_size=3)),
                                        "settings": draw(DOCS)}).encode()
    elif fit_kind == "FIFO":
        files["fit.json"] = "FIFO"
    config = draw(st.sampled_from(["none", "study", "bytes", "FIFO"]))
    if config == "study":
        files["config.yaml"] = yaml.safe_dump({"name": "s", "families": families, "budgets": [1e15, 1e16, 1e17]}).encode()
    elif config == "bytes":
        files["config.yaml"] = draw(st.binary(max_size=40))
    elif config == "FIFO":
        files["config.yaml"] = "FIFO"
    return files


def is_plain(run_id: str) -> bool:
    from ssmscale.fsutil import is_plain_name
    return is_plain_name(run_id)


def lay_out(folder: Path, files: dict) -> set[str]:
    """Write a study's files under folder/s; returns every path made (relative to folder)."""
    (folder / "elsewhere").mkdir()
    for rel, content in files.items():
        path = folder / "s" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "FIFO":
            os.mkfifo(path)
        elif content == "LINK":
            path.symlink_to(folder / "elsewhere")
        else:
            path.write_bytes(content)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}



def _on_study_folder(files, argv, label):
    """`argv` on the study folder `files` laid out as s/: the CLI property, and nothing written outside it."""
    start = time.perf_counter()
    with fresh_folder() as folder, alarm(120):
        inputs = lay_out(folder, files)
        code = run_cli(argv, folder, inputs)
        assert not any((folder / "elsewhere").iterdir())
    _count(label, start, code)


@settings(SETTINGS, max_examples=20)
@given(files=study_folders())
def test_any_study_folder_is_fitted_or_refused_in_one_line(quiet_heavy_work, files):
    _on_study_folder(files, ["fit", "s", "--out", "fitted", "--n-boot", "0", "--jobs", "1", "--no-progress"],
                     "study fit")


@settings(SETTINGS, max_examples=5)
@given(files=study_folders())
def test_any_study_folder_is_reported_or_refused_in_one_line(quiet_heavy_work, files):
    _on_study_folder(files, ["report", "s", "--out", "rep", "--n-boot", "0", "--no-progress"], "study report")


# --------------------------------------------------------------------------------------- arguments
NUMBERS = st.sampled_from(["0", "-1", "1", "2", "8", "16", "1e5", "1e13", "1e14", "1e300", "nan", "inf", "-inf",
                           "0.5", "x", "", "1,2", "16,,32", "2147483648", "99999999999999999999"])
FLAGS = {
    "sizes": {"--families": st.sampled_from(["transformer", "mamba", "transformer,mamba", "", ",", "rwkv"]),
              "--seq-len": NUMBERS, "--head-dim": NUMBERS, "--vocab": NUMBERS},
    "profile": {"--op": st.sampled_from(["model", "scan", "loop", "x"]), "--params": NUMBERS, "--d-model": NUMBERS,
                "--n-layer": NUMBERS, "--seq-lens": NUMBERS, "--batch": NUMBERS, "--mem-limit-gb": NUMBERS,
                "--timeout": NUMBERS, "--repeats": NUMBERS, "--gen-tokens": NUMBERS, "--threads": NUMBERS,
                "--d-inner": NUMBERS, "--d-state": NUMBERS, "--modes": st.sampled_from(["train", "fwd", "x", ""]),
                "--device": st.sampled_from(["cpu", "tpu"]), "--impls": st.sampled_from(["ref", "x", "ref,x"]),
                "--families": st.sampled_from(["mamba", "x"]), "--out": st.sampled_from(["o", "cfg.yaml", "/proc/x"])},
    "ladder": {"--set": st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
                   ["train.seq_len", "budgets", "sizes", "name", "model.head_dim", "train.lr", "x.y", "train"]),
                   NUMBERS),
               "--executor": st.sampled_from(["local", "submitit", "x"]),
               "--out": st.sampled_from(["study", "cfg.yaml", "cfg.yaml/x", "/proc/x"])},
    "train": {"--family": st.sampled_from(["mamba", "transformer", "rnn"]), "--seed": NUMBERS,
              "--out": st.sampled_from(["o", "cfg.yaml", "/proc/x"]),
              "--set": st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
                  ["train.tokens", "model.params", "seed", "name", "train.strategy", "data.cache_dir"]), NUMBERS)},
    "fit": {"--n-boot": st.sampled_from(["0", "-1", "x", "1e3"]), "--seed": NUMBERS, "--ci": NUMBERS,
            "--jobs": st.sampled_from(["0", "1", "-1", "99999"]), "--columns": st.sampled_from(["params=x", "a=b", "="]),
            "--out": st.sampled_from(["o", "cfg.yaml", "/proc/x"])},
    "report": {"--n-boot": st.sampled_from(["0", "-1", "x"]), "--seed": NUMBERS, "--out": st.sampled_from(["o", "/proc/x"])},
}
POSITIONAL = {"sizes": st.lists(NUMBERS, min_size=1, max_size=3), "profile": st.just([]),
              "ladder": st.just(["cfg.yaml", "--dry-run"]), "train": st.just(["run.yaml"]),
              "fit": st.sampled_from([["runs.csv"], ["nope.csv"], ["."]]),
              "report": st.sampled_from([["."], ["nope"], ["runs.csv"]])}


@st.composite
def argument_lists(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(FLAGS)))
    argv = [command, *draw(POSITIONAL[command])]
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS[command])), max_size=4)):
        argv += [flag, draw(FLAGS[command][flag])]
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--bogus", "--help", "-x", "--version"])))
    return argv


@settings(SETTINGS, max_examples=120)
@given(argv=argument_lists())
def test_any_argument_list_is_accepted_or_refused_in_one_line(quiet_heavy_work, argv):
    start = time.perf_counter()
    with fresh_folder() as folder:
        (folder / "cfg.yaml").write_text(yaml.safe_dump(LADDER))
        (folder / "run.yaml").write_text(yaml.safe_dump(RUN))
        (folder / "runs.csv").write_text("params,tokens,loss,budget\n" + "".join(
            f"{n:g},{c / (6 * n):g},{2 + 100 / n ** 0.3:.5f},{c:g}\n" for c in (1e15, 1e16) for n in (1e6, 3e6, 1e7)))
        code = run_cli(argv, folder, {"cfg.yaml", "run.yaml", "runs.csv"})
    _count("arguments", start, code)


def test_zz_property_cases_and_time(capsys):
    """Prints how many generated cases ran and how long they took."""
    if not CASES:
        pytest.skip("the property tests did not run in this session")
    total_n = sum(n for n, _, _ in CASES.values())
    total_s = sum(t for _, _, t in CASES.values())
    with capsys.disabled():
        print("\nproperty-based CLI cases: " + ", ".join(f"{k} {n} ({ok} accepted) in {t:.1f} s"
                                                       for k, (n, ok, t) in CASES.items())
              + f"; {total_n} cases in {total_s:.1f} s")
    assert total_n >= 100 and all(ok > 0 for _, ok, _ in CASES.values())   # success paths are reached too
