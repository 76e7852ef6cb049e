"""A tiny random Gemma 3 pair (language model + gaze mmproj), for tests of non-causal projectors.

Gemma 3 is the projector family whose image tokens attend to each other (mtmd_decode_use_non_causal),
which no family of gaze_edge.convert.tiny has. The pair is made the way a user would make one:
a random ``Gemma3ForConditionalGeneration`` (SigLIP tower, 2-layer Gemma 3 text model) saved by
transformers, converted by llama.cpp's own ``convert_hf_to_gguf.py`` (and ``--mmproj``) from the
pinned tree at f32, then given the gaze keys and ``v.gaze.ctx_tok`` with gguf-py (every other KV
and tensor copied unchanged); the converter's own mmproj is kept too (``mmproj_without_gaze``).

Built once per RECIPE into a cache folder (GAZE_EDGE_TEST_CACHE, or the system temp folder),
keyed by the recipe; a build goes to a temporary folder first and is renamed into place, so an
interrupted or concurrent build never leaves a half-written pair behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIXTURE_VERSION = 2  # bump when the way the pair is built changes

RECIPE = {
    "seed": 0,
    # SigLIP: 64 / 8 = 8 x 8 patches, average-pooled 2 x 2 by the projector -> a 4 x 4 grid
    "image_size": 64,
    "patch_size": 8,
    "mm_tokens_per_image": 16,
    "vision_hidden": 32,
    "vision_layers": 2,
    # Gemma 3 text model; the sliding window is longer than any test sequence
    "hidden": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "sliding_window": 512,
    "max_positions": 512,
    "vocab": 400,
    # gaze
    "region_size": [2, 2],  # h, w
    "n_ctx_tokens": 4,
    "ctx_tok_std": 1.0,  # the scale of Gemma 3's projected image rows (RMS-normed), so they matter
}

SPECIAL = ("<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>", "<image_soft_token>")
_CORPUS = (
    "Describe the image. top left: red circle. bottom right: blue square.",
    "What colour is the shape in the middle? It is a green triangle.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
)


@dataclass(frozen=True)
class Gemma3Pair:
    """The converted files and what the tests need to know about them."""

    folder: Path
    llm: Path
    mmproj: Path  # with the gaze keys and context tokens
    recipe: dict

    @property
    def mmproj_without_gaze(self) -> Path:
        """The converter's mmproj as written (no gaze keys, no context tokens)."""
        return self.folder / "mmproj-nogaze.gguf"

    @property
    def n_grid(self) -> int:
        return self.recipe["mm_tokens_per_image"]

    @property
    def grid_side(self) -> int:
        return round(self.n_grid ** 0.5)

    @property
    def n_ctx_tokens(self) -> int:
        return self.recipe["n_ctx_tokens"]

    @property
    def image_size(self) -> int:
        return self.recipe["image_size"]

    def context_tokens(self) -> np.ndarray:
        """The rows stored as v.gaze.ctx_tok, [n_ctx_tokens, n_embd_text]."""
        return np.load(self.folder / "ctx_tok.npy")


def recipe_key(recipe: dict) -> str:
    blob = json.dumps({"version": FIXTURE_VERSION, **recipe}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("GAZE_EDGE_TEST_CACHE") or Path(tempfile.gettempdir()) / "gaze-edge-test-cache")


def gemma3_pair(recipe: dict | None = None, root: Path | None = None) -> Gemma3Pair:
    """The pair for recipe (default RECIPE), built on first use and cached."""
    recipe = dict(RECIPE if recipe is None else recipe)
    root = Path(root) if root is not None else cache_root()
    folder = root / f"gemma3-tiny-{recipe_key(recipe)}"
    pair = Gemma3Pair(folder, folder / "model.gguf", folder / "mmproj.gguf", recipe)
    if (folder / "done.json").is_file():
        return pair
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{folder.name}.building-", dir=root))
    try:
        _build(work, recipe)
        try:
            os.rename(work, folder)
        except OSError:  # another process finished first: keep its pair
            if not (folder / "done.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return pair


def _build(out: Path, recipe: dict) -> None:
    ckpt = out / "hf"
    save_checkpoint(ckpt, recipe)
    plain = out / "mmproj-nogaze.gguf"
    convert(ckpt, out / "model.gguf", plain)
    rng = np.random.default_rng(recipe["seed"] + 7)
    ctx_tok = (recipe["ctx_tok_std"] * rng.standard_normal((recipe["n_ctx_tokens"], recipe["hidden"])))
    ctx_tok = ctx_tok.astype(np.float32)
    np.save(out / "ctx_tok.npy", ctx_tok)
    add_gaze(plain, out / "mmproj.gguf", recipe["region_size"], ctx_tok)
    shutil.rmtree(ckpt)
    (out / "done.json").write_text(json.dumps(recipe, indent=1))


def _tokenizer_model(vocab: int) -> bytes:
    """A small SentencePiece BPE model (byte fallback) with Gemma 3's image markers as symbols."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_CORPUS) * 8), model_writer=buf, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, user_defined_symbols=list(SPECIAL),
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, num_threads=1)
    return buf.getvalue()


def save_checkpoint(outdir: Path, recipe: dict) -> None:
    """A random Gemma3ForConditionalGeneration with tokenizer.model and preprocessor_config.json."""
    import sentencepiece as spm
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "tokenizer.model").write_bytes(_tokenizer_model(recipe["vocab"]))
    sp = spm.SentencePieceProcessor(model_file=str(outdir / "tokenizer.model"))
    ids = {s: sp.piece_to_id(s) for s in SPECIAL}
    # as Gemma 3's own tokenizer_config.json: the markers are special (CONTROL) tokens, one id each
    (outdir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in ids.items()}}, indent=1))
    text = Gemma3TextConfig(
        vocab_size=sp.get_piece_size(), hidden_size=recipe["hidden"], intermediate_size=2 * recipe["hidden"],
        num_hidden_layers=recipe["n_layers"], num_attention_heads=recipe["n_heads"],
        num_key_value_heads=recipe["n_kv_heads"], head_dim=recipe["head_dim"],
        query_pre_attn_scalar=recipe["head_dim"], sliding_window=recipe["sliding_window"],
        max_position_embeddings=recipe["max_positions"], layer_types=["sliding_attention"] * recipe["n_layers"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = SiglipVisionConfig(
        hidden_size=recipe["vision_hidden"], intermediate_size=2 * recipe["vision_hidden"],
        num_hidden_layers=recipe["vision_layers"], num_attention_heads=2, image_size=recipe["image_size"],
        patch_size=recipe["patch_size"], vision_use_head=False)
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=recipe["mm_tokens_per_image"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = Gemma3ForConditionalGeneration(config).eval()
        g = torch.Generator().manual_seed(recipe["seed"] + 1)
        with torch.no_grad():  # move norms and biases off their init values
            for _, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(outdir)
    _hub_tensor_names(outdir / "model.safetensors")
    size = recipe["image_size"]
    (outdir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "do_resize": True, "do_normalize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "size": {"height": size, "width": size}, "image_seq_length": recipe["mm_tokens_per_image"],
        "resample": 2}, indent=1))


def _hub_tensor_names(path: Path) -> None:
    """Rename the SigLIP tower's tensors to the layout of the Hub's Gemma 3 checkpoints.

    transformers 5 saves them as ``vision_tower.embeddings.*``; google/gemma-3-* (and the pinned
    converter's tensor map) have ``vision_tower.vision_model.embeddings.*``, and the converter stops
    with "Can not map tensor 'vision_tower.embeddings.patch_embedding.bias'" otherwise.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    renamed = {(f"vision_tower.vision_model.{k[len('vision_tower.'):]}"
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def convert(ckpt: Path, llm: Path, mmproj: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py from the pinned tree, text model and --mmproj, at f32 (in parallel)."""
    from gaze_edge.convert.llama_cpp import llama_cpp_dir

    tree = llama_cpp_dir()
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"), PYTHONNOUSERSITE="1")
    env.pop("NO_LOCAL_GGUF", None)
    script = str(tree / "convert_hf_to_gguf.py")
    runs = [[sys.executable, script, str(ckpt), "--outfile", str(llm), "--outtype", "f32"],
            [sys.executable, script, str(ckpt), "--mmproj", "--outfile", str(mmproj), "--outtype", "f32"]]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in runs]
    for cmd, proc in zip(runs, procs, strict=True):
        log, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{log[-3000:]}")


def add_gaze(src: Path, dst: Path, region_size: list[int], ctx_tok: np.ndarray) -> None:
    """Copy the mmproj GGUF src to dst with the gaze keys and v.gaze.ctx_tok (F32 [n_embd, n]) added."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_key_value("clip.vision.gaze.region_size", [int(v) for v in region_size],
                         gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    writer.add_key_value("clip.vision.gaze.n_ctx_tokens", int(ctx_tok.shape[0]), gguf.GGUFValueType.UINT32)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.add_tensor("v.gaze.ctx_tok", np.ascontiguousarray(ctx_tok, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)


if __name__ == "__main__":  # build (or find) the pair and print where it is
    p = gemma3_pair()
    print(p.llm, p.mmproj, sep="\n")
