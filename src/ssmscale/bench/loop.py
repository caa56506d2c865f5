"""What the Lightning loop costs: the same model, batches, optimiser, schedule and clipping timed in a bare
PyTorch loop and in train.py's Lightning loop, alternating (`ssmscale profile --op loop CONFIG`).
"""

from __future__ import annotations

import statistics
import time


def loop_overhead(config_path: str, family: str | None = None, steps: int = 60, warmup: int = 10,
                  rounds: int = 2) -> dict:
    """Time the same model, batches, optimiser, schedule and clipping in a bare PyTorch loop and in
    the Lightning loop of train.py (alternating, `rounds` times each); returns per-step medians."""
    import torch
    import torch.nn.functional as F

    from .. import train as T
    from ..config import load_run_config
    from ..data import prepare_data
    from ..models import LM
    cfg = load_run_config(config_path, {"model.family": family} if family else None)
    t = cfg.train
    data = prepare_data(cfg.data, cfg.tokenizer, seq_len=t.seq_len, eval_tokens=t.eval_tokens, progress=False)
    model_cfg = T.resolve_model(cfg.model, data.vocab_size, cfg.mixers())
    n_steps = warmup + steps

    def bare() -> list[float]:
        torch.manual_seed(cfg.seed)
        model = LM(model_cfg)
        opt = T.make_optimizer(model, t)
        warm = int(t.warmup_fraction * n_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: T.lr_at(s, n_steps, warm, t.lr, t.final_lr) / t.lr)
        times = []
        for step in range(n_steps):
            start = time.perf_counter()
            x, y = data.train_batch(cfg.seed, step, t.batch_size, t.seq_len)
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100)
            loss.item()                                   # the Lightning loop reads the loss too
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return times[warmup:]

    def lightning() -> list[float]:
        L = T._lightning()
        times, marks = [], {}

        class Clock(L.Callback):
            """Time between consecutive step ends: the step plus everything the loop does around it."""

            def on_train_start(self, trainer, module):
                marks["t"] = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, idx):
                now = time.perf_counter()
                times.append(now - marks["t"])
                marks["t"] = now

        module = T.build_module(model_cfg, t, n_steps, data.val_set(t.seq_len), cfg.seed)
        accel, precision = T.resolve_device(t)
        trainer = L.Trainer(accelerator=accel, devices=1, precision=precision, max_steps=n_steps, max_epochs=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Clock()], limit_val_batches=0,
                            num_sanity_val_steps=0)
        loader = torch.utils.data.DataLoader(T.StepBatches(data, cfg.seed, n_steps, t.batch_size, t.seq_len),
                                             batch_size=None, num_workers=0)
        wall = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        wall = time.perf_counter() - wall
        return times[warmup:], wall

    bare_t, light_t, light_wall, bare_wall = [], [], [], []
    for _ in range(rounds):
        w = time.perf_counter()
        bare_t += bare()
        bare_wall.append(time.perf_counter() - w)
        lt, lw = lightning()
        light_t += lt
        light_wall.append(lw)
    tokens = t.batch_size * t.seq_len
    b, lgt = statistics.median(bare_t), statistics.median(light_t)
    return {"family": model_cfg.family, "d_model": model_cfg.d_model, "n_layer": model_cfg.n_layer,
            "tokens_per_step": tokens, "steps": steps, "rounds": rounds,
            "bare_ms": 1e3 * b, "lightning_ms": 1e3 * lgt,
            "bare_tokens_per_s": tokens / b, "lightning_tokens_per_s": tokens / lgt,
            "overhead": lgt / b - 1,
            "bare_wall_s": statistics.median(bare_wall), "lightning_wall_s": statistics.median(light_wall)}


def format_loop_overhead(r: dict) -> str:
    """loop_overhead's result as the lines `ssmscale profile --op loop` prints."""
    return "\n".join([
        f"{r['family']} d_model {r['d_model']} x {r['n_layer']} layers, {r['tokens_per_step']} tokens/step, "
        f"median of {r['steps']} steps x {r['rounds']} alternating rounds:",
        f"  bare PyTorch loop: {r['bare_ms']:.1f} ms/step, {r['bare_tokens_per_s']:,.0f} tokens/s",
        f"  Lightning loop:    {r['lightning_ms']:.1f} ms/step, {r['lightning_tokens_per_s']:,.0f} tokens/s",
        f"  Lightning overhead: {100 * r['overhead']:+.1f}% per step"])
