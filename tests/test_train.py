"""The training loop: schedule, weight-decay groups, budgets, determinism, divergence, resume after kill -9."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ssmscale import threads
from ssmscale.config import RunConfig, TrainConfig, validate
from ssmscale.models import LM, ModelConfig
from ssmscale.train import (context_gain, eval_point_steps, eval_points_tokens, eval_subset, lr_at, make_optimizer,
                            param_groups, plan_steps, run_training)


def tiny_config(tmp_path, family="transformer", **train):
    raw = {
        "name": "t", "seed": 0,
        "data": {"source": "stdlib", "max_bytes": 300_000, "cache_dir": str(tmp_path / "cache")},
        "model": {"family": family, "d_model": 32, "n_layer": 2, "head_dim": 16},
        "train": {"seq_len": 32, "batch_size": 4, "tokens": 30 * 128, "lr": 3e-3, "eval_tokens": 2048,
                  "progress": False, **train},
    }
    return validate(RunConfig, raw, "test")


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-5)
    mid = 10 + (99 - 10) // 2
    assert lrs[mid] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=0.02)


def test_weight_decay_only_on_weight_matrices():
    model = LM(ModelConfig(family="mamba", d_model=32, n_layer=2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)].split(".")[-1] for p in no_decay["params"]}
    decayed = {names[id(p)].split(".")[-1] for p in decay["params"]}
    assert {"A_log", "D", "bias", "weight"} <= exempt          # norms' weights, conv/dt biases
    assert "A_log" not in decayed and all(p.dim() >= 2 for p in decay["params"])
    dt_bias = model.blocks[0].mixer.dt_proj.bias
    assert any(p is dt_bias for p in no_decay["params"])
    assert any(p is model.blocks[0].mixer.in_proj.weight for p in decay["params"])


def test_the_fused_optimizer_step_matches_the_per_tensor_adamw_loop_with_the_same_groups():
    a, b = (LM(ModelConfig(family="mamba", d_model=32, n_layer=2)) for _ in range(2))
    b.load_state_dict(a.state_dict())
    t = TrainConfig(tokens=1000, lr=3e-3, weight_decay=0.1)
    fused = make_optimizer(a, t)
    loop = torch.optim.AdamW(param_groups(b, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps, foreach=False)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0] and fused.defaults["fused"]
    for ga, gb in zip(fused.param_groups, loop.param_groups):
        assert [p.shape for p in ga["params"]] == [p.shape for p in gb["params"]]
    start = [p.detach().clone() for p in a.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=gen) * 0.01
            pb.grad = pa.grad.clone()
        fused.step()
        loop.step()
    for p0, pa, pb in zip(start, a.parameters(), b.parameters()):
        assert not torch.equal(pa, p0)
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_weight_decay_spares_mamba2s_decay_skip_and_dt_bias():
    model = LM(ModelConfig(family="hybrid", d_model=32, n_layer=2))
    decay, no_decay = param_groups(model, 0.1)
    mixer = model.blocks[0].mixer
    exempt = {id(p) for p in no_decay["params"]}
    assert {id(mixer.A_log), id(mixer.D), id(mixer.dt_bias), id(mixer.norm.weight)} <= exempt
    assert any(p is mixer.in_proj.weight for p in decay["params"])
    assert any(p is model.blocks[1].attn.qkv.weight for p in decay["params"])


def test_token_budget_becomes_whole_steps():
    t = TrainConfig(seq_len=64, batch_size=8, tokens=10_000)
    steps, per_step = plan_steps(t)
    assert per_step == 512 and steps == 20            # 19.5 rounds to 20


@pytest.mark.parametrize("family", ["transformer", "mamba", "mamba2", "hybrid"])
def test_a_run_spends_its_budget_and_records_provenance(tmp_path, family, capsys, monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    cfg = tiny_config(tmp_path, family)
    r = run_training(cfg, tmp_path / "run", parallel_jobs=2, max_cores=2)   # 2 of the 8 cores, 2 runs
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith(f"threads: 1 (2 cores, 2 parallel runs; {threads.waiting()})"), header
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["status"] == r["status"] == "ok"
    assert r["steps"] == 30 and r["tokens"] == 30 * 4 * 32
    assert r["flops"] == pytest.approx(r["tokens"] * r["flops_per_token"])
    assert 0 < r["loss"] < math.log(256) and 0 < r["bpb"] < 8
    for key in ("params", "params_total", "seed", "config_hash", "data_fingerprint", "versions", "commit",
                "device", "wall_s", "tokens_per_s", "family"):
        assert on_disk[key] not in (None, ""), key
    assert (on_disk["threads"], on_disk["threads_reason"]) == (1, "2 cores, 2 parallel runs")
    assert on_disk["thread_waiting"] == threads.waiting()
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,tokens,train_loss") and len(rows) == 1 + 30 + 1
    assert (on_disk["scan_impl"] or "").startswith({"transformer": "", "mamba": "", "mamba2": "ssd-",
                                                    "hybrid": "ssd-"}[family])
    assert (on_disk["scan_impl"] is None) == (family == "transformer")
    assert on_disk["model_config"]["family"] == family
    # loss by position: one mean per window position, averaging to the validation loss (every position is scored)
    by_pos = on_disk["val_loss_by_position"]
    assert len(by_pos) == 32 and sum(by_pos) / 32 == pytest.approx(r["loss"], abs=1e-6)
    assert on_disk["context_gain"] == pytest.approx(sum(by_pos[:4]) / 4 - sum(by_pos[-4:]) / 4, abs=1e-5)
    # eval points: the log-spaced steps, then the end, on one subset; FLOPs spent so far at each
    curve = on_disk["eval_curve"]
    assert curve["step"] == eval_point_steps(30, 8) + [30] == [3, 4, 5, 7, 9, 13, 17, 22, 30]
    assert curve["flops"] == [s * 128 * r["flops_per_token"] for s in curve["step"]]
    assert curve["subset_tokens"] == eval_points_tokens(30 * 128, 32, 8, 2048) == 64
    logged = [row.split(",")[-1] for row in rows[1:]]
    assert sum(bool(v) for v in logged) == len(curve["step"])
    assert float(logged[-1]) == pytest.approx(curve["loss"][-1], abs=1e-6)
    assert train_s_excludes_validation(r) and on_disk["train_cpu_s"] > 0


def train_s_excludes_validation(r) -> bool:
    return 0 < r["train_s"] < r["wall_s"]


def test_eval_points_are_log_spaced_over_a_decade_and_their_subset_spans_the_set():
    assert eval_point_steps(1000, 8) == [100, 133, 178, 237, 316, 422, 562, 750]
    assert eval_point_steps(1000, 0) == [] and eval_point_steps(5, 8) == [1, 2, 3, 4]
    # ~5% of the compute: 8 points x subset <= 0.15 x training tokens, in whole windows, within the set
    assert eval_points_tokens(1_000_000, 128, 8, 262144) == 18688 == 146 * 128
    assert eval_points_tokens(1e9, 128, 8, 262144) == 262144 and eval_points_tokens(100, 128, 8, 4096) == 128
    assert eval_subset(100, 10 * 128, 128) == list(range(0, 100, 10))
    assert eval_subset(3, 10 * 128, 128) == [0, 1, 2]


def test_context_gain_is_the_first_tenth_minus_the_last_tenth():
    assert context_gain([5.0] * 10 + [3.0] * 80 + [1.0] * 10) == pytest.approx(4.0)
    assert context_gain([None, 4.0] + [2.0] * 16 + [1.0, None]) == pytest.approx(3.0)    # unscored positions skipped


def test_same_config_and_seed_give_the_same_validation_loss(tmp_path):
    a = run_training(tiny_config(tmp_path, "mamba"), tmp_path / "a")
    b = run_training(tiny_config(tmp_path, "mamba"), tmp_path / "b")
    assert a["loss"] == b["loss"] and a["bpb"] == b["bpb"]
    c = run_training(tiny_config(tmp_path, "mamba").model_copy(update={"seed": 1}), tmp_path / "c")
    assert c["loss"] != a["loss"]


def test_nan_loss_ends_the_run_as_diverged(tmp_path, monkeypatch):
    real_forward = LM.forward
    calls = {"n": 0}

    def poisoned(self, tokens, cache=None):
        out = real_forward(self, tokens, cache)
        calls["n"] += self.training          # validation forwards (eval points) do not count
        return out * float("nan") if self.training and calls["n"] > 5 else out

    monkeypatch.setattr(LM, "forward", poisoned)
    r = run_training(tiny_config(tmp_path), tmp_path / "run")
    assert r["status"] == "diverged"
    assert "loss became nan at step 5" in r["message"]
    assert r["steps"] == 5 and math.isnan(r["loss"])
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "run" / "model.pt").exists()


def _freeze_at_a_readable_checkpoint(proc, ckpt, timeout=120.0) -> int:
    """SIGSTOP the run as soon as its checkpoint exists and loads (a kill mid-write is retried): no timing race."""
    import torch
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ckpt.exists():
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                step = int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
            except Exception:
                step = 0                                  # caught while Lightning was writing it
            if step > 0:
                return step
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError(f"the run ended (exit {proc.poll()}) before a checkpoint could be caught")


def test_run_killed_mid_way_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    n_steps = 160
    cfg = tiny_config(tmp_path, tokens=n_steps * 128, checkpoint_every=10)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    clean = run_training(cfg, tmp_path / "clean")

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ssmscale.cli", "train", str(tmp_path / "cfg.yaml"),
                             "--out", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    try:
        at_step = _freeze_at_a_readable_checkpoint(proc, ckpt)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < at_step < n_steps and not (run_dir / "result.json").exists()

    resumed = run_training(cfg, run_dir)
    assert resumed["resumed_from_step"] == at_step
    assert resumed["steps"] == clean["steps"] == n_steps
    assert resumed["loss"] == pytest.approx(clean["loss"], rel=1e-6)
    steps = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:-1]]
    assert steps == list(range(1, n_steps + 1))   # no step lost or logged twice
    assert not ckpt.exists()                      # cleaned up once the run finished


def test_bpe_run_reports_bits_per_byte_consistent_with_nats_per_token(tmp_path):
    raw = tiny_config(tmp_path).model_dump(mode="json")
    raw["tokenizer"] = {"kind": "bpe", "vocab_size": 512}
    cfg = validate(RunConfig, raw, "test")
    r = run_training(cfg, tmp_path / "bpe")
    assert r["status"] == "ok" and r["data"]["tokenizer"] == "bpe-512"
    n_bytes = r["val_bytes"]
    assert n_bytes > r["val_tokens"]                       # BPE tokens cover more than one byte
    assert r["bpb"] == pytest.approx(r["loss"] * r["val_tokens"] / (math.log(2) * n_bytes), rel=1e-9)
