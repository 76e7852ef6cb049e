"""`gaze-edge distill` / `gaze_edge.distill`: gaze distilled from a checkpoint's dense self.

On tiny random checkpoints of both families (LLaVA with a Llama text model: 4 x 4 grid, 4 regions;
Qwen2-VL: 4 x 4 grid after the 2 x 2 merge), distilled at keep 0.1 (1 region of 4):
- the held-out divergence falls by a clear margin, and the saved checkpoint, loaded again,
  reproduces the reported "after" divergence (what was trained is what was saved);
- a run stopped halfway and continued equals the uninterrupted run (LoRA adapter and optimiser
  state included) and reuses the cached teacher answers;
- a merged LoRA adapter gives the attached adapter's logits (float32, atol 1e-5);
- the output converts with our converter and chats through the patched runtime with the trained
  context tokens (runtime test);
- bad input gives one clear line: an empty image folder, an unknown architecture, bad flags.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gaze_edge.cli import main
from gaze_edge.config import TRAINING_FREE
from gaze_edge.convert.tiny import LLAVA_IMAGE_SIZE, QWEN_IMAGE_SIZE, tiny_checkpoint
from gaze_edge.errors import GazeEdgeError

torch.set_num_threads(1)

PROMPTS = ["Describe the image.", "What is in the image?", "What colour is the top left?"]
SIZES = {"llava": LLAVA_IMAGE_SIZE, "qwen2vl": QWEN_IMAGE_SIZE}
FAST = dict(steps=40, batch_size=4, answer_tokens=12, progress=False)
# a dense SRC: four context tokens and gqa_mean give these tiny random models a divergence to lower
# (with the defaults, one token and gqa_max, the tiny Qwen2-VL starts at 2e-4 nats per token)
DENSE_FAST = dict(FAST, context_tokens=4, score_mode="gqa_mean")


def write_images(folder: Path, size: int, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = np.random.default_rng(i).uniform(0, 255, size=(size // 7 + 1, size // 7 + 1, 3))
        pixels = np.kron(coarse, np.ones((7, 7, 1)))[:size, :size].astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """family -> (checkpoint folder, image folder, prompts file)."""
    root = tmp_path_factory.mktemp("distill-inputs")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    return {family: (tiny_checkpoint(family, root / f"ckpt-{family}", seed=3),
                     write_images(root / f"images-{family}", SIZES[family]), prompts)
            for family in SIZES}


@pytest.fixture(scope="module")
def distilled(inputs, tmp_path_factory):
    """family -> (output folder, DistillResult), distilled on first use (context tokens only)."""
    from gaze_edge import distill

    root = tmp_path_factory.mktemp("distill-out")
    cache = {}

    def get(family: str):
        if family not in cache:
            ckpt, images, prompts = inputs[family]
            out = root / f"out-{family}"
            cache[family] = (out, distill(ckpt, out, images=images, prompts=prompts, **DENSE_FAST))
        return cache[family]

    return get


def remeasure(folder: Path, run_dir: Path, keep_ratio: float, override: bool = False) -> dict:
    """The held-out divergence of a saved gaze checkpoint (at its own keep ratio, which must be
    ``keep_ratio``, or with ``override`` at ``keep_ratio``), against ``run_dir``'s cached teacher."""
    from gaze_edge.checkpoint import load_gaze_vlm
    from gaze_edge.train.distill import samples
    from gaze_edge.train.distill.divergence import measure
    from gaze_edge.train.distill.encode import PromptEncoder
    from gaze_edge.train.distill.run import _Images
    from gaze_edge.train.distill.teacher import load_cache

    settings = json.loads((run_dir / ".distill" / "settings.json").read_text())
    data = settings["data"]
    found = samples.image_samples(data["images"], samples.read_prompts(data["prompts"]))
    _, held = samples.split_heldout(len(found))
    key = torch.load(run_dir / ".distill" / "teacher.pt", weights_only=True)["key"]
    answers = load_cache(run_dir / ".distill" / "teacher.pt", key)
    vlm = load_gaze_vlm(folder, dtype=torch.float32).eval()
    if override:
        vlm.gaze_config = vlm.gaze_config.replace(keep_ratio=keep_ratio)
    assert vlm.gaze_config.keep_ratio == pytest.approx(keep_ratio)
    encoder = PromptEncoder(folder, vlm.model)
    images = _Images(found, encoder, vlm, "cpu")
    return measure(vlm, [answers[i] for i in held], lambda j: images(held[j]), encoder.pad_id, 4, "cpu")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- what it learns


@pytest.mark.parametrize("family", list(SIZES))
def test_distillation_lowers_the_heldout_divergence(distilled, inputs, family):
    out, result = distilled(family)
    before, after = result.before["kl"], result.after["kl"]
    assert result.folder == out and result.step == FAST["steps"]
    assert 0 < after < 0.8 * before, (before, after)
    assert result.before["tokens"] == result.after["tokens"] > 0
    report = json.loads((out / "gaze_edge_distill.json").read_text())
    assert report["divergence"]["after"]["kl"] == pytest.approx(after)
    assert report["samples"] == {"total": 18, "train": 16, "heldout": 2}
    # a gaze checkpoint at the asked budget, SRC's weights untouched (no adapter)
    config = json.loads((out / "config.json").read_text())
    assert config["gaze"]["keep_ratio"] == pytest.approx(0.1) and config["gaze"]["n_context_tokens"] == 4
    assert sha256(out / "model.safetensors") == sha256(inputs[family][0] / "model.safetensors")
    assert not (out / ".distill" / "output").exists()
    # what was trained is what was saved: the output reproduces the reported divergence
    again = remeasure(out, out, 0.1)
    assert again["kl"] == pytest.approx(after, rel=1e-5, abs=1e-9)
    assert again["top1_agreement"] == pytest.approx(result.after["top1_agreement"])


def test_a_stopped_run_continues_to_the_uninterrupted_result(inputs, tmp_path, monkeypatch):
    """With a LoRA adapter (its state and the optimiser's travel in the checkpoint)."""
    from gaze_edge import distill
    from gaze_edge.train.distill import teacher

    ckpt, images, prompts = inputs["llava"]
    settings = dict(images=images, prompts=prompts, lora_rank=2, **{**DENSE_FAST, "steps": 20})
    whole = distill(ckpt, tmp_path / "whole", **settings)

    part = distill(ckpt, tmp_path / "split", stop_after=8, **settings)
    assert part.folder is None and part.step == 8
    assert not (tmp_path / "split" / "config.json").exists()  # nothing that looks like a checkpoint yet

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher answers were generated again")

    monkeypatch.setattr(teacher, "greedy_answers", no_teacher)
    rest = distill(ckpt, tmp_path / "split", **settings)
    assert rest.step == 20 and rest.before == part.before
    assert rest.after["kl"] == pytest.approx(whole.after["kl"], rel=1e-5)
    from safetensors.torch import load_file

    for name in ("gaze.safetensors", "model.safetensors"):  # context tokens; weights with the merged adapter
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "split" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert sha256(tmp_path / "split" / "model.safetensors") != sha256(ckpt / "model.safetensors")
    log = [json.loads(line)["step"] for line in (tmp_path / "split" / ".distill" / "log.jsonl").read_text().splitlines()]
    assert log == [8, 10, 20]
    # the merged checkpoint computes what the trained adapter computed
    assert remeasure(tmp_path / "split", tmp_path / "split", 0.1)["kl"] == pytest.approx(rest.after["kl"], rel=1e-4)
    # a finished run called again does nothing more
    assert distill(ckpt, tmp_path / "split", **settings).after == rest.after


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_a_merged_lora_adapter_gives_the_adapters_logits(family):
    from gaze_edge.config import GazeConfig
    from gaze_edge.reference import GazeVLM
    from gaze_edge.reference.tiny_models import (
        LLAVA_IMAGE_TOKEN,
        QWEN2_VL_TOKENS,
        qwen2_vl_pixels,
        tiny_llava,
        tiny_qwen2_vl,
    )
    from gaze_edge.train.distill.lora import LoraAdapter

    if family == "llava":
        model = tiny_llava(image_size=56)
        ids = [5, 6] + [LLAVA_IMAGE_TOKEN] * 16 + [7, 8, 9, 10, 11]
        image = {"pixel_values": torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))}
    else:
        model = tiny_qwen2_vl()
        ids = [5, QWEN2_VL_TOKENS["vision_start"]] + [QWEN2_VL_TOKENS["image"]] * 16 + [7, 8, 9, 10, 11]
        pixels, grid = qwen2_vl_pixels([(1, 8, 8)])
        image = {"pixel_values": pixels, "image_grid_thw": grid}
    vlm = GazeVLM(model, GazeConfig(2, 2, n_context_tokens=2, keep_ratio=0.25)).eval()
    names = sorted(model.state_dict())
    adapter = LoraAdapter(vlm.text_model, rank=3, seed=1)
    assert len(adapter.a) == 4 * model.config.text_config.num_hidden_layers
    with torch.no_grad():
        for b in adapter.b.values():
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))

    def logits():
        with torch.no_grad():
            return vlm(torch.tensor([ids]), gaze_start=len(ids) - 3, **image).logits

    plain = logits()
    adapter.attach()
    adapted = logits()
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model
    adapter.merge()
    assert not adapter.attached and sorted(model.state_dict()) == names
    torch.testing.assert_close(logits(), adapted, atol=1e-5, rtol=0)


def test_token_kl_is_exact_when_the_teacher_keeps_the_whole_vocabulary():
    from gaze_edge.train.distill.divergence import token_kl
    from gaze_edge.train.distill.teacher import summarize

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 40, generator=g) * 3, torch.randn(5, 40, generator=g) * 3
    exact = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                       log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(student, *(t.long() if i == 0 else t for i, t in
                                                   enumerate(summarize(teacher, 40)))), exact)
    top_ids, top_logp, tail = summarize(teacher, 8)  # pooled tail: a lower bound, 0 for equal models
    pooled = token_kl(student, top_ids.long(), top_logp, tail)
    assert bool((pooled <= exact + 1e-6).all()) and bool((pooled > 0).all())
    assert float(token_kl(teacher, top_ids.long(), top_logp, tail).abs().max()) < 1e-5


def test_prompts_are_the_runtimes_and_the_training_encoders():
    """For the shipped GazeScenes model: the same ids as gaze_edge.train's Encoder (which a test
    checks against the chat template as the runtime renders it) and the same pixels."""
    from gaze_edge.checkpoint import load_model
    from gaze_edge.default_model import default_checkpoint_dir
    from gaze_edge.scenes import render, sample_scene
    from gaze_edge.train.data import Encoder, pixel_values
    from gaze_edge.train.distill.encode import PromptEncoder

    folder = default_checkpoint_dir()
    encoder = PromptEncoder(folder, load_model(folder))
    image = render(sample_scene(7))
    for prompt in ("Describe the image.", "What shape is in the top right?"):
        encoded = encoder.encode(image, prompt)
        assert encoded.prompt_ids == Encoder(encoder.tokenizer, 196).prompt_ids(prompt)
        assert torch.equal(encoded.pixels["pixel_values"], pixel_values([image]))


def test_a_dense_source_gets_the_training_free_defaults_with_one_learned_token(inputs):
    from gaze_edge.train.distill.source import load, student_config

    source = load(inputs["llava"][0], torch.device("cpu"))
    assert student_config(source, 0.1, None, None) == TRAINING_FREE.replace(
        n_context_tokens=1, context_tokens="learned", keep_ratio=0.1, top_k=0)
    assert student_config(source, 0.2, (3, 3), 2, "gqa_mean", 1) == TRAINING_FREE.replace(
        region_h=3, region_w=3, n_context_tokens=2, context_tokens="learned", keep_ratio=0.2, top_k=0,
        score_mode="gqa_mean", n_dense_layers=1)


def test_samples_held_out_and_batches_are_fixed():
    from gaze_edge.train.distill import samples

    train, held = samples.split_heldout(50)
    assert (train, held) == samples.split_heldout(50) and len(held) == 5 and not set(train) & set(held)
    assert sorted(train + held) == list(range(50))
    epoch = [r for s in range(5) for r in samples.step_rows(20, 4, seed=1, step=s)]
    assert sorted(epoch) == list(range(20))  # each sample once per epoch
    assert epoch != [r for s in range(5) for r in samples.step_rows(20, 4, seed=2, step=s)]
    scenes = samples.scene_samples(3)
    assert scenes == samples.scene_samples(3) and all(s.image.startswith("scene:") for s in scenes)


# --------------------------------------------------------------------------- runtime


@pytest.mark.runtime
@pytest.mark.parametrize("family", list(SIZES))
def test_the_output_converts_and_chats_with_its_context_tokens(distilled, inputs, family, tmp_path):
    from gaze_edge.checkpoint import load_gaze
    from gaze_edge.convert import convert
    from gaze_edge.runtime.model import GazeModel

    out, _ = distilled(family)
    llm, _ = convert(out, tmp_path / "gguf", outtype="f32", progress=False)
    config, context = load_gaze(out)
    photo = Image.open(sorted(inputs[family][1].iterdir())[0]).convert("RGB")
    with GazeModel.load(llm.parent, n_threads=1) as model:
        defaults = model.gaze_defaults()
        assert defaults.keep_ratio == pytest.approx(0.1) and defaults.n_context_tokens == 4
        session = model.session()
        added = session.add_image(photo, keep_embeddings=True)
        n_grid = added.grid[0] * added.grid[1]
        np.testing.assert_allclose(added.embeddings[n_grid:], context.numpy(), atol=1e-6)
        session.close()
        result = model.chat("Describe the image.", images=[photo], max_tokens=4, trace=True)
    gazed = [s.trace for s in result.steps if s.trace is not None]
    assert result.steps and gazed
    assert all(t.k == config.n_selected(4) == 1 for t in gazed)  # 1 of the 4 regions


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error(inputs, tmp_path):
    from gaze_edge import distill

    ckpt, images, prompts = inputs["llava"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(GazeEdgeError, match="no images found"):
        distill(ckpt, tmp_path / "a", images=tmp_path / "empty")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(GazeEdgeError, match="model_type 'bert' is not supported"):
        distill(bert, tmp_path / "b", images=images)
    with pytest.raises(GazeEdgeError, match="either images"):
        distill(ckpt, tmp_path / "c", images=images, scenes=4)
    with pytest.raises(GazeEdgeError, match="keep_ratio"):
        distill(ckpt, tmp_path / "c", images=images, keep_ratio=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(GazeEdgeError, match="not empty"):
        distill(ckpt, tmp_path / "busy", images=images)
    assert not any((tmp_path / p).exists() for p in "abc")


def test_a_gaze_source_is_retargeted_from_its_own_context_tokens(distilled, inputs, tmp_path):
    from gaze_edge import distill
    from gaze_edge.checkpoint import load_gaze

    src, _ = distilled("llava")
    _, images, prompts = inputs["llava"]
    with pytest.raises(GazeEdgeError, match="keeps its own region size"):
        distill(src, tmp_path / "x", images=images, context_tokens=2)
    result = distill(src, tmp_path / "retarget", images=images, prompts=prompts, keep_ratio=0.5,
                     **{**FAST, "steps": 10})
    config, _ = load_gaze(tmp_path / "retarget")
    assert config.keep_ratio == 0.5 and config.n_context_tokens == 4
    # the student started as SRC itself at the new budget (its teacher: SRC decoding densely)
    start = remeasure(src, tmp_path / "retarget", 0.5, override=True)
    assert start["kl"] == pytest.approx(result.before["kl"], rel=1e-5)
    assert not (tmp_path / "retarget" / ".distill" / "output").exists()
    report = json.loads((tmp_path / "retarget" / "gaze_edge_distill.json").read_text())
    assert report["src"] == str(src.resolve()) and report["src_kind"] == "gaze"


def run_cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_cli_flags_and_exit_codes(inputs, tmp_path):
    ckpt, images, prompts = inputs["llava"]
    base = ["distill", ckpt, "-o", tmp_path / "out", "--images", images, "--prompts", prompts]
    fast = ["--steps", 6, "--batch-size", 4, "--answer-tokens", 6, "-q"]
    r = run_cli(*base, *fast)
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "out") and "before ->" in lines[0] and "after" in lines[0]
    assert run_cli(*base, *fast).stdout == r.stdout  # finished: the same report again

    for args, code, words in [
        ([*base, *fast, "--keep-ratio", 0.25], 1, "other settings (keep_ratio)"),
        (["distill", ckpt, "-o", tmp_path / "o2", *fast], 2, "give --images DIR or --scenes N"),
        (["distill", ckpt, "-o", tmp_path / "o2", "--scenes", 4, "--prompts", prompts], 2, "--prompts goes with"),
        ([*base, "--keep-ratio", 0], 2, "--keep-ratio"),
        ([*base, "--region", "2y2"], 2, "HxW"),
        (["distill", ckpt, "-o", tmp_path / "o2", "--images", tmp_path / "out" / ".distill"], 1, "no images found"),
    ]:
        r = run_cli(*args)
        assert r.exit_code == code, (args, r.output)
        errors = [line for line in r.stderr.splitlines() if line.startswith("gaze-edge: error:")]
        assert len(errors) == 1 and words in errors[0], r.stderr
    r = run_cli(*base, *fast, "--keep-ratio", 0.25, "--fresh")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["gaze"]["keep_ratio"] == 0.25
