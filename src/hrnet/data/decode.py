"""Robust image decoding: any readable file becomes an upright 8-bit RGB PIL image, anything else a
one-line :class:`ImageReadError` naming the file and the reason.

Handles EXIF orientation, CMYK, greyscale, RGBA, palette (with transparency), 16-bit and float
images, and the first frame of animations. Decompression bombs are refused as soon as PIL sees the
header: PIL's ``DecompressionBombWarning`` (more than ``Image.MAX_IMAGE_PIXELS`` pixels) is
treated as an error, like its ``DecompressionBombError`` (twice that). PIL's other warnings are about
oddities it recovers from (corrupt EXIF, say) and are silenced.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import HRNetError

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageReadError(HRNetError):
    """An image file that cannot be decoded; the message names the file and why."""


class NotAnImageError(ImageReadError):
    """Data that is no image at all (empty, or no format PIL knows), as opposed to a damaged one."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, scaling 16-bit values down instead of clipping them (PIL's convert clips)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully (first frame, EXIF orientation applied) into an 8-bit RGB image."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot open ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block forever
        raise ImageReadError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise NotAnImageError(f"{path}: empty file (0 bytes)")
    try:
        with open(path, "rb") as f:  # PIL does not own f, so the decoded pixels outlive it
            return _decode(f, path)
    except PermissionError:
        raise ImageReadError(f"{path}: cannot open (permission denied)") from None


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """:func:`load_image` on an encoded image held in memory (an upload); ``name`` goes in errors."""
    if not data:
        raise NotAnImageError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name)


def _decode(f: BinaryIO, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recoverable oddities (bad EXIF...) decode fine: no chatter
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                # PIL only warns here, and warning filters are process-global: threads decoding at
                # once (a server) may race on them, so the limit is checked explicitly as well.
                raise Image.DecompressionBombWarning(
                    f"Image size ({img.width * img.height} pixels) exceeds limit of {Image.MAX_IMAGE_PIXELS} pixels")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = f"refused as a possible decompression bomb: {e}"
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image (unrecognised file format)") from None
    except OSError as e:
        reason = f"truncated or corrupt image data ({e})"
    except Exception as e:  # PIL's plugins raise many types on malformed data
        reason = f"cannot decode ({type(e).__name__}: {e})"
    raise ImageReadError(f"{name}: " + " ".join(reason.split()))
