"""Writing files so that nothing is ever half-written: every file hrnet writes goes through here."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
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


class LockedError(HRNetError):
    """A file or directory that another hrnet process holds (an exclusive lock is taken)."""


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, what: str, *, holder: str = "another hrnet process",
                   instead: str = "choose another", error: type[HRNetError] = LockedError) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) while the block runs, with
    this process's pid written in it. A second holder is refused at once, in one line:
    "``what``: ``holder`` (pid N) is running on it; wait for it to end or ``instead``". The kernel drops the lock when the process dies,
    even by SIGKILL, so a stale lock never blocks a resume. Every writer that must never run twice
    on one target (a training run directory, ``predict --output``) goes through here."""
    lock_path = Path(lock_path)
    try:
        lock = open(lock_path, "a+", encoding="utf-8")
    except OSError as e:
        raise error(f"{what}: cannot write {display_path(lock_path)} ({e.strerror or e})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read(20).strip()
            raise error(f"{what}: {holder}{f' (pid {pid})' if pid.isdigit() else ''} is running on it; "
                        f"wait for it to end or {instead}") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def refuse_same_file(dest: str | os.PathLike, *inputs: str | os.PathLike | None,
                     error: type[HRNetError] = WriteError) -> None:
    """Refuse, in one line, to write ``dest`` when it is the same file as one of ``inputs``
    (``os.path.samefile``: symlinks, hard links, ``./x`` and ``x``). Inputs that are URLs, model
    names or missing files are not files on disk and are skipped."""
    for src in inputs:
        if src is None:
            continue
        with contextlib.suppress(OSError, ValueError, TypeError):
            if os.path.samefile(dest, src):
                raise error(f"{display_path(dest)}: is the same file as the input {display_path(src)}; "
                            "writing it would destroy the input; choose another output path")
