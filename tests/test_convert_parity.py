"""Converted models against HF transformers, run through the patched runtime (gaze off, dense).

For every family, converted at f32: mtmd's image embeddings vs ``get_image_features``, the
first-answer-token logits, and 8 teacher-forced decode steps (gaze_edge.convert.verify). Inputs
are at the native size, where mtmd's and transformers' preprocessing agree (docs/CONVERT.md).
Tolerances, from measurements on these tiny random models (docs/CONVERT.md lists the numbers):
- f32: image cosine >= 0.9999 (plain, and centered on HF's mean token), first-token logits
  cosine >= 0.9999 with the same argmax; decode steps max |diff| <= 1e-3 * the largest |logit|
  with every argmax equal. Measured: LLaVA ~1e-5 of the logit scale; Qwen-VL the same since
  patches/0009 loads the RMSNorm eps of qwen2vl (before it: ~5e-4, test_qwen_vl_decode_as_tight_as_llava).
- f16 / q8_0 / q4_k_m: deviation measured and bounded loosely (they are lossy by design).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gaze_edge.convert import convert
from gaze_edge.convert.tiny import LLAVA_IMAGE_SIZE, QWEN25_IMAGE_SIZE, QWEN_IMAGE_SIZE, tiny_checkpoint

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)

LLAVA_PROMPT = "USER: <__media__>\nDescribe the image.\nASSISTANT:"
QWEN_PROMPT = "<|im_start|>user\n<__media__>Describe the image.<|im_end|>\n<|im_start|>assistant\n"

# case -> (family, LLaVA text model, image height, image width, prompt)
CASES = {
    "llava-llama": ("llava", "llama", LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, LLAVA_PROMPT),
    "llava-qwen2": ("llava", "qwen2", LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, LLAVA_PROMPT),
    # vision_feature_layer -1, as gaze-edge's own model (every CLIP block, no post_layernorm)
    "llava-llama-last-layer": ("llava", "llama", LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, LLAVA_PROMPT),
    "qwen2vl": ("qwen2vl", "llama", QWEN_IMAGE_SIZE, QWEN_IMAGE_SIZE, QWEN_PROMPT),
    "qwen2vl-nonsquare": ("qwen2vl", "llama", QWEN_IMAGE_SIZE, QWEN_IMAGE_SIZE + 56, QWEN_PROMPT),
    "qwen2.5vl": ("qwen2.5vl", "llama", QWEN25_IMAGE_SIZE, QWEN25_IMAGE_SIZE, QWEN_PROMPT),
}


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8 [h, w, 3])."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(h // 7 + 1, w // 7 + 1, 3))
    return np.kron(coarse, np.ones((7, 7, 1)))[:h, :w].astype(np.uint8)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert-parity")


def checkpoint(root: Path, family: str, text: str, width: int = 64, feature_layer: int = -2) -> Path:
    folder = root / f"ckpt-{family}-{text}-{width}-{feature_layer}"
    if not folder.exists():
        tiny_checkpoint(family, folder, text=text, width=width, vision_feature_layer=feature_layer)
    return folder


_CONVERTED: dict = {}
_RESULTS: dict = {}


def converted(root: Path, case: str, outtype: str = "f32", width: int = 64) -> tuple[Path, Path, Path]:
    """(checkpoint, llm, mmproj) of CASES[case] at outtype, converted once per module run."""
    key = (root, case, outtype, width)
    if key not in _CONVERTED:
        family, text, *_ = CASES[case]
        ckpt = checkpoint(root, family, text, width, -1 if case.endswith("last-layer") else -2)
        out = root / f"out-{case}-{outtype}-{width}"
        _CONVERTED[key] = (ckpt, *convert(ckpt, out, outtype=outtype, progress=False))
    return _CONVERTED[key]


def parity(root: Path, case: str, outtype: str = "f32", width: int = 64):
    """Compare the conversion of CASES[case] at outtype with transformers (cached per module run)."""
    from gaze_edge.convert.verify import compare

    key = (root, case, outtype, width)
    if key not in _RESULTS:
        *_, h, w, prompt = CASES[case]
        ckpt, llm, mmproj = converted(root, case, outtype, width)
        _RESULTS[key] = compare(ckpt, llm, mmproj, image(h, w), prompt, n_decode=8)
        print(f"\n{case} {outtype} width={width}: {json.dumps(_RESULTS[key].to_dict())}")
    return _RESULTS[key]


@pytest.mark.parametrize("case", list(CASES))
def test_f32_matches_transformers(root, case):
    r = parity(root, case)
    assert r.n_image_tokens == {"llava": 16, "qwen2vl": 16, "qwen2.5vl": 64}[CASES[case][0]] * (
        1.5 if case.endswith("nonsquare") else 1)
    assert r.image_cosine >= 0.9999 and r.image_centered_cosine >= 0.9999, r
    assert r.first_cosine >= 0.9999 and r.first_argmax_same, r
    assert r.decode_max_abs <= 1e-3 * r.logit_scale and r.decode_argmax_same, r


@pytest.mark.parametrize("case", ["qwen2vl", "qwen2.5vl"])
def test_qwen_vl_decode_as_tight_as_llava(root, case):
    """LLaVA's decoders (llama, qwen2) match at ~1e-5 of the logit scale; Qwen-VL too.

    Before patches/0009 the pinned llama.cpp ran Qwen2-VL's RMSNorm with eps = 0 (its
    load_arch_hparams never read the key) and this failed at 2-3e-4 of the logit scale."""
    r = parity(root, case)
    assert r.decode_max_abs <= 1e-4 * r.logit_scale, r


@pytest.mark.parametrize("outtype, min_cosine", [("f16", 0.999), ("q8_0", 0.99), ("q4_k_m", 0.9)])
def test_lossy_outtypes_stay_close(root, outtype, min_cosine):
    """Width 256 so every language-model matrix takes q8_0 / q4_K blocks (no fallback types)."""
    r = parity(root, "llava-llama", outtype, width=256)
    assert r.image_cosine >= min_cosine and r.first_cosine >= min_cosine, r
    assert r.decode_min_cosine >= min_cosine, r


def test_quantized_qwen2vl_projector(root):
    """The Qwen route's projector goes through llama_model_quantize too (mmproj q8_0)."""
    r = parity(root, "qwen2vl", "q8_0", width=256)
    assert r.image_cosine >= 0.99 and r.first_cosine >= 0.99, r


def test_quantized_files_have_the_requested_types(root):
    import gguf

    _, llm, mmproj = converted(root, "llava-llama", "q4_k_m", width=256)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(llm).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    mm = {t.name: t.tensor_type for t in gguf.GGUFReader(mmproj).tensors}
    assert mm["mm.0.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert mm["v.position_embd.weight"] == gguf.GGMLQuantizationType.F32  # llama.cpp keeps positions


def test_patch_0001_cls_order(root):
    """Patch 0001 (CLS first in mtmd's LLaVA graph) is what makes CLIP image embeddings right.

    The patched runtime must match HF at cosine >= 0.9999. The stock graph puts CLS after the
    patches, so patch i takes position embedding i instead of i + 1, patch 0 is dropped and the
    CLS output is sent as the last image token: ``clip_embeddings(order="stock")`` computes that in
    PyTorch with the model's own modules (checked to reproduce HF exactly in the fixed order) and
    lands far from HF (FACTS.md measured 0.72 on the stock wheel with 256 tokens; on this 16-token
    model about 0.98 plain and 0.00 centered), so the parity bar is only reachable with the fix.
    """
    from transformers import AutoModelForImageTextToText

    from gaze_edge.convert.verify import cosine

    r = parity(root, "llava-llama")
    assert r.image_cosine >= 0.9999 and r.image_centered_cosine >= 0.9999

    ckpt = checkpoint(root, "llava", "llama")
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    pixels = torch.randn(1, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        fixed = clip_embeddings(model, pixels, order="fixed")
        stock = clip_embeddings(model, pixels, order="stock")
    assert cosine(fixed, hf) > 0.999999  # the emulation is faithful
    mean = hf.mean(0)
    stock_plain, stock_centered = cosine(stock, hf), cosine(stock - mean, hf - mean)
    print(f"\nstock CLS order vs HF: cosine {stock_plain:.4f}, centered {stock_centered:.4f}")
    assert stock_plain < 0.999 and stock_centered < 0.5


def clip_embeddings(model, pixels: torch.Tensor, order: str) -> torch.Tensor:
    """LLaVA image features computed the way mtmd's graph does, CLS "fixed" (first) or "stock" (last)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    emb = vm.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)[0]  # [n, d]
    cls = emb.class_embedding[None]
    x = torch.cat([cls, patches]) if order == "fixed" else torch.cat([patches, cls])
    x = (x + emb.position_embedding.weight[: x.shape[0]])[None]  # row i gets position i
    x = vm.pre_layrnorm(x)
    layer = model.config.vision_feature_layer
    n_run = layer if layer >= 0 else len(vm.encoder.layers) + layer + 1
    for blk in vm.encoder.layers[:n_run]:
        x = blk(x, attention_mask=None)
        x = x[0] if isinstance(x, tuple) else x
    return model.model.multi_modal_projector(x[0, 1:])  # rows 1..n are the image tokens


def test_loads_in_llama_mtmd_cli(root):
    """llama.cpp's own client (built from the same patched tree) loads and runs converted pairs:
    LLaVA (our CLIP mmproj), Qwen2-VL (llama.cpp's mmproj) and a q8_0 pair (quantized mmproj)."""
    from gaze_edge.runtime import build

    cli = build.BuildSpec.from_env().entry() / "build-tests" / "bin" / "llama-mtmd-cli"  # build_tests()
    if not cli.exists():
        pytest.skip("llama-mtmd-cli is not built: run `make test-binaries`")
    from PIL import Image

    for case, outtype in (("llava-llama", "f32"), ("qwen2vl", "f32"), ("llava-llama", "q8_0")):
        *_, h, w, _ = CASES[case]
        _, llm, mmproj = converted(root, case, outtype, width=256 if outtype == "q8_0" else 64)
        png = root / f"{case}.png"
        Image.fromarray(image(h, w)).save(png)
        # llama.cpp's logger, which also prints the generated text, is asynchronous and its singleton is
        # leaked on purpose (upstream issue 22142); patch 0015 flushes it at exit. Without it, runs lost
        # their last lines with exit code 0 (on this VM: 3 of 8 kept them, and once 0 of 20 tries).
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.run(
                [str(cli), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(png), "-p",
                 "Describe the image.", "-n", "4", "--temp", "0", "-t", "2", "--no-warmup", "--chat-template",
                 "chatml", "--no-repack"],  # no AMX repacking: AMX kernels SIGILL on VMs without AMX (docs/CONVERT.md)
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=120,
                env=dict(os.environ, LLAMA_LOG_COLORS="0"))  # a random model prints raw bytes
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            log = stdout + err.read().decode(errors="replace")
        assert proc.returncode == 0, log[-3000:]
        # mtmd encoded the image, then the model generated
        assert "batch encoding done" in log and stdout.strip(), log[-3000:]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_gaze_pair_loads_in_the_runtime(root, family):
    """A gaze conversion loads (extra keys and v.gaze.ctx_tok do not upset llama.cpp or mtmd) and
    its image chunk is the grid, then (once the runtime appends them) the context tokens as stored."""
    from gaze_edge.config import GazeConfig
    from gaze_edge.convert.verify import IMAGE, Runtime, quiet

    gaze = GazeConfig(region_h=2, region_w=2, n_context_tokens=3, top_k=2)
    ckpt = tiny_checkpoint(family, root / f"gaze-{family}", gaze=gaze)
    llm, mmproj = convert(ckpt, root / f"gaze-{family}-out", outtype="f32", progress=False)
    from safetensors.numpy import load_file

    context_tokens = load_file(ckpt / "gaze.safetensors")["context_tokens"]
    size = LLAVA_IMAGE_SIZE if family == "llava" else QWEN_IMAGE_SIZE
    prompt = LLAVA_PROMPT if family == "llava" else QWEN_PROMPT
    with quiet(), Runtime(llm, mmproj) as rt:
        chunks = rt.tokenize(prompt, image(size, size))
        try:
            (chunk,) = [item for kind, item in rt.chunk_list(chunks) if kind == IMAGE]
            rows = rt.image_embeddings(chunk)
        finally:
            rt.mt.mtmd_input_chunks_free(chunks)
    n_grid = 16
    assert rows.shape[0] in (n_grid, n_grid + gaze.n_context_tokens)
    if rows.shape[0] > n_grid:
        np.testing.assert_allclose(rows[n_grid:], context_tokens, rtol=0, atol=1e-6)
