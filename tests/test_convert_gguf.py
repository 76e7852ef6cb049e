"""What the converter writes, read back from the files with the gguf library (no runtime needed).

Checks names and values against the checkpoint itself and the gaze names against
gaze_edge.gguf_names (the module the C++ side must match); numerical parity with transformers
through llama.cpp is in test_convert_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gaze_edge import gguf_names
from gaze_edge.config import GazeConfig
from gaze_edge.convert import convert
from gaze_edge.convert.tiny import tiny_checkpoint

torch.set_num_threads(1)
GAZE = GazeConfig(region_h=2, region_w=3, n_context_tokens=4, top_k=5, keep_ratio=0.3, score_mode="per_head")


def read(path: Path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: ReaderTensor})"""
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (checkpoint folder, llm path, mmproj path), converted once per module."""
    root = tmp_path_factory.mktemp("convert-gguf")
    cases = {
        "llava-dense-f32": ("llava", "llama", None, "f32"),
        "llava-qwen2-gaze-f16": ("llava", "qwen2", GAZE, "f16"),
        "qwen2vl-gaze-f32": ("qwen2vl", "llama", GAZE, "f32"),
    }
    out = {}
    for key, (family, text, gaze, outtype) in cases.items():
        ckpt = tiny_checkpoint(family, root / key, text=text, gaze=gaze)
        out[key] = (ckpt, *convert(ckpt, root / f"{key}-out", outtype=outtype, progress=False))
    return out


def test_file_names_follow_llama_cpp(converted):
    ckpt, llm, mmproj = converted["llava-dense-f32"]
    assert llm.name == "llava-dense-f32-f32.gguf" and mmproj.name == "mmproj-llava-dense-f32-f32.gguf"
    assert sorted(p.name for p in llm.parent.iterdir()) == sorted([llm.name, mmproj.name])


def test_dense_checkpoint_has_no_gaze_keys(converted):
    _, llm, mmproj = converted["llava-dense-f32"]
    for path in (llm, mmproj):
        kv, tensors = read(path)
        assert not [k for k in kv if ".gaze." in k]
        assert gguf_names.TENSOR_CONTEXT_TOKENS not in tensors


def test_language_model_uses_the_gpt2_pre_tokenizer(converted):
    kv, _ = read(converted["llava-dense-f32"][1])
    assert kv["general.architecture"] == "llama"
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"


def test_clip_mmproj_keys(converted):
    ckpt, _, mmproj = converted["llava-dense-f32"]
    cfg = json.loads((ckpt / "config.json").read_text())
    proc = json.loads((ckpt / "processor_config.json").read_text())["image_processor"]
    kv, _ = read(mmproj)
    v = cfg["vision_config"]
    assert kv["general.architecture"] == "clip" and kv["clip.projector_type"] == "mlp"
    assert kv["clip.vision.image_size"] == v["image_size"] and kv["clip.vision.patch_size"] == v["patch_size"]
    # vision_feature_layer -2 of 3 layers: hidden state 2, so only 2 blocks are needed
    assert kv["clip.vision.feature_layer"] == [2] and kv["clip.vision.block_count"] == 2
    assert np.allclose(kv["clip.vision.image_mean"], proc["image_mean"])
    assert np.allclose(kv["clip.vision.image_std"], proc["image_std"])
    assert kv["clip.vision.projection_dim"] == cfg["text_config"]["hidden_size"]
    assert "clip.use_gelu" not in kv  # quick_gelu: mtmd's default for CLIP


def test_clip_mmproj_tensors_are_the_checkpoint_values(converted):
    ckpt, _, mmproj = converted["llava-dense-f32"]
    weights = load_file(ckpt / "model.safetensors")
    _, tensors = read(mmproj)
    pairs = {
        "v.class_embd": "vision_tower.embeddings.class_embedding",
        "v.patch_embd.weight": "vision_tower.embeddings.patch_embedding.weight",
        "v.position_embd.weight": "vision_tower.embeddings.position_embedding.weight",
        "v.pre_ln.bias": "vision_tower.pre_layrnorm.bias",
        "v.blk.1.attn_q.weight": "vision_tower.encoder.layers.1.self_attn.q_proj.weight",
        "v.blk.1.attn_out.bias": "vision_tower.encoder.layers.1.self_attn.out_proj.bias",
        "v.blk.0.ffn_up.weight": "vision_tower.encoder.layers.0.mlp.fc1.weight",
        "v.blk.0.ffn_down.weight": "vision_tower.encoder.layers.0.mlp.fc2.weight",
        "v.blk.0.ln2.weight": "vision_tower.encoder.layers.0.layer_norm2.weight",
        "mm.0.weight": "multi_modal_projector.linear_1.weight",
        "mm.2.bias": "multi_modal_projector.linear_2.bias",
    }
    for ours, theirs in pairs.items():
        assert np.array_equal(tensors[ours].data.reshape(weights[theirs].shape), weights[theirs]), ours
    # layer 2 is past the feature layer, post_layernorm is not applied by LLaVA
    assert not [n for n in tensors if n.startswith("v.blk.2.") or n.startswith("v.post_ln")]


def test_gaze_keys_in_the_language_model(converted):
    kv, _ = read(converted["llava-qwen2-gaze-f16"][1])
    arch = kv["general.architecture"]
    assert arch == "qwen2"  # LLaVA's Qwen2 decoder keeps its own architecture (q/k/v biases)
    assert kv[gguf_names.llm_key(gguf_names.LLM_TOP_K, arch)] == GAZE.top_k
    assert kv[gguf_names.llm_key(gguf_names.LLM_KEEP_RATIO, arch)] == pytest.approx(GAZE.keep_ratio)
    assert kv[gguf_names.llm_key(gguf_names.LLM_SCORE_MODE, arch)] == gguf_names.SCORE_MODE_IDS["per_head"]


@pytest.mark.parametrize("case", ["llava-qwen2-gaze-f16", "qwen2vl-gaze-f32"])
def test_gaze_region_size_and_context_tokens_in_the_mmproj(converted, case):
    ckpt, llm, mmproj = converted[case]
    kv, tensors = read(mmproj)
    r = gguf.GGUFReader(mmproj)
    assert kv[gguf_names.MMPROJ_REGION_SIZE] == [GAZE.region_h, GAZE.region_w]
    assert r.fields[gguf_names.MMPROJ_REGION_SIZE].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert kv[gguf_names.MMPROJ_N_CONTEXT_TOKENS] == GAZE.n_context_tokens
    ctx = tensors[gguf_names.TENSOR_CONTEXT_TOKENS]
    want = load_file(ckpt / "gaze.safetensors")["context_tokens"]
    n_embd = json.loads((ckpt / "config.json").read_text())["text_config"]["hidden_size"]
    assert ctx.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(ctx.shape) == [n_embd, GAZE.n_context_tokens]  # ggml ne order
    assert np.array_equal(ctx.data.reshape(want.shape), want)
    llm_kv, _ = read(llm)
    assert llm_kv[gguf_names.llm_key(gguf_names.LLM_TOP_K, llm_kv["general.architecture"])] == GAZE.top_k


def test_f16_keeps_1d_tensors_and_positions_in_f32(converted):
    _, llm, mmproj = converted["llava-qwen2-gaze-f16"]
    _, tensors = read(mmproj)
    f16, f32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert tensors["v.blk.0.attn_q.weight"].tensor_type == f16
    assert tensors["mm.0.weight"].tensor_type == f16
    assert tensors["v.patch_embd.weight"].tensor_type == f16
    assert tensors["v.position_embd.weight"].tensor_type == f32
    assert tensors["v.blk.0.ln1.weight"].tensor_type == f32
    assert tensors["v.class_embd"].tensor_type == f32
    kv, tensors = read(llm)
    assert tensors["blk.0.attn_q.weight"].tensor_type == f16
    assert tensors["blk.0.attn_q.bias"].tensor_type == f32
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_qwen2vl_uses_llama_cpp_routes(converted):
    _, llm, mmproj = converted["qwen2vl-gaze-f32"]
    kv, _ = read(llm)
    assert kv["general.architecture"] == "qwen2vl"
    assert kv["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    kv, tensors = read(mmproj)
    assert kv["clip.projector_type"] == "qwen2vl_merger"
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.2.weight"} <= set(tensors)


def test_shipped_default_model_is_the_conversion_of_its_checkpoint(tmp_path):
    """gaze_edge/models/default/ is exactly what `gaze-edge convert` makes of default-hf (f32)."""
    from gaze_edge.convert import convert
    from gaze_edge.default_model import DEFAULT_DIR

    llm, mmproj = convert(DEFAULT_DIR.parent / "default-hf", tmp_path, outtype="f32", name="gaze-scenes",
                          progress=False)
    for made in (llm, mmproj):
        assert made.read_bytes() == (DEFAULT_DIR / made.name).read_bytes(), made.name


def test_shipped_video_model_is_the_conversion_of_its_checkpoint(tmp_path):
    """gaze_edge/models/video/ is exactly what `gaze-edge convert` makes of video-hf (f32), and
    states the 2048 positions it was trained with (a clip of 8 frames is ~1760 tokens)."""
    from gaze_edge.convert import convert
    from gaze_edge.default_model import VIDEO_DIR, VIDEO_HF_DIR

    llm, mmproj = convert(VIDEO_HF_DIR, tmp_path, outtype="f32", name="gaze-scenes-video", progress=False)
    for made in (llm, mmproj):
        assert made.read_bytes() == (VIDEO_DIR / made.name).read_bytes(), made.name
    from gguf import GGUFReader

    field = GGUFReader(llm).fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == 2048
