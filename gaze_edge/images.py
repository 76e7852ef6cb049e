"""Loading user images safely: clear errors for missing, non-image, corrupt and huge files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from gaze_edge.errors import ImageError

# Larger images are refused before they are decoded (a decompression bomb is a small file that
# expands to gigabytes). 64 MP is far above what any vision encoder here takes.
MAX_PIXELS = 64_000_000


def load_image(image: str | os.PathLike | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path or a PIL image, fully decoded, or ImageError."""
    if isinstance(image, Image.Image):
        _check_size(image.size, "the image", max_pixels)
        return image.convert("RGB")
    if not isinstance(image, str | os.PathLike):
        raise ImageError(f"an image must be a path or a PIL image, not {type(image).__name__}")
    path = Path(image)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"image path is a folder: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(im.size, str(path), max_pixels)
                im.load()
                return im.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image (or an unsupported format): {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large (decompression bomb protection): {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image {path}: {e}") from None


def _check_size(size: tuple[int, int], what: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what} is empty ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{what} is too large: {w}x{h} = {w * h / 1e6:.0f} MP (limit {max_pixels / 1e6:.0f} MP)")
