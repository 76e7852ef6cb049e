"""GazeScenes clips (gaze_edge.scenes.clips): deterministic, truthful questions, a scorer that
counts what it should, fixed splits, and training samples laid out as the runtime lays a video out."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gaze_edge.scenes.clips import (
    APPEARED,
    KINDS,
    changes,
    clip_question,
    parse_changes,
    sample_clip,
    score_clip_answer,
    score_clip_answers,
    split_clips,
)
from gaze_edge.scenes.text import parse_caption


def test_clips_are_deterministic_and_follow_their_events():
    for seed in range(200):
        clip = sample_clip(seed)
        assert clip == sample_clip(seed) and len(clip) == 8
        assert 1 <= len(clip.events) <= 3 and all(1 <= e.frame < 8 for e in clip.events)
        assert 2 <= len(clip.frames[0].objects) <= 3
        kinds = [(o.colour, o.shape) for o in clip.objects()]
        assert len(kinds) == len(set(kinds))  # every shape of a clip is its own colour and shape
        for i in range(1, 8):
            before = {o.words for o in clip.frames[i - 1].objects}
            now = {o.words for o in clip.frames[i].objects}
            events = [e for e in clip.events if e.frame == i]
            if not events:
                assert now == before  # nothing moves between events
            else:
                (e,) = events
                assert now == (before | {e.obj.words} if e.kind == APPEARED else before - {e.obj.words})
            assert 1 <= len(now) <= 4 and len({o.cell for o in clip.frames[i].objects}) == len(now)
    assert sample_clip(0) != sample_clip(1)
    assert len(sample_clip(3, n_frames=32)) == 32
    with pytest.raises(ValueError, match="8-32 frames"):
        sample_clip(0, n_frames=4)


def test_questions_are_true_of_their_clip():
    rng = random.Random(0)
    for seed in range(300):
        clip = sample_clip(seed)
        for kind in KINDS:
            ex = clip_question(clip, rng, kind)
            assert ex.kind == kind and score_clip_answer(ex.answer, ex, clip) == 1.0
            if kind == "frame":
                i = int(ex.prompt.split()[-1].rstrip("?")) - 1
                assert {w for w in parse_caption(ex.answer)} == {o.words for o in clip.frames[i].objects}
            elif kind == "when":
                colour, shape = ex.prompt.split()[-3:-1]
                first = int(ex.answer.split()[1].rstrip("."))
                assert all((colour, shape) not in {(o.colour, o.shape) for o in f.objects}
                           for f in clip.frames[: first - 1])  # fmt: skip
                assert (colour, shape) in {(o.colour, o.shape) for o in clip.frames[first - 1].objects}
            elif kind == "change":
                said = set(parse_changes(ex.answer))
                first = {o.words for o in clip.frames[0].objects}
                last = {o.words for o in clip.frames[-1].objects}
                assert said == {(*w, "appeared") for w in last - first} | {(*w, "disappeared") for w in first - last}
    with pytest.raises(ValueError, match="unknown clip question kind"):
        clip_question(sample_clip(0), rng, "colour")


def test_the_scorer_charges_misses_wrong_and_extra_items():
    clip = sample_clip(5)
    rng = random.Random(1)
    frame = clip_question(clip, rng, "frame")
    n = frame.answer.count(".")
    wrong_first = frame.answer.replace("circle", "SQUARE", 1).replace("square", "circle", 1).replace("SQUARE", "square")
    assert score_clip_answer(frame.answer + " top left: red circle.", frame, clip) <= n / (n + 1)
    assert score_clip_answer("", frame, clip) == 0.0
    assert score_clip_answer(wrong_first, frame, clip) < 1.0
    when = clip_question(clip, rng, "when")
    assert score_clip_answer(when.answer.upper(), when, clip) == 1.0  # case and spaces do not count
    assert score_clip_answer("frame 99.", when, clip) == 0.0
    change = clip_question(clip, rng, "change")
    assert score_clip_answer("nothing.", change, clip) == (1.0 if not changes(clip) else 0.0)
    assert score_clip_answer(change.answer + " garbage.", change, clip) < 1.0
    items = [(clip, frame), (clip, when)]
    scores = score_clip_answers([frame.answer, "frame 99."], items)
    assert scores == {"all": 0.5, "n": 2, "frame": 1.0, "when": 0.0}
    with pytest.raises(ValueError):
        score_clip_answers(["x"], items)


def test_splits_are_fixed_disjoint_and_take_every_kind_in_turn():
    test = split_clips("test", 8)
    assert [ex.kind for _, ex in test] == list(KINDS) * 2
    assert split_clips("test", 8) == test and split_clips("test", 4, start=4) == test[4:]
    seeds = {c.seed for c, _ in test} | {c.seed for c, _ in split_clips("val", 8)} | {c.seed for c, _ in split_clips("train", 8)}
    assert len(seeds) == 24
    # about even across "when" answers: not all "frame 1."
    whens = [ex.answer for _, ex in split_clips("val", 400) if ex.kind == "when"]
    assert 0.2 < sum(a == "frame 1." for a in whens) / len(whens) < 0.6


def test_training_samples_lay_a_clip_out_as_the_runtime_lays_a_video_out():
    from gaze_edge.chat import _videos_as_images, normalize_messages, split_prompt
    from gaze_edge.templates import render_chat
    from gaze_edge.train.data import Encoder, clip_sample
    from gaze_edge.train.tokenizer import CHAT_TEMPLATE, IMAGE, train_tokenizer, video_prompt_text
    from gaze_edge.video import Video, VideoPart, expand_videos, load_video

    clip = sample_clip(7)
    ex = clip_question(clip, random.Random(0), "frame")
    from gaze_edge.scenes import render

    video = load_video([render(s) for s in clip.frames])  # a frame list: 1 fps, as chat(video=frames) reads it
    assert isinstance(video, Video) and video.timestamps == [float(i) for i in range(8)]
    # what chat(ex.prompt, video=frames) renders with the model's template, frames laid out by expand_videos
    messages = normalize_messages(ex.prompt, [], videos=[video])
    messages = [_videos_as_images(m, VideoPart) for m in messages]  # as render_prompt does
    text, _ = render_chat(CHAT_TEMPLATE, messages, arch="llama", bos_token="<s>", eos_token="</s>")
    pieces, images = expand_videos(split_prompt(text, 1), [video])
    assert IMAGE.join(pieces) == video_prompt_text(ex.prompt, 8) and len(images) == 8
    tokenizer = train_tokenizer()
    ids, start = clip_sample(Encoder(tokenizer, 196), clip, ex)
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE)) == 8 * 196
    assert tokenizer.decode(ids[start:], skip_special_tokens=True).strip() == ex.answer


def test_video_batches_a_smoke_run_and_the_table(tmp_path):
    """video_fraction mixes clip questions into the batches (deterministic per step, each clip's
    eight frames in row order); a smoke run trains on them and logs val clip accuracy; the table
    has a row per keep ratio with the visual KV of one budget over all frames."""
    from gaze_edge.config import GazeConfig
    from gaze_edge.train import preset, train
    from gaze_edge.train.data import Encoder, step_batch
    from gaze_edge.train.evaluate_video import video_markdown, video_table
    from gaze_edge.train.load import load_model_folder
    from gaze_edge.train.loop import LOG_FILE
    from gaze_edge.train.tokenizer import train_tokenizer

    gaze = GazeConfig(region_h=2, region_w=2, n_context_tokens=2, keep_ratio=0.25)
    config = preset("smoke", gaze=gaze, video_fraction=0.5, chat_fraction=0.5, steps=4, batch_size=6,
                    log_every=1, checkpoint_every=4, eval_scenes=2, micro_batches=2)  # fmt: skip
    tokenizer = train_tokenizer(config.model.vocab_size, config.tokenizer_scenes)
    encoder = Encoder(tokenizer, 196)
    a, b = step_batch(encoder, config, 0), step_batch(encoder, config, 0)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert 8 in a.n_images.tolist() and int(a.n_images.sum()) == a.pixel_values.shape[0]
    with pytest.raises(ValueError, match="video_fraction"):
        preset("smoke", video_fraction=1.5)
    with pytest.raises(ValueError, match="video preset fine-tunes"):
        preset("video")
    folder = train(config, tmp_path / "run", progress=False, threads=1)
    records = [json.loads(line) for line in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert 0.0 <= records[-1]["val_clip_accuracy"] <= 1.0
    net, tok = load_model_folder(folder)
    rows = video_table(net, tok, [None, 0.1], split="val", n_clips=4)
    assert [r["keep_ratio"] for r in rows] == [None, 0.1] and rows[0]["visual_kv_fraction"] == 1.0
    assert rows[1]["visual_kv_fraction"] == pytest.approx(40 * 4 / (8 * 196))  # ceil(0.1 x 392) regions
    assert rows[0]["n"] == 4 and set(rows[0]) >= {"all", "frame", "where", "when", "change"}
    assert "gaze 0.1" in video_markdown(rows)
