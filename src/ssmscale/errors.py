"""User-facing errors: anything the user can fix (config, data path, CSV) raises UserError; a command
stopped by SIGTERM or SIGINT raises Stopped (stop_on_signals).

The CLI turns a UserError into one line on stderr and exit code 2, never a traceback, and a Stopped into
one line ("terminated", "interrupted") and exit code 128 + the signal's number.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

ECHO_CHARS = 200        # an echoed value longer than this is cut, so an error stays one readable line


class UserError(Exception):
    """A problem with the user's input; the message names the field or file and what is wrong."""


def one_line(text: str, limit: int = 5 * ECHO_CHARS) -> str:
    """A message as one line of at most about `limit` characters: line ends escaped, the middle cut."""
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 100] + " ... " + text[-95:]


def shorten(value, limit: int = ECHO_CHARS) -> str:
    """repr(value) cut to about `limit` characters with '...' (a 5 MB name is not echoed back whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 20] + "..." + text[-17:]


class Stopped(BaseException):
    """The command was asked to stop by a signal. A BaseException, so that no `except Exception` in a run
    (or Lightning's own handling) turns it into a failed run: it ends the command, whose finished results
    stay on disk (a study resumes where it stopped)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "terminated"


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Stopped in the main thread while inside. Lightning registers its own SIGTERM
    handler during fit and calls the one it found (this one) after its own, so a run stops there too,
    instead of ending through Lightning's SystemExit as if it had succeeded."""
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
