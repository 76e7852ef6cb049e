"""The converter's front door: SRC resolution (folder / Hub, offline), bad inputs, clean failure.

Every bad input must give one ConvertError line and leave no .gguf behind (OUTDIR itself is
removed when the conversion created it). No network: the Hub download is a stub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gaze_edge.config import GazeConfig
from gaze_edge.convert import ConvertError, convert, source
from gaze_edge.convert.families import FAMILIES, family_for
from gaze_edge.convert.tiny import tiny_checkpoint, write_gaze
from gaze_edge.convert.tokenizer import GPT2_REGEX, is_gpt2_pre_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint("llava", tmp_path_factory.mktemp("ckpt") / "tiny-llava")


@pytest.fixture
def ckpt(llava_dir, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(llava_dir, tmp_path / "tiny-llava"))


def ggufs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.gguf")) if folder.exists() else []


def fails(ckpt_or_src, outdir: Path, match: str, **kw) -> ConvertError:
    with pytest.raises(ConvertError, match=match) as info:
        convert(ckpt_or_src, outdir, progress=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg, "the error must be one line"
    assert ggufs(outdir) == []
    return info.value


# --- bad inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("missing, match", [
    ("config.json", "missing config.json"),
    ("tokenizer.json", "missing tokenizer"),
    ("model.safetensors", "missing weights"),
    ("processor_config.json", "missing image processor config"),
])
def test_missing_files(ckpt, tmp_path, missing, match):
    (ckpt / missing).unlink()
    out = tmp_path / "out"
    fails(ckpt, out, match)
    assert not out.exists(), "an OUTDIR the conversion created is removed on failure"


def test_missing_folder(tmp_path):
    fails(tmp_path / "nope", tmp_path / "out", "model folder not found")


def test_unknown_architecture_names_what_is_supported(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = fails(ckpt, tmp_path / "out", "unsupported architecture 'BertForMaskedLM'")
    for family in FAMILIES:
        assert family.name in str(err) and family.architectures[0] in str(err)


def test_unsupported_setting_is_named(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails(ckpt, tmp_path / "out", r"vision_feature_select_strategy = 'full' is not supported")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(ckpt, tmp_path, damage):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + data[2:64])
    fails(ckpt, tmp_path / "out", "corrupt safetensors file .*model.safetensors")


def _gaze_files(ckpt: Path, gaze: GazeConfig, context_tokens: torch.Tensor) -> None:
    """Write the gaze parts as they are, even when they do not fit (checkpoint.write_gaze refuses)."""
    from safetensors.torch import save_file

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["gaze"] = gaze.to_dict()
    (ckpt / "config.json").write_text(json.dumps(cfg))
    save_file({"context_tokens": context_tokens}, str(ckpt / "gaze.safetensors"))


def test_gaze_context_tokens_of_the_wrong_width(ckpt, tmp_path):
    n_embd = json.loads((ckpt / "config.json").read_text())["text_config"]["hidden_size"]
    _gaze_files(ckpt, GazeConfig(n_context_tokens=3), torch.zeros(3, n_embd + 8))
    fails(ckpt, tmp_path / "out", rf"context_tokens have shape \[3, {n_embd + 8}\].*hidden_size={n_embd}")


def test_gaze_context_tokens_of_the_wrong_count(ckpt, tmp_path):
    _gaze_files(ckpt, GazeConfig(n_context_tokens=5), torch.zeros(3, 64))
    fails(ckpt, tmp_path / "out", r"shape \[3, 64\].*n_context_tokens=5")


def test_gaze_settings_without_context_tokens(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["gaze"] = GazeConfig().to_dict()
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails(ckpt, tmp_path / "out", "gaze.safetensors not found")


def test_context_tokens_without_gaze_settings(ckpt, tmp_path):
    write_gaze(ckpt, GazeConfig(n_context_tokens=2), n_embd=64)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["gaze"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails(ckpt, tmp_path / "out", "gaze.safetensors is present but config.json has no 'gaze' settings")


def test_corrupt_gaze_safetensors(ckpt, tmp_path):
    write_gaze(ckpt, GazeConfig(n_context_tokens=2), n_embd=64)
    (ckpt / "gaze.safetensors").write_bytes(b"\x00" * 12)
    fails(ckpt, tmp_path / "out", "gaze.safetensors is not a readable safetensors file")


def test_invalid_gaze_settings(ckpt, tmp_path):
    write_gaze(ckpt, GazeConfig(n_context_tokens=2), n_embd=64)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["gaze"]["keep_ratio"] = 1.5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails(ckpt, tmp_path / "out", "invalid gaze settings.*keep_ratio")


def test_bad_outtype_and_name(ckpt, tmp_path):
    fails(ckpt, tmp_path / "out", "unknown outtype 'q5_0'", outtype="q5_0")
    fails(ckpt, tmp_path / "out", "invalid model name", name="a/b")


def test_existing_outdir_keeps_its_files_and_gets_nothing(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (ckpt / "tokenizer.json").unlink()
    fails(ckpt, out, "missing tokenizer")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- failures after work started --------------------------------------------------------------

def test_llama_cpp_failure_is_one_line_and_leaves_nothing(ckpt, tmp_path):
    """A pre-tokenizer that is not GPT-2's: llama.cpp's hash check fails inside the child."""
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    err = fails(ckpt, tmp_path / "out", "llama.cpp's converter failed on the language model: "
                                        "NotImplementedError: BPE pre-tokenizer was not recognized")
    assert "Traceback" in err.detail
    assert not (tmp_path / "out").exists()


def test_interrupt_after_the_language_model_leaves_no_gguf(ckpt, tmp_path, monkeypatch):
    from gaze_edge.convert import clip_mmproj

    def interrupted(path, *args, **kwargs):
        Path(path).write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(clip_mmproj, "write", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, out, outtype="f32", progress=False)
    assert ggufs(out) == [] and not out.exists()


# --- SRC: folder or Hub -----------------------------------------------------------------------

def test_offline_hub_fails_fast_with_the_cause(tmp_path, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    calls = []

    def offline(repo_id):
        calls.append(repo_id)
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(source, "_hub_download", offline)
    err = fails("someone/tiny-vlm", tmp_path / "out", "cannot download 'someone/tiny-vlm'")
    assert calls == ["someone/tiny-vlm"]
    assert "offline" in str(err) and "local folder" in str(err)


def test_no_network_and_no_cache(tmp_path, monkeypatch):
    import httpx2  # what huggingface_hub 2.x speaks HTTP with

    def no_network(repo_id):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(source, "_hub_download", no_network)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    err = fails("someone/tiny-vlm", tmp_path / "out", "no network connection")
    assert "local folder" in str(err)


def test_hub_repo_id_downloads_then_converts(llava_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(source, "_hub_download", lambda repo_id: str(llava_dir))
    llm, mmproj = convert("someone/tiny-vlm", tmp_path / "out", outtype="f32", progress=False)
    assert (llm.name, mmproj.name) == ("tiny-vlm-f32.gguf", "mmproj-tiny-vlm-f32.gguf")
    assert ggufs(tmp_path / "out") == sorted([llm, mmproj])
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


# --- small pure functions ---------------------------------------------------------------------

def test_gpt2_pre_tokenizer_detection():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    split = {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False}
    seq = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    bpe = {"type": "BPE"}
    assert is_gpt2_pre_tokenizer({"normalizer": None, "pre_tokenizer": byte_level, "model": bpe})
    assert is_gpt2_pre_tokenizer({"normalizer": None, "pre_tokenizer": seq, "model": bpe})
    # a prefix space, a normaliser, another regex or another model is not GPT-2's split
    assert not is_gpt2_pre_tokenizer({"pre_tokenizer": {**byte_level, "add_prefix_space": True}, "model": bpe})
    assert not is_gpt2_pre_tokenizer({"normalizer": {"type": "NFC"}, "pre_tokenizer": byte_level, "model": bpe})
    other = {**seq, "pretokenizers": [{**split, "pattern": {"Regex": r"\p{L}+"}}, seq["pretokenizers"][1]]}
    assert not is_gpt2_pre_tokenizer({"pre_tokenizer": other, "model": bpe})
    assert not is_gpt2_pre_tokenizer({"pre_tokenizer": byte_level, "model": {"type": "Unigram"}})


def test_each_tiny_family_is_recognised(tmp_path):
    for family, arch in [("qwen2vl", "Qwen2VLForConditionalGeneration"),
                         ("qwen2.5vl", "Qwen2_5_VLForConditionalGeneration")]:
        folder = tiny_checkpoint(family, tmp_path / family)
        assert family_for(json.loads((folder / "config.json").read_text())).architectures == (arch,)


def test_repo_ids_and_paths():
    assert source.looks_like_repo_id("Qwen/Qwen2-VL-2B-Instruct")
    for not_id in ("./a/b", "~/a", "/abs/path", "a/b/c", "plain"):
        assert not source.looks_like_repo_id(not_id)
