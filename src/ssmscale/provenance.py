"""What every result records so it can be trusted later: versions, git commit, device, hashes."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from functools import lru_cache
from pathlib import Path


def stable_hash(obj) -> str:
    """sha256 (first 16 hex digits) of a JSON-serialisable object with sorted keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@lru_cache(maxsize=1)
def git_commit() -> str:
    """Commit of the ssmscale checkout this code runs from, with '+dirty' for local changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=1)
def source_commit() -> str:
    """The last commit that changed the package's source, '+dirty' if it is modified: unlike HEAD it does not
    move when regenerated study outputs are committed, so a report that names it stays byte-identical."""
    root = Path(__file__).resolve().parents[2]
    paths = ["src", "pyproject.toml"]
    try:
        sha = subprocess.run(["git", "log", "-1", "--format=%H", "--", *paths], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("ssmscale", "torch", "lightning", "numpy", "datasets", "tokenizers", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str = "cpu") -> str:
    """The machine a measurement ran on, named well enough to compare wall-clock numbers: the GPU, or
    the CPU model and torch's thread count."""
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (GPU; host {cpu_model()})"
    threads = torch.get_num_threads()
    return f"cpu ({cpu_model()}, {threads} thread{'' if threads == 1 else 's'})"


def provenance(device: str = "cpu") -> dict:
    return {"versions": versions(), "commit": git_commit(), "device": device_description(device)}
