"""mmr1.images: decoding every accepted image form and resizing into the pixel range."""

import io
import itertools

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
    for (w, h), factor in itertools.product([(30, 20), (112, 112), (4000, 3000), (50, 2000)], (28, 32)):
        out = images.resize_image(Image.new("RGB", (w, h)), 3136, 200_000, factor)  # 14- and 16-px patches x 2
        ow, oh = out.size
        assert ow % factor == 0 and oh % factor == 0
        assert 3136 <= ow * oh <= 200_000, (w, h, out.size)


def test_load_image_sources(tmp_path):
    img = grid_image()
    path = image_file(tmp_path)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    for source in (img, path, buffer.getvalue(), {"bytes": buffer.getvalue(), "path": None}, {"path": path}):
        assert images.load_image(source).size == (112, 112)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def left_red_image() -> Image.Image:
    """40 wide x 20 high: the left half red, the right half blue."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    return img


def test_exif_orientation_is_applied(tmp_path):
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png")):
        exif = Image.Exif()
        exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
        data = encoded(left_red_image(), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
        path = tmp_path / f"rotated.{suffix}"
        path.write_bytes(data)
        for source in (data, str(path), {"bytes": data}, Image.open(io.BytesIO(data))):
            out = images.load_image(source)
            assert out.mode == "RGB" and out.size == (20, 40), (fmt, out.size)
            top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))  # red went from the left to the top
            assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (fmt, top, bottom)
    no_tag = images.load_image(encoded(left_red_image(), "PNG"))
    assert no_tag.size == (40, 20) and no_tag.getpixel((5, 5)) == (255, 0, 0)


def test_16_bit_grey_png_keeps_its_values():
    import numpy as np

    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    data = encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(images.load_image(data))
    assert out.shape == (2, 4, 3)
    expected = np.rint(values / 257.0).astype(np.uint8)  # [[0, 1, 128, 255], [4, 78, 156, 233]]
    assert out[..., 0].tolist() == [[0, 1, 128, 255], [4, 78, 156, 233]] == expected.tolist()
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert images.load_image(Image.fromarray(values.astype(np.int32), mode="I")).getpixel((2, 0)) == (128, 128, 128)


def test_other_modes_become_the_right_rgb():
    import numpy as np

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (100, 255))
    assert list(images.load_image(la).getdata()) == [(255, 255, 255), (100, 100, 100)]  # alpha 0 -> white
    rgba = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    assert images.load_image(rgba).getpixel((0, 0)) == (255, 127, 127)
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # palette entry 0 (black) is transparent
    reread = Image.open(io.BytesIO(encoded(p, "PNG")))
    assert list(images.load_image(reread).getdata()) == [(255, 255, 255), (255, 0, 0)]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # full magenta + yellow = red
    assert images.load_image(cmyk).getpixel((0, 0)) == (255, 0, 0)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert list(images.load_image(f).getdata()) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    grey = Image.new("L", (1, 1), 77)
    assert images.load_image(grey).getpixel((0, 0)) == (77, 77, 77)
