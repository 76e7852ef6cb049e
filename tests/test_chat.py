"""The Python API and `gaze-edge chat` on the embedded default model, as a user runs them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gaze_edge.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"
TRUTH = (ROOT / "examples" / "scene.txt").read_text().strip()
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def model():
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1)
    yield m
    m.close()


def test_default_model_describes_the_example(model):
    result = model.chat(PROMPT, image=SCENE, trace=True)
    assert result.text.strip() == TRUTH
    assert result.finish_reason == "stop"
    # 2x2 regions of a 14x14 grid = 49 regions; keep_ratio 0.25 keeps 13 of them (52 of 196 tokens)
    assert result.visual_kv_fraction == pytest.approx(13 * 4 / 196)
    assert result.steps[0].trace is None  # the first token comes from the dense prompt
    assert all(s.trace is not None for s in result.steps[1:])


def test_gaze_settings_and_dense(model):
    dense = model.chat(PROMPT, image=SCENE, gaze=False, trace=True)
    assert dense.text.strip() == TRUTH and dense.visual_kv_fraction is None
    one = model.chat(PROMPT, image=SCENE, keep_regions=1, trace=True, max_tokens=4)
    assert one.visual_kv_fraction == pytest.approx(4 / 196)
    half = model.chat(PROMPT, image=SCENE, keep_ratio=0.5, trace=True, max_tokens=4)
    assert half.visual_kv_fraction == pytest.approx(25 * 4 / 196)


def test_stream_yields_the_same_text(model):
    pieces = list(model.chat(PROMPT, image=SCENE, stream=True))
    assert len(pieces) > 3 and "".join(pieces).strip() == TRUTH


def test_questions_and_a_conversation_with_two_images(model):
    answer = model.chat("What is in the center?", image=SCENE)
    assert answer.text.strip() == "yellow square."
    other = Image.new("RGB", (196, 196), (235, 235, 235))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": str(SCENE)},
                                     {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": TRUTH},
        {"role": "user", "content": [{"type": "image", "image": other},
                                     {"type": "text", "text": "How many shapes are there?"}]},
    ]
    result = model.chat(messages, trace=True, max_tokens=8)
    assert len(result.images) == 2 and result.text.strip()
    # one budget over both images' 98 regions: 25 regions of 4 tokens out of 392 grid tokens
    assert result.visual_kv_fraction == pytest.approx(25 * 4 / 392)


def test_sampling_is_seeded(model):
    a = model.chat(PROMPT, image=SCENE, temperature=1.5, seed=3, max_tokens=12)
    b = model.chat(PROMPT, image=SCENE, temperature=1.5, seed=3, max_tokens=12)
    assert a.text == b.text


def test_concurrent_calls_are_serialised(model):
    results = [None, None]

    def run(i):
        results[i] = model.chat(PROMPT, image=SCENE).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == results[0] and results[0].strip() == TRUTH


# ----------------------------------------------------------------------------- CLI


def test_cli_json_and_gaze_map(tmp_path):
    out = tmp_path / "m.png"
    result = CliRunner().invoke(main, ["chat", "--image", str(SCENE), "-p", PROMPT, "--json",
                                       "--threads", "1", "--gaze-map", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["text"].strip() == TRUTH
    assert data["gaze"] is True and data["visual_kv_fraction"] == pytest.approx(13 * 4 / 196)
    assert data["prompt_tokens"] > 196 and data["generated_tokens"] > 10
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[0] > 200 and picture.shape[1] > 200


def test_cli_gif_and_dense(tmp_path):
    out = tmp_path / "m.gif"
    assert CliRunner().invoke(main, ["chat", "--image", str(SCENE), "-p", PROMPT, "--gaze-map",
                                     str(out), "--max-tokens", "6"]).exit_code == 0
    assert Image.open(out).n_frames == 5  # tokens 2..6 gazed; the first came from the prompt
    dense = CliRunner().invoke(main, ["chat", "--image", str(SCENE), "-p", PROMPT, "--dense"])
    assert dense.exit_code == 0 and dense.output.strip() == TRUTH
    gathered = CliRunner().invoke(main, ["chat", "--image", str(SCENE), "-p", PROMPT, "--gather", "--json"])
    assert gathered.exit_code == 0, gathered.output
    data = json.loads(gathered.output)
    assert data["text"].strip() == TRUTH and data["visual_kv_fraction"] == pytest.approx(13 * 4 / 196)


def test_cli_info_on_the_default_model():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["vision"] and data["gaze"]["region_h"] == 2 and data["gaze"]["n_context_tokens"] == 4


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "image not found"),
        (lambda d: _write(d / "notes.png", b"just text"), "not an image"),
        (lambda d: _write(d / "cut.png", SCENE.read_bytes()[:120]), "corrupt"),
        (lambda d: Image.new("1", (12000, 12000)).save(d / "bomb.png") or d / "bomb.png", "too large"),
    ],
    ids=["missing", "non-image", "corrupt", "bomb"],
)
def test_cli_bad_images(tmp_path, make, message):
    line = _one_line_error(CliRunner().invoke(main, ["chat", "--image", str(make(tmp_path)), "-p", "hi"]))
    assert message in line


BAD_FLAGS = [
    ["--keep-regions", "0"], ["--keep-ratio", "2"], ["--dense", "--keep-regions", "3"], ["--dense", "--gather"],
    ["--gaze-map", "m.jpg"], ["--max-tokens", "-1"], ["-n", "0"], ["-c", "-1"], ["--ctx-size", "x"],
    ["--temp", "-1"], ["--top-k", "-1"], ["--top-p", "1.5"], ["--min-p", "-0.1"], ["--repeat-penalty", "0"],
    ["--repeat-last-n", "-2"], ["--seed", "-1"], ["-ngl", "-2"], ["--image-min-tokens", "0"],
    ["--image-max-tokens", "x"], ["--json-schema", "{not json"], ["--json-schema", "[1]"],
    ["--grammar-file", "missing.gbnf"], ["--mmproj", __file__], ["-m", "no/such/model.gguf"],
]


@pytest.mark.parametrize("args", BAD_FLAGS, ids=" ".join)
def test_cli_bad_flags_give_one_line_and_exit_2(args):
    result = CliRunner().invoke(main, ["chat", "--image", str(SCENE), "-p", "hi", *args])
    assert result.exit_code == 2, (args, result.output)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gaze-edge: error: "), result.output


def test_cli_model_folder_with_missing_or_mismatched_files(tmp_path):
    from gaze_edge.default_model import default_model_dir

    src = default_model_dir()
    llm = next(p for p in src.glob("*.gguf") if not p.name.startswith("mmproj-"))
    mmproj = next(src.glob("mmproj-*.gguf"))
    only_llm = tmp_path / "only-llm"
    only_llm.mkdir()
    (only_llm / llm.name).write_bytes(llm.read_bytes())
    line = _one_line_error(CliRunner().invoke(main, ["chat", "--model", str(only_llm), "--image",
                                                     str(SCENE), "-p", "hi"]))
    assert "mmproj" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / llm.name).write_bytes(llm.read_bytes()[: len(llm.read_bytes()) // 2])
    (broken / mmproj.name).write_bytes(mmproj.read_bytes())
    line = _one_line_error(CliRunner().invoke(main, ["chat", "--model", str(broken), "--image",
                                                     str(SCENE), "-p", "hi"]))
    assert "broken" in line and "past the end of the file" in line  # gaze_edge.runtime.gguf_check's words
