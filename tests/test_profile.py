"""The model profiler: every mode measures, a point that does not fit is 'oom', exponents are slopes."""

import json
import math

import pandas as pd
import pytest
import torch

from ssmscale.bench import memprobe, profile
from ssmscale.cli import main
from ssmscale.models import LM, ModelConfig
from ssmscale.bench.profile import growth_exponents, prepare_generate, run_profile, shapes_for, state_bytes


def test_profile_writes_csv_json_and_plot_for_the_families_and_all_modes(tmp_path):
    # Mamba, and the hybrid: attention (KV cache, prefilled in pieces) and Mamba-2 layers in one model
    rows = run_profile(["mamba", "hybrid"], [32], ["train", "prefill", "generate"], d_model=32,
                       n_layer=2, head_dim=16, repeats=1, gen_tokens=4, out=tmp_path)
    df = pd.read_csv(tmp_path / "profile.csv")
    assert len(df) == len(rows) == 2 * 3 and set(df.status) == {"ok"}
    from ssmscale.ops.scan import resolve_impl
    from ssmscale.ops.ssd import resolve_ssd_impl
    assert dict(zip(df.family, df.scan_impl)) == {"mamba": resolve_impl("auto", "cpu").name,
                                                  "hybrid": "ssd-" + resolve_ssd_impl("auto", "cpu", (8, 16))}
    assert {"family", "mode", "seq_len", "batch", "tokens_per_s", "peak_mem_bytes", "mfu", "status"} <= set(df)
    assert (df.tokens_per_s > 0).all() and (df.mfu > 0).all()
    # a measured peak, never negative; a model this small can add nothing the probe sees over its baseline
    # (0 for some rows with 1 thread and OPENBLAS_CORETYPE=Haswell): memprobe's own tests check the probe
    assert df.peak_mem_bytes.notna().all() and (df.peak_mem_bytes >= 0).all()
    gen = df[df["mode"] == "generate"]
    # the reported generation memory includes the cache itself
    assert (gen.peak_mem_bytes >= gen.state_bytes).all()
    # per token and layer, and the floor of reading every weight and the cache once
    assert (gen.ms_per_token_layer * gen.n_layer / 1e3 * gen.tokens_per_s).round(6).eq(1).all()   # batch 1
    assert (gen.read_bytes_per_token > gen.state_bytes).all() and (gen.floor_ms_per_token > 0).all()
    assert df[df["mode"] != "generate"].floor_ms_per_token.isna().all()
    assert (tmp_path / "profile.png").stat().st_size > 10_000 and (tmp_path / "profile.json").exists()


def test_bf16_decoding_rows_read_half_the_weight_bytes_and_say_how_far_the_logits_moved(tmp_path, capsys):
    rows = run_profile(["mamba2", "transformer"], [32], ["generate", "generate-bf16"], d_model=32, n_layer=2,
                       head_dim=16, repeats=1, gen_tokens=4, out=tmp_path)
    df = pd.read_csv(tmp_path / "profile.csv")
    assert len(df) == len(rows) == 4 and set(df.status) == {"ok"}
    for fam in ("mamba2", "transformer"):
        fp32, bf16 = (df[(df.family == fam) & (df["mode"] == m)].iloc[0] for m in ("generate", "generate-bf16"))
        weights = fp32.read_bytes_per_token - fp32.state_bytes
        assert bf16.read_bytes_per_token - bf16.state_bytes == weights / 2
        assert math.isnan(fp32.logit_rel_err) and 0 < bf16.logit_rel_err < 0.05
        assert 0 <= bf16.greedy_agreement <= 1
    out = capsys.readouterr().out
    assert "logits vs fp32" in out and "generation, bf16" not in out      # (the plot's title, not the table)


def test_a_point_that_does_not_fit_is_recorded_as_oom_not_a_crash(tmp_path):
    rows = run_profile(["transformer"], [16, 4096], ["train"], d_model=32, n_layer=1, head_dim=16, repeats=1,
                       batch=8, mem_limit_bytes=64 * 2**20, out=tmp_path)
    status = {r["seq_len"]: r["status"] for r in rows}
    assert status == {16: "ok", 4096: "oom"}
    df = pd.read_csv(tmp_path / "profile.csv")
    assert list(df.status) == ["ok", "oom"] and math.isnan(df.tokens_per_s[1])


def test_kv_cache_grows_with_context_and_ssm_states_do_not():
    t1, t2 = (state_bytes("transformer", 64, 2, 1, L) for L in (1024, 4096))
    m1, m2 = (state_bytes("mamba", 64, 2, 1, L) for L in (1024, 4096))
    assert t2 == 4 * t1 == 4 * (2 * 2 * 1024 * 64 * 4)     # K and V, 2 layers, fp32
    assert m1 == m2 == 2 * (128 * 4 + 128 * 16) * 4          # conv (E d x d_conv) + SSM (E d x N)
    s1, s2 = (state_bytes("mamba2", 64, 2, 1, L) for L in (1024, 4096))
    assert s1 == s2 == 2 * ((128 + 2 * 16) * 4 + 16 * 8 * 16) * 4   # conv (x, B, C channels) + SSM (H x P x N)
    h1, h2 = (state_bytes("hybrid", 64, 8, 1, L) for L in (1024, 4096))   # 1 attention layer of 8
    assert h2 - h1 == 2 * 3072 * 64 * 4 and h1 == 2 * 1024 * 64 * 4 + 7 * s1 // 2


@pytest.mark.parametrize("family", ["transformer", "mamba", "mamba2", "hybrid"])
def test_generation_step_decodes_like_the_full_forward_and_rewinds_its_cache(family):
    step = prepare_generate(family, 32, 2, seq_len=24, batch=2, gen_tokens=5, head_dim=16)
    step()
    first = step.decoded.clone()
    step()                     # rewound cache: decoding again from the same context gives the same tokens
    assert torch.equal(step.decoded, first)
    torch.manual_seed(0)       # the profiler's model, rebuilt: greedy decoding = argmax of the full forward
    model = LM(ModelConfig(family=family, d_model=32, n_layer=2, head_dim=16)).eval()
    seq = torch.cat([step.context, first], dim=1)
    with torch.no_grad():
        logits = model(seq[:, :-1])
    n_ctx = step.context.shape[1]
    assert torch.equal(logits[:, n_ctx - 1:].argmax(-1), first)


def test_growth_exponents_are_log_log_slopes():
    rows = [{"family": "f", "mode": "train", "status": "ok", "seq_len": L, "step_ms": 3.0 * L ** 2,
             "peak_mem_bytes": 5 * L} for L in (1024, 2048, 4096, 8192)]
    g = growth_exponents(rows)["f/train"]
    assert g["time"] == pytest.approx(2.0) and g["memory"] == pytest.approx(1.0)


def test_params_give_a_matched_pair():
    shapes = shapes_for(["transformer", "mamba"], params=1e6)
    (_, nt, pt), (_, nm, pm) = shapes["transformer"], shapes["mamba"]
    assert nm == 2 * nt and abs(pm / pt - 1) < 0.1


def test_compete_measures_each_point_alone_and_beside_busy_processes(tmp_path, capsys, monkeypatch):
    """The wiring, with the measurement faked: 10 ms alone, 25 ms beside the competitors, the matmul
    beside the steps at 2 GFLOP/s (alone at the run's start: 1 GFLOP/s)."""
    def fake_run_isolated(func_path, kwargs, **kw):
        assert kw["threads"] == 1 and kw["compete"] == 2 and kw["matmul_peak"]
        return {"status": "ok", "median_ms": 10.0, "median_compete_ms": 25.0, "peak_flops": 2e9,
                "peak_extra_bytes": 1000, "memory_method": "VmHWM"}

    monkeypatch.setattr(memprobe, "run_isolated", fake_run_isolated)
    monkeypatch.setattr(profile, "measure_peak_flops", lambda device, threads: (1e9, "alone"))
    run_profile(["transformer"], [32], ["train"], d_model=32, n_layer=1, head_dim=16, repeats=1, threads=1,
                compete=2, out=tmp_path)
    r = pd.read_csv(tmp_path / "profile.csv").iloc[0]
    assert r.status == "ok" and r.competitors == 2 and r.threads == 1
    assert r.tokens_per_s == pytest.approx(32 / 0.010) and r.tokens_per_s_compete == pytest.approx(32 / 0.025)
    assert r.compete_ratio == pytest.approx(0.4) and r.step_ms_compete == 25.0
    assert r.peak_flops == 2e9 and r.mfu == pytest.approx(r.tokens_per_s * r.flops_per_token / 2e9)
    meta = json.loads((tmp_path / "profile.json").read_text())
    assert meta["peak_flops"] == 1e9 and "after each timed step" in meta["peak_note"]
    assert (meta["threads"], meta["threads_reason"], meta["competitors"]) == (1, "--threads", 2)
    out = capsys.readouterr().out
    assert "w/ 2 busy" in out and "40%" in out and "beside 2 CPU-bound competitors" in out


def test_rounds_measure_the_families_side_by_side_and_report_medians_over_the_rounds(tmp_path, capsys, monkeypatch):
    """The wiring, with the measurement faked: each call is one point in one round, its time and matmul peak set by
    the round; one point times out in round 1 and is not measured again."""
    calls = []
    times = {0: 10.0, 1: 30.0, 2: 14.0}                  # ms of a step, by round
    peaks = {0: 2e9, 1: 1e9, 2: 2e9}

    def fake_run_isolated(func_path, kwargs, **kw):
        point = (kwargs["family"], kwargs["seq_len"])
        rnd = sum(c == point for c in calls)
        calls.append(point)
        if point == ("mamba", 64) and rnd == 1:
            return {"status": "timeout", "error": "took too long", "median_ms": None}
        return {"status": "ok", "median_ms": times[rnd], "peak_flops": peaks[rnd], "peak_extra_bytes": 1000 + rnd,
                "memory_method": "VmHWM"}

    monkeypatch.setattr(memprobe, "run_isolated", fake_run_isolated)
    monkeypatch.setattr(profile, "measure_peak_flops", lambda device, threads: (1e9, "alone"))
    assert main(["profile", "--families", "transformer,mamba", "--d-model", "32", "--n-layer", "1", "--head-dim",
                 "16", "--seq-lens", "32,64", "--modes", "train", "--repeats", "1", "--threads", "1",
                 "--rounds", "3", "--out", str(tmp_path)]) == 1          # (a point timed out)
    one_round = [("transformer", 32), ("mamba", 32), ("transformer", 64), ("mamba", 64)]
    assert calls == one_round * 2 + one_round[:3]                         # side by side; the failed one not again
    rows = pd.read_csv(tmp_path / "profile.csv")
    assert list(zip(rows.family, rows.seq_len)) == [("transformer", 32), ("transformer", 64), ("mamba", 32),
                                                    ("mamba", 64)]
    ok = rows[rows.status == "ok"]
    assert (ok.rounds == 3).all() and (ok.step_ms == 14.0).all()
    assert (ok.step_ms_min == 10.0).all() and (ok.step_ms_max == 30.0).all()
    assert (ok.peak_mem_bytes == 1002).all() and (ok.peak_flops == 2e9).all()
    # MFU: the median of each round's own (tokens/s x FLOPs per token / that round's peak)
    r = ok.iloc[0]
    per_round = sorted(r.seq_len / (t / 1e3) * r.flops_per_token / p for t, p in zip(times.values(), peaks.values()))
    assert r.mfu == pytest.approx(per_round[1])
    failed = rows[rows.status != "ok"].iloc[0]
    assert (failed.family, failed.seq_len, failed.status, failed.rounds) == ("mamba", 64, "timeout", 2)
    assert json.loads((tmp_path / "profile.json").read_text())["rounds"] == 3
    captured = capsys.readouterr()
    assert "(round 3/3)" in captured.err and "3 rounds: ms" in captured.out and "10.0-30.0" in captured.out


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--rounds", "x"], ["--op", "scan", "--rounds", "2"]])
def test_a_bad_rounds_value_exits_2_with_one_line_naming_it(args, capsys):
    assert main(["profile", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rounds" in err[0]


@pytest.mark.parametrize("args", [["--compete", "x"], ["--compete", "-1"], ["--compete", "1.5"],
                                  ["--op", "scan", "--compete", "1"]])
def test_a_bad_compete_value_exits_2_with_one_line_naming_it(args, capsys):
    assert main(["profile", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compete" in err[0]


def test_a_width_that_is_not_a_multiple_of_the_head_dimension_exits_2_naming_it(capsys):
    assert main(["profile", "--d-model", "96", "--n-layer", "2", "--head-dim", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--head-dim" in err[0] and "96" in err[0]


def test_params_give_matched_shapes():
    shapes = shapes_for(["transformer", "mamba", "mamba2", "hybrid"], params=1e6)
    _, nt, pt = shapes["transformer"]
    for fam in ("mamba", "mamba2", "hybrid"):
        _, nm, pm = shapes[fam]
        assert nm == 2 * nt and abs(pm / pt - 1) < 0.1
