"""Tiny random models of the supported families, for tests (ours and other components').

Built from configs in a fraction of a second, no network. Every builder seeds torch, so a given
argument set always gives the same weights.
"""

from __future__ import annotations

import torch

LLAVA_IMAGE_TOKEN = 99
QWEN2_VL_TOKENS = {"image": 110, "video": 111, "vision_start": 112, "vision_end": 113}


def tiny_llava(
    *,
    text: str = "llama",
    image_size: int = 84,
    patch_size: int = 14,
    hidden: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int = 100,
    attn_implementation: str = "eager",
    seed: int = 0,
):
    """LlavaForConditionalGeneration: CLIP tower (2 layers) -> MLP projector -> Llama or Qwen2 text.

    The image is a ``(image_size // patch_size)``-square grid; image token id 99 (= vocab - 1).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size,
    )
    text_kwargs = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    text_config = LlamaConfig(**text_kwargs) if text == "llama" else Qwen2Config(**text_kwargs)
    config = LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_id=vocab - 1,
        projector_hidden_act="gelu", vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation).eval()


def tiny_qwen2_vl(
    *,
    version: str = "2",
    hidden: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int = 120,
    attn_implementation: str = "eager",
    seed: int = 0,
):
    """Qwen2VLForConditionalGeneration (version "2") or Qwen2_5_VLForConditionalGeneration ("2.5").

    Vision patches are 2x2 pixels (x 2 frames), merged 2x2: an image with ``image_grid_thw =
    (1, h, w)`` takes ``h * w`` pixel rows of width 24 and gives an ``h/2 x w/2`` grid.
    Token ids: QWEN2_VL_TOKENS.
    """
    import transformers

    torch.manual_seed(seed)
    head_dim = hidden // n_heads
    quarter = head_dim // 4
    text = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters=dict(
            rope_type="default", rope_theta=10000.0,
            mrope_section=[head_dim // 2 - 2 * quarter, quarter, quarter],
        ),
    )
    vision = dict(
        depth=1, hidden_size=hidden, num_heads=2, patch_size=2, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3,
    )
    if version == "2":
        vision.update(embed_dim=16, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision.update(intermediate_size=32, out_hidden_size=hidden, window_size=8, fullatt_block_indexes=[0])
        vision["hidden_size"] = 16
        config_cls = transformers.Qwen2_5_VLConfig
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config = config_cls(
        text_config=text, vision_config=vision,
        image_token_id=QWEN2_VL_TOKENS["image"], video_token_id=QWEN2_VL_TOKENS["video"],
        vision_start_token_id=QWEN2_VL_TOKENS["vision_start"], vision_end_token_id=QWEN2_VL_TOKENS["vision_end"],
    )
    return model_cls._from_config(config, attn_implementation=attn_implementation).eval()


def qwen2_vl_pixels(grid_thw: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixel rows for tiny_qwen2_vl images: (pixel_values, image_grid_thw)."""
    generator = torch.Generator().manual_seed(seed)
    n_rows = sum(t * h * w for t, h, w in grid_thw)
    return torch.randn(n_rows, 3 * 2 * 2 * 2, generator=generator), torch.tensor(grid_thw)
