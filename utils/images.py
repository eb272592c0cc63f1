"""One image loader for every script, the trainers and the dataset checker.

    image = load_image("photo.png")            # PIL RGB, 8 bits, upright
    digit = load_image("digit.png", "RGBA")    # keeps transparency (mnist.vis_attn)

Every PIL mode is brought to 8 bits by its real range: 1, L, LA, P (with or without transparency), RGB, RGBA, CMYK
and 16-bit-per-channel RGB(A) as PIL converts them; 16- and 32-bit grayscale (I;16, I;16B, I) by its bit depth
(the values' bit length, at least 8: a 12-bit scan fills the 8 bits as a 16-bit one does, 8-bit data stored in 16
bits stays as it is); floating point (F) in [0, 1] times 255, any other float range stretched from its minimum to its
maximum. The EXIF orientation is applied, as a phone or camera viewer shows the photo.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MODES = ("RGB", "RGBA", "L")
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageError(ValueError):
    """An image file that is missing, a folder, or cannot be decoded; one sentence naming the file."""


def to_8bit(image: Image.Image) -> Image.Image:
    """A PIL image of any mode -> an 8-bit one (L for 1-channel integer / float data, else the image as it is).

    Integer data (I;16*, I): divided by 2^bits - 1, bits = max(8, bit length of the largest value) after shifting a
    negative minimum to 0; float data (F): times 255 when in [0, 1], else stretched from min to max."""
    if image.mode not in ("F", "I") and not image.mode.startswith("I;16"):
        return image
    a = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        lo, hi = (0.0, 1.0) if a.size and a.min() >= 0 and a.max() <= 1 else (a.min(), a.max())
        a = np.nan_to_num(a, nan=lo)
    else:
        lo = min(0.0, a.min()) if a.size else 0.0
        hi = lo + 2.0 ** max(8, int(a.max() - lo).bit_length() if a.size else 8) - 1
    a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), mode="L")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}.")


def convert(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """A decoded PIL image of any mode -> 8-bit `mode` ("RGB", "RGBA" or "L"); see the module docstring."""
    _check_mode(mode)
    image = to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's own advice: palette transparency is converted through RGBA
    if image.mode == "RGBA" and mode == "L":
        image = image.convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Read an image file -> an 8-bit PIL image of `mode` ("RGB", "RGBA" or "L"), EXIF orientation applied.

    Raises ImageError (one sentence naming the file) when the path is missing, a folder, or not a decodable image;
    ValueError for an unknown `mode`. Multi-frame files (GIF, TIFF) give their first frame."""
    _check_mode(mode)
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise ImageError(f"image '{path}' {what}.")
    if path.stat().st_size == 0:
        raise ImageError(f"image '{path}' is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            return convert(ImageOps.exif_transpose(image), mode)
    except DECODE_ERRORS as e:
        reason = " ".join(str(e).replace(f"'{path}'", "").split())[:160] or type(e).__name__
        raise ImageError(f"image '{path}' cannot be decoded ({reason}).") from None
