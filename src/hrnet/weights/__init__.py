"""Weights, in layers with no edge back: file containers (:mod:`.containers`), key layouts
(:mod:`.layouts`), hrnet's own format (:mod:`.hrnet_format`), the download cache (:mod:`.download`),
loading (:mod:`.loading`) and writing (:mod:`.writers`) on top."""

from .containers import CONTAINERS, is_onnx, sniff
from .download import cache_dir, fetch
from .errors import ChecksumError, CheckpointError, DownloadError, KeyMismatchError, UnsafeCheckpointError
from .hrnet_format import eval_config_of
from .layouts import LAYOUTS, WRITABLE, to_layout
from .loading import load_checkpoint, load_weights, local_path
from .writers import convert_checkpoint, save_checkpoint, write_checkpoint

__all__ = [
    "convert_checkpoint", "eval_config_of", "load_checkpoint", "load_weights", "local_path", "save_checkpoint", "cache_dir", "fetch", "ChecksumError", "CheckpointError",
    "DownloadError", "KeyMismatchError", "UnsafeCheckpointError", "LAYOUTS",
    "WRITABLE", "to_layout", "write_checkpoint", "CONTAINERS", "is_onnx", "sniff",
]
