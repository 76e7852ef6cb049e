"""Loading user images safely, in every form a user has them, and telling images apart.

``load_image`` takes a path (str or PathLike), a PIL image, the bytes of an image file, or a
``data:`` URL, and returns a decoded RGB PIL image or raises ImageError with one clear line:
missing, not an image, corrupt, too many pixels (checked before decoding: a decompression bomb is
a small file that expands to gigabytes), or too many encoded bytes.

``image_key`` names an image by its decoded pixels, so the same picture given as a path, as bytes
or as a data URL is recognised as the same image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import urllib.parse
import warnings
from pathlib import Path
from typing import IO, Union

from PIL import Image, UnidentifiedImageError

from gaze_edge.errors import ImageError
from gaze_edge.files import local_file

# Larger images are refused before they are decoded. 64 MP is far above what any vision encoder
# here takes.
MAX_PIXELS = 64_000_000
# Image file contents given in memory (bytes, data: URLs) larger than this are refused before
# they are decoded or copied.
MAX_ENCODED_BYTES = 64 * 2**20

ImageInput = Union[str, os.PathLike, Image.Image, bytes, bytearray, memoryview]

_WHITESPACE = re.compile(rb"\s+")


def load_image(
    image: ImageInput, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_ENCODED_BYTES
) -> Image.Image:
    """An RGB PIL image, fully decoded, or ImageError.

    image: a path (str or os.PathLike); a PIL image; the encoded contents of an image file
      (bytes, bytearray or memoryview); or a str starting with ``data:`` (RFC 2397,
      ``data:[<mediatype>][;base64],<data>``). Any format Pillow opens is taken, whatever the
      declared media type. A file whose name starts with ``data:`` must be given as a Path.
    max_pixels: width * height above which the image is refused, read from the header before
      decoding.
    max_bytes: encoded size above which bytes and data: URLs are refused.
    """
    if isinstance(image, Image.Image):
        _check_size(image.size, "the image", max_pixels)
        try:
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # a lazily opened, corrupt file
            raise ImageError(f"corrupt image: {e}") from None
    if isinstance(image, bytes | bytearray | memoryview):
        data = _check_bytes(image, "the image bytes", max_bytes)
        return _decode(io.BytesIO(data), "<bytes>", max_pixels)
    if isinstance(image, str) and image[:5].lower() == "data:":
        data = _data_url_bytes(image, max_bytes)
        return _decode(io.BytesIO(data), "<data: URL>", max_pixels)
    if not isinstance(image, str | os.PathLike):
        raise ImageError(
            f"an image must be a path, a PIL image, bytes or a data: URL, not {type(image).__name__}"
        )
    path = local_file(image, "image", ImageError)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror or e}") from None
    with f:
        return _decode(_BoundedReads(f), str(path), max_pixels)


class _BoundedReads:
    """A binary file whose ``read(n)`` asks for no more than the bytes left in it.

    Pillow reads some lengths straight from the file (PNG's load_end reads the rest of an IDAT
    chunk by its claimed length, up to 4 GiB) and a buffered file allocates the whole request
    before reading: a 100-byte PNG could take 4 GiB. Memory streams (bytes, data: URLs) already
    clamp their reads.
    """

    def __init__(self, f) -> None:
        self._f = f
        self._size = os.fstat(f.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._f.tell())
        return self._f.read(left if n is None or n < 0 or n > left else n)

    def __getattr__(self, name):  # seek, tell, name, fileno, ...: the file's own
        return getattr(self._f, name)


def image_key(rgb: Image.Image) -> str:
    """A stable hex name of an image's decoded RGB pixels (its size and every pixel).

    Equal for the same pixels however the image was given (path, bytes, data: URL, PIL image);
    different when a single pixel differs. Images not in RGB mode are converted first.
    """
    if rgb.mode != "RGB":
        rgb = rgb.convert("RGB")
    h = hashlib.blake2b(digest_size=16)
    h.update(f"RGB {rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _decode(source: Path | IO[bytes], what: str, max_pixels: int) -> Image.Image:
    """Open (reads the header only), check the size, then decode; Pillow's errors as ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                _check_size(im.size, what, max_pixels)
                im.load()
                return im.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image (or an unsupported format): {what}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses it in open(), before our own check sees the size: say how large it claims to be
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({int(found.group(1)) / 1e6:.0f} MP, limit {max_pixels / 1e6:.0f} MP)" if found else ""
        raise ImageError(f"image too large (decompression bomb protection): {what}{size}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt image {what}: {e}") from None
    except MemoryError:  # a header that claims more than the checks above see, on a small machine
        raise ImageError(f"corrupt image {what}: decoding it needs more memory than there is") from None


def _check_bytes(data: bytes | bytearray | memoryview, what: str, max_bytes: int) -> bytes | bytearray:
    n = data.nbytes if isinstance(data, memoryview) else len(data)
    if n == 0:
        raise ImageError(f"{what} are empty")
    if n > max_bytes:
        raise ImageError(f"{what} are too large: {_amount(n)} (limit {_amount(max_bytes)})")
    return data.tobytes() if isinstance(data, memoryview) else data


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The payload of an RFC 2397 data: URL: base64 (whitespace, URL-safe letters and missing
    padding tolerated) or percent-encoded."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError("bad data: URL: no ',' between the header and the data")
    is_base64 = header.lower().split(";")[-1].strip() == "base64"
    # a lower bound of the decoded size, before any copy: base64 is 4 characters per 3 bytes (and
    # at most 2 of padding), percent-encoding 1 to 3 characters per byte
    if (len(payload) * 3 // 4 - 2 if is_base64 else len(payload) // 3) > max_bytes:
        raise ImageError(f"the data: URL is too large for an image (limit {_amount(max_bytes)})")
    try:
        raw = payload.encode("ascii")
    except UnicodeEncodeError:
        raise ImageError(
            "bad base64 in data: URL" if is_base64 else "bad data: URL: characters outside ASCII"
        ) from None
    if "%" in payload:
        raw = urllib.parse.unquote_to_bytes(raw)
    if is_base64:
        raw = _WHITESPACE.sub(b"", raw).replace(b"-", b"+").replace(b"_", b"/")
        raw += b"=" * (-len(raw) % 4)
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("bad base64 in data: URL") from None
    return bytes(_check_bytes(raw, "the data: URL's bytes", max_bytes))


def _amount(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _check_size(size: tuple[int, int], what: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what} is empty ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{what} is too large: {w}x{h} = {w * h / 1e6:.0f} MP (limit {max_pixels / 1e6:.0f} MP)")
