"""Write examples/clip.mp4: GazeScenes test clip 0 (gaze_edge.scenes.clips), 8 frames at 1 fps,
H.264 at high quality, and print its questions with their true answers.

    .venv/bin/python scripts/example_clip.py
    .venv/bin/gaze-edge chat --video examples/clip.mp4 -p "What is in frame 8?"
"""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np

from gaze_edge.scenes import render
from gaze_edge.scenes.clips import KINDS, clip_question, split_clips

OUT = Path(__file__).resolve().parents[1] / "examples" / "clip.mp4"


def main() -> None:
    clip, _ = split_clips("test", 1)[0]
    tmp = OUT.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=1, options={"crf": "4"})
        s.height = s.width = 196
        s.pix_fmt = "yuv444p"
        for scene in clip.frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.asarray(render(scene)), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    tmp.replace(OUT)
    rng = random.Random(0)
    for kind in KINDS:
        ex = clip_question(clip, rng, kind)
        print(f"{ex.prompt} -> {ex.answer}")


if __name__ == "__main__":
    main()
