"""Resident memory that stays flat under load (glibc only; a no-op elsewhere).

A long soak grew the server's RSS by 13 %. Each thread that allocates (the event loop, the decoder
and parse threads, the model thread, the runtime's own threads) gets a glibc malloc arena of its own,
where freed request buffers (uploads, decoded images, batches) stay mapped as fragments:
:func:`limit_arenas` caps the arenas at two (``MALLOC_ARENA_MAX=2``, which also reaches spawned
``--workers`` processes). ``malloc_trim`` between batches was tried and removed: in a process that
has loaded OpenVINO it corrupted the heap (a later, unrelated forward pass segfaulted).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_arenas(arenas: int = ARENAS) -> None:
    """Cap this process's malloc arenas (and, through the environment, its children's)."""
    os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, arenas)
