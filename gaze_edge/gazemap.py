"""Gaze pictures: where the model looked, per generated token, drawn from a real trace.

For each generated token the runtime's trace says which regions every (layer, KV head) selected
when choosing it. A panel shows the image lit region by region by the fraction of (layer, KV
head) pairs that selected it (dark = never, full brightness = all), outlines the regions most of
them selected, and captions the token. Panels go
into one PNG grid, or one frame each into an animated GIF.

A video (``render_video``) is drawn over time: per generated token one sheet of all its frames
tiled, each frame lit by its own regions' selection frequency (the regions of all frames are
numbered together, frame after frame, and share one gaze budget) and captioned with its label
and the share of the step's selections it got; the frame with the largest share is framed. A
GIF has one sheet per token; a PNG stacks the sheets, one row of frames per token.

Regions map to pixels by stretching the token grid over the whole picture, which is exact for
inputs the runtime feeds at the model's native size and approximate where it pads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 224  # px, the long side of one panel
CAPTION = 18  # px below each panel
COLOR = (255, 64, 32)


@dataclass(frozen=True)
class RegionGrid:
    """How an image's grid of tokens is cut into regions (GAZE_SPEC.md, Terms)."""

    grid_h: int
    grid_w: int
    region_h: int
    region_w: int

    @property
    def regions_h(self) -> int:
        return math.ceil(self.grid_h / self.region_h)

    @property
    def regions_w(self) -> int:
        return math.ceil(self.grid_w / self.region_w)

    @property
    def n_regions(self) -> int:
        return self.regions_h * self.regions_w

    def box(self, region: int, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1) of a region in a width x height picture."""
        r, c = divmod(region, self.regions_w)
        y0, x0 = r * self.region_h, c * self.region_w
        y1, x1 = min(y0 + self.region_h, self.grid_h), min(x0 + self.region_w, self.grid_w)
        sx, sy = width / self.grid_w, height / self.grid_h
        return round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)


def selection_frequency(selected: np.ndarray, n_regions: int) -> np.ndarray:
    """Fraction of (layer, head) rows that selected each region.

    selected: int array (n_layers, n_heads, k) of region indices of one image (or -1 for none).
    Returns float (n_regions,) in [0, 1].
    """
    sel = np.asarray(selected).reshape(-1, np.asarray(selected).shape[-1])
    counts = np.zeros(n_regions, dtype=np.float64)
    for row in sel:
        idx = np.unique(row[(row >= 0) & (row < n_regions)])
        counts[idx] += 1
    return counts / max(len(sel), 1)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_panel(image: Image.Image, grid: RegionGrid, frequency: np.ndarray, caption: str,
               size: int = PANEL) -> Image.Image:
    """The image dimmed, each region lit by how often it was selected, and a caption below.

    A region selected by every (layer, KV head) shows at full brightness, one never selected stays
    dark; regions a majority selected are outlined. size: the panel's long side in pixels.
    """
    base = image.convert("RGB")
    scale = size / max(base.size)
    base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))))
    dim = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.75)
    panel = dim.copy()
    outlines = []
    for region, f in enumerate(frequency):
        if f <= 0:
            continue
        box = grid.box(region, *base.size)
        panel.paste(Image.blend(dim.crop(box), base.crop(box), float(f)), box[:2])
        if f >= 0.5:
            outlines.append(box)
    draw = ImageDraw.Draw(panel)
    for x0, y0, x1, y1 in outlines:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=COLOR, width=2)
    out = Image.new("RGB", (panel.width, panel.height + CAPTION), (255, 255, 255))
    out.paste(panel, (0, 0))
    ImageDraw.Draw(out).text((4, panel.height + 2), caption[:32], fill=(0, 0, 0), font=_font())
    return out


def render(
    image: Image.Image,
    grid: RegionGrid,
    steps: Sequence[tuple[str, np.ndarray]],
    path: str | Path,
    columns: int = 6,
) -> Path:
    """Write the gaze picture of a run: a PNG grid of panels, or an animated GIF (by suffix).

    steps: (token text, selected region indices (n_layers, n_heads, k)) per generated token.
    """
    if not steps:
        raise ValueError("no generated token gazed at the image: nothing to draw")
    path = Path(path)
    panels = [draw_panel(image, grid, selection_frequency(sel, grid.n_regions), repr(text.strip() or text))
              for text, sel in steps]
    if path.suffix.lower() == ".gif":
        return _save_gif(panels, path)
    return _save_png(_tile(panels, min(columns, len(panels))), path)


@dataclass(frozen=True)
class VideoFrame:
    """One frame of a video as the sequence holds it: the picture, its region grid, the global
    id of its first region (regions of all images are numbered together) and its label."""

    image: Image.Image
    grid: RegionGrid
    first_region: int
    label: str


VIDEO_PANEL = 160  # px, the long side of one frame in a video sheet
HEADER = 20  # px above each video sheet: the token


def frame_shares(frames: Sequence[VideoFrame], selected: np.ndarray) -> np.ndarray:
    """(n_frames,) the fraction of a step's selected regions (over layers, heads and the k
    picks) that lie in each frame."""
    ids = np.asarray(selected).reshape(-1)
    ids = ids[ids >= 0]
    counts = np.array([np.count_nonzero((ids >= f.first_region) & (ids < f.first_region + f.grid.n_regions))
                       for f in frames], dtype=np.float64)
    return counts / max(len(ids), 1)


def draw_video_sheet(frames: Sequence[VideoFrame], selected: np.ndarray, caption: str,
                     columns: int | None = None) -> Image.Image:
    """One step over a video: every frame lit by the selections of its own regions, captioned
    with its label and share, the frame with the largest share framed, the token on top."""
    shares = frame_shares(frames, selected)
    panels = []
    for frame, share in zip(frames, shares, strict=True):
        frequency = selection_frequency(np.asarray(selected) - frame.first_region, frame.grid.n_regions)
        panels.append(draw_panel(frame.image, frame.grid, frequency, f"{frame.label} {share:.0%}", VIDEO_PANEL))
    if len(panels) and shares.max() > 0:
        best = panels[int(shares.argmax())]
        ImageDraw.Draw(best).rectangle((0, 0, best.width - 1, best.height - 1), outline=COLOR, width=3)
    cols = columns or math.ceil(math.sqrt(len(panels)))
    tiles = _tile(panels, min(cols, len(panels)))
    sheet = Image.new("RGB", (tiles.width, tiles.height + HEADER), (255, 255, 255))
    sheet.paste(tiles, (0, HEADER))
    ImageDraw.Draw(sheet).text((4, 3), caption[:80], fill=(0, 0, 0), font=_font())
    return sheet


def render_video(frames: Sequence[VideoFrame], steps: Sequence[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """Write the gaze picture of a run over a video: an animated GIF with one sheet of tiled
    frames per generated token, or a PNG with one row of frames per token (by suffix).

    frames: the video's frames in sequence order; steps: (token text, selected region ids
    (n_layers, n_heads, k), numbering all regions of the sequence) per generated token.
    """
    if not steps:
        raise ValueError("no generated token gazed at the video: nothing to draw")
    if not frames:
        raise ValueError("no video frames to draw")
    path = Path(path)
    gif = path.suffix.lower() == ".gif"
    sheets = [draw_video_sheet(frames, sel, f"token {i + 1}: {text.strip() or text!r}",
                               columns=None if gif else len(frames))
              for i, (text, sel) in enumerate(steps)]
    if gif:
        return _save_gif(sheets, path)
    return _save_png(_tile(sheets, 1), path)


def _tile(panels: Sequence[Image.Image], cols: int) -> Image.Image:
    """Panels in a grid of ``cols`` columns (rows as needed), each cell the size of the largest."""
    rows = math.ceil(len(panels) / cols)
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * w, (i // cols) * h))
    return sheet


def _save_gif(pictures: Sequence[Image.Image], path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    pictures[0].save(tmp, format="GIF", save_all=True, append_images=list(pictures[1:]), duration=600, loop=0)
    tmp.replace(path)
    return path


def _save_png(picture: Image.Image, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    tmp.replace(path)
    return path
