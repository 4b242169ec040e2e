"""Fetching weights into the cache: hash-checked, atomic, resumable by simply asking again.

Files land in ``$HRNET_HOME/checkpoints`` (default ``~/.cache/hrnet``) under their published name.
A download streams into a ``.part`` file next to its destination and is renamed into place only once
complete and verified, so an interrupted or corrupt download is never taken for a cached file.
``HRNET_OFFLINE=1`` never touches the network; ``HRNET_MIRROR`` (a base URL or a local directory)
serves the same file names as the cache, still hash-checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit

from tqdm import tqdm

from .errors import ChecksumError, DownloadError

TIMEOUT = 10.0  # seconds to connect, and to wait for each chunk: an unreachable host fails fast
CHUNK = 1 << 20
LOCAL_HINT = "pass a local file instead: checkpoint=PATH in Python, --checkpoint PATH on the command line"


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
    with _exclusive(filename):
        if dest.is_file():  # another process (a torchrun rank, say) fetched it while we waited
            return dest
        try:
            stream, total = _open(source)
        except (OSError, ValueError) as e:
            via = f" from the mirror {source}" if source != url else ""
            raise DownloadError(f"cannot download {url}{via} into {dest} ({_reason(e)}); {LOCAL_HINT}") from None
        _save(stream, total, source, dest, sha256_prefix(filename), progress)
    return dest


@contextlib.contextmanager
def _exclusive(filename: str) -> Iterator[None]:
    """One downloader per file across processes: the others wait, then find it cached."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads stay correct (atomic rename), only wasteful
        yield
        return
    locks = cache_dir().parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{filename}.lock", "w") as f:
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
        return open(source, "rb"), os.path.getsize(source)
    request = urllib.request.Request(source, headers={"User-Agent": "hrnet"})
    response = urllib.request.urlopen(request, timeout=TIMEOUT)
    length = response.headers.get("Content-Length")
    return response, int(length) if length else None


def _save(stream: BinaryIO, total: int | None, source: str, dest: Path, prefix: str | None, progress: bool) -> None:
    """Stream into a temporary file beside ``dest``; rename it into place only if complete and verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    digest, size = hashlib.sha256(), 0
    try:
        with stream, os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                      desc=dest.name, disable=not progress) as bar:
            try:
                while chunk := stream.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise DownloadError(f"{source}: download interrupted after {size} bytes ({_reason(e)}); "
                                    "nothing was cached") from None
        if total is not None and size != total:
            raise DownloadError(f"{source}: connection closed after {size} of {total} bytes; nothing was cached")
        if prefix and not digest.hexdigest().startswith(prefix):
            raise ChecksumError(f"{source}: SHA-256 {digest.hexdigest()[:len(prefix)]} does not match the "
                                f"{prefix} in its file name; nothing was cached")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
