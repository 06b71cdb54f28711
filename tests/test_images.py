"""mmr1.images: decoding every accepted image form and resizing into the pixel range."""

import io

from PIL import Image

from data import toy
from mmr1 import images


def grid_image(colours=("red", "blue", "green", "yellow")):
    return toy.draw_grid(list(colours))


def image_file(tmp_path, name="img.png"):
    path = tmp_path / name
    grid_image().save(path)
    return str(path)


def test_resize_image_keeps_pixels_in_range():
    for w, h in [(30, 20), (112, 112), (4000, 3000), (50, 2000)]:
        out = images.resize_image(Image.new("RGB", (w, h)), 3136, 200_000)
        ow, oh = out.size
        assert ow % 28 == 0 and oh % 28 == 0
        assert 3136 <= ow * oh <= 200_000, (w, h, out.size)


def test_load_image_sources(tmp_path):
    img = grid_image()
    path = image_file(tmp_path)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    for source in (img, path, buffer.getvalue(), {"bytes": buffer.getvalue(), "path": None}, {"path": path}):
        assert images.load_image(source).size == (112, 112)
