"""Writing files so that nothing is ever half-written: every file hrnet writes goes through here."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import HRNetError


class WriteError(HRNetError):
    """A file that could not be written (read-only or full disk, missing permission...)."""


def umask() -> int:
    """The process umask: from /proc where it is shown, else by setting and restoring it (no getter in POSIX)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk, then rename it
    onto ``path``: readers (and a run resumed after a crash) see the old file or the whole new one,
    never half of one. On any failure the temporary file is removed and ``path`` is untouched.
    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part" + path.suffix)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # after write: some writers replace the file they are given
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as text that can always be printed.

    A file name whose bytes are not valid UTF-8 reaches Python as a str with surrogate escapes, which
    ``print`` to a UTF-8 stream refuses (``UnicodeEncodeError``); here those bytes read ``\\xff``.
    """
    p = os.fspath(path)
    try:
        raw = p if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return p.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def open_regular(path: str | os.PathLike, error: type[HRNetError]) -> BinaryIO:
    """Open ``path`` for binary reading, or raise ``error`` naming it if it is not a regular file.

    A FIFO is refused from ``stat`` before any open (opening one for reading blocks until a writer
    comes), and the opened file is checked again with ``fstat`` in case the path changed in between.
    """
    path = os.fspath(path)
    name = display_path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise error(f"{name}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: never wait on a FIFO
    except OSError as e:
        raise error(f"{name}: cannot open ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise error(f"{name}: not a regular file")
    return f
