"""User images: missing, non-image, corrupt and huge files give ImageError with a clear message."""

from __future__ import annotations

import pytest
from PIL import Image

from gaze_edge.errors import ImageError
from gaze_edge.images import load_image


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
