"""The errors a user can get from loading, downloading or converting weights: one line each, naming the file."""

from __future__ import annotations

from ..errors import HRNetError


class CheckpointError(HRNetError):
    """A checkpoint that cannot be read: unknown container, truncated or corrupt bytes."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for anything but tensors/arrays (it could run code); it is never executed."""


class KeyMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not match the architecture (another width, another model)."""


class DownloadError(HRNetError):
    """A download that failed, was cut short, or is not available offline."""


class ChecksumError(DownloadError):
    """Downloaded bytes whose SHA-256 does not start with the prefix in the file name."""
