"""Images of a row: decoding any of the accepted forms, resizing into the run's pixel range the way
Qwen2.5-VL's processor does, and the shape rules the processor would otherwise fail on."""

from __future__ import annotations

import io
import math
import os
from typing import Any


def load_image(image: Any):
    """PIL RGB image from a PIL image, a path, raw bytes or a `{"bytes": ..., "path": ...}` dict."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image).convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def resize_image(image, min_pixels: int, max_pixels: int, factor: int = 28):
    """Resizes so that H*W lies in [min_pixels, max_pixels] and H, W are multiples of `factor`.

    Keeps the aspect ratio (as Qwen2.5-VL's smart resize does), so HF and vLLM see the same pixels.
    """
    w, h = image.size
    w_bar, h_bar = resized_size(w, h, min_pixels, max_pixels, factor)
    return image if (w_bar, h_bar) == (w, h) else image.resize((w_bar, h_bar))


def resized_size(w: int, h: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
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


def check_image_shape(w: int, h: int, min_pixels: int, max_pixels: int) -> None:
    """Raises ValueError for a w x h image the Qwen2-VL image processor would refuse.

    The processor (transformers' smart_resize) gets the image after resize_image and refuses it
    when max(H, W) / min(H, W) > 200; an empty image would divide by zero there.
    """
    if min(w, h) < 1:
        raise ValueError(f"is {w}x{h} pixels (empty)")
    w_bar, h_bar = resized_size(w, h, min_pixels, max_pixels)
    if max(w_bar, h_bar) / min(w_bar, h_bar) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"is {w}x{h} pixels, resized to {w_bar}x{h_bar}: aspect ratio above the processor's limit of "
            f"{MAX_ASPECT_RATIO} (crop or pad it)"
        )


def row_images(row: dict, min_pixels: int, max_pixels: int) -> list:
    """The row's images as resized PIL images (see resize_image)."""
    return [resize_image(load_image(im), min_pixels, max_pixels) for im in (row.get("images") or [])]
