"""Weights: loading every public HRNet checkpoint format safely, the download cache, hrnet's own format."""

from .checkpoint import (convert_checkpoint, eval_config_of, load_checkpoint, load_weights, local_path,
                         save_checkpoint)
from .download import cache_dir, fetch
from .errors import ChecksumError, CheckpointError, DownloadError, KeyMismatchError, UnsafeCheckpointError
from .formats import LAYOUTS
from .writers import WRITABLE, to_layout, write_checkpoint

__all__ = [
    "convert_checkpoint", "eval_config_of", "load_checkpoint", "load_weights", "local_path", "save_checkpoint", "cache_dir", "fetch", "ChecksumError", "CheckpointError",
    "DownloadError", "KeyMismatchError", "UnsafeCheckpointError", "LAYOUTS",
    "WRITABLE", "to_layout", "write_checkpoint",
]
