"""The gaze checkpoint format (docs/FORMAT.md): save/load round trips and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

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
from gaze_edge.config import GazeConfig
from gaze_edge.reference import GazeVLM
from gaze_edge.reference.tiny_models import tiny_llava, tiny_qwen2_vl

torch.set_num_threads(1)
CONFIG = GazeConfig(region_h=2, region_w=3, n_context_tokens=3, top_k=2, keep_ratio=0.5, score_mode="per_head")


def _model(family):
    return tiny_llava() if family == "llava" else tiny_qwen2_vl()


def _prompt(vlm, images):
    n = sum(h * w for h, w in vlm.image_features(**images).grids)
    return torch.tensor([[1, 5] + [vlm.model.config.image_token_id] * n + [6, 7, 10, 11, 12]])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_save_load_round_trip(tmp_path, family):
    vlm = GazeVLM(_model(family), CONFIG, torch.randn(3, 32))
    save_gaze_checkpoint(vlm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[CONFIG_KEY] == CONFIG.to_dict()
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    assert list(stored) == ["context_tokens"] and stored["context_tokens"].dtype == torch.float32
    gaze_config, context_tokens = load_gaze(tmp_path)
    assert gaze_config == CONFIG and torch.equal(context_tokens, vlm.context_tokens.detach())

    loaded = load_gaze_vlm(tmp_path)
    images = calibration_images(vlm.model, n_images=1)
    ids = _prompt(vlm, images)
    with torch.no_grad():
        a = vlm(ids, **images, gaze_start=ids.shape[1] - 3).logits
        b = loaded(ids, **images, gaze_start=ids.shape[1] - 3).logits
    assert torch.equal(a, b)


def test_the_folder_loads_unchanged_with_transformers(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = tiny_llava()
    vlm = GazeVLM(model, CONFIG)
    save_gaze_checkpoint(vlm, tmp_path)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5] + [99] * 36 + [6]])
    pixels = calibration_images(model, n_images=1)["pixel_values"]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, pixel_values=pixels).logits,
                           model(input_ids=ids, pixel_values=pixels).logits)


def test_no_context_tokens_round_trip(tmp_path):
    config = CONFIG.replace(n_context_tokens=0)
    save_gaze_checkpoint(GazeVLM(tiny_llava(), config), tmp_path)
    gaze_config, context_tokens = load_gaze(tmp_path)
    assert gaze_config == config and context_tokens.shape == (0, 32)


def test_clear_errors(tmp_path):
    with pytest.raises(GazeCheckpointError, match="config.json not found"):
        load_gaze(tmp_path)
    save_gaze_checkpoint(GazeVLM(tiny_llava(), CONFIG), tmp_path)
    config_path, weights = tmp_path / "config.json", tmp_path / WEIGHTS_FILE
    good_config, good_weights = config_path.read_text(), load_file(str(weights))

    save_file({"context_tokens": torch.zeros(3, 48)}, str(weights))
    with pytest.raises(GazeCheckpointError, match=r"\[3, 48\].*hidden_size=32"):
        load_gaze(tmp_path)
    save_file({"context_tokens": torch.zeros(4, 32)}, str(weights))
    with pytest.raises(GazeCheckpointError, match="n_context_tokens=3"):
        load_gaze(tmp_path)
    save_file({"ctx": torch.zeros(3, 32)}, str(weights))
    with pytest.raises(GazeCheckpointError, match="no 'context_tokens' tensor"):
        load_gaze(tmp_path)
    weights.unlink()
    with pytest.raises(GazeCheckpointError, match="gaze.safetensors not found"):
        load_gaze(tmp_path)
    save_file(good_weights, str(weights))

    config = json.loads(good_config)
    config[CONFIG_KEY]["score_mode"] = "best"
    config_path.write_text(json.dumps(config))
    with pytest.raises(GazeCheckpointError, match="invalid gaze settings"):
        load_gaze(tmp_path)
    del config[CONFIG_KEY]
    config_path.write_text(json.dumps(config))
    with pytest.raises(GazeCheckpointError, match="dense checkpoint"):
        load_gaze(tmp_path)
    with pytest.raises(GazeCheckpointError, match="hidden_size=32"):
        write_gaze(tmp_path, CONFIG, torch.zeros(3, 31))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_dense_to_gaze(tmp_path, family):
    model = _model(family)
    src, dst = tmp_path / "dense", tmp_path / "gaze"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}\n")  # any other file is copied as is
    dense_to_gaze(src, dst, CONFIG)
    assert (dst / "tokenizer_config.json").read_text() == "{}\n"
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    vlm = load_gaze_vlm(dst)
    assert vlm.gaze_config == CONFIG
    # context tokens: the mean projected image embedding of the calibration images, plus 1% noise
    images = calibration_images(model)
    with torch.no_grad():
        features = torch.cat(vlm.image_features(**images).features)
    spread = float(features.std())
    deviation = (vlm.context_tokens - features.mean(0)).abs().max()
    assert 0 < deviation < 0.06 * spread
    with pytest.raises(GazeCheckpointError, match="already a gaze checkpoint"):
        dense_to_gaze(dst, tmp_path / "again", CONFIG)
    with pytest.raises(GazeCheckpointError, match="not empty"):
        dense_to_gaze(src, dst, CONFIG)


def test_unsupported_family_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not supported"):
        dense_to_gaze(tmp_path, tmp_path / "out", CONFIG)
