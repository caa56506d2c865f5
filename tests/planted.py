"""What a planted pickle can do: unpickling a RunsShell runs a shell command (it touches `marker`). Tests
plant one in a checkpoint or a Slurm result and assert the marker never appears."""

from __future__ import annotations

import os
from pathlib import Path


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
