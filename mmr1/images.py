"""Images of a row: decoding any of the accepted forms, resizing into the run's pixel range the way
the Qwen-VL processors do (to multiples of the processor's pixels per merged token,
families.image_factor), and the shape rules the processor would otherwise fail on."""

from __future__ import annotations

import contextlib
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
    """PIL RGB image from a PIL image, a path, raw bytes or a `{"bytes": ..., "path": ...}` dict.

    The EXIF orientation is applied (as the hub's image decoding does: a phone photo stored sideways
    is seen upright) and every mode becomes 8-bit RGB with the right values (to_rgb).
    """
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        with open_regular(image) as f:
            image = Image.open(io.BytesIO(f.read()))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    return to_rgb(upright(image))


EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image by 90 degrees: width and height swap


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of an image in any accepted form as load_image gives it (upright), read from
    its header and EXIF tag (no pixel decoding)."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    if isinstance(image, Image.Image):
        return upright(image).size if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else image.size
    if not isinstance(image, (str, os.PathLike, io.BytesIO)):
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    if isinstance(image, (str, os.PathLike)):
        image = open_regular(image)
    with image if not isinstance(image, io.BytesIO) else contextlib.nullcontext(), Image.open(image) as opened:
        w, h = opened.size
        # a PNG's EXIF may follow its pixels (PIL would decode them to find it): read only one found in the header
        tagged = opened.format != "PNG" or "exif" in opened.info
        return (h, w) if tagged and opened.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


def upright(image):
    """The image turned as its EXIF orientation tag says (a no-op without one)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def to_rgb(image):
    """8-bit RGB with the values the image means, whatever its mode.

    - 16-bit grey (`I;16*`, and `I` holding 0..65535): scaled to 0..255 by /257 (PIL's own
      convert("RGB") clips them at 255, so nearly every 16-bit image became white);
    - float grey (`F`): values in [0, 1] scaled by 255, others clipped to 0..255;
    - transparency (`RGBA`, `LA`, `PA`, `P` / `L` / `RGB` with a transparency entry): composited over
      white, as Qwen's own loader does (a plain convert would show the colour under alpha 0, often black);
    - everything else (`L`, `1`, `P`, `CMYK`, `YCbCr`, ...): PIL's conversion.
    """
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
    """Resizes so that H*W lies in [min_pixels, max_pixels] and H, W are multiples of `factor` (the
    processor's patch x merge, families.image_factor: then its own resize leaves the image as it is).

    Keeps the aspect ratio (as the processor's smart resize does), so HF and vLLM see the same pixels.
    """
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
    """Raises ValueError for a w x h image the Qwen-VL image processor would refuse.

    The processor (transformers' smart_resize) gets the image after resize_image (to multiples of
    `factor`, families.image_factor of the processor) and refuses it when max(H, W) / min(H, W) >
    200; an empty image would divide by zero there. A reader with no processor at hand
    (prepare.load_rows) checks at 28 px, the 14-px patch x 2 merge; the door with a processor, and
    the loop's rows after it, at the processor's own factor.
    """
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
