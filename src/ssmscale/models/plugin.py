"""Plugin families: a mixer class named by a file path or a module path, loaded only when a model is built.

    custom_families:
      mine: {mixer: "path/to/my_mixer.py:MyMixer", mlp: true, options: {heads: 4}}

`MixerSpec` is the plugin's description as a config states it (torch-free, no import: the config schema,
fit and report handle it without running anything). `load_mixer_class` imports the code: that happens
only where a model is built or measured (train, ladder, check-family, sizes, profile), never in fit or
report. A file path names one .py file, read once through safeload (a regular file of bounded size: a
FIFO or a device there is refused, not waited on), hashed, and those very bytes are run as the module
(named after their sha256, so two versions of a file never share a module, and the sha256 a result
records is that of the code that ran); a module path ("pkg.module:Class") is imported with importlib
from sys.path. Every import prints one line naming the code and its sha256. Which commands import plugin
code, and which paths a config may name, is in docs/byo.md ("What runs code"). The contract a mixer class meets is
in models/block.py and docs/byo.md; admission.py checks it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

_CLASS = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"{_CLASS}(\.{_CLASS})*")
_TARGET = re.compile(rf"(?P<where>.+):(?P<cls>{_CLASS})")
# a plugin family's name: it becomes part of run ids and folder names
FAMILY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def split_target(target: str) -> tuple[str, str, str]:
    """("file" | "module", path or module name, class name) of "path/to/file.py:Class" or "pkg.mod:Class"."""
    m = _TARGET.fullmatch(target.strip())
    if not m:
        raise ValueError(f"expected 'path/to/file.py:ClassName' or 'package.module:ClassName', got {target!r}")
    where, cls = m.group("where"), m.group("cls")
    if where.endswith(".py") or "/" in where or "\\" in where:
        return "file", where, cls
    if not _MODULE.fullmatch(where):
        raise ValueError(f"{where!r} is neither a .py file nor a dotted module name")
    return "module", where, cls


def resolve_target(target: str, base_dir: str | Path | None) -> str:
    """The target with a relative file path made absolute against `base_dir` (the config file's folder)."""
    kind, where, cls = split_target(target)
    if kind == "module" or Path(where).expanduser().is_absolute() or base_dir is None:
        return f"{Path(where).expanduser() if kind == 'file' else where}:{cls}"
    return f"{(Path(base_dir) / where).resolve()}:{cls}"


@dataclass(frozen=True)
class MixerSpec:
    """A plugin family: its mixer class, the options it is built with, and how the shell sizes it."""
    target: str                        # "/abs/path/file.py:Class" or "pkg.module:Class"
    options: dict = field(default_factory=dict)
    mlp: bool = True                   # a SwiGLU branch after the mixer, as in Transformer++'s layer
    n_layer: int | None = None         # fixed depth; None: the shell's depth rule (sizing.py)
    width_multiple: int = 2            # d_model is searched in multiples of this

    def __hash__(self):                # options is a dict: hash its canonical JSON
        return hash((self.target, json.dumps(self.options, sort_keys=True), self.mlp, self.n_layer,
                     self.width_multiple))

    @property
    def class_name(self) -> str:
        return split_target(self.target)[2]

    def source_path(self) -> Path:
        """The file holding the mixer's code (a module path is located without importing it)."""
        kind, where, _ = split_target(self.target)
        if kind == "file":
            path = Path(where)
            if not os.path.lexists(path):      # anything else there is named by read_source (a FIFO, a folder)
                raise UserError(f"{where}: mixer file not found")
            return path
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError) as exc:
            raise UserError(f"{where}: mixer module cannot be found ({exc})") from None
        if found is None or not found.origin or not Path(found.origin).is_file():
            raise UserError(f"{where}: mixer module not found on sys.path")
        return Path(found.origin)

    def sha256(self) -> str:
        """sha256 of the mixer's source file: a study knows when the code under it changed."""
        return file_sha256(self.source_path())

    def provenance(self) -> dict:
        """What a result records about the plugin: the class, its options, its file and that file's sha256."""
        return {"target": self.target, "class": self.class_name, "file": str(self.source_path()),
                "sha256": self.sha256(), "options": self.options, "mlp": self.mlp}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(read_source(path)).hexdigest()


def read_source(path: Path) -> bytes:
    """The bytes of a plugin's source file (a regular file of at most safeload.CAPS["text"] bytes)."""
    from ..safeload import CAPS, read_named
    return read_named(path, CAPS["text"], "mixer file not found")


def load_mixer_class(target: str):
    """Import the code `target` names and return its class (a torch.nn.Module subclass): code execution,
    on purpose, as `python file.py` would run it."""
    import torch.nn as nn
    kind, where, cls_name = split_target(target)
    if kind == "file":
        path = Path(where)
        source = read_source(path)
        digest = hashlib.sha256(source).hexdigest()
        name = f"ssmscale_plugin_{digest[:16]}"
        module = sys.modules.get(name)
        if module is None:
            print(f"importing plugin mixer {cls_name} from {path} (sha256 {digest[:12]})", file=sys.stderr)
            spec = importlib.util.spec_from_file_location(name, path)     # sets __file__, as an import would
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module          # before running it: dataclasses in it look themselves up here
            try:
                # the bytes just hashed, not the file read again: the sha256 is that of the code that runs
                exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the plugin, on purpose
            except Exception as exc:
                del sys.modules[name]
                raise UserError(f"{path}: importing the mixer file failed: {_first_line(exc)}") from None
    else:
        already = where in sys.modules
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise UserError(f"{where}: importing the mixer module failed: {_first_line(exc)}") from None
        if not already:
            print(f"importing plugin mixer {cls_name} from module {where} ({module.__file__})", file=sys.stderr)
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise UserError(f"{target}: no {cls_name} in {where}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"{target}: {cls_name} is not a torch.nn.Module class")
    return cls


def build_mixer(spec: MixerSpec, d_model: int):
    """An instance of the plugin's mixer at width d_model; a constructor that refuses says which width."""
    cls = load_mixer_class(spec.target)
    try:
        return cls(d_model, **spec.options)
    except Exception as exc:
        raise UserError(f"{spec.target}: {spec.class_name}({d_model}, **{spec.options}) failed: {_first_line(exc)} "
                        "(a mixer that needs d_model to be a multiple of something: set width_multiple)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
