"""What a client sends as an image, turned into what ``gaze_edge.images.load_image`` takes, safely.

An OpenAI ``image_url`` is a ``data:`` URL (always taken), a ``file://`` URL (only with
``allow_file``: it reads the server machine's files) or an ``http(s)://`` URL (only with
``allow_http``: the server fetches it, within a time and size limit). Nothing else is taken; in
particular a bare path is refused, so a client cannot make the server open its files by name.
Ollama sends plain base64 (``images`` on a message).

The checks here are about *where* an image comes from; what it is (a real image, not a
decompression bomb) is load_image's job, done before any compute.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gaze_edge.errors import ImageError

_WHITESPACE = re.compile(r"\s+")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class UrlPolicy:
    """Which image URLs the server follows, and the limits on fetching one."""

    allow_file: bool = False
    allow_http: bool = False
    timeout: float = 10.0  # seconds for a whole http(s) download
    max_bytes: int = 20 * 2**20  # largest file:// or http(s):// image, in bytes


def image_from_url(url, policy: UrlPolicy, where: str) -> str | bytes:
    """The data: URL itself, or the bytes a file:// / http(s):// URL names; ImageError otherwise.
    ``where`` names the part in the request (for the message)."""
    if not isinstance(url, str) or not url:
        raise ImageError(f"{where}: image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return url
    if scheme == "file":
        if not policy.allow_file:
            raise ImageError(f"{where}: file:// image URLs are not allowed (start the server with --allow-file-urls)")
        return _read_file(url, policy, where)
    if scheme in ("http", "https"):
        if not policy.allow_http:
            raise ImageError(f"{where}: http(s):// image URLs are not fetched (send the image as a data: URL, "
                             "or start the server with --allow-http-urls)")
        return _download(url, policy, where)
    raise ImageError(f"{where}: an image URL must be a data: URL (or file:// / http(s):// when the server "
                     f"allows them), got {url[:40]!r}")


def image_from_base64(text, where: str) -> str | bytes:
    """The bytes of an Ollama-style base64 image (a data: URL is taken too)."""
    if not isinstance(text, str) or not text:
        raise ImageError(f"{where}: an image must be a non-empty base64 string")
    if text[:5].lower() == "data:":
        return text
    raw = _WHITESPACE.sub("", text).replace("-", "+").replace("_", "/")
    raw += "=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ImageError(f"{where}: bad base64") from None
    if not data:
        raise ImageError(f"{where}: the image is empty")
    return data


def _read_file(url: str, policy: UrlPolicy, where: str) -> bytes:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"{where}: a file:// URL must name a file on this machine, not on {parts.netloc!r}")
    path = Path(urllib.request.url2pathname(urllib.parse.unquote(parts.path)))
    if not path.is_file():
        raise ImageError(f"{where}: no such image file: {path}")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise ImageError(f"{where}: the image file is too large: {size} bytes (limit {policy.max_bytes})")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{where}: cannot read {path}: {e.strerror or e}") from None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (urllib also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, policy: UrlPolicy, where: str) -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "gaze-edge"})
    deadline = time.monotonic() + policy.timeout
    try:
        with opener.open(request, timeout=policy.timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise ImageError(f"{where}: the image at the URL is too large: {declared} bytes "
                                 f"(limit {policy.max_bytes})")
            chunks, n = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(f"{where}: fetching the image URL took longer than {policy.timeout:g} s")
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                n += len(chunk)
                if n > policy.max_bytes:
                    raise ImageError(f"{where}: the image at the URL is larger than {policy.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"{where}: fetching the image URL failed: HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        raise ImageError(f"{where}: fetching the image URL took longer than {policy.timeout:g} s") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ImageError(f"{where}: fetching the image URL failed: {reason}") from None
