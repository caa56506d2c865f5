"""THE training loop, shared by every family: a LightningModule, a Trainer factory, and `run_training`.
Over ~500 lines because the one loop is read in one sitting (nanoGPT's train.py is one file for the same
reason): the module, the trainer, resume and the result record, top to bottom.

One run = one model trained on exactly its token budget:
  steps = round(tokens / (batch_size * seq_len)); the tokens and FLOPs actually spent are recorded.
AdamW (betas 0.9/0.95, weight decay on weight matrices only: norms, biases, A_log, D and the dt bias
are exempt), linear warmup then cosine decay to `final_lr` at the last step, gradient clipping,
fp32 on CPU / bf16-mixed on GPU. Batch i is a pure function of (seed, i), so a resumed run sees
the same batches and both families see the same tokens in the same order. Validation uses a fixed
held-out token set and reports nats/token, bits/byte and the mean loss at each position of the window
(does the model use its context?). `eval_points` more validations at log-spaced steps, on one fixed
subset of that set, give the loss curve Chinchilla's Approach 1 needs. `train_s` is pure training time:
the optimiser steps only, no start-up, validation or checkpointing; `train_cpu_s` is the CPU time the
process spent in those steps (for a 1-thread run: its training time on a core of its own, whatever else
the machine was doing). A NaN/inf loss ends the run as `diverged`.

Several devices (`train.devices`, `train.strategy: ddp`): `batch_size` is the global batch; each rank
trains on its rows of it, the logged loss is the mean over all ranks, and only rank 0 evaluates and
writes (metrics, logs, checkpoints, model.pt, result.json), so tokens and FLOPs are counted once.
Per-step metrics go to `metrics.csv` (METRIC_FIELDS, what resume and the report read) and, with the
same fields, to Lightning's loggers under `logs/`: CSV always, TensorBoard and W&B by `train.loggers`.

Why one file of ~600 lines: it is one run read top to bottom (pure helpers, the LightningModule and its
callbacks, then run_training), and the loop must exist exactly once; its parts share the run's state
(resume step, metrics rows, eval points) and are not used alone.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelSpec, RunConfig, TrainConfig, config_hash, dump_yaml
from .errors import UserError
from .fsutil import atomic_write_json, atomic_write_text, open_replacing
from .models import LM, ModelConfig
from .models.lm import state_bytes

LN2 = math.log(2.0)
# val_loss / val_bpb (/ val_accuracy for recall tasks): the whole validation set (eval_every, the end);
# val_subset_loss: the eval points' subset
METRIC_FIELDS = ["step", "tokens", "train_loss", "lr", "grad_norm", "elapsed_s", "val_loss", "val_bpb",
                 "val_accuracy", "flops", "val_subset_loss"]
# eval-point tokens (forward only: about a third of a training token's FLOPs) per training token: ~5% of compute
EVAL_POINTS_COST = 0.15
CONTEXT_EDGE = 0.1     # context gain: mean loss over the first 10% of window positions minus over the last 10%
# what a run writes in its folder (itself, Lightning's checkpoint and loggers): a link or a special file at
# any of them is refused before the run starts (fsutil.check_no_links), so no write leaves the folder
RUN_FILES = ("result.json", "metrics.csv", "config.yaml", "model.pt", ".run.lock", "checkpoints/last.ckpt",
             "logs/csv/hparams.yaml", "logs/csv/metrics.csv", "logs/tensorboard/hparams.yaml")
RUN_FOLDERS = ("logs/wandb",)


# ------------------------------------------------------------------------------- pure helpers
def resolve_model(spec: ModelSpec, vocab_size: int, mixers: dict | None = None) -> ModelConfig:
    """The concrete ModelConfig of a spec: its explicit shape, or the sizing rule applied to `params`.
    `mixers`: {plugin family: MixerSpec} (RunConfig.mixers()); a plugin family's is attached to its config."""
    mixer = (mixers or {}).get(spec.family)
    try:
        d_model, n_layer, knobs = spec.d_model, spec.n_layer, spec.knobs()
        if spec.params is not None:
            from .models.sizing import shape_for
            base = ModelConfig(family="transformer", d_model=spec.head_dim, n_layer=1, vocab_size=vocab_size,
                               **knobs)
            shape = shape_for(spec.family, spec.params, base, mixer=mixer)
            d_model, n_layer = shape.d_model, shape.n_layer
            if shape.d_ff is not None:
                knobs["d_ff"] = shape.d_ff
        cfg = ModelConfig(family=spec.family, d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                          mixer=mixer, **knobs)
        from .models.sizing import check_within_bounds
        check_within_bounds(cfg)
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


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (one pass over each tensor) on the CPU as on the GPU: on CPU the
    default is a per-tensor loop of ~6 elementwise ops, 2-3x slower at the 10M profile size; the fused
    step agrees with it to fp32 rounding (tests/test_train.py)."""
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=train.betas,
                             eps=train.eps, fused=True)


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


def eval_point_steps(n_steps: int, points: int) -> list[int]:
    """Steps after which the eval points validate: log-spaced over one decade, from 10% of the run to
    10^(-1/points) of it (the final validation adds the end); distinct steps in [1, n_steps - 1].
    From 5 n_steps points on, consecutive points are less than a step apart and the last rounds to n_steps,
    so every step from 10% on is one: capping `points` there gives the same steps without a loop as long
    as a huge `points` (train.eval_points may be up to limits.MAX_COUNT)."""
    points = min(points, 5 * n_steps)
    steps = {round(10.0 ** (-1.0 + i / points) * n_steps) for i in range(points)}
    return sorted(s for s in steps if 1 <= s < n_steps)


def eval_points_tokens(train_tokens: float, seq_len: int, points: int, eval_tokens: int) -> int:
    """Default size of the eval points' subset: whole windows, at least one, at most the validation set,
    with points x subset <= EVAL_POINTS_COST x the training tokens."""
    windows = int(EVAL_POINTS_COST * train_tokens / max(points, 1)) // seq_len
    return seq_len * max(1, min(windows, eval_tokens // seq_len))


def eval_subset(n_windows: int, tokens: int, seq_len: int) -> list[int]:
    """The subset's windows: evenly strided over the validation set (so it spans its documents)."""
    k = max(1, min(n_windows, tokens // seq_len))
    return [(i * n_windows) // k for i in range(k)]


def context_gain(loss_by_position) -> float:
    """Mean loss over the first CONTEXT_EDGE of window positions minus over the last (positions with no
    scored target, e.g. MQAR's, are skipped): how much a model gains from the context it has seen."""
    edge = max(1, math.ceil(CONTEXT_EDGE * len(loss_by_position)))

    def mean(xs):
        xs = [x for x in xs if x is not None and math.isfinite(x)]
        return sum(xs) / len(xs) if xs else float("nan")
    return mean(loss_by_position[:edge]) - mean(loss_by_position[-edge:])


class Diverged(Exception):
    """Raised inside the step: Lightning unwinds before any optimiser update with the bad values."""


@torch.no_grad()
def evaluate(model: LM, val, batch_size: int, device, context=None, windows=None) -> dict:
    """Nats over the fixed validation set (or only its `windows`) -> loss (nats/token), bits per byte (whole
    set only), the mean loss at each position of the window, and each window's nats and scored tokens.

    Where only some positions are scored (synthetic recall: targets -100 elsewhere), also the
    accuracy: the fraction of scored positions whose argmax over the vocabulary is the target.
    Text data scores every position and gets None (no argmax: its evaluation costs what it did)."""
    x_all, y_all, n_bytes = val
    if windows is not None:
        idx = torch.as_tensor(windows, dtype=torch.long)
        x_all, y_all, n_bytes = x_all[idx], y_all[idx], None
    sparse = bool((y_all == -100).any())
    was_training = model.training
    model.eval()
    pos_nats = torch.zeros(y_all.shape[1], dtype=torch.float64)
    pos_count = torch.zeros(y_all.shape[1], dtype=torch.int64)
    win_nats, win_tokens = [], []
    correct = 0
    for i in range(0, x_all.shape[0], batch_size):
        x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
        with (context() if context else _null()):
            logits = model(x)
        # one cross-entropy per target (ignored ones are 0), summed both ways: by position and by window
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                              reduction="none").view(y.shape).double().cpu()
        scored = (y != -100).cpu()
        pos_nats += nll.sum(0)
        pos_count += scored.sum(0)
        win_nats.append(nll.sum(1))
        win_tokens.append(scored.sum(1))
        if sparse:   # padded vocabulary rows are never targets: argmax over the real tokens only
            correct += int((logits[..., :model.cfg.vocab_size].argmax(-1) == y).sum())
    model.train(was_training)
    total, count = float(pos_nats.sum()), int(pos_count.sum())
    loss = total / max(count, 1)
    bpb = total / (LN2 * n_bytes) if n_bytes else float("nan")
    by_position = [float(n / c) if c else float("nan") for n, c in zip(pos_nats.tolist(), pos_count.tolist())]
    accuracy = correct / max(count, 1) if sparse else None
    return {"val_loss": loss, "val_bpb": bpb, "val_accuracy": accuracy, "val_tokens": count, "val_bytes": n_bytes,
            "val_loss_by_position": by_position, "window_nats": torch.cat(win_nats),
            "window_tokens": torch.cat(win_tokens)}


def subset_loss(ev: dict, windows) -> float:
    """Loss over some of the windows an `evaluate` call scored (indices into its windows)."""
    idx = torch.as_tensor(windows, dtype=torch.long)
    return float(ev["window_nats"][idx].sum()) / max(int(ev["window_tokens"][idx].sum()), 1)


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


def build_module(model_cfg: ModelConfig, train: TrainConfig, n_steps: int, val, seed: int,
                 subset: list[int] | None = None):
    L = _lightning()

    class LMModule(L.LightningModule):
        """Next-token cross-entropy on the shared LM shell; the family is only in `model_cfg`."""

        def __init__(self):
            super().__init__()
            self.model = LM(model_cfg)
            self.train_cfg, self.n_steps, self.val, self.subset = train, n_steps, val, subset
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
            opt = make_optimizer(self.model, t)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_at(s, self.n_steps, self.warmup_steps, t.lr, t.final_lr) / t.lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def run_eval(self, subset_only: bool = False) -> dict:
            """The whole validation set (its subset loss read off the same pass), or only the subset."""
            ctx = self.trainer.precision_plugin.forward_context if self._trainer else None
            ev = evaluate(self.model, self.val, self.train_cfg.batch_size, self.device, ctx,
                          windows=self.subset if subset_only else None)
            if self.subset is not None:
                ev["val_subset_loss"] = (ev["val_loss"] if subset_only else subset_loss(ev, self.subset))
            if not subset_only:
                self.last_eval = ev
            return ev

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
    """The training rows a killed run logged up to the checkpoint it resumes from (none if unreadable: a
    metrics.csv of a copied run directory may hold anything)."""
    import io

    from .safeload import CAPS, FileRefused, read_text
    if not resume_step:
        return []
    try:
        rows = [r for r in csv.DictReader(io.StringIO(read_text(path, CAPS["csv"], within=path.parent), newline=""))
                if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step and r.get("train_loss")]
        for r in rows:
            _numbers(r)         # every kept field a number, as the loggers and the eval curve read them
        return rows
    except FileNotFoundError:
        return []
    except (FileRefused, csv.Error, ValueError, TypeError) as exc:
        why = str(exc) if isinstance(exc, FileRefused) else f"{path}: unreadable ({exc})"
        print(f"{why}; the steps before step {resume_step} are not kept", file=sys.stderr)
        return []


def _numbers(row: dict) -> dict:
    """A metrics row as the loggers take it: the numeric fields except the step, empty ones dropped."""
    return {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}


def _callbacks(L, out_dir: Path, train: TrainConfig, tokens_per_step: int, resume_step: int,
               flops_per_token: float, point_steps: list[int]):
    class RunMonitor(L.Callback):
        """Per-step metrics to metrics.csv (flushed every line) and to the loggers, periodic validation,
        eval points, train-time clock. Only rank 0 evaluates and writes; metrics.csv is (re)written once
        training starts, so a run refused before that leaves none."""

        def __init__(self):
            self.path = out_dir / "metrics.csv"
            self.train_time = 0.0
            self.train_cpu = 0.0       # CPU seconds of this process in the same steps (every thread's)
            self.points = set(point_steps)
            self.curve: list[tuple[int, float]] = []    # (step, subset loss) of the eval points so far
            self._t0 = None
            self._start = time.perf_counter()
            self._f = self._w = None
            self._loggers = []

        def _open(self, loggers):
            rows = _kept_rows(self.path, resume_step)
            self._loggers = loggers
            for logger in loggers:     # the Lightning CSV log starts empty: give it the kept steps
                if isinstance(logger, L.pytorch.loggers.CSVLogger):
                    for r in rows:
                        logger.log_metrics(_numbers(r), step=int(r["step"]))
            self._f = open_replacing(self.path)
            self._w = csv.DictWriter(self._f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            self._w.writeheader()
            self._w.writerows(rows)
            self._f.flush()
            self.curve = [(int(r["step"]), float(r["val_subset_loss"])) for r in rows if r.get("val_subset_loss")]

        def on_train_start(self, trainer, module):
            if trainer.is_global_zero and self._f is None:
                self._open(trainer.loggers)
            self._start = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._c0 = time.process_time()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.train_time += time.perf_counter() - self._t0      # before any validation: not training time
            self.train_cpu += time.process_time() - self._c0
            module.log("loss", module.last_loss, prog_bar=True, logger=False)
            if not trainer.is_global_zero:
                return
            step = trainer.global_step
            # the learning rate this step used (the scheduler has already moved on to the next one)
            lr = lr_at(step - 1, module.n_steps, module.warmup_steps, train.lr, train.final_lr)
            row = {"step": step, "tokens": step * tokens_per_step, "train_loss": module.last_loss,
                   "lr": lr, "grad_norm": module.last_grad_norm,
                   "elapsed_s": round(time.perf_counter() - self._start, 3),
                   "flops": step * tokens_per_step * flops_per_token}
            ev = None
            if train.eval_every and step % train.eval_every == 0 and step < module.n_steps:
                ev = module.run_eval()
                row.update(val_loss=ev["val_loss"], val_bpb=ev["val_bpb"], val_accuracy=ev["val_accuracy"])
                module.log("val_bpb", ev["val_bpb"], prog_bar=True, logger=False)
            if step in self.points:
                ev = ev or module.run_eval(subset_only=True)
                row["val_subset_loss"] = ev["val_subset_loss"]
                self.curve.append((step, ev["val_subset_loss"]))
            self._write(row)

        def _write(self, row: dict):
            self._w.writerow(row)
            self._f.flush()
            for logger in self._loggers:
                logger.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

        def write_final(self, step, ev, loggers=()):
            if self._f is None:      # not rank 0, or training never started (a run resumed at its last step)
                if ev is None:
                    return
                self._open(loggers)
            if ev is not None:
                row = {"step": step, "tokens": step * tokens_per_step, "val_loss": ev["val_loss"],
                       "val_bpb": ev["val_bpb"], "val_accuracy": ev["val_accuracy"],
                       "flops": step * tokens_per_step * flops_per_token}
                if "val_subset_loss" in ev:
                    row["val_subset_loss"] = ev["val_subset_loss"]
                    self.curve.append((step, ev["val_subset_loss"]))
                self._write(row)
            self._f.close()
            for logger in self._loggers:
                logger.finalize("success" if ev is not None else "failed")

        def eval_curve(self, subset_tokens: int) -> dict:
            """The eval points (and the end) as columns, for Approach 1: tokens and FLOPs spent so far."""
            steps = [s for s, _ in self.curve]
            return {"subset_tokens": subset_tokens, "step": steps, "tokens": [s * tokens_per_step for s in steps],
                    "flops": [s * tokens_per_step * flops_per_token for s in steps],
                    "loss": [round(v, 6) for _, v in self.curve]}

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
                 extra: dict | None = None, parallel_jobs: int = 1, max_cores: int | None = None,
                 announce: bool = True) -> dict:
    """Train one model on its token budget; write out_dir/result.json atomically and return it.

    An unfinished run with a checkpoint in out_dir resumes from it. `extra` is merged into the
    result (the ladder adds run_id, budget, ...). `parallel_jobs`: runs sharing this machine's
    cores, `max_cores`: a cap on the cores counted (threads.py); `announce`: print the run header."""
    from . import flops as flops_mod
    from . import threads
    from .data import prepare_data
    from .provenance import provenance

    from .fsutil import check_no_links, check_writable_dir
    from .safeload import FileRefused, load_checkpoint, state_dict_mismatch

    out_dir = Path(out_dir)
    check_writable_dir(out_dir, "run directory")
    check_no_links(out_dir, RUN_FILES, RUN_FOLDERS)
    t = cfg.train
    cores = min(threads.available_cores(), max_cores) if max_cores else None
    thread_choice = threads.apply(threads.choose(t.num_threads, jobs=parallel_jobs, cores=cores))
    accelerator, precision = resolve_device(t)
    data = prepare_data(cfg.data, cfg.tokenizer, seq_len=t.seq_len, eval_tokens=t.eval_tokens,
                        progress=t.progress)
    model_cfg = resolve_model(cfg.model, data.vocab_size, cfg.mixers())
    plugin = _admit_plugin(model_cfg) if model_cfg.is_plugin else None
    n_steps, tokens_per_step = plan_steps(t)
    cost = flops_mod.flops_summary(model_cfg, t.seq_len)
    if plugin is not None:
        plugin["flops"] = cost["measured"]
    if announce:
        print(f"{cfg.name}: {model_cfg.family} d_model {model_cfg.d_model} x {model_cfg.n_layer} layers, "
              f"{n_steps * tokens_per_step:,} tokens in {n_steps} steps on {accelerator}; "
              f"{thread_choice.describe()}", flush=True)
        if getattr(data, "chunking", None):
            print(f"data: {data.chunking}", flush=True)

    ckpt = out_dir / "checkpoints" / "last.ckpt"
    resume_step, saved = 0, None
    if ckpt.exists():
        # weights-only: a checkpoint in a copied run directory must not run code. One that is refused
        # (cut short by a kill, or not a plain checkpoint) is set aside and the run starts over: batches are
        # a function of (seed, step), so that gives the same result, only later
        try:
            saved = load_checkpoint(ckpt, within=out_dir)
            resume_step = saved["global_step"]
        except FileRefused as exc:
            print(f"{exc}; {_set_aside(ckpt)}, starting the run over", file=sys.stderr)
    val = data.val_set(t.seq_len)
    point_steps = eval_point_steps(n_steps, t.eval_points) if t.eval_points else []
    subset_tokens = t.eval_points_tokens or eval_points_tokens(n_steps * tokens_per_step, t.seq_len,
                                                               t.eval_points, t.eval_tokens)
    subset = eval_subset(val[0].shape[0], subset_tokens, t.seq_len) if t.eval_points else None
    # the selective scan resolves (and the fused kernel compiles) here, before the training clock starts
    scan_impl = _scan_impl_name(model_cfg, accelerator)

    L = _lightning()
    module = build_module(model_cfg, t, n_steps, val, cfg.seed, subset)
    if saved is not None and (problem := state_dict_mismatch(saved["state_dict"], module.state_dict())):
        print(f"{ckpt}: refused, {problem}; {_set_aside(ckpt)}, starting the run over", file=sys.stderr)
        resume_step = 0
    del saved
    callbacks = _callbacks(L, out_dir, t, tokens_per_step, resume_step, cost["train_flops_per_token"],
                           point_steps)
    monitor = callbacks[0]
    if t.progress:
        callbacks.append(_progress_bar(L, progress_position))
    try:
        trainer = L.Trainer(
            accelerator=accelerator, devices=t.devices, precision=precision,
            strategy="ddp" if t.devices > 1 else t.strategy,   # never Lightning's in-notebook ddp_fork
            max_steps=n_steps, max_epochs=1, logger=_loggers(L, cfg, out_dir, resume_step),
            enable_checkpointing=bool(t.checkpoint_every),
            enable_progress_bar=t.progress, enable_model_summary=False, callbacks=callbacks,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out_dir),
            deterministic=accelerator == "cpu")
    except (ValueError, L.fabric.utilities.exceptions.MisconfigurationException) as exc:
        # Lightning refuses this device / strategy / precision combination (before anything is written)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"train: accelerator {accelerator}, devices {t.devices}, strategy {t.strategy}, "
                        f"precision {precision}: {first}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg.model_dump(mode="json")))
    hparams = cfg.model_dump(mode="json")
    for logger in trainer.loggers:      # rank 0 only (Lightning's loggers write on rank 0)
        logger.log_hyperparams(hparams)
    loader = torch.utils.data.DataLoader(
        StepBatches(data, cfg.seed, n_steps, t.batch_size, t.seq_len, start_step=resume_step),
        batch_size=None, num_workers=0)

    start = time.perf_counter()
    status, message = "ok", ""
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt) if resume_step else None,
                    weights_only=True)
    except Diverged as exc:
        status, message = "diverged", str(exc)
        print(f"run diverged: {exc}", file=sys.stderr)
    except (RuntimeError, MemoryError) as exc:   # e.g. out of memory: recorded, not a crash of the ladder
        status, message = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    steps_done = trainer.global_step
    if not trainer.is_global_zero:     # multi-process strategies: rank 0 evaluates and writes the result
        return {"status": status, "message": message, "global_rank": trainer.global_rank}
    ev = {"val_loss": float("nan"), "val_bpb": float("nan"), "val_accuracy": None, "val_tokens": 0,
          "val_bytes": None, "val_loss_by_position": None}
    if status == "ok":
        ev = module.run_eval()
    monitor.write_final(steps_done, ev if status == "ok" else None, trainer.loggers)
    wall = time.perf_counter() - start
    tokens = steps_done * tokens_per_step
    result = {
        "status": status, "message": message,
        "family": model_cfg.family, "d_model": model_cfg.d_model, "n_layer": model_cfg.n_layer,
        "params": cost["params"], "params_total": cost["params_total"],
        "state_bytes": state_bytes(model_cfg, 1, t.seq_len),
        "tokens": tokens, "steps": steps_done, "planned_steps": n_steps,
        "flops": tokens * cost["train_flops_per_token"],
        "flops_per_token": cost["train_flops_per_token"], "ratio_to_6n": cost["ratio_to_6n"],
        "flops_convention": cost["flops_convention"],
        "loss": ev["val_loss"], "bpb": ev["val_bpb"], "val_accuracy": ev["val_accuracy"],
        "val_tokens": ev["val_tokens"], "val_bytes": ev["val_bytes"],
        "val_loss_by_position": (None if ev["val_loss_by_position"] is None    # null: no target at a position
                                 else [round(v, 6) if math.isfinite(v) else None for v in ev["val_loss_by_position"]]),
        "context_gain": (None if ev["val_loss_by_position"] is None
                         else round(context_gain(ev["val_loss_by_position"]), 6)),
        "eval_curve": monitor.eval_curve(len(subset) * t.seq_len) if subset is not None else None,
        "final_train_loss": module.last_loss,
        "lr": t.lr, "seq_len": t.seq_len, "batch_size": t.batch_size, "seed": cfg.seed,
        "wall_s": round(wall, 3), "train_s": round(monitor.train_time, 3),
        "train_cpu_s": round(monitor.train_cpu, 3),
        "tokens_per_s": ((steps_done - resume_step) * tokens_per_step / monitor.train_time
                         if monitor.train_time > 0 else float("nan")),
        "resumed_from_step": resume_step,
        # when the run ended (UTC): a forecast of its budget is scored as one only if made before this
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "config_hash": config_hash(cfg, plugin and plugin["sha256"]), "data_fingerprint": data.fingerprint,
        **({"mixer": plugin, "mixer_sha256": plugin["sha256"]} if plugin is not None else {}),
        "precision": precision, "scan_impl": scan_impl,
        "threads": thread_choice.threads, "threads_reason": thread_choice.reason,
        "thread_waiting": threads.waiting(),
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


def _admit_plugin(model_cfg: ModelConfig) -> dict:
    """A plugin family's admission checks (once per process and code version) and what its result records:
    the mixer's class, options, file and sha256, and the checks it passed."""
    from .models.admission import admit_plugin
    report = admit_plugin(model_cfg.mixer, model_cfg.d_model, model_cfg.family)
    return {**model_cfg.mixer.provenance(), "admission": report.lines, "admission_precision": report.dtype,
            "can_generate": report.can_generate}


def _set_aside(ckpt: Path) -> str:
    """Rename a refused checkpoint out of the run's way (never delete a file the run did not write)."""
    import uuid
    aside = ckpt.with_name(f"{ckpt.name}.refused-{uuid.uuid4().hex[:8]}")
    os.rename(ckpt, aside)
    return f"moved to {aside.name}"


def _scan_impl_name(model_cfg: ModelConfig, accelerator: str) -> str | None:
    from .models.lm import kernel_impl
    return kernel_impl(model_cfg, "cuda" if accelerator == "gpu" else "cpu")


def _save_weights(model, path: Path):
    import io
    from .fsutil import atomic_write_bytes
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
