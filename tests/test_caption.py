"""`gaze-edge caption` and gaze_edge.caption: many images, one model, a JSON-lines file that resumes.

The file logic (which files, resume, repair, errors) is checked with a stand-in model that needs no
runtime; the real captions, exit statuses and resume are checked on the embedded default model
(runtime tests), which knows GazeScenes images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from gaze_edge.caption import caption, caption_images, find_images
from gaze_edge.cli import main
from gaze_edge.errors import GazeEdgeError
from gaze_edge.scenes import render, sample_scene

PROMPT = "Describe the image."


def _lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")  # whole lines only
    return [json.loads(line) for line in text.splitlines()]


def _scene(path: Path, seed: int) -> Path:
    render(sample_scene(seed)).save(path)
    return path


def _folder(root: Path) -> Path:
    """3 good scenes, a truncated PNG, a text file named .png and a .txt side file."""
    folder = root / "imgs"
    folder.mkdir()
    for i in range(3):
        _scene(folder / f"scene{i}.png", i)
    good = (folder / "scene0.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[: len(good) // 3])
    (folder / "text.png").write_text("not an image at all")
    (folder / "notes.txt").write_text("a caption file, not an image")
    return folder


# --------------------------------------------------------------------------- without the runtime


class FakeResult:
    def __init__(self, text: str) -> None:
        self.text = text

    def to_dict(self) -> dict:
        return {"text": self.text, "finish_reason": "stop", "prompt_tokens": 1, "generated_tokens": 1,
                "prompt_seconds": 0.0, "generate_seconds": 0.0, "ms_per_token": 0.0,
                "visual_kv_fraction": 0.5}


class FakeModel:
    """Captions an image by its top-left pixel; records what it was asked."""

    has_vision = True

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def chat(self, prompt, *, image, trace, **options):
        self.calls.append((prompt, image.size, trace, options))
        return FakeResult(f" pixel {image.getpixel((0, 0))} \n")


def test_find_images_in_folders_and_files(tmp_path):
    folder = _folder(tmp_path)
    (folder / ".hidden.png").write_bytes((folder / "scene0.png").read_bytes())
    (folder / "sub").mkdir()
    _scene(folder / "sub" / "deep.JPG", 4)
    names = [p.name for p in find_images([folder])]
    assert names == ["corrupt.png", "scene0.png", "scene1.png", "scene2.png", "text.png"]
    assert [p.name for p in find_images([folder], recursive=True)] == [*names[:4], "deep.JPG", "text.png"]
    # a named file is always taken; each image once, in the order given
    named = find_images([folder / "notes.txt", folder, folder / "scene1.png"])
    assert [p.name for p in named] == ["notes.txt", *names]
    assert find_images(str(folder / "missing.png")) == [folder / "missing.png"]  # gets an error line later
    (tmp_path / "empty").mkdir()
    with pytest.raises(GazeEdgeError, match="no images found"):
        find_images([tmp_path / "empty"])


def test_recursive_order(tmp_path):
    (tmp_path / "b").mkdir()
    _scene(tmp_path / "b" / "x.png", 1)
    _scene(tmp_path / "a.png", 2)
    _scene(tmp_path / "c.png", 3)
    assert [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path], recursive=True)] == \
        ["a.png", "b/x.png", "c.png"]
    assert [p.name for p in find_images([tmp_path])] == ["a.png", "c.png"]


def test_caption_writes_lines_and_resumes(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out" / "caps.jsonl"
    model = FakeModel()
    summary = caption(model, [folder], jsonl=out, prompt="What?", progress=False, max_tokens=7)
    assert (summary.total, summary.captioned, summary.skipped, summary.failed) == (5, 3, 0, 2)
    assert "2 failed" in str(summary)
    lines = _lines(out)
    assert [Path(r["path"]).name for r in lines] == ["corrupt.png", "scene0.png", "scene1.png", "scene2.png",
                                                     "text.png"]
    by_name = {Path(r["path"]).name: r for r in lines}
    assert "corrupt" in by_name["corrupt.png"]["error"]
    assert "not an image" in by_name["text.png"]["error"]
    pixel = Image.open(folder / "scene1.png").convert("RGB").getpixel((0, 0))
    assert by_name["scene1.png"]["text"] == f"pixel {pixel}"  # stripped
    assert by_name["scene1.png"]["visual_kv_fraction"] == 0.5
    assert all(call == ("What?", (196, 196), True, {"max_tokens": 7}) for call in model.calls)
    assert len(model.calls) == 3

    # resume: captioned images are skipped, failed ones retried, the file keeps one line per image
    model.calls.clear()
    (folder / "text.png").unlink()
    _scene(folder / "text.png", 9)  # fixed since
    summary = caption(model, [folder], jsonl=out, progress=False)
    assert (summary.captioned, summary.skipped, summary.failed) == (1, 3, 1)
    assert len(model.calls) == 1
    again = _lines(out)
    assert [r["path"] for r in again] == [r["path"] for r in lines if "text" in r] + \
        [str(folder / "corrupt.png"), str(folder / "text.png")]
    assert again[:3] == [r for r in lines if "text" in r]  # the old lines, untouched
    assert "text" in again[-1] and "error" in again[-2]

    # the same image under another name of its path is not captioned twice
    model.calls.clear()
    summary = caption(model, [folder / ".." / "imgs" / "scene2.png"], jsonl=out, progress=False)
    assert (summary.captioned, summary.skipped) == (0, 1) and model.calls == []

    # --no-resume starts the file over
    summary = caption(model, [folder / "scene0.png"], jsonl=out, resume=False, progress=False)
    assert summary.captioned == 1 and len(_lines(out)) == 1


def test_a_line_cut_short_is_redone(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "caps.jsonl"
    caption(FakeModel(), [folder / "scene0.png", folder / "scene1.png"], jsonl=out, progress=False)
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.rindex(b"scene1") + 20])  # a crash in the middle of the last line
    model = FakeModel()
    summary = caption(model, [folder / "scene0.png", folder / "scene1.png"], jsonl=out, progress=False)
    assert (summary.captioned, summary.skipped) == (1, 1) and len(model.calls) == 1
    assert out.read_bytes() == whole


def test_a_damaged_line_inside_the_file_is_not_deleted(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "caps.jsonl"
    out.write_text('{"path": "a.png", "text": "x"}\nnot json\n{"path": "b.png", "text": "y"}\n')
    with pytest.raises(GazeEdgeError, match="line 2"):
        caption(FakeModel(), [folder / "scene0.png"], jsonl=out, progress=False)
    assert out.read_text().count("\n") == 3


def test_duplicates_and_blank_lines_are_cleaned(tmp_path):
    folder = _folder(tmp_path)
    path = str(folder / "scene0.png")
    out = tmp_path / "caps.jsonl"
    first = json.dumps({"path": path, "text": "first"})
    out.write_text(f"{first}\n\n{json.dumps({'path': path, 'text': 'second'})}\n")
    model = FakeModel()
    summary = caption(model, [path], jsonl=out, progress=False)
    assert summary.skipped == 1 and model.calls == []
    assert out.read_text() == first + "\n"


def test_caption_images_yields_dicts_and_needs_vision(tmp_path):
    folder = _folder(tmp_path)
    records = list(caption_images(FakeModel(), [folder / "scene0.png", folder / "missing.png"]))
    assert records[0]["text"].startswith("pixel") and "not found" in records[1]["error"]
    blind = FakeModel()
    blind.has_vision = False
    with pytest.raises(GazeEdgeError, match="no vision projector"):
        list(caption_images(blind, [folder / "scene0.png"]))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Missing argument"),
        (["IMG"], "Missing option '--jsonl'"),
        (["IMG", "--jsonl", "o.jsonl", "--dense", "--keep-ratio", "0.5"], "--dense cannot go with"),
        (["IMG", "--jsonl", "o.jsonl", "--keep-ratio", "0"], "--keep-ratio"),
        (["IMG", "--jsonl", "o.jsonl", "-n", "0"], "--max-tokens"),
        (["IMG", "--jsonl", "o.jsonl", "--temp", "-1"], "--temp"),
        (["IMG", "--jsonl", "o.jsonl", "--mmproj", "IMG"], "--mmproj goes with -m/--model"),
        (["IMG", "--jsonl", "o.jsonl", "--frobnicate"], "No such option"),
    ],
)
def test_bad_flags_exit_2(tmp_path, args, message):
    image = _scene(tmp_path / "s.png", 0)
    args = [str(image) if a == "IMG" else str(tmp_path / a) if a == "o.jsonl" else a for a in args]
    result = CliRunner().invoke(main, ["caption", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_no_images_exits_1_before_loading_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["caption", str(tmp_path / "empty"), "--jsonl", str(tmp_path / "o.jsonl"),
                                       "-m", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "no images found" in result.output


# --------------------------------------------------------------------------- on the default model


@pytest.fixture(scope="module")
def model():
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1)
    yield m
    m.close()


def _caption_cli(*args):
    return CliRunner().invoke(main, ["caption", "--threads", "1", *map(str, args)])


@pytest.mark.runtime
def test_cli_captions_a_folder_resumes_and_repairs(tmp_path, model):
    folder = _folder(tmp_path)
    out = tmp_path / "caps.jsonl"
    result = _caption_cli(folder, "--jsonl", out)
    assert result.exit_code == 1, result.output  # two images failed
    assert "captioned 3 of 5 images, 2 failed" in result.stderr
    lines = _lines(out)
    by_name = {Path(r["path"]).name: r for r in lines}
    assert sorted(by_name) == ["corrupt.png", "scene0.png", "scene1.png", "scene2.png", "text.png"]
    assert "corrupt" in by_name["corrupt.png"]["error"] and set(by_name["corrupt.png"]) == {"path", "error"}
    assert "not an image" in by_name["text.png"]["error"]
    for i in range(3):
        record = by_name[f"scene{i}.png"]
        alone = model.chat(PROMPT, image=folder / f"scene{i}.png", trace=True, max_tokens=128)
        assert record["text"] == alone.text.strip() and record["text"]
        assert record["visual_kv_fraction"] == pytest.approx(alone.visual_kv_fraction)
        assert record["generated_tokens"] == alone.n_generated_tokens
        assert record["prompt_tokens"] == alone.n_prompt_tokens
        assert record["prompt_seconds"] > 0 and record["generate_seconds"] > 0

    # a rerun skips the captioned images (their lines stay byte for byte) and retries the failed ones
    before = out.read_text().splitlines()
    _scene(folder / "scene3.png", 3)
    result = _caption_cli(folder, "--jsonl", out)
    assert result.exit_code == 1 and "3 already done, 2 failed" in result.stderr
    after = out.read_text().splitlines()
    captioned = [line for line in before if '"text"' in line]
    assert after[:3] == captioned
    paths = [json.loads(line)["path"] for line in after]
    assert len(paths) == len(set(paths)) == 6
    # then the rest in folder order: the failures retried, the new image captioned
    assert [(Path(r["path"]).name, "error" in r) for r in map(json.loads, after[3:])] == \
        [("corrupt.png", True), ("scene3.png", False), ("text.png", True)]

    # a crash in the middle of the last line: the line is dropped and its image captioned again
    good = [folder / f"scene{i}.png" for i in range(4)]
    result = _caption_cli(*good, "--jsonl", out, "--no-resume")
    assert result.exit_code == 0, result.output
    whole = out.read_bytes()
    out.write_bytes(whole[: len(whole) - 25])
    result = _caption_cli(*good, "--jsonl", out, "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    repaired = out.read_bytes().splitlines()
    assert repaired[:3] == whole.splitlines()[:3]  # the whole lines, untouched
    assert [r["path"] for r in _lines(out)] == [str(p) for p in good]
    assert _lines(out)[3]["text"] == json.loads(whole.splitlines()[3])["text"]  # the cut one, redone


@pytest.mark.runtime
def test_cli_named_non_image_and_dense(tmp_path, model):
    folder = _folder(tmp_path)
    out = tmp_path / "caps.jsonl"
    result = _caption_cli(folder / "notes.txt", folder / "scene1.png", "--jsonl", out, "--dense", "-n", "5")
    assert result.exit_code == 1 and "1 failed" in result.stderr
    bad, good = _lines(out)
    assert bad["path"].endswith("notes.txt") and "not an image" in bad["error"]
    alone = model.chat(PROMPT, image=folder / "scene1.png", gaze=False, max_tokens=5)
    assert good["text"] == alone.text.strip() and good["visual_kv_fraction"] is None
    assert good["generated_tokens"] == 5 and good["finish_reason"] == "length"


def test_progress_bar_on_demand_and_silent_off_a_terminal(tmp_path, capsys):
    pytest.importorskip("tqdm")
    folder = _folder(tmp_path)
    caption(FakeModel(), [folder], jsonl=tmp_path / "a.jsonl", progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err and "failed=2" in err
    caption(FakeModel(), [folder], jsonl=tmp_path / "b.jsonl")  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
