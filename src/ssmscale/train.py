"""THE training loop, shared by every family: a LightningModule, a Trainer factory, and `run_training`.

One run = one model trained on exactly its token budget:
  steps = round(tokens / (batch_size * seq_len)); the tokens and FLOPs actually spent are recorded.
AdamW (betas 0.9/0.95, weight decay on weight matrices only: norms, biases, A_log, D and the dt bias
are exempt), linear warmup then cosine decay to `final_lr` at the last step, gradient clipping,
fp32 on CPU / bf16-mixed on GPU. Batch i is a pure function of (seed, i), so a resumed run sees
the same batches and both families see the same tokens in the same order. Validation uses a fixed
held-out token set and reports nats/token and bits/byte. A NaN/inf loss ends the run as `diverged`.

Several devices (`train.devices`, `train.strategy: ddp`): `batch_size` is the global batch; each rank
trains on its rows of it, the logged loss is the mean over all ranks, and only rank 0 evaluates and
writes (metrics, logs, checkpoints, model.pt, result.json), so tokens and FLOPs are counted once.
Per-step metrics go to `metrics.csv` (METRIC_FIELDS, what resume and the report read) and, with the
same fields, to Lightning's loggers under `logs/`: CSV always, TensorBoard and W&B by `train.loggers`.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelSpec, RunConfig, TrainConfig, config_hash
from .errors import UserError
from .fsutil import atomic_write_json, atomic_write_text
from .models import LM, ModelConfig

LN2 = math.log(2.0)
METRIC_FIELDS = ["step", "tokens", "train_loss", "lr", "grad_norm", "elapsed_s", "val_loss", "val_bpb"]


# ------------------------------------------------------------------------------- pure helpers
def resolve_model(spec: ModelSpec, vocab_size: int) -> ModelConfig:
    """The concrete ModelConfig of a spec: its explicit shape, or the sizing rule applied to `params`."""
    try:
        cfg = ModelConfig(family=spec.family, d_model=spec.d_model or spec.head_dim,
                          n_layer=spec.n_layer or 1, vocab_size=vocab_size, head_dim=spec.head_dim,
                          d_ff=spec.d_ff, d_state=spec.d_state, d_conv=spec.d_conv, expand=spec.expand,
                          dt_rank=spec.dt_rank, scan_impl=spec.scan_impl)
        if spec.params is not None:
            from .models.sizing import shape_for
            shape = shape_for(spec.family, spec.params, cfg)
            cfg = cfg.replace(d_model=shape.d_model, n_layer=shape.n_layer)
        return cfg
    except ValueError as exc:
        raise UserError(f"model.{exc}") from None


def plan_steps(train: TrainConfig) -> tuple[int, int]:
    """(steps, tokens_per_step) that spend the token budget: the nearest whole number of steps (>= 1)."""
    per_step = train.batch_size * train.seq_len
    return max(1, round(train.tokens / per_step)), per_step


def lr_at(step: int, n_steps: int, warmup_steps: int, lr: float, final_lr: float) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warmup, then cosine to final_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, n_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices (>= 2-D) only; norms, biases and params marked `_no_weight_decay` are exempt."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(train: TrainConfig) -> tuple[str, str]:
    """(accelerator, precision) after resolving 'auto'."""
    accel = train.accelerator
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
    if accel == "gpu" and not torch.cuda.is_available():
        raise UserError("train.accelerator: 'gpu' requested but CUDA is not available")
    precision = train.precision
    if precision == "auto":
        precision = "bf16-mixed" if accel == "gpu" else "32"
    return accel, ("32-true" if precision == "32" else precision)


class Diverged(Exception):
    """Raised inside the step: Lightning unwinds before any optimiser update with the bad values."""


@torch.no_grad()
def evaluate(model: LM, val, batch_size: int, device, context=None) -> dict:
    """Sum of nats over the fixed validation set -> loss (nats/token) and bits per byte."""
    x_all, y_all, n_bytes = val
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, x_all.shape[0], batch_size):
        x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
        with (context() if context else _null()):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    bpb = total / (LN2 * n_bytes) if n_bytes else float("nan")
    return {"val_loss": loss, "val_bpb": bpb, "val_tokens": count, "val_bytes": n_bytes}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------ Lightning part
def _lightning():
    import warnings

    import lightning as L  # heavy (~4 s): imported only when training
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # notices that do not apply to this loop: batches are a function of the step (so a resumed
    # run continues exactly), the IterableDataset runs in the main process, checkpoints overwrite, the
    # ladder submits Slurm jobs itself (srun hint), RunMonitor logs every step itself (logging interval)
    for pattern in (".*IterableDataset.*has `__len__`", ".*resuming from a checkpoint that ended before",
                    ".*Checkpoint directory .* exists and is not empty", ".*LeafSpec.*is deprecated",
                    ".*does not have many workers", ".*Total length of .* across ranks is zero",
                    ".*The `srun` command is available on your system but is not used",
                    ".*Experiment logs directory .* exists and is not empty",
                    ".*smaller than the logging interval"):
        warnings.filterwarnings("ignore", message=pattern)
    return L


def build_module(model_cfg: ModelConfig, train: TrainConfig, n_steps: int, val, seed: int):
    L = _lightning()

    class LMModule(L.LightningModule):
        """Next-token cross-entropy on the shared LM shell; the family is only in `model_cfg`."""

        def __init__(self):
            super().__init__()
            self.model = LM(model_cfg)
            self.train_cfg, self.n_steps, self.val = train, n_steps, val
            self.warmup_steps = int(train.warmup_fraction * n_steps)
            self.last_eval: dict = {}
            self.last_loss = float("nan")
            self.last_grad_norm = float("nan")

        def training_step(self, batch, batch_idx):
            x, y = batch
            world = self.trainer.world_size
            if world > 1:   # batch_size is the global batch: each rank trains on its own rows
                x, y = x[self.global_rank::world], y[self.global_rank::world]
            logits = self.model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
            # the global batch's loss (ranks hold equal rows); every rank sees it, so all stop together
            value = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean").item() \
                if world > 1 else loss.item()
            self.last_loss = value
            if not math.isfinite(value):
                raise Diverged(f"loss became {value} at step {self.global_step}")
            return loss

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            params = [p for p in self.parameters() if p.grad is not None]
            clip = self.train_cfg.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            self.last_grad_norm = norm.item()
            if not math.isfinite(self.last_grad_norm):
                raise Diverged(f"gradient norm became {self.last_grad_norm} at step {self.global_step}")

        def configure_optimizers(self):
            t = self.train_cfg
            fused = {"fused": True} if torch.cuda.is_available() and t.accelerator != "cpu" else {}
            opt = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=t.betas,
                                    eps=t.eps, **fused)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_at(s, self.n_steps, self.warmup_steps, t.lr, t.final_lr) / t.lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def run_eval(self) -> dict:
            ctx = self.trainer.precision_plugin.forward_context if self._trainer else None
            self.last_eval = evaluate(self.model, self.val, self.train_cfg.batch_size, self.device, ctx)
            return self.last_eval

    torch.manual_seed(seed)
    return LMModule()


class StepBatches(torch.utils.data.IterableDataset):
    """Batches start_step .. n_steps - 1, each a pure function of (seed, step).

    The length is the whole run (n_steps) even when resuming: Lightning restores its batch counter
    from the checkpoint and ends the epoch when that counter reaches the length."""

    def __init__(self, data, seed, n_steps, batch_size, seq_len, start_step=0):
        self.data, self.seed, self.n_steps = data, seed, n_steps
        self.batch_size, self.seq_len, self.start_step = batch_size, seq_len, start_step

    def __iter__(self):
        for step in range(self.start_step, self.n_steps):
            yield self.data.train_batch(self.seed, step, self.batch_size, self.seq_len)

    def __len__(self):
        return self.n_steps


def _kept_rows(path: Path, resume_step: int) -> list[dict]:
    """The training rows a killed run logged up to the checkpoint it resumes from."""
    if not resume_step or not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                and int(r["step"]) <= resume_step and r.get("train_loss")]


def _numbers(row: dict) -> dict:
    """A metrics row as the loggers take it: the numeric fields except the step, empty ones dropped."""
    return {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}


def _callbacks(L, out_dir: Path, train: TrainConfig, tokens_per_step: int, resume_step: int):
    class RunMonitor(L.Callback):
        """Per-step metrics to metrics.csv (flushed every line) and to the loggers, periodic validation,
        train-time clock. Only rank 0 evaluates and writes; the files open once the ranks are known."""

        def __init__(self):
            self.path = out_dir / "metrics.csv"
            self.train_time = 0.0
            self._t0 = None
            self._start = time.perf_counter()
            self._f = self._w = None
            self._loggers = []

        def setup(self, trainer, module, stage):
            if not trainer.is_global_zero or self._f is not None:
                return
            rows = _kept_rows(self.path, resume_step)
            self._loggers = trainer.loggers
            for logger in self._loggers:     # the Lightning CSV log starts empty: give it the kept steps
                if isinstance(logger, L.pytorch.loggers.CSVLogger):
                    for r in rows:
                        logger.log_metrics(_numbers(r), step=int(r["step"]))
            self._f = open(self.path, "w", newline="")
            self._w = csv.DictWriter(self._f, fieldnames=METRIC_FIELDS)
            self._w.writeheader()
            self._w.writerows(rows)
            self._f.flush()

        def on_train_start(self, trainer, module):
            self._start = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.train_time += time.perf_counter() - self._t0
            module.log("loss", module.last_loss, prog_bar=True, logger=False)
            if not trainer.is_global_zero:
                return
            step = trainer.global_step
            # the learning rate this step used (the scheduler has already moved on to the next one)
            lr = lr_at(step - 1, module.n_steps, module.warmup_steps, train.lr, train.final_lr)
            row = {"step": step, "tokens": step * tokens_per_step, "train_loss": module.last_loss,
                   "lr": lr, "grad_norm": module.last_grad_norm,
                   "elapsed_s": round(time.perf_counter() - self._start, 3)}
            if train.eval_every and step % train.eval_every == 0 and step < module.n_steps:
                ev = module.run_eval()
                row.update(val_loss=ev["val_loss"], val_bpb=ev["val_bpb"])
                module.log("val_bpb", ev["val_bpb"], prog_bar=True, logger=False)
            self._write(row)

        def _write(self, row: dict):
            self._w.writerow(row)
            self._f.flush()
            for logger in self._loggers:
                logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])

        def write_final(self, step, ev):
            if self._f is None:       # not rank 0, or training never started
                return
            if ev is not None:
                self._write({"step": step, "tokens": step * tokens_per_step, "val_loss": ev["val_loss"],
                             "val_bpb": ev["val_bpb"]})
            self._f.close()
            for logger in self._loggers:
                logger.finalize("success" if ev is not None else "failed")

    callbacks = [RunMonitor()]
    if train.checkpoint_every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=out_dir / "checkpoints", filename="last", every_n_train_steps=train.checkpoint_every,
            save_top_k=1, save_last=False, enable_version_counter=False))
    return callbacks


def _loggers(L, cfg: RunConfig, out_dir: Path, resume_step: int) -> list:
    """Lightning's loggers under out_dir/logs/: csv/ always, tensorboard/ and wandb/ when configured.
    A resumed run's TensorBoard log drops the killed run's steps after the checkpoint (purge_step);
    its W&B run continues under the same id."""
    from .provenance import stable_hash
    loggers = L.pytorch.loggers
    save_dir = out_dir / "logs"
    out = [loggers.CSVLogger(save_dir, name="", version="csv")]
    if "tensorboard" in cfg.train.loggers:
        out.append(loggers.TensorBoardLogger(save_dir, name="", version="tensorboard", default_hp_metric=False,
                                             purge_step=resume_step + 1 if resume_step else None))
    if "wandb" in cfg.train.loggers:
        study, _, run = cfg.name.rpartition("/")
        out.append(loggers.WandbLogger(project=study or cfg.name, name=run, save_dir=str(save_dir),
                                       id=stable_hash(str(out_dir.resolve())), resume="allow"))
    hparams = cfg.model_dump(mode="json")
    for logger in out:
        logger.log_hyperparams(hparams)
    return out


def _progress_bar(L, position: int):
    class Bar(L.pytorch.callbacks.TQDMProgressBar):
        def get_metrics(self, trainer, module):
            items = super().get_metrics(trainer, module)
            items.pop("v_num", None)
            return items

    return Bar(leave=position == 0, process_position=position)


# ------------------------------------------------------------------------------------ one run
def run_training(cfg: RunConfig, out_dir: str | Path, *, progress_position: int = 0,
                 extra: dict | None = None) -> dict:
    """Train one model on its token budget; write out_dir/result.json atomically and return it.

    An unfinished run with a checkpoint in out_dir resumes from it. `extra` is merged into the
    result (the ladder adds run_id, budget, ...)."""
    from . import flops as flops_mod
    from .data import prepare_data
    from .provenance import provenance

    out_dir = Path(out_dir)
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    accelerator, precision = resolve_device(t)
    data = prepare_data(cfg.data, cfg.tokenizer, seq_len=t.seq_len, eval_tokens=t.eval_tokens,
                        progress=t.progress)
    model_cfg = resolve_model(cfg.model, data.vocab_size)
    n_steps, tokens_per_step = plan_steps(t)
    cost = flops_mod.flops_summary(model_cfg, t.seq_len)

    out_dir.mkdir(parents=True, exist_ok=True)
    import yaml
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    ckpt = out_dir / "checkpoints" / "last.ckpt"
    resume_step = 0
    if ckpt.exists():
        try:
            resume_step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        except Exception:  # a checkpoint cut short by a kill: start over
            print(f"ignoring unreadable checkpoint {ckpt}", file=sys.stderr)
            ckpt.unlink()
    val = data.val_set(t.seq_len)

    L = _lightning()
    module = build_module(model_cfg, t, n_steps, val, cfg.seed)
    callbacks = _callbacks(L, out_dir, t, tokens_per_step, resume_step)
    monitor = callbacks[0]
    if t.progress:
        callbacks.append(_progress_bar(L, progress_position))
    trainer = L.Trainer(
        accelerator=accelerator, devices=t.devices, precision=precision,
        strategy="ddp" if t.devices > 1 else t.strategy,   # never Lightning's in-notebook ddp_fork
        max_steps=n_steps, max_epochs=1, logger=_loggers(L, cfg, out_dir, resume_step),
        enable_checkpointing=bool(t.checkpoint_every),
        enable_progress_bar=t.progress, enable_model_summary=False, callbacks=callbacks,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out_dir),
        deterministic=accelerator == "cpu")
    loader = torch.utils.data.DataLoader(
        StepBatches(data, cfg.seed, n_steps, t.batch_size, t.seq_len, start_step=resume_step),
        batch_size=None, num_workers=0)

    start = time.perf_counter()
    status, message = "ok", ""
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt) if resume_step else None)
    except Diverged as exc:
        status, message = "diverged", str(exc)
        print(f"run diverged: {exc}", file=sys.stderr)
    except (RuntimeError, MemoryError) as exc:   # e.g. out of memory: recorded, not a crash of the ladder
        status, message = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    steps_done = trainer.global_step
    if not trainer.is_global_zero:     # multi-process strategies: rank 0 evaluates and writes the result
        return {"status": status, "message": message, "global_rank": trainer.global_rank}
    ev = {"val_loss": float("nan"), "val_bpb": float("nan"), "val_tokens": 0, "val_bytes": None}
    if status == "ok":
        ev = module.run_eval()
    monitor.write_final(steps_done, ev if status == "ok" else None)
    wall = time.perf_counter() - start
    tokens = steps_done * tokens_per_step
    result = {
        "status": status, "message": message,
        "family": model_cfg.family, "d_model": model_cfg.d_model, "n_layer": model_cfg.n_layer,
        "params": cost["params"], "params_total": cost["params_total"],
        "tokens": tokens, "steps": steps_done, "planned_steps": n_steps,
        "flops": tokens * cost["train_flops_per_token"],
        "flops_per_token": cost["train_flops_per_token"], "ratio_to_6n": cost["ratio_to_6n"],
        "flops_convention": cost["flops_convention"],
        "loss": ev["val_loss"], "bpb": ev["val_bpb"], "val_tokens": ev["val_tokens"], "val_bytes": ev["val_bytes"],
        "final_train_loss": module.last_loss,
        "lr": t.lr, "seq_len": t.seq_len, "batch_size": t.batch_size, "seed": cfg.seed,
        "wall_s": round(wall, 3), "train_s": round(monitor.train_time, 3),
        "tokens_per_s": ((steps_done - resume_step) * tokens_per_step / monitor.train_time
                         if monitor.train_time > 0 else float("nan")),
        "resumed_from_step": resume_step,
        "config_hash": config_hash(cfg), "data_fingerprint": data.fingerprint,
        "precision": precision, "scan_impl": _scan_impl_name(model_cfg, accelerator),
        **provenance("cuda" if accelerator == "gpu" else "cpu"),
        "data": data.describe(), "model_config": model_cfg.to_dict(),
        **(extra or {}),
    }
    if status == "ok":
        _save_weights(module.model, out_dir / "model.pt")
        if ckpt.exists():
            ckpt.unlink()
    atomic_write_json(out_dir / "result.json", result)
    return result


def _scan_impl_name(model_cfg: ModelConfig, accelerator: str) -> str | None:
    if model_cfg.family != "mamba":
        return None
    from .ops.scan import resolve_impl
    return resolve_impl(model_cfg.scan_impl, "cuda" if accelerator == "gpu" else "cpu").name


def _save_weights(model, path: Path):
    import io
    from .fsutil import atomic_write_bytes
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
