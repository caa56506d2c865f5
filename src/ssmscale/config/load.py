"""Loading a config: a YAML file read with YAML 1.2's number rule, no duplicate keys and a cap on its
size once aliases are expanded; `--set key.path=value` overrides; the schema's validation (schema.py)
with one-line errors; and the logger packages a config asks for checked before any work starts.
"""

from __future__ import annotations

import functools
import re
from importlib.util import find_spec
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..errors import UserError
from .schema import LadderConfig, RunConfig, format_validation_error


# YAML 1.2's floats that YAML 1.1 (PyYAML's rule) reads as strings: an exponent without a dot or a sign
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
MAX_YAML_VALUES = 100_000       # values in a document once aliases are expanded (a YAML bomb stops here)


@functools.cache
def _yaml_loader():
    """yaml.SafeLoader, plus YAML 1.2 floats, minus duplicate keys (which PyYAML lets the last one win)."""
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

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
    return Loader


@functools.cache
def _yaml_dumper():
    """yaml.SafeDumper that quotes every string the loader would read back as a number (e.g. '1e5')."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
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
    from ..safeload import CAPS, FileRefused, read_bytes
    path = Path(path)
    try:
        text = read_bytes(path, CAPS["yaml"], within).decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so not a YAML config") from None
    except FileRefused as exc:
        raise UserError(str(exc)) from None
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


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    cfg = validate(RunConfig, apply_overrides(read_yaml(path), overrides), str(path))
    check_logger_packages(cfg, str(path))
    return cfg


def load_ladder_config(path: str | Path, overrides: dict | None = None,
                       within: str | Path | None = None) -> LadderConfig:
    cfg = validate(LadderConfig, apply_overrides(read_yaml(path, within), overrides), str(path))
    check_logger_packages(cfg, str(path))
    return cfg
