"""User images: paths, PIL images, bytes and data: URLs load alike; missing, non-image, corrupt and
huge ones give ImageError with a clear message; image_key names an image by its pixels."""

from __future__ import annotations

import base64
import io
import re
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gaze_edge.errors import ImageError
from gaze_edge.images import image_key, load_image


def test_loads_any_mode_as_rgb(tmp_path):
    Image.new("L", (10, 7), 128).save(tmp_path / "g.png")
    im = load_image(tmp_path / "g.png")
    assert im.mode == "RGB" and im.size == (10, 7)
    assert load_image(Image.new("RGBA", (3, 3))).mode == "RGB"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "image not found"),
        (lambda p: p.write_text("hello, not an image"), "not an image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "not an image|corrupt"),
    ],
    ids=["missing", "text-file", "corrupt-header"],
)
def test_bad_files(tmp_path, make, message):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageError, match=message):
        load_image(path)


def test_truncated_image_is_corrupt(tmp_path):
    path = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageError, match="corrupt"):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 MP, a few KB on disk
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


# --------------------------------------------------------------------------- every form of image


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mediatype: str = "image/png") -> str:
    return f"data:{mediatype};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def picture():
    """A small image with distinct pixels everywhere (a gradient), and its PNG bytes."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), "RGB")
    return im, _png_bytes(im)


def test_bytes_bytearray_memoryview(picture):
    im, png = picture
    for form in (png, bytearray(png), memoryview(png)):
        got = load_image(form)
        assert got.mode == "RGB" and got.size == (13, 9)
        assert got.tobytes() == im.tobytes()


def test_jpeg_bytes_and_other_modes():
    buf = io.BytesIO()
    Image.new("L", (8, 6), 77).save(buf, format="JPEG")
    got = load_image(buf.getvalue())
    assert got.mode == "RGB" and got.size == (8, 6)
    assert got.getpixel((3, 3)) == pytest.approx((77, 77, 77), abs=2)


def test_data_urls(picture):
    im, png = picture
    b64 = base64.b64encode(png).decode()
    urls = [
        _data_url(png),
        "DATA:image/png;base64," + b64,  # the scheme is case-insensitive
        "data:;base64," + b64,  # no media type
        "data:application/octet-stream;base64," + b64,  # Pillow decides what it is
        "data:image/png;base64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),  # wrapped
        "data:image/png;base64," + b64.rstrip("="),  # padding dropped
        "data:image/png;base64," + base64.urlsafe_b64encode(png).decode(),  # URL-safe alphabet
        "data:image/png," + urllib.parse.quote_from_bytes(png),  # percent-encoded, not base64
    ]
    for url in urls:
        assert load_image(url).tobytes() == im.tobytes(), url[:40]


@pytest.mark.parametrize(
    "url, message",
    [
        ("data:image/png;base64,iVBO!!!!", "bad base64 in data: URL"),
        ("data:image/png;base64,iVBORw0KG", "bad base64 in data: URL"),  # 9 characters: never valid
        ("data:image/png;base64,é", "bad base64 in data: URL"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,", "empty"),
        ("data:text/plain;base64," + base64.b64encode(b"hello, not an image").decode(), "not an image"),
        ("data:text/plain,hello%20world", "not an image"),
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode(),
         "not an image|corrupt"),
    ],
    ids=["bad-letters", "bad-length", "non-ascii", "no-comma", "empty", "text", "text-plain", "corrupt"],
)
def test_bad_data_urls(url, message):
    with pytest.raises(ImageError, match=message):
        load_image(url)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image|corrupt"),
    ],
    ids=["empty", "text", "corrupt-header"],
)
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_bytes_are_corrupt(picture):
    _, png = picture
    with pytest.raises(ImageError, match="corrupt"):
        load_image(png[: len(png) // 2])


def test_decompression_bomb_bytes_and_data_url_refused_before_decoding(monkeypatch):
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 MP, a few KB encoded
    data = bomb.getvalue()
    assert len(data) < 200_000
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    for form in (data, _data_url(data)):
        with pytest.raises(ImageError, match="too large"):
            load_image(form)
    assert decoded == []  # refused from the header, before any pixel was decoded
    load_image(_png_bytes(Image.new("RGB", (4, 3))))
    assert set(decoded) == {(4, 3)}  # (the spy sees decoding)


def test_max_pixels_and_max_bytes_are_parameters(picture):
    _, png = picture
    with pytest.raises(ImageError, match="too large"):
        load_image(png, max_pixels=100)  # 13 x 9 = 117 pixels
    assert load_image(png, max_pixels=117).size == (13, 9)
    with pytest.raises(ImageError, match="too large"):
        load_image(png, max_bytes=len(png) - 1)
    with pytest.raises(ImageError, match="too large"):
        load_image(_data_url(png), max_bytes=len(png) - 1)
    assert load_image(_data_url(png), max_bytes=len(png)).size == (13, 9)


def test_other_types_and_urls_are_refused():
    with pytest.raises(ImageError, match="not int"):
        load_image(3)
    with pytest.raises(ImageError, match="not downloaded"):
        load_image("https://example.com/cat.png")


def test_a_file_named_like_a_data_url_is_opened_as_a_path(tmp_path, monkeypatch, picture):
    im, png = picture
    monkeypatch.chdir(tmp_path)
    Path("data:x.png").write_bytes(png)
    assert load_image(Path("data:x.png")).tobytes() == im.tobytes()


# --------------------------------------------------------------------------- image_key


def test_key_is_the_same_for_the_same_pixels_in_every_form(tmp_path, picture):
    im, png = picture
    path = tmp_path / "p.png"
    path.write_bytes(png)
    keys = {image_key(load_image(form)) for form in (path, str(path), png, _data_url(png), im, im.copy())}
    assert len(keys) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", keys.pop())


def test_key_changes_with_one_pixel_and_with_the_shape(picture):
    im, _ = picture
    other = im.copy()
    r, g, b = other.getpixel((5, 4))
    other.putpixel((5, 4), (r, g, b ^ 1))
    assert image_key(other) != image_key(im)
    flat = Image.new("RGB", (6, 4))
    assert image_key(flat) != image_key(flat.resize((4, 6)))  # same bytes, other shape
    assert image_key(flat) != image_key(flat.resize((8, 3)))


def test_key_of_other_modes_is_that_of_their_rgb():
    grey = Image.new("L", (5, 5), 40)
    assert image_key(grey) == image_key(grey.convert("RGB"))
