"""The training-free selection options in the files: the gaze checkpoint (config.json, no
gaze.safetensors for pooled context tokens), `make-gaze`, and the GGUF keys the converter writes
(``{arch}.attention.gaze.n_dense_layers``, ``clip.vision.gaze.ctx_tokens_mode``, score mode id 3),
read back into a GazeConfig. Files and checkpoints from before the options read as the defaults.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from gaze_edge import cli, gguf_names
from gaze_edge.checkpoint import (
    CONFIG_KEY,
    WEIGHTS_FILE,
    GazeCheckpointError,
    calibration_images,
    dense_to_gaze,
    load_gaze,
    load_gaze_vlm,
    save_gaze_checkpoint,
    write_gaze,
)
from gaze_edge.config import CONTEXT_TOKEN_MODES, SCORE_MODES, TRAINING_FREE, GazeConfig
from gaze_edge.convert import ConvertError, convert
from gaze_edge.convert.gaze import (
    GazeParts,
    config_from_keys,
    llm_keys,
    mmproj_keys,
    mmproj_tensors,
    read_gguf_config,
)
from gaze_edge.convert.tiny import tiny_checkpoint
from gaze_edge.reference import GazeVLM
from gaze_edge.reference.tiny_models import tiny_llava, tiny_qwen2_vl

torch.set_num_threads(1)


def f32(config: GazeConfig) -> GazeConfig:
    """The config as a GGUF holds it (keep_ratio is an f32 there)."""
    return config.replace(keep_ratio=float(np.float32(config.keep_ratio)))


def as_read(keys, arch: str = "llama") -> dict:
    """KeyValues as GGUFReader's contents() gives them ({arch} filled)."""
    return {kv.key.format(arch=arch): kv.value for kv in keys}


def parts(config: GazeConfig, n_embd: int = 8) -> GazeParts:
    n = 0 if config.pooled else config.n_context_tokens
    return GazeParts(config, np.ones((n, n_embd), dtype=np.float32))


# --- the keys, without a conversion ---------------------------------------------------------

OPTIONS = list(itertools.product(SCORE_MODES, CONTEXT_TOKEN_MODES, [0, 3]))


@pytest.mark.parametrize("mode,context,n_dense", OPTIONS)
def test_every_key_round_trips(mode, context, n_dense):
    config = GazeConfig(region_h=3, region_w=2, n_context_tokens=4, top_k=5, keep_ratio=0.3, score_mode=mode,
                        n_dense_layers=n_dense, context_tokens=context)
    p = parts(config)
    llm, mmproj = as_read(llm_keys(p)), as_read(mmproj_keys(p))
    llm["general.architecture"] = "llama"
    assert config_from_keys(llm, mmproj) == config
    assert llm["llama.attention.gaze.score_mode"] == gguf_names.SCORE_MODE_IDS[mode]
    # the new keys are written when they differ from the default, and only then
    assert (gguf_names.llm_key(gguf_names.LLM_N_DENSE_LAYERS, "llama") in llm) == (n_dense > 0)
    assert mmproj.get(gguf_names.MMPROJ_CONTEXT_TOKENS_MODE) == ("pooled" if context == "pooled" else None)
    tensors = mmproj_tensors(p)
    assert (gguf_names.TENSOR_CONTEXT_TOKENS in tensors) == (context == "learned")


def test_key_types_and_score_mode_ids():
    config = GazeConfig(n_dense_layers=2, context_tokens="pooled", score_mode="gqa_max")
    kinds = {kv.key: kv.vtype for kv in llm_keys(parts(config)) + mmproj_keys(parts(config))}
    assert kinds[gguf_names.LLM_N_DENSE_LAYERS] == "UINT32"
    assert kinds[gguf_names.MMPROJ_CONTEXT_TOKENS_MODE] == "STRING"
    assert gguf_names.SCORE_MODE_IDS == {"gqa_mean": 0, "per_head": 1, "layer_mean": 2, "gqa_max": 3}
    assert gguf_names.LLM_N_DENSE_LAYERS == "{arch}.attention.gaze.n_dense_layers"
    assert gguf_names.MMPROJ_CONTEXT_TOKENS_MODE == "clip.vision.gaze.ctx_tokens_mode"


def test_files_without_the_new_keys_read_as_the_defaults():
    old_llm = {"general.architecture": "qwen2", "qwen2.attention.gaze.top_k": 0,
               "qwen2.attention.gaze.keep_ratio": 0.5, "qwen2.attention.gaze.score_mode": 1}
    old_mmproj = {gguf_names.MMPROJ_REGION_SIZE: [2, 2], gguf_names.MMPROJ_N_CONTEXT_TOKENS: 4}
    got = config_from_keys(old_llm, old_mmproj)
    assert got == GazeConfig(region_h=2, region_w=2, n_context_tokens=4, keep_ratio=0.5, score_mode="per_head")
    assert got.n_dense_layers == 0 and got.context_tokens == "learned"
    # no gaze keys in the mmproj: no regions, a dense pair
    assert config_from_keys(old_llm, {}) is None
    # a dense language model with a gaze mmproj selects with the defaults
    assert config_from_keys({"general.architecture": "llama"}, old_mmproj) == GazeConfig(
        region_h=2, region_w=2, n_context_tokens=4)
    for bad in ({"qwen2.attention.gaze.score_mode": 9}, {"qwen2.attention.gaze.n_dense_layers": -1}):
        with pytest.raises(ConvertError, match="invalid gaze keys"):
            config_from_keys({**old_llm, **bad}, old_mmproj)
    with pytest.raises(ConvertError, match="invalid gaze keys"):
        config_from_keys(old_llm, {**old_mmproj, gguf_names.MMPROJ_CONTEXT_TOKENS_MODE: "mean"})


def test_the_shipped_default_model_reads_as_its_checkpoint():
    """A GGUF pair converted before the options existed: the defaults, and its checkpoint's settings."""
    from gaze_edge.default_model import DEFAULT_DIR

    config = read_gguf_config(DEFAULT_DIR / "gaze-scenes-f32.gguf", DEFAULT_DIR / "mmproj-gaze-scenes-f32.gguf")
    checkpoint_config, _ = load_gaze(DEFAULT_DIR.parent / "default-hf")
    assert config == f32(checkpoint_config)
    assert config.n_dense_layers == 0 and config.context_tokens == "learned"


# --- conversions ------------------------------------------------------------------------------

CASES = {
    "llava-pooled": ("llava", GazeConfig(region_h=2, region_w=3, n_context_tokens=4, keep_ratio=0.3,
                                         score_mode="gqa_max", n_dense_layers=2, context_tokens="pooled")),
    "qwen2vl-pooled": ("qwen2vl", GazeConfig(region_h=3, region_w=2, n_context_tokens=1, top_k=3,
                                             score_mode="gqa_max", n_dense_layers=1, context_tokens="pooled")),
    "llava-learned": ("llava", GazeConfig(region_h=2, region_w=2, n_context_tokens=3, keep_ratio=0.2,
                                          score_mode="gqa_max", n_dense_layers=1)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-options")
    out = {}
    for name, (family, config) in CASES.items():
        ckpt = tiny_checkpoint(family, root / name, gaze=config)
        out[name] = (ckpt, *convert(ckpt, root / f"{name}-out", outtype="f32", progress=False))
    return out


def _read(path: Path):
    r = gguf.GGUFReader(path)
    return r.fields, {t.name for t in r.tensors}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_conversion_writes_every_option(converted, name):
    ckpt, llm, mmproj = converted[name]
    _, config = CASES[name]
    assert read_gguf_config(llm, mmproj) == f32(config)
    llm_fields, _ = _read(llm)
    mm_fields, mm_tensors = _read(mmproj)
    arch = llm_fields["general.architecture"].contents()
    dense_key = gguf_names.llm_key(gguf_names.LLM_N_DENSE_LAYERS, arch)
    assert llm_fields[dense_key].types == [gguf.GGUFValueType.UINT32]
    assert llm_fields[dense_key].contents() == config.n_dense_layers
    assert llm_fields[gguf_names.llm_key(gguf_names.LLM_SCORE_MODE, arch)].contents() == 3
    if config.pooled:
        assert not (ckpt / WEIGHTS_FILE).exists()
        assert mm_fields[gguf_names.MMPROJ_CONTEXT_TOKENS_MODE].types == [gguf.GGUFValueType.STRING]
        assert mm_fields[gguf_names.MMPROJ_CONTEXT_TOKENS_MODE].contents() == "pooled"
        assert gguf_names.TENSOR_CONTEXT_TOKENS not in mm_tensors
    else:
        assert gguf_names.MMPROJ_CONTEXT_TOKENS_MODE not in mm_fields
        assert gguf_names.TENSOR_CONTEXT_TOKENS in mm_tensors
    assert mm_fields[gguf_names.MMPROJ_N_CONTEXT_TOKENS].contents() == config.n_context_tokens


def test_a_pooled_checkpoint_with_a_stale_tensor_does_not_convert(converted, tmp_path):
    ckpt = Path(shutil.copytree(converted["llava-pooled"][0], tmp_path / "ckpt"))
    save_file({"context_tokens": torch.zeros(4, 64)}, str(ckpt / WEIGHTS_FILE))
    with pytest.raises(ConvertError, match="pool the context tokens") as info:
        convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.gguf"))


# --- the checkpoint -----------------------------------------------------------------------------

POOLED = GazeConfig(region_h=2, region_w=3, n_context_tokens=4, keep_ratio=0.5, score_mode="gqa_max",
                    n_dense_layers=1, context_tokens="pooled")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pooled_checkpoint_round_trip(tmp_path, family):
    model = tiny_llava() if family == "llava" else tiny_qwen2_vl()
    vlm = GazeVLM(model, POOLED)
    save_gaze_checkpoint(vlm, tmp_path)
    assert not (tmp_path / WEIGHTS_FILE).exists()
    stored = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert stored["context_tokens"] == "pooled" and stored["n_dense_layers"] == 1
    config, tokens = load_gaze(tmp_path)
    assert config == POOLED and tokens.shape == (0, 32)
    loaded = load_gaze_vlm(tmp_path)
    images = calibration_images(model, n_images=2)
    n = sum(h * w for h, w in vlm.image_features(**images).grids)
    ids = torch.tensor([[1, 5] + [model.config.image_token_id] * n + [6, 7, 10, 11, 12]])
    with torch.no_grad():
        a = vlm(ids, **images, gaze_start=ids.shape[1] - 3).logits
        b = loaded(ids, **images, gaze_start=ids.shape[1] - 3).logits
    assert torch.equal(a, b)


def test_pooled_checkpoint_files_are_checked(tmp_path):
    save_gaze_checkpoint(GazeVLM(tiny_llava(), POOLED.replace(context_tokens="learned")), tmp_path)
    assert (tmp_path / WEIGHTS_FILE).exists()
    write_gaze(tmp_path, POOLED, None)  # learned -> pooled: the tensor goes
    assert not (tmp_path / WEIGHTS_FILE).exists() and load_gaze(tmp_path)[0] == POOLED
    save_file({"context_tokens": torch.zeros(4, 32)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(GazeCheckpointError, match="pool the context tokens"):
        load_gaze(tmp_path)
    with pytest.raises(GazeCheckpointError, match="no learned tensor"):
        write_gaze(tmp_path, POOLED, torch.zeros(4, 32))
    with pytest.raises(GazeCheckpointError, match="n_context_tokens=4"):
        write_gaze(tmp_path, POOLED.replace(context_tokens="learned"), None)


def test_an_old_checkpoint_reads_with_the_defaults(tmp_path):
    config = GazeConfig(region_h=2, region_w=3, n_context_tokens=3, top_k=2, score_mode="per_head")
    save_gaze_checkpoint(GazeVLM(tiny_llava(), config), tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    for key in ("n_dense_layers", "context_tokens"):
        del data[CONFIG_KEY][key]
    path.write_text(json.dumps(data))
    got, tokens = load_gaze(tmp_path)
    assert got == config and got.n_dense_layers == 0 and got.context_tokens == "learned"
    assert tokens.shape == (3, 32)


def test_dense_to_gaze_pooled_writes_no_tensor_and_loads_no_model(tmp_path, monkeypatch):
    from gaze_edge import checkpoint

    src = tmp_path / "dense"
    tiny_qwen2_vl().save_pretrained(src)

    def no_load(*args, **kwargs):
        raise AssertionError("pooled context tokens need no model")

    monkeypatch.setattr(checkpoint, "load_model", no_load)
    dense_to_gaze(src, tmp_path / "gaze", POOLED)
    assert not (tmp_path / "gaze" / WEIGHTS_FILE).exists()
    assert load_gaze(tmp_path / "gaze")[0] == POOLED
    assert (tmp_path / "gaze" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


# --- make-gaze ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_llava(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("dense") / "llava"
    tiny_llava().save_pretrained(src)
    return src


def test_make_gaze_pooled_with_every_option(dense_llava, tmp_path):
    dst = tmp_path / "gaze"
    result = CliRunner().invoke(cli.main, ["make-gaze", str(dense_llava), str(dst), "--context-tokens", "pooled",
                                           "--n-context-tokens", "4", "--dense-layers", "2", "--score-mode",
                                           "gqa_max", "--region", "3x2", "--keep-ratio", "0.1"])
    assert result.exit_code == 0, result.output
    config, tokens = load_gaze(dst)
    assert config == GazeConfig(region_h=3, region_w=2, n_context_tokens=4, keep_ratio=0.1, score_mode="gqa_max",
                                n_dense_layers=2, context_tokens="pooled")
    assert tokens.shape == (0, 32) and not (dst / WEIGHTS_FILE).exists()


def test_make_gaze_without_flags_writes_the_training_free_defaults(dense_llava, tmp_path):
    dst = tmp_path / "gaze"
    result = CliRunner().invoke(cli.main, ["make-gaze", str(dense_llava), str(dst)])
    assert result.exit_code == 0, result.output
    config, tokens = load_gaze(dst)
    assert config == TRAINING_FREE and config.pooled and config.score_mode == "gqa_max"
    assert tokens.shape == (0, 32) and not (dst / WEIGHTS_FILE).exists()


def test_make_gaze_learned_keeps_the_mean_embedding_initialisation(dense_llava, tmp_path):
    for args, n in ((["--context-tokens", "learned", "--n-context-tokens", "2"], 2), (["--context-tokens", "3"], 3)):
        dst = tmp_path / f"gaze-{n}"
        result = CliRunner().invoke(cli.main, ["make-gaze", str(dense_llava), str(dst), *args])
        assert result.exit_code == 0, result.output
        config, tokens = load_gaze(dst)
        assert config == TRAINING_FREE.replace(context_tokens="learned", n_context_tokens=n)
        assert tokens.shape == (n, 32)
        vlm = load_gaze_vlm(dst)
        with torch.no_grad():
            features = torch.cat(vlm.image_features(**calibration_images(vlm.model)).features)
        assert 0 < float((tokens - features.mean(0)).abs().max()) < 0.06 * float(features.std())


@pytest.mark.parametrize("args", [
    ["--context-tokens", "mean"],
    ["--context-tokens", "65"],
    ["--context-tokens", "3", "--n-context-tokens", "2"],
    ["--score-mode", "gqa_min"],
    ["--dense-layers", "-1"],
])
def test_make_gaze_bad_options_exit_2(dense_llava, tmp_path, args):
    result = CliRunner().invoke(cli.main, ["make-gaze", str(dense_llava), str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x").exists()
