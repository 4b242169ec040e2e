"""Robust image decoding: any readable file becomes an upright 8-bit RGB PIL image, anything else a
one-line :class:`ImageReadError` naming the file and the reason.

Handles EXIF orientation, CMYK, greyscale, RGBA, palette (with transparency), 16-bit and float
images, and the first frame of animations. What is refused, and when:

- anything that is not a regular file (a FIFO, a device), before it is opened for reading, so
  nothing ever blocks on it;
- more than :data:`MAX_PIXELS` pixels, or a pixel mode outside :data:`MODES`, from the header alone,
  before any pixel is decoded. PIL's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``,
  89.5 MP by default) also counts as a refusal, but hrnet does not rely on it: some libraries set it
  to ``None`` on import. PIL's other warnings are about oddities it recovers from (corrupt EXIF,
  say) and are silenced.

Memory: decoding holds the image as stored plus at most one 8-bit copy, so an image costs at most
6 bytes per pixel (600 MB at the cap). A 16-bit or float image is scaled to 8 bits a band of rows
at a time, never through full-size float arrays (which took 2.1 GB for an 81 MP 16-bit PNG).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import HRNetError
from ..fileio import display_path, open_regular

#: The largest image hrnet decodes, in pixels. Classification resizes to a few hundred pixels a side;
#: 100 MP is more than any camera's full-resolution photo, and bounds decoding to 600 MB.
MAX_PIXELS = 100_000_000

_DEEP_MODES = {"I;16": 1 / 257, "I;16B": 1 / 257, "I;16L": 1 / 257, "I;16N": 1 / 257, "I": 1 / 257, "F": 1.0}
#: Pixel modes hrnet converts to RGB (16-bit and ``I`` values are scaled by 1/257, ``F`` clipped to 0..255).
MODES = frozenset({"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                   *_DEEP_MODES})
_BAND_PIXELS = 1 << 20  # rows scaled per step for 16-bit/float images: a few MB of temporaries
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that makes the image upright


class ImageReadError(HRNetError):
    """An image file that cannot be decoded; the message names the file and why."""


class NotAnImageError(ImageReadError):
    """Data that is no image at all (empty, or no format PIL knows), as opposed to a damaged one."""


def _check_header(img: Image.Image) -> None:
    """Refuse from what the header declares, before any pixel data is decoded."""
    w, h = img.size
    # PIL's own limit only warns below twice its value, and warning filters are process-wide (threads
    # decoding at once, as in the server, race on them): both limits are checked here explicitly.
    limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)
    if w * h > limit:
        raise ImageReadError(f"{w}x{h} pixels ({w * h / 1e6:.0f} MP) exceed the {limit / 1e6:.0f} MP limit "
                             "(hrnet.data.decode.MAX_PIXELS, PIL's Image.MAX_IMAGE_PIXELS)")
    if img.mode not in MODES:
        raise ImageReadError(f"unsupported pixel mode {img.mode!r}")


def _deep_to_grey(img: Image.Image, scale: float) -> Image.Image:
    """An 8-bit greyscale copy of a 16/32-bit or float image: ``round(value * scale)`` clipped to
    0..255 (PIL's own conversion clips 16-bit values instead of scaling them), a band of rows at a time."""
    w, h = img.size
    out = Image.new("L", img.size)
    rows = max(1, _BAND_PIXELS // w)
    for y in range(0, h, rows):
        # float32 is exact here: v / 257 for a 16-bit v is never within 0.001 of a rounding tie
        band = np.asarray(img.crop((0, y, w, min(h, y + rows))), dtype=np.float32)
        band = np.nan_to_num(band, nan=0.0, posinf=255.0, neginf=0.0) * scale
        out.paste(Image.fromarray(np.clip(np.rint(band), 0, 255).astype(np.uint8), "L"), (0, y))
    return out


def _decode(f: BinaryIO) -> Image.Image:
    """The first frame of ``f`` as upright RGB; each step rebinds ``img`` so at most two copies live."""
    img = Image.open(f)
    _check_header(img)
    img.load()
    orientation = img.getexif().get(0x0112)
    if img.mode in _DEEP_MODES:
        img = _deep_to_grey(img, _DEEP_MODES[img.mode])
    if img.mode != "RGB":
        img = img.convert("RGB")  # for a palette with transparency PIL warns, and the colours are the same
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    return img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully (first frame, EXIF orientation applied) into an 8-bit RGB image."""
    name = display_path(path)
    with open_regular(path, ImageReadError) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise NotAnImageError(f"{name}: empty file (0 bytes)")
        return _decode_named(f, name)  # PIL does not own f, so the decoded pixels outlive it


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """:func:`load_image` on an encoded image held in memory (an upload); ``name`` goes in errors."""
    if not data:
        raise NotAnImageError(f"{name}: empty file (0 bytes)")
    return _decode_named(io.BytesIO(data), name)


def _decode_named(f: BinaryIO, name: str) -> Image.Image:
    """:func:`_decode`, with every failure as one :class:`ImageReadError` line naming ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recoverable oddities (bad EXIF...) decode fine: no chatter
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(f)
    except ImageReadError as e:
        reason = f"refused: {e}"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = f"refused as a possible decompression bomb: {e}"
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image (unrecognised file format)") from None
    except MemoryError:
        reason = "out of memory while decoding"
    except OSError as e:
        reason = f"truncated or corrupt image data ({e})"
    except Exception as e:  # PIL's plugins raise many types on malformed data
        reason = f"cannot decode ({type(e).__name__}: {e})"
    raise ImageReadError(f"{name}: " + " ".join(reason.split()))
