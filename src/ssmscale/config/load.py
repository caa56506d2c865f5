"""Loading a config: a YAML file read with YAML 1.2's number rule, no duplicate keys and a cap on its
size once aliases are expanded; `--set key.path=value` overrides; the schema's validation (schema.py)
with one-line errors; the logger packages a config asks for checked before any work starts; and where
its plugin code may come from (origin.py).
"""

from __future__ import annotations

import functools
import re
from importlib.util import find_spec
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..errors import UserError
from .schema import LadderConfig, RunConfig, format_validation_error


# YAML 1.2's (core schema) numbers in place of YAML 1.1's, PyYAML's rule: 1.1 reads 1e5 and 3e-3 (an exponent
# without a dot) as strings, 010 as 8 (octal), 1_000 and 1:30 (base 60) as numbers; 1.2 reads 1e5 and 3e-3 as
# numbers, 010 as 10, 0o17 as 15, and 1_000 and 1:30 as strings
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_YAML12_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _yaml12_numbers(cls) -> None:
    """Give a PyYAML Loader or Dumper class YAML 1.2's number resolvers instead of YAML 1.1's (ints first:
    a resolver list is tried in order, and every int also matches the float pattern)."""
    cls.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
                                   for first, resolvers in cls.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver(_INT, _YAML12_INT, list("-+0123456789"))
    cls.add_implicit_resolver(_FLOAT, _YAML12_FLOAT, list("-+0123456789."))


def _construct_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


MAX_YAML_VALUES = 100_000       # values in a document once aliases are expanded (a YAML bomb stops here)


@functools.cache
def _yaml_loader():
    """yaml.SafeLoader with YAML 1.2's numbers, minus duplicate keys (which PyYAML lets the last one win)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:          # an unhashable key: the base class reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    _yaml12_numbers(Loader)
    Loader.add_constructor(_INT, _construct_int)
    return Loader


@functools.cache
def _yaml_dumper():
    """yaml.SafeDumper that quotes every string the loader would read back as a number (e.g. '1e5', '010')."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    _yaml12_numbers(Dumper)
    return Dumper


def dump_yaml(value) -> str:
    """YAML text that parse_yaml reads back as the same values (config.yaml files of runs and studies)."""
    import yaml
    return yaml.dump(value, Dumper=_yaml_dumper(), sort_keys=False)


def parse_yaml(text: str, source: str):
    """A YAML document -> Python values, or a UserError of one line naming `source` and the line."""
    import yaml
    try:
        value = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None)
        if problem and problem.startswith("duplicate key"):
            raise UserError(f"{source}: {problem} (line {mark.line + 1})") from None
        where = f" (line {mark.line + 1}{': ' + problem if problem else ''})" if mark else ""
        raise UserError(f"{source}: not valid YAML{where}") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a config") from None
    if _count_values(value, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise UserError(f"{source}: more than {MAX_YAML_VALUES:,} values once its aliases are expanded")
    return value


def _count_values(value, limit: int) -> int:
    """Values in a loaded document with aliases expanded, counting stops just past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        v = stack.pop()
        count += 1
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return count


def read_yaml(path: str | Path, within: str | Path | None = None) -> dict:
    """A YAML mapping from a regular file of at most safeload.CAPS["yaml"] bytes, checked before parsing
    (a 48 MB list would take minutes to parse before the count of values stops it)."""
    from ..safeload import CAPS, read_named
    path = Path(path)
    raw = read_named(path, CAPS["yaml"], "config file not found", within)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so not a YAML config") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values")
    return raw


def validate(schema: type[BaseModel], raw: dict, source: str):
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc, schema)) from None


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


def resolve_mixer_paths(raw: dict, base_dir: Path) -> dict:
    """custom_families.*.mixer file paths made absolute against the config file's folder (malformed entries
    are left for the schema to name). Nothing is read or imported."""
    from ..models.plugin import resolve_target
    custom = raw.get("custom_families")
    if not isinstance(custom, dict):
        return raw
    resolved = {}
    for name, entry in custom.items():
        if isinstance(entry, dict) and isinstance(entry.get("mixer"), str):
            try:
                entry = {**entry, "mixer": resolve_target(entry["mixer"], base_dir)}
            except ValueError:
                pass
        resolved[name] = entry
    return {**raw, "custom_families": resolved}


def load_config(schema, path: str | Path, overrides: dict | None = None, within: str | Path | None = None):
    """A config file validated against `schema` (RunConfig or LadderConfig), plugin paths resolved.

    Without `within`, a config the user named: its plugins may come from where origin.py allows (a config
    in a study or run folder names code inside it only). With `within` (a study's folder), the tool re-reads
    the config.yaml it wrote there, from inside that folder only (safeload.open_regular); its plugins were
    checked when the ladder read the user's config."""
    raw = resolve_mixer_paths(apply_overrides(read_yaml(path, within), overrides), Path(path).resolve().parent)
    cfg = validate(schema, raw, str(path))
    check_logger_packages(cfg, str(path))
    if within is None:
        from .origin import check_plugin_origin
        check_plugin_origin(cfg, path, overrides)
    return cfg


def load_run_config(path: str | Path, overrides: dict | None = None,
                    within: str | Path | None = None) -> RunConfig:
    return load_config(RunConfig, path, overrides, within)


def load_ladder_config(path: str | Path, overrides: dict | None = None,
                       within: str | Path | None = None) -> LadderConfig:
    return load_config(LadderConfig, path, overrides, within)


def read_study_config(path: str | Path, within: str | Path | None = None) -> LadderConfig:
    """A study's saved config.yaml, validated (a UserError of one line when it is not one); unlike
    load_ladder_config it needs no logger package: fit and report read a study, they train nothing."""
    return validate(LadderConfig, read_yaml(path, within), str(path))


def config_plugins(path: str | Path | None) -> tuple[dict, list]:
    """({plugin family: MixerSpec}, the config's families) of a ladder or run config file (`sizes --config`,
    `profile CONFIG`); ({}, []) without one. Describes the plugins, imports nothing."""
    if path is None:
        return {}, []
    raw = read_yaml(path)
    schema = LadderConfig if any(k in raw for k in ("sizes", "widths", "budgets", "families")) else RunConfig
    cfg = load_config(schema, path)
    mixers = {name: c.spec() for name, c in cfg.custom_families.items()}
    return mixers, list(cfg.families) if schema is LadderConfig else [cfg.model.family]
