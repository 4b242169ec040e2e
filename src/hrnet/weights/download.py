"""Fetching weights into the cache: verified, bounded, atomic, resumable by simply asking again.

Files land in ``$HRNET_HOME/checkpoints`` (default ``~/.cache/hrnet``) under their published name.
A download streams into a ``.part`` file next to its destination and is renamed into place only once
complete and verified, so an interrupted or corrupt download is never taken for a cached file.
Verified means: the SHA-256 prefix in the file name where one is published; otherwise (the two
small models' hub files) the declared length and a full structural check of the container, with a
warning that no checksum exists. A download is capped at MAX_BYTES and must keep up MIN_RATE over
every STALL_WINDOW, and SIGTERM/SIGHUP (like Ctrl-C) remove the ``.part`` before the process ends.
``HRNET_OFFLINE=1`` never touches the network; ``HRNET_MIRROR`` (a base URL or a local directory)
serves the same file names as the cache, verified the same way.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import os
import re
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit

from tqdm import tqdm

from ..fileio import open_regular, umask
from .errors import CheckpointError, ChecksumError, DownloadError

TIMEOUT = 10.0  # seconds to connect, and to wait for each read: an unreachable host fails fast
CHUNK = 1 << 20
MAX_BYTES = 4 << 30  # hrnet-w64's file is 0.5 GB: anything near this is not a weights file
STALL_WINDOW = 30.0  # seconds over which a download must average at least MIN_RATE
MIN_RATE = 1024  # bytes per second: a trickle (one byte every few seconds) fails within a window
LOCAL_HINT = "pass a local file instead: checkpoint=PATH in Python, --checkpoint PATH on the command line"
UNVERIFIED = "no published checksum; verified only by length and structure"


def sha256_prefix(filename: str) -> str | None:
    """The hex digits after the last '-' of ``name-<hex>.ext`` (the torch.hub convention), if any."""
    m = re.search(r"-([0-9a-f]{8,64})\.[a-z.]+$", filename)
    return m.group(1) if m else None


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$HRNET_HOME/checkpoints``."""
    return Path(os.environ.get("HRNET_HOME") or "~/.cache/hrnet").expanduser() / "checkpoints"


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` is an http(s) URL rather than a local path."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def fetch(url: str, filename: str | None = None, *, progress: bool = True) -> Path:
    """The cached copy of ``url`` (saved as ``filename``, default the URL's last path part), downloading it once."""
    filename = filename or Path(urlsplit(url).path).name
    dest = cache_dir() / filename
    if dest.is_file():
        return dest
    if os.environ.get("HRNET_OFFLINE", "") not in ("", "0"):
        raise DownloadError(f"{url} is not in the cache ({dest}) and HRNET_OFFLINE is set; {LOCAL_HINT}")
    mirror = os.environ.get("HRNET_MIRROR")
    source = url if not mirror else (mirror.rstrip("/") + "/" + filename if is_url(mirror)
                                     else str(Path(mirror).expanduser() / filename))
    with _exclusive(filename), _cleanup_on_signals():
        if dest.is_file():  # another process (a torchrun rank, say) fetched it while we waited
            return dest
        for stale in dest.parent.glob(glob.escape(dest.name) + ".*.part"):  # left by a killed download
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            stream, total = _open(source)
        except (OSError, ValueError, DownloadError) as e:
            via = f" from the mirror {source}" if source != url else ""
            raise DownloadError(f"cannot download {url}{via} into {dest} ({_reason(e)}); {LOCAL_HINT}") from None
        prefix = sha256_prefix(filename)
        if not prefix:
            warnings.warn(f"{filename}: {UNVERIFIED}", stacklevel=2)
        _save(stream, total, source, dest, prefix, progress)
    return dest


def _unwritable(directory: Path, e: OSError) -> DownloadError:
    return DownloadError(f"cannot write to the weights cache {directory} ({e.strerror or e}); "
                         "set HRNET_HOME to a writable directory with free space")


class _Signalled(BaseException):
    """Raised by the SIGTERM/SIGHUP handler so that ``finally`` blocks remove the ``.part`` file."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception while downloading (Ctrl-C already is one); once cleaned
    up, the signal is re-delivered under the previous handler, so the process still dies of it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) not in (signal.SIG_IGN, None):
            previous[signum] = signal.signal(signum, _raise_signalled)
    try:
        yield
    except _Signalled as e:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        previous = {}
        signal.raise_signal(e.signum)
        raise SystemExit(128 + e.signum) from None  # the previous handler chose not to exit
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_signalled(signum: int, frame: object) -> None:
    raise _Signalled(signum)


@contextlib.contextmanager
def _exclusive(filename: str) -> Iterator[None]:
    """One downloader per file across processes: the others wait, then find it cached."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads stay correct (atomic rename), only wasteful
        yield
        return
    locks = cache_dir().parent / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = open(locks / f"{filename}.lock", "w")
    except OSError as e:
        raise _unwritable(locks.parent, e) from None
    with lock as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _open(source: str) -> tuple[BinaryIO, int | None]:
    """A byte stream for a URL or a local mirror file, and its length when known."""
    if not is_url(source):
        f = open_regular(source, DownloadError)  # a FIFO must not block the open
        length = os.fstat(f.fileno()).st_size
    else:
        request = urllib.request.Request(source, headers={"User-Agent": "hrnet"})
        f = urllib.request.urlopen(request, timeout=TIMEOUT)
        header = f.headers.get("Content-Length")
        length = int(header) if header and header.isdigit() else None
    if length is not None and length > MAX_BYTES:
        f.close()
        raise ValueError(f"{length:,} bytes, more than the {MAX_BYTES:,} a weights file may have")
    return f, length


def _save(stream: BinaryIO, total: int | None, source: str, dest: Path, prefix: str | None, progress: bool) -> None:
    """Stream into a temporary file beside ``dest``; rename it into place only if complete and verified."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    except OSError as e:
        stream.close()
        raise _unwritable(dest.parent, e) from None
    digest, size, limit = hashlib.sha256(), 0, MAX_BYTES if total is None else total
    read = getattr(stream, "read1", stream.read)  # at most one network read, so a trickle is noticed
    try:
        with stream, os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                      desc=dest.name, disable=not progress) as bar:
            window_start, window_size = time.monotonic(), 0
            while True:
                try:
                    chunk = read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                    raise DownloadError(f"{source}: download interrupted after {size} bytes ({_reason(e)}); "
                                        "nothing was cached") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise DownloadError(f"{source}: sent more than {limit:,} bytes "
                                        f"({'its declared length' if total is not None else 'the maximum'}); "
                                        "nothing was cached")
                try:
                    out.write(chunk)
                except OSError as e:
                    raise _unwritable(dest.parent, e) from None
                digest.update(chunk)
                bar.update(len(chunk))
                window_size += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= STALL_WINDOW:
                    if window_size < MIN_RATE * elapsed:
                        raise DownloadError(f"{source}: stalled ({window_size} bytes in the last {elapsed:.0f} s, "
                                            f"under {MIN_RATE} bytes/s); nothing was cached")
                    window_start, window_size = time.monotonic(), 0
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise _unwritable(dest.parent, e) from None
        if total is not None and size != total:
            raise DownloadError(f"{source}: connection closed after {size} of {total} bytes; nothing was cached")
        if prefix and not digest.hexdigest().startswith(prefix):
            raise ChecksumError(f"{source}: SHA-256 {digest.hexdigest()[:len(prefix)]} does not match the "
                                f"{prefix} in its file name; nothing was cached")
        if not prefix:
            _check_structure(Path(tmp), source)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600; a shared cache must be readable by others
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_structure(path: Path, source: str) -> None:
    """A file without a published hash must at least be a complete, well-formed checkpoint container."""
    from . import preflight, safe

    try:
        kind = safe.container(path)
        if kind == "safetensors":
            preflight.check_safetensors(path)
        elif kind == "pickle":
            with open(path, "rb") as f:
                preflight.check_plain_pickle(f, os.fstat(f.fileno()).st_size, str(path))
        elif _is_zip(path):
            preflight.check_torch_zip(path)
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()  # every entry's CRC: a body cut or corrupted in the middle
            if bad is not None:
                raise CheckpointError(f"{path}: entry {bad} is corrupt")
        else:
            preflight.check_torch_legacy(path)
    except (CheckpointError, zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{source}: not a complete checkpoint ({str(e).replace(str(path) + ': ', '')}); "
                            "nothing was cached") from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
