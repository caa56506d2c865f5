"""One typed, validated configuration schema (pydantic v2), loaded from YAML.

Why pydantic: it validates nested, typed schemas and reports the exact key path of every problem
(`train.lr`, `ladder.budgets.2`), forbids unknown keys with one flag, and costs ~0.1 s to import.
YAML is read with YAML 1.2's number rule (unquoted 3e-3 and 1e5 are numbers, as YAML 1.1 would not
have them) and a duplicate key is an error; after that the schema is strict: unknown keys, wrong types
(a number must be a number: `true` and "128" are not), impossible values and sizes beyond what can
exist (limits.py) are errors naming the key path. Names are plain names (they become folder names).
Reading a YAML file and loading a config from it: load.py; the `sweep:` axes: sweep.py.
Plugin families (`custom_families`, models/plugin.py) are described, never imported, here: a relative
mixer file path is made absolute against the config file's folder when the file is loaded, so the
config a study saves names the same file; fit and report read configs and run nothing.
Over ~500 lines because it is the config reference: every key (run, ladder, plugin, Slurm) with its rule
beside its field, read top to bottom; splitting it would scatter one schema over several files.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_serializer,
                      model_validator)

from .. import limits
from ..errors import shorten
from ..fsutil import is_plain_name
from ..models.config import FAMILIES, HYBRID_SSMS, RESERVED_NAMES, SSD_IMPLS, plugin_name_ok
from ..models.plugin import MixerSpec, split_target

Family = Literal[FAMILIES]

PositiveInt = Annotated[int, Field(gt=0, le=limits.MAX_COUNT)]
Count = Annotated[int, Field(ge=0, le=limits.MAX_COUNT)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Width = Annotated[int, Field(gt=0, le=limits.MAX_WIDTH)]
Layers = Annotated[int, Field(gt=0, le=limits.MAX_LAYERS)]
Vocab = Annotated[int, Field(gt=0, le=limits.MAX_VOCAB)]
Params = Annotated[float, Field(gt=0, le=limits.MAX_PARAMS)]
Flops = Annotated[float, Field(gt=0, le=limits.MAX_FLOPS)]
Seed = Annotated[int, Field(ge=0, le=limits.MAX_SEED)]
# Lightning strategies this loop runs under (its batch rows are split per rank in training_step)
STRATEGIES = ("auto", "ddp")

def _plain_name(value: str, segments: bool = False) -> str:
    parts = value.split("/") if segments else [value]
    if not all(is_plain_name(p, max_len=100) for p in parts):
        what = "plain names joined by '/'" if segments else "a plain name"
        raise ValueError(f"must be {what} (letters, digits, '_', '.', '-', '+', '='; not starting with '.' "
                         f"or '-'; at most 100 characters), got {shorten(value)}")
    return value


class _Strict(BaseModel):
    # strict: YAML's `true` or "128" is not taken for a number, nor 1 for `true`
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MQARConfig(_Strict):
    """Multi-query associative recall (Zoology): keys from one half of the vocabulary, values from the other."""
    vocab_size: Vocab = 256
    num_kv_pairs: PositiveInt = 8
    num_examples: PositiveInt = 20000


class DataConfig(_Strict):
    source: Literal["stdlib", "files", "hf", "synthetic"] = "stdlib"
    paths: list[str] = Field(default_factory=list)     # files: local text / jsonl / parquet (globs allowed)
    text_field: str = "text"                           # files / hf: the column holding the text
    hf_name: str | None = None                         # hf: dataset name on the hub (or a local dataset folder)
    hf_config: str | None = None
    hf_split: str = "train"
    max_bytes: Annotated[int, Field(gt=0, le=limits.MAX_BYTES)] | None = None  # corpus cap (the first bytes in order)
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    # cut documents into pieces of at most this many bytes at paragraph ends (data/corpus.py); unset: a
    # corpus of one document (a single text file) is cut into 4096-byte pieces, others are read whole
    chunk_bytes: Annotated[int, Field(ge=64, le=limits.MAX_BYTES)] | None = None
    synthetic: MQARConfig | None = None
    cache_dir: str | None = None                       # default: $SSMSCALE_CACHE or ~/.cache/ssmscale

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "files" and not self.paths:
            raise ValueError("paths: source 'files' needs at least one path")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("hf_name: source 'hf' needs a dataset name")
        return self


class TokenizerConfig(_Strict):
    kind: Literal["byte", "bpe"] = "byte"
    vocab_size: Vocab = 256                            # bpe: the trained vocabulary size

    @model_validator(mode="after")
    def _sizes(self):
        if self.kind == "byte" and self.vocab_size != 256:
            raise ValueError("vocab_size: the byte tokenizer has exactly 256 tokens")
        if self.kind == "bpe" and self.vocab_size < 260:
            raise ValueError("vocab_size: a BPE vocabulary needs more than the 256 byte tokens")
        return self


class ModelDefaults(_Strict):
    """Per-family knobs shared by every size of a ladder (shapes come from `sizes`); the names and
    defaults are models.ModelConfig's (see its module docstring for the Mamba-2 and hybrid ones)."""
    head_dim: Width = 32                               # attention (transformer, hybrid)
    d_ff: Width | None = None
    d_state: Width = 16                                # Mamba
    d_conv: Width = 4                                  # Mamba, Mamba-2
    expand: Width = 2                                  # Mamba, Mamba-2
    dt_rank: Width | None = None
    scan_impl: Literal["auto", "fused", "chunked", "ref", "triton"] = "auto"   # ops.selective_scan impl
    mamba2_head_dim: Width = 8
    mamba2_d_state: Width = 16
    mamba2_ngroups: Width = 1
    mamba2_chunk_size: Width = 8                       # the SSD's chunk: speed (and counted FLOPs), not results
    ssd_impl: Literal[SSD_IMPLS] = "auto"              # ops.ssd impl
    hybrid_ssm: Literal[HYBRID_SSMS] = "mamba2"        # the hybrid's SSM layers
    hybrid_attn_every: Layers = 8                      # about one attention layer in this many (at least one)
    hybrid_attn_layers: list[Annotated[int, Field(ge=0, le=limits.MAX_LAYERS)]] | None = None   # or exactly these layer indices

    @field_validator("head_dim")
    @classmethod
    def _rotary_pairs(cls, value):
        if value % 2:
            raise ValueError(f"must be even (rotary position embeddings turn channels in pairs), got {value}")
        return value

    def knobs(self) -> dict:
        """The ModelConfig keyword arguments these knobs set."""
        return self.model_dump(include=set(ModelDefaults.model_fields))


class ModelSpec(ModelDefaults):
    """One model: the family knobs plus either an explicit shape (d_model, n_layer) or a target
    non-embedding parameter count. `family`: a built-in family or one of the config's custom_families."""
    family: str = "transformer"
    d_model: Width | None = None
    n_layer: Layers | None = None
    params: Params | None = None

    @model_validator(mode="after")
    def _shape(self):
        explicit = self.d_model is not None or self.n_layer is not None
        if explicit and self.params is not None:
            raise ValueError("params: give either params or (d_model, n_layer), not both")
        if explicit and (self.d_model is None or self.n_layer is None):
            raise ValueError("d_model: an explicit shape needs both d_model and n_layer")
        if not explicit and self.params is None:
            raise ValueError("params: give a target parameter count or (d_model, n_layer)")
        if self.family == "transformer" and explicit and self.d_model % self.head_dim:
            raise ValueError(f"head_dim: {self.head_dim} does not divide d_model {self.d_model} (the transformer's "
                             "heads split its width)")
        return self


class CustomFamily(_Strict):
    """A plugin family: a mixer class by file path ("path/to/file.py:Class", relative to the config file) or
    module path ("package.module:Class"), built as Class(d_model, **options) inside the shared LM shell."""
    mixer: str
    mlp: bool = True                                   # Transformer++'s SwiGLU branch after the mixer
    options: dict[str, Any] = Field(default_factory=dict)
    n_layer: Layers | None = None                      # fixed depth (default: the sizing rule's)
    width_multiple: Width = 2                          # d_model searched in multiples of this

    @model_validator(mode="after")
    def _target(self):
        try:
            split_target(self.mixer)
        except ValueError as exc:
            raise ValueError(f"mixer: {exc}") from None     # named here: the message itself holds colons
        return self

    @field_validator("options")
    @classmethod
    def _json_options(cls, value):
        import json
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options: must be plain YAML values (numbers, strings, lists, mappings): {exc}") from None
        return value

    def spec(self) -> MixerSpec:
        return MixerSpec(self.mixer, dict(self.options), self.mlp, self.n_layer, self.width_multiple)


CustomFamilies = dict[str, CustomFamily]


class _WithPlugins(_Strict):
    """A config that may define plugin families: without any, it dumps (config.yaml, hashes) exactly as
    configs did before plugins existed."""
    custom_families: CustomFamilies = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _no_empty_plugins(self, handler):
        d = handler(self)
        if isinstance(d, dict) and not d.get("custom_families"):
            d.pop("custom_families", None)
        return d


def _check_custom_names(custom: dict) -> None:
    for name in custom:
        if not plugin_name_ok(name):
            raise ValueError(f"custom_families.{name}: a plugin family needs a name of its own (a letter, then "
                             f"letters, digits or '_', at most 32; not one of {', '.join(dict.fromkeys(RESERVED_NAMES))})")


def _unknown_family(name: str, custom: dict) -> str:
    known = ", ".join([*FAMILIES, *custom])
    return f"unknown model family {name!r}; known: {known} (a plugin family is defined under custom_families)"


class TrainConfig(_Strict):
    seq_len: Annotated[int, Field(gt=0, le=limits.MAX_SEQ_LEN)] = 256
    batch_size: Annotated[int, Field(gt=0, le=limits.MAX_BATCH)] = 16   # sequences per optimiser step
    tokens: Annotated[float, Field(gt=0, le=limits.MAX_TOKENS)] | None = None                # token budget of the run (or set by the ladder)
    lr: PositiveFloat = 3e-3                            # peak learning rate
    final_lr: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-5      # cosine floor
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1
    betas: Annotated[tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]],
                     Field(strict=False)] = (0.9, 0.95)          # not strict: a YAML list is a tuple here
    eps: PositiveFloat = 1e-8
    grad_clip: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0      # 0 disables clipping
    eval_every: Count = 0                              # steps between validations; 0: only at the end
    # validations at log-spaced steps (10% to 75% of the run, then the end) on one fixed subset of the
    # validation set, for Chinchilla's Approach 1; 0: none
    eval_points: Count = 8
    # tokens of that subset; default: sized so the eval points cost about 5% of the run's compute
    # (a ladder sizes it once for the whole study, from its smallest run, so every run uses the same)
    eval_points_tokens: PositiveInt | None = None
    eval_tokens: PositiveInt = 65536                    # size of the fixed held-out validation set
    checkpoint_every: Count = 0                        # steps between resumable checkpoints; 0: none
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"  # auto: 32 on CPU, bf16-mixed on GPU
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: PositiveInt = 1
    # Lightning strategy: with devices > 1 both mean ddp, which re-executes the command line once per
    # extra rank (gloo on CPU, NCCL on GPU); batch_size stays the global batch
    strategy: Literal[STRATEGIES] = "auto"
    num_threads: Annotated[int, Field(gt=0, le=limits.MAX_THREADS)] | None = None   # CPU threads (default: threads.py)
    progress: bool = True
    # Lightning loggers under <run>/logs/, beside metrics.csv and with its fields: csv is always written
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = ["csv"]

    @model_validator(mode="after")
    def _lrs(self):
        if self.final_lr > self.lr:
            raise ValueError("final_lr: must not exceed lr")
        if self.batch_size % self.devices:
            raise ValueError(f"batch_size: {self.batch_size} does not split over {self.devices} devices")
        return self


class RunConfig(_WithPlugins):
    """`ssmscale train CONFIG`: one model, one budget."""
    name: str = "run"                                  # plain names joined by '/' (a ladder's runs: study/run_id)
    seed: Seed = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelSpec
    train: TrainConfig = TrainConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return _plain_name(value, segments=True)

    @model_validator(mode="after")
    def _budget(self):
        if self.train.tokens is None:
            raise ValueError("train.tokens: a run needs a token budget")
        _check_custom_names(self.custom_families)
        if self.model.family not in FAMILIES and self.model.family not in self.custom_families:
            raise ValueError(f"model.family: {_unknown_family(self.model.family, self.custom_families)}")
        return self

    def mixers(self) -> dict[str, MixerSpec]:
        """{plugin family: its MixerSpec} (describing, not importing, the code)."""
        return {name: c.spec() for name, c in self.custom_families.items()}


ShapeSpec = create_model(
    "ShapeSpec", __base__=_Strict,
    __doc__="An explicit size: one (d_model, n_layer) per family (e.g. {transformer: [64, 2], mamba: [56, 4]}).",
    **{family: (Annotated[tuple[Width, Layers], Field(strict=False)] | None, None) for family in FAMILIES})


# What may reach a Slurm job script. Each value becomes an `#SBATCH --key=value` line, which a line end
# would end (the rest of the value would run as shell when the job starts): partition and account are names
# (comma-separated lists allowed); slurm_extra keys are sbatch option names, values printable ASCII. Options
# that move the job's files, working folder or environment (--export=LD_PRELOAD=...) or that submitit sets
# itself are refused: a config from someone else must not choose what runs or where it writes.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,+=-]{0,99}")
_SLURM_KEY = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_SLURM_VALUE = re.compile(r"[ -~]{0,200}")          # printable ASCII: no line end, no control character
_SLURM_KEYS_REFUSED = {"output", "error", "input", "chdir", "export", "export-file", "get-user-env", "wrap",
                       "array", "open-mode", "signal", "job-name", "container", "container-id", "wait",
                       "test-only", "parsable", "uid", "gid"}


class SubmititConfig(_Strict):
    """Resources per run when the ladder runs through submitit (local pool or Slurm job array)."""
    cluster: Literal["local", "slurm", "auto"] = "local"
    parallelism: PositiveInt = 1           # runs at once (Slurm: array parallelism)
    timeout_min: PositiveInt = 240
    cpus_per_task: PositiveInt = 2
    gpus_per_node: Count = 0
    mem_gb: Annotated[float, Field(gt=0, le=limits.MAX_GB)] | None = None
    partition: str | None = None
    account: str | None = None
    slurm_extra: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("partition", "account")
    @classmethod
    def _slurm_name(cls, value):
        if value is not None and not _SLURM_NAME.fullmatch(value):
            raise ValueError(f"must be a Slurm name (letters, digits, '_', '.', ',', '+', '=', '-'; at most 100 "
                             f"characters), got {shorten(value)}")
        return value

    @field_validator("slurm_extra")
    @classmethod
    def _slurm_options(cls, value):
        for key, v in value.items():
            if not _SLURM_KEY.fullmatch(key):
                raise ValueError(f"must have sbatch option names as keys (lowercase letters, digits, '_', '-'), "
                                 f"got {shorten(key)}")
            if key.replace("_", "-") in _SLURM_KEYS_REFUSED:
                raise ValueError(f"{key}: ssmscale sets the job's files, folder and environment itself; "
                                 f"--{key.replace('_', '-')} is not passed to Slurm")
            if isinstance(v, str) and not _SLURM_VALUE.fullmatch(v):
                raise ValueError(f"{key}: must be printable ASCII of at most 200 characters (no line end), "
                                 f"got {shorten(v)}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{key}: must be a finite number, got {v}")
        return value


SweepGrid = dict[str, Annotated[list[Any], Field(min_length=1)]]


class LadderConfig(_WithPlugins):
    """`ssmscale ladder CONFIG`: a grid of families x run lengths x sizes x learning rates x seeds,
    repeated at every point of an optional `sweep` over config keys (sweep.py).

    Run length, one of: `budgets` (an IsoFLOP ladder: each run spends a FLOP budget, the length follows
    from its size), `steps` or `tokens` (every run trains that long, e.g. a recall study).
    Sizes, one of: `sizes` (target non-embedding parameters or explicit shapes, sizing.py matches the
    families) or `widths` (d_model; the transformer gets `width_layers` layers, other families the
    depth sizing.layers_at_width gives them)."""
    name: str
    # built-in families and plugin families (custom_families); default: every built-in and every plugin
    families: Annotated[list[str], Field(min_length=1)] = list(FAMILIES)
    budgets: Annotated[list[Flops], Field(min_length=1)] | None = None   # training FLOPs per run
    steps: PositiveInt | None = None                    # optimiser steps per run (instead of budgets)
    tokens: Annotated[float, Field(gt=0, le=limits.MAX_TOKENS)] | None = None   # training tokens per run (instead of budgets)
    sizes: Annotated[list[Params | ShapeSpec], Field(min_length=1)] | None = None  # target params, or shapes
    widths: Annotated[list[Width], Field(min_length=1)] | None = None  # d_model per size (instead of sizes)
    width_layers: Layers | None = None                  # with widths: transformer layers (default 2)
    sweep: SweepGrid | Annotated[list[SweepGrid], Field(min_length=1)] | None = None   # extra axes (sweep.py)
    lrs: Annotated[list[PositiveFloat], Field(min_length=1)] | dict[str, Annotated[list[PositiveFloat], Field(min_length=1)]] = [3e-3]
    seeds: Annotated[list[Seed], Field(min_length=1)] = [0]
    # seed noise: once the main grid has finished, the best run of each family and budget is trained
    # again with each of these seeds (same shape and learning rate); the fits average seeds per point
    noise_seeds: list[Seed] = []
    # with noise_seeds: the budgets whose best runs get them (default: every budget)
    noise_budgets: Annotated[list[Flops], Field(min_length=1)] | None = None
    # tune the learning rate at one budget only: runs at that budget try the whole `lrs` grid; every
    # other budget uses, per family and size, the learning rate that reached the lowest loss there
    lr_tune_budget: Flops | None = None
    # with lr_tune_budget: where a (family, size) cell's best learning rate is the lowest or highest it tried,
    # try the next value beyond that edge (the grid's end ratio), up to this many extra values per cell
    lr_widen: Annotated[int, Field(ge=0, le=16)] = 0
    min_steps: PositiveInt = 20            # runs with fewer optimiser steps are flagged (and skipped)
    run_flagged: bool = False              # also train runs flagged for too few steps / data repeats
    allow_repeats: bool = False            # allow runs that need more than one pass over the training tokens
    # [low, high] training tokens per non-embedding parameter: runs outside are flagged "ratio" and skipped
    # (Chinchilla's optimum is ~20), so each budget trains only the sizes near its optimum; the tuning budget
    # trains them (flagged), as the other budgets take their learning rates from it
    tokens_per_param: Annotated[tuple[PositiveFloat, PositiveFloat], Field(strict=False)] | None = None
    # {budget: [size, ...]} or {budget: {family: [size, ...]}}: the sizes a budget trains (Chinchilla's
    # IsoFLOP profiles: a window of sizes around each budget's, or each family's, optimum); the other sizes
    # are planned as skipped ("window"). Budgets and families not named train every size; the
    # lr_tune_budget must train every size (it tunes their learning rates)
    budget_sizes: dict[str, Annotated[list[Params], Field(min_length=1)] |
                       dict[str, Annotated[list[Params], Field(min_length=1)]]] | None = None
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelDefaults = ModelDefaults()
    train: TrainConfig = TrainConfig()
    executor: Literal["local", "submitit"] = "local"
    # local executor: runs trained at once, each in a worker process that lives for the whole ladder
    # (threads per run: the cores / parallel, threads.py)
    parallel: Annotated[int, Field(gt=0, le=1024)] = 1
    submitit: SubmititConfig = SubmititConfig()
    fit: bool = True                       # fit scaling laws and write the report when the ladder ends
    # the study directory beside this one (same parent) trained with the same protocol at another sequence
    # length: the report contrasts the two (report/contrast.py)
    contrast_with: str | None = None

    @field_validator("name", "contrast_with")
    @classmethod
    def _name(cls, value):
        return value if value is None else _plain_name(value)

    @model_validator(mode="before")
    @classmethod
    def _default_families(cls, data):
        # no `families` key: every built-in family and every plugin family the config defines
        if isinstance(data, dict) and "families" not in data and isinstance(data.get("custom_families"), dict):
            return {**data, "families": [*FAMILIES, *data["custom_families"]]}
        return data

    @field_validator("budget_sizes", mode="before")
    @classmethod
    def _budget_keys(cls, value):
        # YAML reads an unquoted budget key (1.0e+13:) as a number; keyed by text, as lrs is by size
        if isinstance(value, dict):
            return {f"{k:.15g}" if isinstance(k, (int, float)) and not isinstance(k, bool) else k: v
                    for k, v in value.items()}
        return value

    @field_validator("lrs", mode="before")
    @classmethod
    def _size_keys(cls, value):
        # YAML reads an unquoted size key (1e5:, 25000:) as a number; the schema keys sizes by text
        if isinstance(value, dict):
            return {repr(k) if isinstance(k, (int, float)) and not isinstance(k, bool) else k: v
                    for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _grid(self):
        _check_custom_names(self.custom_families)
        for i, fam in enumerate(self.families):
            if fam not in FAMILIES and fam not in self.custom_families:
                raise ValueError(f"families.{i}: {_unknown_family(fam, self.custom_families)}")
        if self.train.tokens is not None:
            raise ValueError("train.tokens: set by the ladder (budgets, steps or tokens); remove it")
        lengths = [k for k in ("budgets", "steps", "tokens") if getattr(self, k) is not None]
        if len(lengths) != 1:
            raise ValueError("budgets: give the run length as one of budgets (FLOPs per run), steps or tokens "
                             f"(the same for every run){', not ' + ' and '.join(lengths) if lengths else ''}")
        if (self.sizes is None) == (self.widths is None):
            raise ValueError("sizes: give one of sizes (parameter counts or shapes) or widths (d_model), "
                             f"{'not both' if self.sizes else 'none given'}")
        planned = self._grid_size()
        if planned > limits.MAX_RUNS:       # before any loop over the points or the runs: no request hangs
            raise ValueError(f"the grid is {planned:,} runs (families x run lengths x sizes x learning rates x seeds "
                             f"x sweep points), more than {limits.MAX_RUNS:,}, ssmscale's bound (limits.py)")
        for key in ("families", "seeds", "budgets", "sizes"):
            values = getattr(self, key)
            if values is not None and (twice := _repeated(values)) is not None:
                raise ValueError(f"{key}: {twice} appears twice")
        for key, values in (self.lrs.items() if isinstance(self.lrs, dict) else [("", self.lrs)]):
            if (twice := _repeated(values)) is not None:
                raise ValueError(f"lrs{'.' + key if key else ''}: {twice} appears twice")
        if len(set(self.noise_seeds)) != len(self.noise_seeds):
            raise ValueError("noise_seeds: duplicate entries")
        if set(self.noise_seeds) & set(self.seeds):
            raise ValueError(f"noise_seeds: {sorted(set(self.noise_seeds) & set(self.seeds))[0]} is already one "
                             "of the seeds")
        if self.noise_seeds and self.budgets is None:
            raise ValueError("noise_seeds: only used with budgets (an IsoFLOP study)")
        if self.noise_budgets is not None:
            if not self.noise_seeds:
                raise ValueError("noise_budgets: only used with noise_seeds")
            stray = [c for c in self.noise_budgets if not any(math.isclose(c, b, rel_tol=1e-9) for b in self.budgets)]
            if stray:
                raise ValueError(f"noise_budgets: {stray[0]:g} is not one of the budgets")
        if self.widths is not None and len(set(self.widths)) != len(self.widths):
            raise ValueError("widths: duplicate entries")
        if self.width_layers is not None and self.widths is None:
            raise ValueError("width_layers: only used with widths")
        if self.steps is not None and self.steps < self.min_steps:
            raise ValueError(f"steps: {self.steps} is below min_steps {self.min_steps}")
        if self.tokens_per_param is not None and self.tokens_per_param[0] >= self.tokens_per_param[1]:
            raise ValueError("tokens_per_param: give [low, high] with low < high")
        if self.lr_tune_budget is not None and self.lr_tune_budget not in (self.budgets or []):
            raise ValueError(f"lr_tune_budget: {self.lr_tune_budget:g} is not one of the budgets")
        if self.lr_widen and self.lr_tune_budget is None:
            raise ValueError("lr_widen: only used with lr_tune_budget (the budget whose grid is widened)")
        if isinstance(self.lrs, dict):
            if not self.lrs:
                raise ValueError("lrs: empty learning-rate grid")
            for key in self.lrs:
                if key != "default" and not _is_size_key(key):
                    raise ValueError(f"lrs.{key}: keys are sizes (e.g. '1e5', or 'd64' with widths) or 'default'")
        if self.budget_sizes is not None:
            self._check_budget_sizes()
        for i, size in enumerate(self.sizes or []):
            if isinstance(size, ShapeSpec):
                plugins = [f for f in self.families if f not in FAMILIES]
                if plugins:
                    raise ValueError(f"sizes.{i}: explicit shapes name built-in families only; size the plugin family "
                                     f"{plugins[0]} by parameter count (sizes: [1e5, ...]) or widths")
                missing = [f for f in self.families if getattr(size, f, None) is None]
                if missing:
                    raise ValueError(f"sizes.{i}: no shape for family {missing[0]}")
        if self.sweep is not None:
            self._check_sweep()
        return self

    def _grid_size(self) -> int:
        """Runs of the main grid, counted without planning them (a sweep's points: the sum of each grid's product)."""
        lrs = max(map(len, self.lrs.values()), default=1) if isinstance(self.lrs, dict) else len(self.lrs)
        grids = [] if self.sweep is None else [self.sweep] if isinstance(self.sweep, dict) else self.sweep
        points = sum(math.prod(len(values) for values in grid.values()) for grid in grids) or 1
        return (len(self.families) * len(self.budgets or [None]) * len(self.sizes or self.widths) * lrs
                * len(self.seeds) * points)

    def _check_budget_sizes(self):
        if self.budgets is None or self.sizes is None or any(isinstance(s, ShapeSpec) for s in self.sizes):
            raise ValueError("budget_sizes: only used with budgets and sizes given as parameter counts")
        for key, chosen in self.budget_sizes.items():
            try:
                budget = float(key)
            except ValueError:
                raise ValueError(f"budget_sizes.{key}: keys are budgets (e.g. 1.0e+13)") from None
            if not _among(budget, self.budgets):
                raise ValueError(f"budget_sizes.{key}: not one of the budgets")
            per_family = chosen if isinstance(chosen, dict) else {"": chosen}
            for fam, sizes in per_family.items():
                where = f"budget_sizes.{key}{'.' + fam if fam else ''}"
                if fam and fam not in self.families:
                    raise ValueError(f"{where}: {fam} is not one of the families")
                for i, size in enumerate(sizes):
                    if not _among(size, self.sizes):
                        raise ValueError(f"{where}.{i}: {size:g} is not one of the sizes")
                if self.lr_tune_budget is not None and _among(budget, [self.lr_tune_budget]) \
                        and not all(_among(s, sizes) for s in self.sizes):
                    raise ValueError(f"{where}: the lr_tune_budget trains every size (it tunes their learning "
                                     "rates)")

    def mixers(self) -> dict[str, MixerSpec]:
        """{plugin family: its MixerSpec} for the plugin families the ladder trains (describing, not importing)."""
        return {name: c.spec() for name, c in self.custom_families.items() if name in self.families}

    def trains_size(self, budget, family: str, size) -> bool:
        """Whether `budget` trains `size` for `family` (budget_sizes; every size where it names none)."""
        for key, chosen in (self.budget_sizes or {}).items():
            if budget is not None and _among(float(key), [budget]):
                if isinstance(chosen, dict):
                    chosen = chosen.get(family)
                return chosen is None or _among(float(size), chosen)
        return True

    def _check_sweep(self):
        """Every key sweepable, no value twice, no point twice, and every point a valid config."""
        from . import sweep
        seen = set()
        for grid in sweep.grids(self.sweep):
            if not grid:
                raise ValueError("sweep: an empty grid")
            for key, values in grid.items():
                sweep.check_key(key)
                if len({sweep.encode({key: v}) for v in values}) != len(values):
                    raise ValueError(f"sweep.{key}: duplicate values")
        base = self.model_dump(mode="json", exclude={"sweep"})
        for point in sweep.points(self.sweep):
            code = sweep.encode(point)
            if code in seen:
                raise ValueError(f"sweep: the point {sweep.label(point)} appears twice")
            seen.add(code)
            try:
                LadderConfig.model_validate(sweep.apply_point(base, point))
            except ValidationError as exc:
                loc, msg = _error_parts(exc, LadderConfig)
                key = next((k for k in point if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")),
                           None)
                raise ValueError(f"sweep.{key or loc}: {msg} (at the point {sweep.label(point)})") from None


def _repeated(values: list):
    """The first value of a list that an earlier one equals (numbers to 1e-9: budgets and sizes are floats
    read from YAML), or None."""
    for i, v in enumerate(values):
        if any(_among(v, [w]) if isinstance(v, float) and isinstance(w, float) else v == w for w in values[:i]):
            return f"{v:g}" if isinstance(v, float) else v.model_dump(exclude_none=True) if isinstance(
                v, BaseModel) else v
    return None


def _among(x: float, values) -> bool:
    """x is one of values (budgets and sizes are floats read from YAML: equal to 1e-9)."""
    return any(math.isclose(x, v, rel_tol=1e-9) for v in values)


def _is_size_key(key: str) -> bool:
    if key[:1] == "d" and key[1:].isdigit():     # a width label
        return int(key[1:]) > 0
    try:
        return float(key) > 0
    except ValueError:
        return False


def _is_union_tag(part) -> bool:
    """Pydantic names the branch of a union in the location ('constrained-float', 'ShapeSpec', 'list[...]')."""
    return isinstance(part, str) and (not part.replace("_", "a").isalnum() or part[:1].isupper()
                                      or part in ("float", "int", "str", "bool"))


def format_validation_error(source: str, exc: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """One line: `file: key.path: what is wrong` for the most relevant error (and how many more)."""
    loc, msg = _error_parts(exc, schema)
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def _models_in(annotation) -> list[type[BaseModel]]:
    """The schema classes a field's type may hold (through Optional, unions, Annotated, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _nearest_key(schema: type[BaseModel] | None, loc: tuple) -> str | None:
    """The valid key closest to the unknown last key of `loc` (a typo's likely meaning), or None."""
    models = [schema] if schema is not None else []
    for part in loc[:-1]:
        if isinstance(part, int) or _is_union_tag(part):
            continue
        models = [m for model in models if part in model.model_fields
                  for m in _models_in(model.model_fields[part].annotation)]
    names = sorted({name for model in models for name in model.model_fields})
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6) if loc else []
    return close[0] if close else None


def _error_parts(exc: ValidationError, schema: type[BaseModel] | None = None) -> tuple[str, str]:
    """(dotted key path, message) of the most relevant error."""
    errs = exc.errors()
    # in a union, the branch that got deepest into the input is the one the user meant
    first = max(errs, key=lambda e: (len(e["loc"]), e["type"] == "extra_forbidden"))   # a typo explains a missing key
    loc = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
    msg = first["msg"]
    is_value_error = first["type"] == "value_error"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # our validators name the field themselves ("field: message"); qualify it with the location
        field, sep, rest = msg.partition(":")
        if sep and re.fullmatch(r"[\w.+=\-]+", field):
            loc = f"{loc}.{field}" if loc else field
            msg = rest.strip()
    if first["type"] == "extra_forbidden":
        nearest = _nearest_key(schema, tuple(first["loc"]))
        msg = "unknown key" + (f"; did you mean {'.'.join(loc.split('.')[:-1] + [nearest])}?" if nearest else "")
    elif first["type"] == "less_than_equal":       # only limits.py's bounds use le
        msg = (f"must be at most {first['ctx']['le']:g}, ssmscale's bound on what can exist (limits.py); "
               f"got {shorten(first['input'])}")
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif "input" in first and not is_value_error and first["type"] != "model_type":
        msg = f"{msg} (got {shorten(first['input'])})"
    return loc, msg


# Train settings that say how a run executes, not what it computes; result.json records their values
EXECUTION_KEYS = {"num_threads": None, "progress": True}


def config_hash(cfg: BaseModel, mixer_sha256: str | None = None) -> str:
    """Hash of the resolved config with the execution settings at their defaults (so a run resumed or
    rerun with another thread count keeps its identity; hashes of default configs are unchanged). A plugin
    family's run hashes its mixer file's sha256 with it: the same config over changed code is another run."""
    from ..provenance import stable_hash
    d = cfg.model_dump(mode="json")
    if isinstance(d.get("train"), dict):
        d["train"].update(EXECUTION_KEYS)
    if mixer_sha256 is not None:
        d["mixer_sha256"] = mixer_sha256
    return stable_hash(d)
