"""Images of a row: decoding any of the accepted forms, resizing into the run's pixel range the way
the Qwen-VL processors do (to multiples of the processor's pixels per merged token,
families.image_factor), and the shape rules the processor would otherwise fail on."""

from __future__ import annotations

import io
import math
import os
import stat
from typing import Any


def open_regular(path: str | os.PathLike):
    """`path` opened for binary reading if it is a regular file (after following links); ValueError
    otherwise. A FIFO would block open() forever and a device (/dev/zero) never ends, so the type is
    read from the opened descriptor itself (opened non-blocking: no race with a swapped file)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file (a FIFO, device or socket is never read)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def load_image(image: Any):
    """PIL RGB image from a PIL image, a path, raw bytes or a `{"bytes": ..., "path": ...}` dict, turned
    upright by its EXIF orientation (as the hub's decoding does) and in 8-bit RGB (to_rgb)."""
    from PIL import Image, ImageOps

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        with open_regular(image) as f:
            image = Image.open(io.BytesIO(f.read()))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    return to_rgb(ImageOps.exif_transpose(image))


EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image by 90 degrees: width and height swap


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of an image in any accepted form as load_image gives it (upright), read from
    its header and EXIF tag (no pixel decoding)."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, Image.Image):
        return image.size[::-1] if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else image.size
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        image = open_regular(image)
    else:
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    with image, Image.open(image) as opened:
        w, h = opened.size
        # a PNG's EXIF may follow its pixels (PIL would decode them to find it): read only one found in the header
        tagged = opened.format != "PNG" or "exif" in opened.info
        return (h, w) if tagged and opened.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


def to_rgb(image):
    """8-bit RGB with the values the image means, whatever its mode: 16-bit grey (`I;16*`, `I`) / 257
    (PIL's convert clips at 255: white), float grey (`F`) in [0, 1] times 255 (else clipped), transparency
    composited over white as Qwen's loader does (not the colour under alpha 0); others by PIL's convert."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            values = values * 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else values
        else:  # 16-bit range
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image, min_pixels: int, max_pixels: int, factor: int):
    """Resizes so that H*W lies in [min_pixels, max_pixels] and H, W are multiples of `factor`
    (families.image_factor: the processor's own resize then leaves it as it is), keeping the aspect
    ratio as the processor's smart resize does, so HF and vLLM see the same pixels."""
    w, h = image.size
    w_bar, h_bar = resized_size(w, h, min_pixels, max_pixels, factor)
    return image if (w_bar, h_bar) == (w, h) else image.resize((w_bar, h_bar))


def resized_size(w: int, h: int, min_pixels: int, max_pixels: int, factor: int) -> tuple[int, int]:
    """(width, height) in pixels that resize_image gives a w x h image: the size the processor sees."""
    h_bar, w_bar = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar, w_bar = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return w_bar, h_bar


MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize raises "absolute aspect ratio must be smaller than 200"


def check_image_shape(w: int, h: int, min_pixels: int, max_pixels: int, factor: int = 28) -> None:
    """Raises ValueError for a w x h image the Qwen-VL image processor would refuse: after resize_image
    (to multiples of `factor` px, families.image_factor; 28 without a processor) transformers'
    smart_resize refuses max(H, W) / min(H, W) > 200, and an empty image would divide by zero there."""
    if min(w, h) < 1:
        raise ValueError(f"is {w}x{h} pixels (empty)")
    w_bar, h_bar = resized_size(w, h, min_pixels, max_pixels, factor)
    if max(w_bar, h_bar) / min(w_bar, h_bar) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"is {w}x{h} pixels, resized to {w_bar}x{h_bar}: aspect ratio above the processor's limit of "
            f"{MAX_ASPECT_RATIO} (crop or pad it)"
        )


def row_images(row: dict, min_pixels: int, max_pixels: int, factor: int) -> list:
    """The row's images as PIL images resized to multiples of `factor` (see resize_image)."""
    return [resize_image(load_image(im), min_pixels, max_pixels, factor) for im in (row.get("images") or [])]
