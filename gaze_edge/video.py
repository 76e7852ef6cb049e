"""Videos as sampled frames with their timestamps, and the prompt text that names each frame.

``load_video`` takes a video file (a path, or its bytes), a list of frames (PIL images, paths,
image bytes: anything ``gaze_edge.images.load_image`` takes) or a ``(T, H, W, 3)`` uint8 array,
and returns a ``Video``: RGB PIL frames sampled uniformly over the duration, with the time of
each in seconds from the first frame. A frame list is a clip at one frame per second
(timestamps 0, 1, 2, ...). Errors are ``VideoError`` (a GazeEdgeError) with one clear line: a
missing file, not a video, a corrupt or truncated one, an unsupported codec, no frames, frames
too large.

Sampling follows Hugging Face's video processors (Qwen2-VL's ``sample_frames``): ``n`` frames out
of ``total``, frame ``floor(i * total / n)`` for ``i = 0 .. n-1`` (the first frame always, then
even steps), here as times ``i * duration / n`` so that a file is read by time, not by index;
``n = min(max_frames, total)``, or with ``fps`` ``min(max_frames, floor(duration * fps), total)``
(at least 1).

Decoding: **PyAV** (``av`` on PyPI, the ``[video]`` extra). Its wheels bundle FFmpeg's libraries
(libavformat/libavcodec: mp4, mkv, webm, avi, mov; h264, hevc, vp8/9, av1, mpeg4, ...) for
Linux, macOS and Windows, so a fresh machine needs no system ffmpeg. It was chosen over
imageio-ffmpeg, which also ships an ffmpeg binary but runs it as a subprocess and pipes raw
frames: PyAV decodes in-process, reads each frame's own timestamp (pts) instead of assuming a
constant rate, seeks to far-apart sample times instead of decoding every frame in between,
reads the header (size, frame count, duration) before decoding anything, so limits are checked
first, and reports FFmpeg's errors as exceptions instead of text on a child's stderr.

Limits (like gaze_edge.images): ``MAX_FRAME_PIXELS`` per frame, ``MAX_TOTAL_PIXELS`` over the
sampled frames (what stays in memory), ``MAX_FRAMES`` frames, ``MAX_ENCODED_BYTES`` for a video
given as bytes. A file on disk is streamed: only the sampled frames (and those up to them) are
decoded, so its size is not limited.

In a prompt each frame is an image (its own grid regions and context tokens; one gaze budget
over all frames) preceded by its label, ``frame_texts``: "Frame 1 (0.0 s): <frame>\\nFrame 2
(0.5 s): <frame>..." (``expand_videos`` lays a rendered prompt out that way).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from gaze_edge.errors import GazeEdgeError, ImageError
from gaze_edge.files import local_file

DEFAULT_MAX_FRAMES = 8  # frames sampled when the caller gives no max_frames
MAX_FRAMES = 1024  # more is refused: each frame is a whole image chunk in the context
MAX_FRAME_PIXELS = 40_000_000  # per frame, read from the header before decoding (8K UHD is 33 MP)
MAX_TOTAL_PIXELS = 256_000_000  # all sampled frames together (~770 MB as RGB)
MAX_ENCODED_BYTES = 512 * 2**20  # a video given as bytes
SEEK_GAP = 5.0  # seconds: a sample this far past the last decoded frame is reached by seeking
TRUNCATED = 0.9  # frames that stop before this fraction of the header's duration: a truncated file


class VideoError(GazeEdgeError, ValueError):
    """A video that cannot be used: missing, not a video, corrupt, no frames, or too large."""


@dataclass(frozen=True)
class Video:
    """Sampled frames (RGB PIL images) and the time of each, in seconds from the first frame."""

    frames: list[Image.Image]
    timestamps: list[float]
    source: str = field(default="<frames>", compare=False)

    def __len__(self) -> int:
        return len(self.frames)

    def labels(self) -> list[str]:
        """What the prompt calls each frame: "Frame 1 (0.0 s)", "Frame 2 (0.25 s)", ... (times to
        the millisecond, trailing zeros dropped)."""
        return [f"Frame {i + 1} ({_seconds(t)} s)" for i, t in enumerate(self.timestamps)]


@dataclass(frozen=True)
class VideoPart:
    """A video in a message, before it is decoded (what ``render_prompt`` hands on)."""

    video: Any


VideoInput = Any  # a path, bytes, a frame list, a (T, H, W, 3) array, or a Video


def _seconds(t: float) -> str:
    """0.0, 0.25, 1.5, 2.333: at least one decimal, at most three."""
    text = f"{t:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def frame_texts(video: Video) -> list[str]:
    """The text that goes before each frame of ``video`` in a prompt: its label and ": ", the
    frames after the first on a new line ("Frame 1 (0.0 s): ", "\\nFrame 2 (0.5 s): ", ...)."""
    return [("\n" if i else "") + f"{label}: " for i, label in enumerate(video.labels())]


def expand_videos(pieces: Sequence[str], media: Sequence[Any]) -> tuple[list[str], list[Any]]:
    """A prompt cut at its media (``len(pieces) == len(media) + 1``) with every Video replaced by
    its frames, each after its ``frame_texts`` label. Returns (pieces, images), again with one
    more piece than images."""
    if len(pieces) != len(media) + 1:
        raise ValueError(f"{len(pieces)} prompt pieces for {len(media)} images/videos")
    out_pieces, images = [pieces[0]], []
    for item, after in zip(media, pieces[1:], strict=True):
        if isinstance(item, Video):
            for text, frame in zip(frame_texts(item), item.frames, strict=True):
                out_pieces[-1] += text
                images.append(frame)
                out_pieces.append("")
            out_pieces[-1] += after
        else:
            images.append(item)
            out_pieces.append(after)
    return out_pieces, images


def load_video(video: VideoInput, fps: float | None = None, max_frames: int | None = None, *,
               max_frame_pixels: int = MAX_FRAME_PIXELS, max_total_pixels: int = MAX_TOTAL_PIXELS,
               max_bytes: int = MAX_ENCODED_BYTES) -> Video:
    """Frames sampled uniformly over ``video`` with their timestamps, or VideoError.

    video: a video file's path (str or PathLike) or contents (bytes); a list or tuple of frames
      (anything ``load_image`` takes; one frame per second); a ``(T, H, W, 3)`` uint8 array (also
      one per second); or a Video (kept as it is unless ``fps`` or ``max_frames`` asks for fewer
      frames).
    fps: frames per second to sample (None: ``max_frames`` spread over the whole clip).
    max_frames: at most this many frames (default ``DEFAULT_MAX_FRAMES``, for a Video all it has;
      at most ``MAX_FRAMES``).
    """
    if max_frames is None:
        max_frames = MAX_FRAMES if isinstance(video, Video) else DEFAULT_MAX_FRAMES
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or not 1 <= max_frames <= MAX_FRAMES:
        raise VideoError(f"max_frames must be an integer in [1, {MAX_FRAMES}], got {max_frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0
                            or not math.isfinite(fps)):
        raise VideoError(f"fps must be a number > 0, got {fps!r}")
    if isinstance(video, Video):
        return _resample(list(video.frames), list(video.timestamps), fps, max_frames, video.source,
                         max_total_pixels)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise VideoError(f"a video array must be (frames, height, width, 3) uint8, got {video.shape} {video.dtype}")
        video = list(video)
    if isinstance(video, list | tuple):
        return _from_frames(video, fps, max_frames, max_frame_pixels, max_total_pixels)
    if isinstance(video, bytes | bytearray | memoryview):
        data = bytes(video)
        if not data:
            raise VideoError("the video bytes are empty")
        if len(data) > max_bytes:
            raise VideoError(f"the video bytes are too large: {len(data) / 2**20:.1f} MiB "
                             f"(limit {max_bytes / 2**20:.0f} MiB)")
        return _decode(io.BytesIO(data), "<bytes>", fps, max_frames, max_frame_pixels, max_total_pixels)
    if not isinstance(video, str | os.PathLike):
        raise VideoError(f"a video must be a path, bytes, a list of frames or an array, not {type(video).__name__}")
    path = local_file(video, "video", VideoError)
    if not os.access(path, os.R_OK):
        raise VideoError(f"cannot read video {path}: permission denied")
    return _decode(str(path), str(path), fps, max_frames, max_frame_pixels, max_total_pixels)


# --- sampling ---------------------------------------------------------------------------------


def sample_count(total: int, duration: float, fps: float | None, max_frames: int) -> int:
    """How many frames to take of ``total`` spanning ``duration`` seconds (at least 1)."""
    n = min(max_frames, total)
    if fps is not None:
        n = min(n, math.floor(duration * fps + 1e-9))
    return max(1, n)


def _indices(total: int, n: int) -> list[int]:
    """Hugging Face's uniform sample: frame ``floor(i * total / n)``, i = 0 .. n-1."""
    return [i * total // n for i in range(n)]


def _resample(frames: list, timestamps: list[float], fps, max_frames: int, source: str,
              max_total_pixels: int) -> Video:
    if not frames:
        raise VideoError(f"the video has no frames: {source}")
    if len(frames) != len(timestamps):
        raise VideoError(f"{len(frames)} frames with {len(timestamps)} timestamps")
    span = timestamps[-1] - timestamps[0]
    duration = span * len(frames) / (len(frames) - 1) if len(frames) > 1 and span > 0 else float(len(frames))
    picked = _indices(len(frames), sample_count(len(frames), duration, fps, max_frames))
    frames = [frames[i] for i in picked]
    _check_total([f.size for f in frames], source, max_total_pixels)
    return Video(frames, [float(timestamps[i]) for i in picked], source)


def _from_frames(items: Sequence[Any], fps, max_frames: int, max_frame_pixels: int, max_total_pixels: int) -> Video:
    from gaze_edge.images import load_image

    if not items:
        raise VideoError("the video has no frames (an empty list)")
    picked = _indices(len(items), sample_count(len(items), float(len(items)), fps, max_frames))
    frames = []
    for i in picked:
        item = items[i]
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[-1] != 3 or item.dtype != np.uint8:
                raise VideoError(f"frame {i + 1}: an array frame must be (height, width, 3) uint8")
            item = Image.fromarray(item)
        try:
            frames.append(load_image(item, max_pixels=max_frame_pixels))
        except ImageError as e:
            raise VideoError(f"frame {i + 1}: {e}") from None
    _check_total([f.size for f in frames], "<frames>", max_total_pixels)
    return Video(frames, [float(i) for i in picked], "<frames>")


def _check_total(sizes: list[tuple[int, int]], what: str, max_total_pixels: int) -> None:
    total = sum(w * h for w, h in sizes)
    if total > max_total_pixels:
        w, h = sizes[0]
        raise VideoError(f"the video's {len(sizes)} frames are too large together: {len(sizes)} x {w}x{h} = "
                         f"{total / 1e6:.0f} MP (limit {max_total_pixels / 1e6:.0f} MP); take fewer frames")


# --- decoding a file --------------------------------------------------------------------------


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("reading video files needs PyAV: pip install 'gaze-edge[video]' (or pip install av)") from None
    return av


def _decode(source, what: str, fps, max_frames: int, max_frame_pixels: int, max_total_pixels: int) -> Video:
    av = _av()
    try:
        container = av.open(source, mode="r")
    except av.error.FFmpegError as e:
        raise VideoError(f"not a video, or a corrupt or truncated one: {what} ({_reason(e)})") from None
    except OSError as e:
        raise VideoError(f"cannot read video {what}: {e.strerror or e}") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"no video stream in {what} (an audio file, or not a video)")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = getattr(ctx, "name", None) or "unknown"
        width, height = int(stream.width or 0), int(stream.height or 0)
        if width * height > max_frame_pixels:
            raise VideoError(f"the video's frames are too large: {width}x{height} = {width * height / 1e6:.0f} MP "
                             f"(limit {max_frame_pixels / 1e6:.0f} MP)")
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        duration = _duration(container, stream)
        try:
            if duration is None:  # no duration in the header: read the packets' times (no decoding)
                duration = _scan_duration(container, stream, rate)
                container.seek(0)
            total = int(stream.frames or 0) or (max(1, round(duration * rate)) if rate and duration else 0)
            if total <= 0 or not duration or duration <= 0:
                raise VideoError(f"the video has no frames: {what}")
            n = sample_count(total, duration, fps, max_frames)
            if width and height:
                _check_total([(width, height)] * n, what, max_total_pixels)
            targets = [i * duration / n for i in range(n)]
            frames, times, end = _frames_at(container, stream, targets, rate, max_frame_pixels, what)
        except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError, NotImplementedError):
            raise VideoError(f"unsupported video codec {codec!r} in {what}") from None
        except av.error.FFmpegError as e:
            raise VideoError(f"corrupt video {what}: {_reason(e)} (codec {codec})") from None
    if not frames:
        raise VideoError(f"the video has no frames: {what}")
    if end is not None and end < TRUNCATED * duration - (1 / rate if rate else 0):
        raise VideoError(f"corrupt video {what}: its frames stop at {end:.1f} s of the {duration:.1f} s "
                         "its header gives (truncated?)")
    _check_total([f.size for f in frames], what, max_total_pixels)
    return Video(frames, times, what)


def _reason(e) -> str:
    """FFmpeg's own words for an error, without the errno and the file name PyAV adds."""
    return str(getattr(e, "strerror", None) or e).strip() or type(e).__name__


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base
    return None


def _scan_duration(container, stream, rate: float | None) -> float | None:
    """The stream's length from its packets' timestamps (demuxing only), for headers without one."""
    start = end = None
    count = 0
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        count += 1
        t = float(packet.pts * stream.time_base)
        start = t if start is None else min(start, t)
        step = float(packet.duration * stream.time_base) if packet.duration else (1 / rate if rate else 0)
        end = t + step if end is None else max(end, t + step)
    if not count:
        return None
    return (end - start) if end and end > start else float(count) / (rate or 1.0)


def _frames_at(container, stream, targets: list[float], rate: float | None, max_frame_pixels: int, what: str):
    """Decode, for each target time (seconds from the first frame), the last frame at or before
    it (Hugging Face samples frame ``floor(i * total / n)``); a frame that serves several targets
    is taken once. Returns (frames, their times from the first frame, and the time of the last
    frame when the stream ended before the last target, else None)."""
    eps = 0.25 / rate if rate else 1e-3
    frames, times = [], []
    origin = None
    index = 0  # frames decoded since the start (the time of a frame without pts)
    last = 0.0
    prev = None  # (frame, time) the last decoded frame, not yet taken
    ended = False  # the stream ended before the last target
    i = 0
    sought = -1  # the target last sought (its keyframe may lie further back than SEEK_GAP)

    def take(frame, t):
        if frame.width * frame.height > max_frame_pixels:
            raise VideoError(f"the video's frames are too large: {frame.width}x{frame.height} "
                             f"(limit {max_frame_pixels / 1e6:.0f} MP)")
        frames.append(frame.to_image().convert("RGB"))
        times.append(round(t, 6))

    decoded = container.decode(stream)
    while i < len(targets):
        if origin is not None and sought != i and targets[i] - last > SEEK_GAP and stream.time_base:
            # far ahead: seek to the keyframe before the target instead of decoding every frame
            container.seek(int((origin + targets[i]) / stream.time_base), stream=stream, backward=True)
            decoded = container.decode(stream)
            sought, index, prev = i, None, None  # frame counts are lost after a seek
        frame = next(decoded, None)
        if frame is None:
            ended = True
            break
        t = frame.time if frame.time is not None else (index or 0) / (rate or 1.0)
        if index is not None:
            index += 1
        if origin is None:
            origin = t
        t -= origin
        last = max(last, t)
        while i < len(targets) and t > targets[i] + eps:  # past target i: the frame before serves it
            if prev is not None:
                take(*prev)
                prev = None
            i += 1
        prev = (frame, t)
    if prev is not None and i < len(targets):  # the last frame serves the targets after it
        take(*prev)
    return frames, times, (last if ended else None)
