"""Tiny random checkpoints of every family the converter supports, built in seconds.

They are real transformers 5 checkpoints (config.json, model.safetensors, tokenizer, processor),
saved the way ``save_pretrained`` saves them, so tests and examples can convert one without a
download. Weights are random: the models are for checking a conversion against transformers,
not for generating anything sensible.

The tokenizer is a byte-level BPE with GPT-2's pre-tokenizer (like the project's own model), so
its pre-tokenizer hash is unknown to llama.cpp and the converter's ``gpt-2`` mapping is exercised.
"""

from __future__ import annotations

from pathlib import Path

from gaze_edge.config import GazeConfig

FAMILIES = ("llava", "qwen2vl", "qwen2.5vl")

# Special tokens, ids 0.. in this order; the image token is the one the processor expands.
LLAVA_SPECIAL = ("<s>", "</s>", "<pad>", "<image>")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")

_CORPUS = (
    "USER: Describe the image.\nASSISTANT: top left: red circle. bottom right: blue square.",
    "What colour is the shape in the middle? It is a green triangle.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
)

# Native input sizes (no resize in either mtmd or transformers): see docs/CONVERT.md.
LLAVA_IMAGE_SIZE = 56  # CLIP 56/14: a 4 x 4 grid
QWEN_IMAGE_SIZE = 112  # 8 x 8 patches of 14, merged 2 x 2: a 4 x 4 grid
QWEN25_IMAGE_SIZE = 224  # 16 x 16 patches: an 8 x 8 grid in 2 x 2 attention windows


def _tokenizer(special: tuple[str, ...], vocab_size: int = 320, **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **named)


def _seeded(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    # Random init leaves norms at 1 and biases at 0; perturb them so a dropped or misplaced
    # norm/bias shows up in parity checks instead of hiding behind identity values.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "class_embedding" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _llava(outdir: Path, text: str, seed: int, image_size: int, vision_feature_layer: int, width: int):
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    tok = _tokenizer(LLAVA_SPECIAL, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                     extra_special_tokens={"image_token": "<image>"})
    patch = 14
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, image_size=image_size, patch_size=patch,
                              projection_dim=64)
    text_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text]
    text_cfg = text_cls(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n_grid = (image_size // patch) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text_cfg,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
                         image_seq_length=n_grid, tie_word_embeddings=False)
    model = _seeded(seed, lambda: LlavaForConditionalGeneration(config))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    return model, processor


def _qwen_vl(outdir: Path, version: str, seed: int, width: int):
    from transformers import Qwen2VLImageProcessorPil

    tok = _tokenizer(QWEN_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    half = width // 8  # head_dim / 2 rotary pairs, split over (t, h, w) like Qwen2-VL's [16, 24, 24]
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "qwen2vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        # depth >= 3: llama.cpp maps visual.merger.mlp.{0,2} through its per-block table
        vision = dict(depth=3, embed_dim=32, hidden_size=width, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
        model = _seeded(seed, lambda: Qwen2VLForConditionalGeneration(config))
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        # windows of 112 px (what mtmd hard-codes): a QWEN25_IMAGE_SIZE image spans 2 x 2 windows
        vision = dict(depth=4, hidden_size=32, out_hidden_size=width, intermediate_size=64, num_heads=4,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      window_size=112, fullatt_block_indexes=[1, 3], hidden_act="silu")
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                  **token_ids)
        model = _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))
    # Qwen2VLProcessor would also need a video processor (torchvision): save the parts, as older
    # checkpoints do (preprocessor_config.json + tokenizer files).
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1024, patch_size=14, merge_size=2, temporal_patch_size=2)
    return model, (image_processor, tok)


def tiny_checkpoint(family: str, outdir: str | Path, *, text: str = "llama", seed: int = 0,
                    gaze: GazeConfig | None = None, image_size: int = LLAVA_IMAGE_SIZE,
                    vision_feature_layer: int = -2, width: int = 64) -> Path:
    """Save a tiny random checkpoint of ``family`` (one of FAMILIES) into ``outdir``.

    text: the LLaVA language model, "llama" or "qwen2" (ignored for the Qwen VL families).
    width: the language model's hidden size (4 heads, 2 KV heads, FFN 2 x width); a multiple of
      256 lets every matrix take q4_K blocks when quantized.
    image_size, vision_feature_layer: LLaVA's CLIP input size and feature layer.
    gaze: when given, make it a gaze checkpoint: config.json gets a ``gaze`` object and
      gaze.safetensors holds ``context_tokens`` [n_context_tokens, n_embd_text] (random; no file
      for pooled context tokens).
    Returns outdir.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if family == "llava":
        model, processor = _llava(outdir, text, seed, image_size, vision_feature_layer, width)
    elif family in ("qwen2vl", "qwen2.5vl"):
        model, processor = _qwen_vl(outdir, family, seed, width)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    model.save_pretrained(outdir)
    for part in processor if isinstance(processor, tuple) else (processor,):
        part.save_pretrained(outdir)
    if gaze is not None:
        write_gaze(outdir, gaze, n_embd=model.config.text_config.hidden_size, seed=seed)
    return outdir


def write_gaze(outdir: str | Path, gaze: GazeConfig, n_embd: int, seed: int = 0) -> None:
    """Turn the checkpoint in outdir into a gaze checkpoint with random context tokens [C, n_embd]
    (none for pooled context tokens)."""
    import torch

    from gaze_edge.checkpoint import write_gaze as write

    if gaze.pooled:
        write(outdir, gaze, None)
        return
    g = torch.Generator().manual_seed(seed + 2)
    write(outdir, gaze, 0.02 * torch.randn(gaze.n_context_tokens, n_embd, generator=g))
