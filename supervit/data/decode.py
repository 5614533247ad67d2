"""Decoding: every image a file-backed dataset reads goes through `decode_image`."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps

from .splits import DataError

_ORIENTATION = 0x0112
# PIL names the buffer it read (" <_io.BytesIO object at 0x7f...>"): an address, different at every read and
# meaningless to whoever reads the message.
_ADDRESS = re.compile(r" <[\w.]+ object at 0x[0-9a-f]+>")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, TypeError, EOFError, IndexError, Image.DecompressionBombError)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Deep greyscale (16-bit PNG/TIFF: modes I;16*, I, F) scaled to 8 bits: PIL's own convert() clips
    values above 255, which turns a 16-bit photo white."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode == "I":
        a = np.asarray(img).astype(np.int64)
        # Mode I comes from 16-bit sources; one whose values all fit in 8 bits is already on that scale.
        if a.max(initial=0) > 255:
            a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) <= 1.0:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img


def decode_image(data: bytes | None, in_chans: int = 3) -> Image.Image:
    """Decode encoded image bytes into an 8-bit PIL image with ``in_chans`` channels (``L`` or ``RGB``).

    Applies the EXIF orientation; scales 16-bit images to 8 bits; composites transparent images (RGBA, LA,
    palette with transparency) onto white, since the colour under a transparent pixel is arbitrary; converts
    CMYK and palette images. Animated files give their first frame.

    Raises:
        DataError: the bytes are not a decodable image (the message says why, not where: callers add that).
    """
    if data is None:
        raise DataError("the image is null")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # the full decode happens here, so a truncated or corrupt file fails here
        if img.getexif().get(_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_8bit(img)
        if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("L" if in_chans == 1 else "RGB")
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image: {_ADDRESS.sub('', str(e)) or type(e).__name__}") from e
