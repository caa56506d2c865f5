"""Writing files and folders: crash-safe writes, and writes that a planted link or file cannot redirect.

Crash-safe: write to a temporary file in the same folder, fsync, then rename; a reader (or a restarted
ladder) therefore sees either the old file or the new one, never half of one.

Into shared folders (a study, a run): a folder the tool keeps below one it was given is never a link
(make_dirs), a lock is a plain file opened without following a link (FileLock), a log is a new file
renamed into place (open_replacing: a link there is replaced, its target untouched), and a run folder
holding a link or a special file where the tool writes is refused before anything is written
(check_no_links). Names read from files (run ids) must be plain names (is_plain_name).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path

# a plain name: a folder name that stays where it is put (no '/', no leading '.' or '-')
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


def is_plain_name(text, max_len: int = 255) -> bool:
    """Whether `text` is a plain name of at most `max_len` characters (a file name's limit by default)."""
    return isinstance(text, str) and len(text) <= max_len and PLAIN_NAME.fullmatch(text) is not None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `path` whole or not at all; folders made for it are removed again if the write fails (a full
    disk leaves no empty output folder behind)."""
    path = Path(path)
    made = _make_parents(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _remove_empty(made)
        raise


def _make_parents(path: Path) -> list[Path]:
    """Make the missing folders above `path`; return them, deepest first."""
    made, folder = [], path.parent
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON: a NaN or infinite number is written as null (bare NaN is not JSON)."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False,
                                       default=_json_default) + "\n")


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and not hasattr(obj, "__len__"):     # a numpy scalar
        return _finite(obj.item())
    return obj


def _json_default(obj):
    # numpy scalars and paths show up in results; store them as plain JSON values
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_dataframe_csv(path: str | os.PathLike, df) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse (UserError, one line) a folder that cannot be made or written, before any long work starts.

    Creates nothing: the nearest existing ancestor must be a folder in which a file can be created (a
    nameless temporary file, gone when closed, tells; permission bits alone do not, e.g. for root)."""
    from .errors import UserError
    path = Path(path)
    try:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        # where making the missing folders lands: a '..' among them steps back out of a folder just made
        # (missing/../afile is afile), which the kernel cannot tell before that folder exists
        target = Path(os.path.normpath(probe.resolve() / path.relative_to(probe)))
        if target.exists() and not target.is_dir():
            raise UserError(f"{what} {path}: exists and is not a folder")
        probe = target
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    except OSError as exc:       # e.g. a name longer than the filesystem's 255 bytes
        raise UserError(f"{what} {path}: {exc.strerror or exc}") from None
    if not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot write in {probe} ({exc.strerror or exc})") from None


def _refused(path: Path, what: str):
    from .errors import UserError
    return UserError(f"{path}: {what}; refused (ssmscale writes there and never follows a link or replaces a "
                     "file of another kind; remove it)")


def make_dirs(root: str | os.PathLike, *parts: str) -> Path:
    """root/parts..., creating the folders below `root` that are missing. `root` is the user's choice and may
    be a link; a link or a file where one of the folders below it belongs is refused (UserError): a planted
    link (runs/<id> -> elsewhere) would otherwise take the writes with it."""
    from .safeload import kind_of
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    for part in parts:
        path = path / part
        try:
            os.mkdir(path)
        except FileExistsError:
            mode = os.lstat(path).st_mode
            if not stat.S_ISDIR(mode):
                raise _refused(path, f"{kind_of(mode)} where ssmscale keeps a folder") from None
    return path


def check_no_links(root: str | os.PathLike, files: tuple[str, ...], folders: tuple[str, ...] = ()) -> None:
    """Refuse (UserError) a link or a special file at any of the paths below `root` that the tool (or a
    library it calls, such as Lightning's loggers) writes: `files` (regular files, relative paths: their
    folders count as folders) and `folders`."""
    from .safeload import kind_of
    root = Path(root)
    expected = {}
    for rel in files:
        parts = Path(rel).parts
        expected.update({Path(*parts[:i]): "folder" for i in range(1, len(parts))})
        expected[Path(rel)] = "file"
    expected.update({Path(rel): "folder" for rel in folders})
    for rel, kind in sorted(expected.items()):
        try:
            mode = os.lstat(root / rel).st_mode
        except FileNotFoundError:
            continue
        ok = stat.S_ISDIR(mode) if kind == "folder" else stat.S_ISREG(mode)
        if not ok:
            raise _refused(root / rel, f"{kind_of(mode)} where ssmscale keeps a {kind}")


def open_replacing(path: str | os.PathLike):
    """A new text file put in place of `path` at once and kept open for writing (a log written as it
    grows): the rename replaces whatever was at `path` (a link is replaced, its target is never touched)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        os.close(fd)
        os.unlink(tmp)
        raise _refused(path, f"cannot be replaced ({exc.strerror or exc})") from None
    return os.fdopen(fd, "w", newline="")


class FileLock:
    """An exclusive flock on a lock file, released by the kernel even after kill -9; the holder's pid is
    written into it. The lock file is a plain file opened without following a link (O_NOFOLLOW: a planted
    link is refused, never created through or written through) and holding no other name (a hard link's
    target is not written); it is never truncated. `busy`: the UserError message when another process
    holds it ("{pid}" in it is replaced by the holder's), or None to wait for it. `tidy`: its folder is made if missing, and when
    the block ends by an exception the lock file and the folders this lock made are removed again if they
    were new and hold nothing else (a refused command leaves nothing behind)."""

    PID_BYTES = 21

    def __init__(self, path: str | os.PathLike, busy: str | None = None, tidy: bool = False):
        self.path, self.busy, self.tidy = Path(path), busy, tidy
        self.fd, self.created, self.made = None, False, []

    def __enter__(self):
        if self.tidy:
            self.made = _make_parents(self.path)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if self.busy else 0))
            except BlockingIOError:
                holder = os.pread(fd, self.PID_BYTES, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                self._tidy()
                from .errors import UserError
                raise UserError(self.busy.replace("{pid}", holder)) from None
            try:
                same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:          # else its holder removed the file as we waited: lock the one at the path now
                break
            os.close(fd)
        os.pwrite(fd, f"{os.getpid():<{self.PID_BYTES - 1}}\n".encode(), 0)
        self.fd = fd
        return self

    def _open(self) -> int:
        from .safeload import kind_of
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                self.created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
        except OSError as exc:
            self._tidy()
            what = "a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror or exc})"
            raise _refused(self.path, f"{what} where ssmscale keeps its lock file") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            self._tidy()
            what = kind_of(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} names"
            raise _refused(self.path, f"{what} where ssmscale keeps its lock file")
        return fd

    def _tidy(self) -> None:
        if not self.tidy:
            return
        if self.created:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        _remove_empty(self.made)      # those still empty: nothing else was written there

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self._tidy()            # before the lock is released: no other process holds this file
        os.close(self.fd)
        return False
