"""Drawing a scene with Pillow."""

from __future__ import annotations

from PIL import Image, ImageDraw

from gaze_edge.scenes.scene import BACKGROUND, Scene, SceneObject

SQUARE_SCALE = 0.82  # a square's half side / half_size: about a circle's area, so size is no cue


def shape_polygon(obj: SceneObject) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for a circle), inside center +- half_size."""
    cx, cy = obj.center
    h = obj.half_size
    if obj.shape == "square":
        s = h * SQUARE_SCALE
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if obj.shape == "triangle":
        # pointing up: apex at the top of the box, base (2 * half_size wide) near its bottom
        return [(cx, cy - h), (cx + h, cy + 0.75 * h), (cx - h, cy + 0.75 * h)]
    if obj.shape == "circle":
        return None
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.image_size x scene.image_size pixels."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        polygon = shape_polygon(obj)
        if polygon is None:
            cx, cy = obj.center
            r = obj.half_size
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.rgb)
        else:
            draw.polygon(polygon, fill=obj.rgb)
    return image
