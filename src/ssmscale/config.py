"""One typed, validated configuration schema (pydantic v2), loaded from YAML.

Why pydantic: it validates nested, typed schemas and reports the exact key path of every problem
(`train.lr`, `ladder.budgets.2`), forbids unknown keys with one flag, and costs ~0.1 s to import.
Numbers are parsed leniently ("3e-3" is a string to YAML 1.1 but means 0.003 here); everything
else is strict: unknown keys, wrong types and impossible values are errors naming the key path.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError

Family = Literal["transformer", "mamba"]      # models.config.FAMILIES, spelled out: importing it imports torch
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MQARConfig(_Strict):
    """Multi-query associative recall (Zoology): keys from one half of the vocabulary, values from the other."""
    vocab_size: PositiveInt = 256
    num_kv_pairs: PositiveInt = 8
    num_examples: PositiveInt = 20000


class DataConfig(_Strict):
    source: Literal["stdlib", "files", "hf", "synthetic"] = "stdlib"
    paths: list[str] = Field(default_factory=list)     # files: local text / jsonl / parquet (globs allowed)
    text_field: str = "text"                           # files / hf: the column holding the text
    hf_name: str | None = None                         # hf: dataset name on the hub (or a local dataset folder)
    hf_config: str | None = None
    hf_split: str = "train"
    max_bytes: PositiveInt | None = None               # cap on corpus size (the first bytes in order)
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
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
    vocab_size: PositiveInt = 256                      # bpe: the trained vocabulary size

    @model_validator(mode="after")
    def _sizes(self):
        if self.kind == "byte" and self.vocab_size != 256:
            raise ValueError("vocab_size: the byte tokenizer has exactly 256 tokens")
        if self.kind == "bpe" and self.vocab_size < 260:
            raise ValueError("vocab_size: a BPE vocabulary needs more than the 256 byte tokens")
        return self


class ModelDefaults(_Strict):
    """Per-family knobs shared by every size of a ladder (shapes come from `sizes`)."""
    head_dim: PositiveInt = 32
    d_ff: PositiveInt | None = None
    d_state: PositiveInt = 16
    d_conv: PositiveInt = 4
    expand: PositiveInt = 2
    dt_rank: PositiveInt | None = None
    scan_impl: Literal["auto", "fused", "chunked", "ref", "triton"] = "auto"   # ops.selective_scan impl


class ModelSpec(ModelDefaults):
    """One model: the family knobs plus either an explicit shape (d_model, n_layer) or a target
    non-embedding parameter count."""
    family: Family = "transformer"
    d_model: PositiveInt | None = None
    n_layer: PositiveInt | None = None
    params: PositiveFloat | None = None

    @model_validator(mode="after")
    def _shape(self):
        explicit = self.d_model is not None or self.n_layer is not None
        if explicit and self.params is not None:
            raise ValueError("params: give either params or (d_model, n_layer), not both")
        if explicit and (self.d_model is None or self.n_layer is None):
            raise ValueError("d_model: an explicit shape needs both d_model and n_layer")
        if not explicit and self.params is None:
            raise ValueError("params: give a target parameter count or (d_model, n_layer)")
        return self


class TrainConfig(_Strict):
    seq_len: PositiveInt = 256
    batch_size: PositiveInt = 16                        # sequences per optimiser step
    tokens: PositiveFloat | None = None                 # token budget of the run (or set by the ladder)
    lr: PositiveFloat = 3e-3                            # peak learning rate
    final_lr: Annotated[float, Field(ge=0)] = 1e-5      # cosine floor
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    grad_clip: Annotated[float, Field(ge=0)] = 1.0      # 0 disables clipping
    eval_every: Annotated[int, Field(ge=0)] = 0         # steps between validations; 0: only at the end
    eval_tokens: PositiveInt = 65536                    # size of the fixed held-out validation set
    checkpoint_every: Annotated[int, Field(ge=0)] = 0   # steps between resumable checkpoints; 0: none
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"  # auto: 32 on CPU, bf16-mixed on GPU
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: PositiveInt = 1
    # Lightning strategy: with devices > 1 both mean ddp, which re-executes the command line once per
    # extra rank (gloo on CPU, NCCL on GPU); batch_size stays the global batch
    strategy: Literal["auto", "ddp"] = "auto"
    num_threads: PositiveInt | None = None              # CPU threads for torch (default: torch's choice)
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


class RunConfig(_Strict):
    """`ssmscale train CONFIG`: one model, one budget."""
    name: str = "run"
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelSpec
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _budget(self):
        if self.train.tokens is None:
            raise ValueError("train.tokens: a run needs a token budget")
        return self


class ShapeSpec(_Strict):
    """An explicit size: one shape per family (e.g. {transformer: [64, 2], mamba: [56, 4]})."""
    transformer: tuple[PositiveInt, PositiveInt] | None = None
    mamba: tuple[PositiveInt, PositiveInt] | None = None


class SubmititConfig(_Strict):
    """Resources per run when the ladder runs through submitit (local pool or Slurm job array)."""
    cluster: Literal["local", "slurm", "auto"] = "local"
    parallelism: PositiveInt = 1           # runs at once (Slurm: array parallelism)
    timeout_min: PositiveInt = 240
    cpus_per_task: PositiveInt = 2
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    mem_gb: PositiveFloat | None = None
    partition: str | None = None
    account: str | None = None
    slurm_extra: dict[str, str | int | float | bool] = Field(default_factory=dict)


class LadderConfig(_Strict):
    """`ssmscale ladder CONFIG`: an IsoFLOP grid of families x budgets x sizes x learning rates x seeds."""
    name: str
    families: Annotated[list[Family], Field(min_length=1)] = Field(default_factory=lambda: list(get_args(Family)))
    budgets: Annotated[list[PositiveFloat], Field(min_length=1)]          # training FLOPs per run
    sizes: Annotated[list[PositiveFloat | ShapeSpec], Field(min_length=1)]  # target non-embedding params, or shapes
    lrs: Annotated[list[PositiveFloat], Field(min_length=1)] | dict[str, Annotated[list[PositiveFloat], Field(min_length=1)]] = [3e-3]
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = [0]
    # tune the learning rate at one budget only: runs at that budget try the whole `lrs` grid; every
    # other budget uses, per family and size, the learning rate that reached the lowest loss there
    lr_tune_budget: PositiveFloat | None = None
    min_steps: PositiveInt = 20            # runs with fewer optimiser steps are flagged (and skipped)
    run_flagged: bool = False              # also train runs flagged for too few steps / data repeats
    allow_repeats: bool = False            # allow runs that need more than one pass over the training tokens
    # [low, high] training tokens per non-embedding parameter: runs outside are flagged "ratio" and skipped
    # (Chinchilla's optimum is ~20), so each budget trains only the sizes near its optimum
    tokens_per_param: tuple[PositiveFloat, PositiveFloat] | None = None
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelDefaults = ModelDefaults()
    train: TrainConfig = TrainConfig()
    executor: Literal["local", "submitit"] = "local"
    submitit: SubmititConfig = SubmititConfig()
    fit: bool = True                       # fit scaling laws and write the report when the ladder ends

    @model_validator(mode="after")
    def _grid(self):
        if self.train.tokens is not None:
            raise ValueError("train.tokens: set by the ladder from each budget; remove it")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError("budgets: duplicate entries")
        if self.tokens_per_param is not None and self.tokens_per_param[0] >= self.tokens_per_param[1]:
            raise ValueError("tokens_per_param: give [low, high] with low < high")
        if self.lr_tune_budget is not None and self.lr_tune_budget not in self.budgets:
            raise ValueError(f"lr_tune_budget: {self.lr_tune_budget:g} is not one of the budgets")
        if isinstance(self.lrs, dict):
            if not self.lrs:
                raise ValueError("lrs: empty learning-rate grid")
            for key in self.lrs:
                if key != "default" and not _is_size_key(key):
                    raise ValueError(f"lrs.{key}: keys are sizes (e.g. '1e5') or 'default'")
        for i, size in enumerate(self.sizes):
            if isinstance(size, ShapeSpec):
                missing = [f for f in self.families if getattr(size, f) is None]
                if missing:
                    raise ValueError(f"sizes.{i}: no shape for family {missing[0]}")
        return self


def _is_size_key(key: str) -> bool:
    try:
        return float(key) > 0
    except ValueError:
        return False


# ----------------------------------------------------------------------------------- loading
def _is_union_tag(part) -> bool:
    """Pydantic names the branch of a union in the location ('constrained-float', 'ShapeSpec', 'list[...]')."""
    return isinstance(part, str) and (not part.replace("_", "a").isalnum() or part[:1].isupper()
                                      or part in ("float", "int", "str", "bool"))


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line: `file: key.path: what is wrong` for the most relevant error (and how many more)."""
    errs = exc.errors()
    # in a union, the branch that got deepest into the input is the one the user meant
    first = max(errs, key=lambda e: len(e["loc"]))
    loc = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
    msg = first["msg"]
    is_value_error = first["type"] == "value_error"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # our validators name the field themselves ("field: message"); qualify it with the location
        if ":" in msg:
            field, rest = msg.split(":", 1)
            loc = f"{loc}.{field}" if loc else field
            msg = rest.strip()
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif "input" in first and not is_value_error and first["type"] != "model_type":
        msg = f"{msg} (got {first['input']!r})"
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def read_yaml(path: str | Path) -> dict:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values")
    return raw


def validate(schema: type[BaseModel], raw: dict, source: str):
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc)) from None


def apply_overrides(raw: dict, overrides: dict | None) -> dict:
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {dotted}: {key} is not a mapping")
        node[leaf] = value
    return raw


LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_logger_packages(cfg: RunConfig | LadderConfig, source: str) -> None:
    """A logger the config asks for must be importable: say so now, not after the data is prepared."""
    for name in cfg.train.loggers:
        packages = LOGGER_PACKAGES.get(name, ())
        if packages and not any(find_spec(p) for p in packages):
            raise UserError(f"{source}: train.loggers: '{name}' needs the {packages[0]} package "
                            f"(pip install {packages[0]})")


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    cfg = validate(RunConfig, apply_overrides(read_yaml(path), overrides), str(path))
    check_logger_packages(cfg, str(path))
    return cfg


def load_ladder_config(path: str | Path, overrides: dict | None = None) -> LadderConfig:
    cfg = validate(LadderConfig, apply_overrides(read_yaml(path), overrides), str(path))
    check_logger_packages(cfg, str(path))
    return cfg


def config_hash(cfg: BaseModel) -> str:
    from .provenance import stable_hash
    return stable_hash(cfg.model_dump(mode="json"))
