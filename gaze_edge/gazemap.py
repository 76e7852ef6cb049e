"""Gaze pictures: where the model looked, per generated token, drawn from a real trace.

For each generated token the runtime's trace says which regions every (layer, KV head) selected
when choosing it. A panel shows the image lit region by region by the fraction of (layer, KV
head) pairs that selected it (dark = never, full brightness = all), outlines the regions most of
them selected, and captions the token. Panels go
into one PNG grid, or one frame each into an animated GIF.

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


def draw_panel(image: Image.Image, grid: RegionGrid, frequency: np.ndarray, caption: str) -> Image.Image:
    """The image dimmed, each region lit by how often it was selected, and a caption below.

    A region selected by every (layer, KV head) shows at full brightness, one never selected stays
    dark; regions a majority selected are outlined.
    """
    base = image.convert("RGB")
    scale = PANEL / max(base.size)
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
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".gif":
        panels[0].save(tmp, format="GIF", save_all=True, append_images=panels[1:], duration=600, loop=0)
    else:
        cols = min(columns, len(panels))
        rows = math.ceil(len(panels) / cols)
        w, h = panels[0].size
        sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
        for i, p in enumerate(panels):
            sheet.paste(p, ((i % cols) * w, (i // cols) * h))
        sheet.save(tmp, format="PNG")
    tmp.replace(path)
    return path
