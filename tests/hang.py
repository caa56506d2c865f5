"""A hang (a FIFO read, a stuck first import) becomes a failure of the case instead of a stuck suite."""

from __future__ import annotations

import signal
from contextlib import contextmanager


@contextmanager
def alarm(seconds: int):
    def handler(signum, frame):
        raise AssertionError(f"did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
