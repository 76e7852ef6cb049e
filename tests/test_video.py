"""Videos: decoding and sampling (PyAV), the prompt that names each frame, gaze maps over time, the
runtime against the reference on multi-frame sequences, and `gaze-edge chat --video`.

Every video here is made by the test with PyAV (the ``[video]`` extra): flat frames whose grey
level names their index, so a sampled frame can be checked to be the right one.

Parity (both families, tiny random gaze checkpoints converted at f32, f16 KV cache): a 5-frame
sample of a 10-frame clip goes through ``chat``'s prompt path (the chat template, the frame
labels, each frame an image chunk); the reference gets the ids the Hugging Face processor makes
from the same text with one image placeholder per frame (checked equal to the runtime's) and
mtmd's image features, as tests/test_runtime_parity.py does for still images. 10 generated tokens
teacher-forced on the reference's greedy choice: logits cosine >= 0.999 and the same argmax at
every step, selections identical wherever the reference's k-th / (k+1)-th score gap is clear.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from reference_helpers import reference_inputs

from gaze_edge.chat import normalize_messages
from gaze_edge.errors import GazeEdgeError
from gaze_edge.gazemap import RegionGrid, VideoFrame, frame_shares, render_video
from gaze_edge.video import Video, VideoError, expand_videos, frame_texts, load_video

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"


@pytest.fixture(scope="module")
def av():
    return pytest.importorskip("av", reason="the [video] extra (PyAV) is not installed")


def levels(n: int) -> list[int]:
    """The grey level of each of n frames: 10 .. 240, evenly apart."""
    return [10 + round(i * 230 / max(n - 1, 1)) for i in range(n)]


def write_video(av, path: Path, frames, fps: int = 4, codec: str = "mpeg4", faststart: bool = False) -> Path:
    """Encode RGB uint8 arrays (all one size) into a video file with PyAV."""
    frames = [np.ascontiguousarray(f) for f in frames]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames[0].shape[:2] if frames else (48, 64)
        s.pix_fmt = "yuv420p"
        s.bit_rate = 4_000_000
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def flat_clip(av, path: Path, n: int, fps: int = 4, size=(48, 64), **kw) -> Path:
    """n flat grey frames, frame i at level levels(n)[i]."""
    return write_video(av, path, [np.full((*size, 3), v, np.uint8) for v in levels(n)], fps=fps, **kw)


def frame_index(frame: Image.Image, n: int) -> int:
    """Which frame of a flat_clip this is (the nearest grey level)."""
    level = float(np.asarray(frame, dtype=np.float64).mean())
    return int(np.argmin([abs(level - v) for v in levels(n)]))


# ----------------------------------------------------------------------------- decoding, sampling


def test_frames_are_sampled_uniformly_with_their_timestamps(av, tmp_path):
    path = flat_clip(av, tmp_path / "clip.mp4", 12, fps=4)
    video = load_video(path)  # default: 8 frames
    picked = [i * 12 // 8 for i in range(8)]  # Hugging Face's floor(i * total / n)
    assert [frame_index(f, 12) for f in video.frames] == picked
    assert video.timestamps == pytest.approx([i / 4 for i in picked])
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in video.frames)
    assert video.labels()[:3] == ["Frame 1 (0.0 s)", "Frame 2 (0.25 s)", "Frame 3 (0.75 s)"]

    one_fps = load_video(path, fps=1)  # 3 s at 1 fps
    assert one_fps.timestamps == pytest.approx([0.0, 1.0, 2.0])
    assert [frame_index(f, 12) for f in one_fps.frames] == [0, 4, 8]
    assert len(load_video(path, max_frames=12)) == 12
    assert len(load_video(path, fps=100, max_frames=50)) == 12  # never more than the clip has
    assert len(load_video(path, fps=100)) == 8  # max_frames caps fps


def test_far_apart_samples_are_reached_by_seeking(av, tmp_path):
    path = flat_clip(av, tmp_path / "long.mp4", 60, fps=4)  # 15 s, keyframes every 12 frames
    video = load_video(path, max_frames=2)  # 0 s and 7.5 s: more than SEEK_GAP apart
    assert [frame_index(f, 60) for f in video.frames] == [0, 30]
    assert video.timestamps == pytest.approx([0.0, 7.5])
    video = load_video(path, max_frames=3)
    assert [frame_index(f, 60) for f in video.frames] == [0, 20, 40]


def test_webm_h264_and_bytes(av, tmp_path):
    webm = flat_clip(av, tmp_path / "clip.webm", 8, codec="libvpx")  # no frame count in the header
    video = load_video(webm, max_frames=4)
    assert [frame_index(f, 8) for f in video.frames] == [0, 2, 4, 6]
    h264 = flat_clip(av, tmp_path / "clip.mp4", 8, codec="libx264")
    from_bytes = load_video(h264.read_bytes(), max_frames=4)
    assert [frame_index(f, 8) for f in from_bytes.frames] == [0, 2, 4, 6]
    assert from_bytes.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_frame_lists_arrays_and_videos(tmp_path):
    frames = [Image.new("RGB", (16, 8), (v, v, v)) for v in levels(6)]
    frames[2].save(tmp_path / "f.png")
    listed = load_video([*frames[:2], tmp_path / "f.png", *frames[3:]])
    assert listed.timestamps == [0, 1, 2, 3, 4, 5] and [frame_index(f, 6) for f in listed.frames] == list(range(6))
    fewer = load_video(frames, max_frames=4)  # one frame per second, sampled like a file
    assert fewer.timestamps == [0, 1, 3, 4]
    assert load_video(frames, fps=0.5).timestamps == [0, 2, 4]
    array = np.stack([np.asarray(f) for f in frames])
    assert load_video(array, max_frames=3).timestamps == [0, 2, 4]
    clip = Video(frames, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert load_video(clip) == clip
    long = Video(frames * 2, [i / 2 for i in range(12)])
    assert load_video(long) == long  # a Video keeps all its frames (already sampled)
    assert load_video(clip, max_frames=3).timestamps == [0.0, 1.0, 2.0]


def test_labels_and_how_a_prompt_lays_the_frames_out():
    frames = [Image.new("RGB", (4, 4), (v, 0, 0)) for v in (1, 2, 3)]
    video = Video(frames, [0.0, 0.5, 1.0 / 3])
    assert video.labels() == ["Frame 1 (0.0 s)", "Frame 2 (0.5 s)", "Frame 3 (0.333 s)"]
    assert frame_texts(video) == ["Frame 1 (0.0 s): ", "\nFrame 2 (0.5 s): ", "\nFrame 3 (0.333 s): "]
    still = Image.new("RGB", (4, 4))
    pieces, images = expand_videos(["USER: ", "\n", "\nWhat changed?"], [still, video])
    assert images == [still, *frames]
    assert pieces == ["USER: ", "\nFrame 1 (0.0 s): ", "\nFrame 2 (0.5 s): ", "\nFrame 3 (0.333 s): ",
                      "\nWhat changed?"]
    with pytest.raises(ValueError):
        expand_videos(["a"], [still])


def test_video_parts_in_messages():
    messages = normalize_messages([{"role": "user", "content": [{"type": "video", "path": "a.mp4"},
                                                                {"type": "text", "text": "Describe."}]}], [])
    assert messages[0]["content"][0] == {"type": "video", "video": "a.mp4"}
    # video= goes after the images, before the text of the last user message
    messages = normalize_messages("What changed?", ["x.png"], ["clip.mp4"])
    assert [p["type"] for p in messages[0]["content"]] == ["image", "video", "text"]
    with pytest.raises(GazeEdgeError, match="a video part needs"):
        normalize_messages([{"role": "user", "content": [{"type": "video"}]}], [])
    with pytest.raises(GazeEdgeError, match="a video needs a user message"):
        normalize_messages([{"role": "system", "content": "hi"}], [], ["clip.mp4"])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _header_only(av, d: Path) -> Path:
    """A faststart mp4 cut right after its header: a video stream that promises 40 frames, none there."""
    data = flat_clip(av, d / "full.mp4", 40, faststart=True).read_bytes()
    return _write(d / "empty.mp4", data[: data.find(b"mdat") + 4])


def _no_stream(av, d: Path) -> Path:
    with av.open(str(d / "nostream.mp4"), "w") as c:  # a stream added, never written: mp4 drops it
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    return d / "nostream.mp4"


BAD_VIDEOS = {
    "missing": (lambda av, d: d / "missing.mp4", "video not found"),
    "folder": (lambda av, d: d, "video path is a folder"),
    "text-renamed": (lambda av, d: _write(d / "notes.mp4", b"just some text, not a video\n" * 20), "not a video"),
    "truncated": (lambda av, d: _write(d / "cut.mp4", flat_clip(av, d / "a.mp4", 12).read_bytes()[:600]),
                  "not a video, or a corrupt or truncated one"),
    "truncated-faststart": (lambda av, d: _write(d / "cut.mp4", (lambda b: b[: len(b) * 2 // 3])(
        flat_clip(av, d / "a.mp4", 40, faststart=True).read_bytes())), "truncated"),
    "zero-frames": (_header_only, "the video has no frames"),
    "no-video-stream": (_no_stream, "no video stream"),
    "empty-bytes": (lambda av, d: b"", "empty"),
}


@pytest.mark.parametrize("name", list(BAD_VIDEOS))
def test_bad_videos_are_one_clear_error(av, tmp_path, name):
    make, message = BAD_VIDEOS[name]
    with pytest.raises(VideoError, match=message) as e:
        load_video(make(av, tmp_path))
    assert "\n" not in str(e.value) and isinstance(e.value, GazeEdgeError)


def test_limits_and_bad_arguments(av, tmp_path):
    path = flat_clip(av, tmp_path / "clip.mp4", 12)
    with pytest.raises(VideoError, match="frames are too large: 64x48"):
        load_video(path, max_frame_pixels=1000)
    with pytest.raises(VideoError, match=r"8 frames are too large together: 8 x 64x48 = 0 MP"):
        load_video(path, max_total_pixels=20_000)
    with pytest.raises(VideoError, match="too large"):
        load_video(path.read_bytes(), max_bytes=100)
    with pytest.raises(VideoError, match="frame 2: image not found"):
        load_video([Image.new("RGB", (4, 4)), tmp_path / "nope.png"])
    with pytest.raises(VideoError, match="no frames"):
        load_video([])
    for bad in (0, -1, 2000, 2.5, True):
        with pytest.raises(VideoError, match="max_frames"):
            load_video(path, max_frames=bad)
    for bad in (0, -2, float("nan"), "2"):
        with pytest.raises(VideoError, match="fps"):
            load_video(path, fps=bad)
    with pytest.raises(VideoError, match="not downloaded"):
        load_video("https://example.com/a.mp4")
    with pytest.raises(VideoError, match="not int"):
        load_video(3)


def test_without_pyav_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    path = _write(tmp_path / "clip.mp4", b"\0" * 64)
    with pytest.raises(VideoError, match=r"needs PyAV: pip install 'gaze-edge\[video\]'"):
        load_video(path)
    assert len(load_video([Image.new("RGB", (4, 4))] * 2)) == 2  # frame lists need no decoder


# ----------------------------------------------------------------------------- gaze maps over time


def test_video_gaze_map_has_a_sheet_per_token_marking_the_right_frame(tmp_path):
    grid = RegionGrid(4, 4, 2, 2)  # 2 x 2 regions per frame
    frames = [VideoFrame(Image.new("RGB", (64, 64), (120, 120, 120)), grid, 4 * i, f"Frame {i + 1}")
              for i in range(3)]
    # step 1: every layer/head picks frame 2's region 0 (global id 4); step 2: frame 3's region 3 (id 11)
    steps = [("red", np.full((2, 2, 1), 4)), ("circle", np.full((2, 2, 1), 11))]
    assert frame_shares(frames, steps[0][1]).tolist() == [0.0, 1.0, 0.0]
    out = render_video(frames, steps, tmp_path / "m.gif")
    gif = Image.open(out)
    assert gif.n_frames == len(steps)

    def brightness(sheet, frame: int, region: int) -> float:
        cols = math.ceil(math.sqrt(len(frames)))  # 2 x 2 tiles of 160 + 18 px, under a 20 px header
        x0 = (frame % cols) * 160 + (40 if region % 2 == 0 else 120)
        y0 = 20 + (frame // cols) * (160 + 18) + (40 if region < 2 else 120)
        return float(np.asarray(sheet, dtype=np.float64)[y0 - 10 : y0 + 10, x0 - 10 : x0 + 10].mean())

    for step, (frame, region) in enumerate([(1, 0), (2, 3)]):
        gif.seek(step)
        sheet = gif.convert("RGB")
        lit = brightness(sheet, frame, region)
        assert lit > 100  # the selected region of the right frame shows at full brightness
        others = [brightness(sheet, f, r) for f in range(3) for r in range(4) if (f, r) != (frame, region)]
        assert max(others) < 50, others  # every other region of every frame stays dark
    png = render_video(frames, steps, tmp_path / "m.png")
    assert Image.open(png).size == (3 * 160, 2 * (20 + 160 + 18))  # a row of frames per token
    with pytest.raises(ValueError, match="nothing to draw"):
        render_video(frames, [], tmp_path / "x.gif")


# ----------------------------------------------------------------------------- runtime vs reference

GAZE_KW = dict(region_h=2, region_w=2, n_context_tokens=3, top_k=0, keep_ratio=0.25, score_mode="gqa_mean")
PARITY = {
    # family: (tiny_checkpoint kwargs, frame size (h, w), the HF processor's image placeholder)
    "llava": (dict(image_size=98), (98, 98), "<image>"),
    "qwen2vl": ({}, (112, 112), "<|vision_start|><|image_pad|><|vision_end|>"),
}
SETTINGS = [dict(top_k=1), dict(top_k=0, keep_ratio=0.25, gather=True), dict(top_k=3, score_mode="per_head")]
N_STEPS = 10
MARGIN = 1e-3


def textured_clip(av, path: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """n frames of coarse random blocks (the features differ from frame to frame)."""
    rng = np.random.default_rng(seed)
    h, w = size
    frames = [np.kron(rng.uniform(0, 255, size=(h // 7 + 1, w // 7 + 1, 3)), np.ones((7, 7, 1)))[:h, :w]
              .astype(np.uint8) for _ in range(n)]
    return write_video(av, path, frames, fps=2)


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory):
    """family -> (runtime GazeModel, reference GazeVLM, checkpoint folder), built on first use."""
    import torch

    from gaze_edge.checkpoint import load_gaze_vlm
    from gaze_edge.config import GazeConfig
    from gaze_edge.convert import convert
    from gaze_edge.convert.tiny import tiny_checkpoint
    from gaze_edge.runtime.model import GazeModel

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("video-parity")
    cache = {}

    def get(family: str):
        if family not in cache:
            ckpt = tiny_checkpoint(family, root / f"ckpt-{family}", gaze=GazeConfig(**GAZE_KW), seed=1,
                                   **PARITY[family][0])
            llm, _ = convert(ckpt, root / f"gguf-{family}", outtype="f32", progress=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = GazeModel.load(llm.parent, n_threads=2, n_ctx=1024)
            cache[family] = (model, load_gaze_vlm(ckpt, dtype=torch.float32), ckpt)
        return cache[family]

    yield get
    for model, _, _ in cache.values():
        model.close()


def hf_input_ids(ckpt: Path, family: str, text: str, frames: list[Image.Image]) -> list[int]:
    """What the Hugging Face processor makes of ``text`` (one placeholder per frame) and the
    frames: every image placeholder expanded to the frame's grid tokens."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if family == "llava":
        return AutoProcessor.from_pretrained(ckpt)(text=text, images=frames).input_ids[0]
    # Qwen2VLProcessor's expansion (the tiny checkpoint saves its parts, not the processor)
    grids = AutoImageProcessor.from_pretrained(ckpt)(images=frames).image_grid_thw
    parts = text.split("<|image_pad|>")
    expanded = parts[0] + "".join("<|image_pad|>" * (int(np.prod(g)) // 4) + p for g, p in zip(grids, parts[1:],
                                                                                               strict=True))
    return AutoTokenizer.from_pretrained(ckpt)(expanded).input_ids


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.runtime
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("family", list(PARITY))
def test_runtime_matches_the_reference_on_video_frames(av, tmp_path, parity_models, family, settings):
    import torch

    from gaze_edge.conversation import make_plan, prepare_call
    from gaze_edge.runtime.session import SessionImage

    model, vlm, ckpt = parity_models(family)
    _, size, placeholder = PARITY[family]
    clip = textured_clip(av, tmp_path / "clip.mp4", 10, size)
    messages = [{"role": "user", "content": [{"type": "video", "video": str(clip)},
                                             {"type": "text", "text": "What changed?"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny checkpoint has no chat template: the family's
        call = prepare_call(model, messages, {"max_frames": 5})
    assert len(call.images) == 5 and call.n_video_frames == 5
    text = placeholder.join(call.pieces)
    assert text.count("Frame ") == 5 and "Frame 5 (4.0 s): " in text  # 2 fps, frames 0 2 4 6 8

    # the runtime: chat's prompt plan, every frame an image chunk
    s = model.session(keep_regions=settings.get("top_k"), keep_ratio=settings.get("keep_ratio"),
                      score_mode=settings.get("score_mode"), gather=settings.get("gather", False), n_ctx=1024)
    plan = make_plan(model, call, s.n_ctx)
    pending: list[int] = []
    for element in plan:
        if element.image is None:
            pending.append(element.key[1])
            continue
        s.add_tokens(pending)
        pending = []
        s.add_image(element.image, keep_embeddings=True)
    s.add_tokens(pending)
    frames = [item for item in s.history if isinstance(item, SessionImage)]
    assert len(frames) == 5 and [f.id for f in frames] == list(range(5))
    assert s.n_regions == sum(f.n_regions for f in frames) == 5 * frames[0].n_regions

    # the reference: the HF processor's ids for the same text and frames, mtmd's features
    ids, features = reference_inputs(s, vlm.model.config.image_token_id)
    assert hf_input_ids(ckpt, family, text, call.images) == ids  # the same multi-frame sequence
    selection = {k: v for k, v in settings.items() if k != "gather"}
    vlm.gaze_config = vlm.gaze_config.replace(**{f: getattr(vlm.gaze_config.replace(**selection), f)
                                                 for f in ("top_k", "keep_ratio", "score_mode")})
    ref = vlm.prefill(torch.tensor([ids]), image_features=features)
    rt = s.logits()
    assert cosine(rt, ref.logits.float().numpy()) >= 0.9999 and rt.argmax() == int(ref.logits.argmax())
    n_rows = n_compared = 0
    frames_selected = set()
    for step in range(N_STEPS):
        token = int(ref.logits.argmax())
        rt = s.append(token)
        ref = vlm.step(token)
        ref_logits = ref.logits.float().numpy()
        assert cosine(rt, ref_logits) >= 0.999, step
        assert rt.argmax() == ref_logits.argmax(), step
        trace, ref_trace = s.trace(), ref.trace
        assert trace.n_regions == ref_trace.n_regions == s.n_regions and trace.k == ref_trace.k
        selected, gaps = ref_trace.selected.numpy(), ref_trace.margins().numpy()
        scale = ref_trace.scores.abs().amax(-1).numpy()
        assert trace.selected.shape == selected.shape
        for layer in range(selected.shape[0]):
            for head in range(selected.shape[1]):
                n_rows += 1
                if gaps[layer, head] > MARGIN * scale[layer, head]:
                    n_compared += 1
                    np.testing.assert_array_equal(trace.selected[layer, head], selected[layer, head],
                                                  err_msg=f"step {step} layer {layer} head {head}")
        frames_selected |= {int(r) // frames[0].n_regions for r in trace.selected.reshape(-1)}
    assert n_compared >= 0.8 * n_rows, (n_compared, n_rows)
    assert len(frames_selected) > 1  # one budget over all frames: selections span several
    s.close()


# ----------------------------------------------------------------------------- session, chat, CLI


@pytest.fixture(scope="module")
def embedded():
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1)
    yield m
    m.close()


def scene_clip(av, path: Path, n: int = 6) -> Path:
    """The example scene, every other frame shifted right: a 196 x 196 clip at 2 fps."""
    scene = np.asarray(Image.open(SCENE).convert("RGB"))
    return write_video(av, path, [np.roll(scene, 28 * i, axis=1) if i % 2 else scene for i in range(n)], fps=2)


@pytest.mark.runtime
def test_add_video_gives_every_frame_its_own_regions_under_one_budget(av, tmp_path, embedded):
    from gaze_edge.errors import ContextOverflowError
    from gaze_edge.runtime.session import SessionImage

    clip = load_video(scene_clip(av, tmp_path / "scene.mp4"), max_frames=3)
    with embedded.session(keep_ratio=0.1) as s:
        s.add_text("USER: ")
        added = s.add_video(clip)
        s.add_text("\nWhat changed?\nASSISTANT:")
        assert [im.id for im in added] == [0, 1, 2] and all(im.n_context_tokens == 4 for im in added)
        labels = [embedded.tokenize(t) for t in frame_texts(clip)]
        layout = [item for item in s.history[len(embedded.tokenize("USER: ", add_special=embedded.add_bos)):]]
        expected = labels[0] + [added[0]] + labels[1] + [added[1]] + labels[2] + [added[2]]
        assert layout[: len(expected)] == expected
        n = sum(im.n_regions for im in added)
        assert s.n_regions == n == 3 * 49
        s.append(int(s.logits().argmax()))
        trace = s.trace()
        assert trace.n_regions == n and trace.k == math.ceil(0.1 * n)  # one budget over all frames
        assert trace.selected.max() >= 49  # region ids go on past the first frame
        before = (len(s.history), s.n_cells)
    with embedded.session(n_ctx=500) as small:
        small.add_text("USER: ")
        start = (len(small.history), small.n_cells)
        with pytest.raises(ContextOverflowError, match=r"the video's 3 frames need \d+ context cells"):
            small.add_video(clip)
        assert (len(small.history), small.n_cells) == start  # nothing evaluated
        assert not any(isinstance(item, SessionImage) for item in small.history)
    assert before[1] > 3 * 200


@pytest.mark.runtime
def test_chat_takes_a_video_as_an_option_or_a_message_part(av, tmp_path, embedded):
    path = scene_clip(av, tmp_path / "scene.mp4")
    a = embedded.chat("What changed?", video=path, max_frames=3, max_tokens=8, trace=True)
    assert len(a.images) == 3 and a.steps[1].trace.n_regions == 3 * 49
    b = embedded.chat([{"role": "user", "content": [{"type": "video", "video": str(path)},
                                                    {"type": "text", "text": "What changed?"}]}],
                      max_frames=3, max_tokens=8)
    assert b.text == a.text and b.n_prompt_tokens == a.n_prompt_tokens
    assert b.n_cached_tokens >= 3 * 200  # warm: the frames came from the cache
    c = embedded.chat("What changed?", video=path, fps=1, max_tokens=8)  # 3 s at 1 fps
    assert len(c.images) == 3
    with pytest.raises(VideoError, match="not a video"):
        embedded.chat("hi", video=_write(tmp_path / "notes.mp4", b"text " * 40))


def _one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.runtime
def test_cli_video_with_a_gaze_map_over_time(av, tmp_path):
    from gaze_edge.cli import main

    out = tmp_path / "m.gif"
    result = CliRunner().invoke(main, ["chat", "--video", str(scene_clip(av, tmp_path / "s.mp4")), "--max-frames",
                                       "4", "-p", "Describe the image.", "--json", "-q", "--threads", "1",
                                       "--max-tokens", "6", "--gaze-map", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["video_frames"] == [0.0, 0.5, 1.5, 2.0]  # 6 frames at 2 fps, 4 sampled
    assert data["prompt_tokens"] > 4 * 200 and data["visual_kv_fraction"] is not None
    gif = Image.open(out)
    assert gif.n_frames == data["generated_tokens"] - 1  # a sheet per gazed token (the first is dense)
    assert gif.size == (2 * 160, 20 + 2 * (160 + 18))  # 4 frames tiled 2 x 2


@pytest.mark.runtime
@pytest.mark.parametrize("name", ["text-renamed", "truncated", "zero-frames"])
def test_cli_bad_videos_are_one_line_and_exit_1(av, tmp_path, name):
    from gaze_edge.cli import main

    make, message = BAD_VIDEOS[name]
    line = _one_line_error(CliRunner().invoke(main, ["chat", "--video", str(make(av, tmp_path)), "-p", "hi"]))
    assert line.startswith("gaze-edge: error: ") and message in line


@pytest.mark.runtime
def test_cli_too_many_frames_for_the_context(av, tmp_path):
    from gaze_edge.cli import main

    path = scene_clip(av, tmp_path / "s.mp4")
    line = _one_line_error(CliRunner().invoke(main, ["chat", "--video", str(path), "-c", "500", "-p", "hi"]))
    assert "the conversation needs" in line and "6 of them video frames" in line and "holds 500" in line
    assert "--max-frames" in line
    bad = CliRunner().invoke(main, ["chat", "--fps", "2", "-p", "hi"])
    assert bad.exit_code == 2 and "--fps needs a --video" in bad.output


@pytest.mark.runtime
def test_the_embedded_video_model_answers_clips_as_the_reference_does(av, tmp_path):
    """The shipped video model (gaze_edge/models/video, the conversion of video-hf): through the
    runtime, test clips given as frame lists get the reference's greedy answers at keep 0.1, and
    `gaze-edge chat --video` without -m runs it on a clip written to a file."""
    from gaze_edge.default_model import VIDEO_HF_DIR, video_model_dir
    from gaze_edge.runtime.model import GazeModel
    from gaze_edge.scenes import render
    from gaze_edge.scenes.clips import score_clip_answers, split_clips
    from gaze_edge.train.evaluate import decode_gaze
    from gaze_edge.train.evaluate_video import clip_answers
    from gaze_edge.train.load import load_model_folder

    if not (VIDEO_HF_DIR / "config.json").is_file():
        pytest.skip("no video-hf checkpoint (a source checkout has it)")
    items = split_clips("test", 8)
    net, tokenizer = load_model_folder(VIDEO_HF_DIR)
    reference = clip_answers(net, tokenizer, items, decode_gaze(net, 0.1))
    model = GazeModel.load(video_model_dir(), n_threads=2)
    try:
        ours = [model.chat(ex.prompt, video=[render(s) for s in clip.frames], keep_ratio=0.1, max_tokens=64).text.strip()
                for clip, ex in items]  # fmt: skip
    finally:
        model.close()
    assert ours == reference
    assert score_clip_answers(ours, items)["all"] > 0.25  # 8 clips: a floor, docs/TRAINING.md has 500
    from gaze_edge.cli import main

    clip, ex = items[1]
    path = write_video(av, tmp_path / "clip.mp4", [np.asarray(render(s)) for s in clip.frames], fps=1)
    result = CliRunner().invoke(main, ["chat", "--video", str(path), "-p", ex.prompt, "--json", "-q", "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["video_frames"] == [float(i) for i in range(8)] and data["model"].endswith("video-f32.gguf")
    alone = CliRunner().invoke(main, ["chat", "--video", str(path), "--mmproj", str(next(video_model_dir().glob("mmproj-*"))),
                                      "-p", ex.prompt])  # fmt: skip
    assert alone.exit_code == 2 and "--mmproj goes with -m/--model" in alone.output
