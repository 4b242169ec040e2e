"""Fetching weights into the cache: keyed by URL, verified, bounded, atomic, resumable by asking again.

The cache is keyed by the whole URL, never the file name alone (two URLs ending in ``model.safetensors``
are two entries), as huggingface_hub keys by repository and revision: a URL's file lands in
``$HRNET_HOME/checkpoints/<sha256 of the URL, 32 hex>/<its file name>`` (default home ``~/.cache/hrnet``),
with ``source.json`` beside it recording the URL, the byte count and the SHA-256 of the bytes it served.
A reuse checks all three, so a cache shared by users or processes hands each URL exactly its own bytes.
A download streams through :func:`~hrnet.fileio.atomic_write` and is renamed into place only once
complete and verified, so an interrupted or corrupt download is never taken for a cached file.
Verified means: the SHA-256 prefix in the file name where one is published; otherwise (the two
small models' hub files) the declared length and a full structural check of the container
(:data:`~.containers.CONTAINERS`), with a warning that no checksum exists. A download is capped at MAX_BYTES and must keep up MIN_RATE over
every STALL_WINDOW, and SIGTERM/SIGHUP (like Ctrl-C) remove the ``.part`` before the process ends.
``HRNET_OFFLINE=1`` never touches the network; ``HRNET_MIRROR`` (a base URL or a local directory)
serves the published file names, verified the same way and cached under the published URL.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit

from tqdm import tqdm

from ..fileio import WriteError, atomic_write, open_regular
from .containers import sniff
from .errors import CheckpointError, ChecksumError, DownloadError

TIMEOUT = 10.0  # seconds to connect, and to wait for each read: an unreachable host fails fast
CHUNK = 1 << 20
MAX_BYTES = 4 << 30  # hrnet-w64's file is 0.5 GB: anything near this is not a weights file
STALL_WINDOW = 30.0  # seconds over which a download must average at least MIN_RATE
MIN_RATE = 1024  # bytes per second: a trickle (one byte every few seconds) fails within a window
LOCAL_HINT = "pass a local file instead: checkpoint=PATH in Python, --checkpoint PATH on the command line"
UNVERIFIED = "no published checksum; verified only by length and structure"
RECORD = "source.json"  # beside each cached file: the URL it came from, its size and SHA-256


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


def offline() -> bool:
    """Whether ``HRNET_OFFLINE`` forbids the network."""
    return os.environ.get("HRNET_OFFLINE", "") not in ("", "0")


def cache_path(url: str, filename: str | None = None) -> Path:
    """Where ``url``'s file (named ``filename``, default the URL's last path part) is kept in the cache."""
    key = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_dir() / key / (filename or Path(urlsplit(url).path).name)


def source_of(url: str, filename: str) -> str:
    """Where a download of ``url`` reads from: ``HRNET_MIRROR``'s copy of ``filename`` when set, else ``url``."""
    mirror = os.environ.get("HRNET_MIRROR")
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + filename if is_url(mirror) else str(Path(mirror).expanduser() / filename)


def cached(url: str, filename: str | None = None) -> Path | None:
    """``url``'s file in the cache if its record names this URL and its bytes are the ones recorded
    (length and SHA-256, and the SHA-256 prefix in the name where there is one); else None."""
    dest = cache_path(url, filename)
    if not dest.is_file():
        return None
    try:
        record = json.loads((dest.parent / RECORD).read_text()[:65536])
        good = (record.get("url") == url and dest.is_file() and dest.stat().st_size == record.get("size")
                and file_sha256(dest) == record.get("sha256")
                and record["sha256"].startswith(sha256_prefix(dest.name) or ""))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if not good:
        warnings.warn(f"{dest}: the cached file is not what {url} served (its record in {RECORD} disagrees); "
                      "downloading it again", stacklevel=3)
    return dest if good else None


def fetch(url: str, filename: str | None = None, *, progress: bool = True) -> Path:
    """The cached copy of ``url`` (saved as ``filename``, default the URL's last path part), downloading it once."""
    filename = filename or Path(urlsplit(url).path).name
    dest = cache_path(url, filename)
    if cached(url, filename):
        return dest
    if offline():
        raise DownloadError(f"{url} is not in the cache ({dest}) and HRNET_OFFLINE is set; {LOCAL_HINT}")
    source = source_of(url, filename)
    with _exclusive(dest.parent.name), _cleanup_on_signals():
        if cached(url, filename):  # another process (a torchrun rank, say) fetched it while we waited
            return dest
        try:
            for stale in dest.parent.glob("." + glob.escape(dest.name) + ".*.part*"):  # left by a killed download
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
            digest, size = _save(stream, total, source, dest, prefix, progress)
            text = json.dumps({"url": url, "size": size, "sha256": digest}, indent=1) + "\n"
            atomic_write(dest.parent / RECORD, lambda tmp: Path(tmp).write_text(text))
        except WriteError as e:
            raise DownloadError(f"{e}; set HRNET_HOME to a writable directory with free space") from None
        finally:
            with contextlib.suppress(OSError):
                dest.parent.rmdir()  # only if empty: a failed first download leaves no entry behind
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
def _exclusive(key: str) -> Iterator[None]:
    """One downloader per URL across processes: the others wait, then find it cached. (It waits, where
    :func:`~hrnet.fileio.exclusive_lock` refuses: a second torchrun rank wants the same file, not an error.)"""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads stay correct (atomic rename), only wasteful
        yield
        return
    locks = cache_dir().parent / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = open(locks / f"{key}.lock", "w")
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


def _save(stream: BinaryIO, total: int | None, source: str, dest: Path, prefix: str | None,
          progress: bool) -> tuple[str, int]:
    """Stream into ``dest`` through :func:`atomic_write`: renamed into place only if complete and verified.
    Returns the SHA-256 and the size of the bytes."""
    digest, sizes = hashlib.sha256(), [0]

    def write(tmp: str) -> None:
        size, limit = 0, MAX_BYTES if total is None else total
        read = getattr(stream, "read1", stream.read)  # at most one network read, so a trickle is noticed
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
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
                    raise _unwritable(cache_dir(), e) from None
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
            except OSError as e:
                raise _unwritable(cache_dir(), e) from None
        if total is not None and size != total:
            raise DownloadError(f"{source}: connection closed after {size} of {total} bytes; nothing was cached")
        if prefix and not digest.hexdigest().startswith(prefix):
            raise ChecksumError(f"{source}: SHA-256 {digest.hexdigest()[:len(prefix)]} does not match the "
                                f"{prefix} in its file name; nothing was cached")
        if not prefix:
            _check_structure(Path(tmp), source)
        sizes[0] = size

    with stream:
        atomic_write(dest, write)
    return digest.hexdigest(), sizes[0]


def _check_structure(path: Path, source: str) -> None:
    """A file without a published hash must at least be a complete, well-formed checkpoint container."""
    try:
        sniff(path).verify(path)
    except (CheckpointError, OSError) as e:
        raise DownloadError(f"{source}: not a complete checkpoint ({str(e).replace(str(path) + ': ', '')}); "
                            "nothing was cached") from None


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
