"""The tiny LLaVA we train from scratch: a CLIP vision tower, an MLP projector, a Llama decoder.

Choices llama.cpp's mtmd must reproduce (and does: see docs/TRAINING.md):
- vision_feature_layer = -1 (the last encoder layer's output, before post_layernorm) with the
  "default" select strategy (CLS dropped): 196 visual tokens for 196 px / patch 14. The mmproj
  GGUF states this as ``clip.vision.feature_layer = [n_layer]`` (mtmd then runs every layer and
  takes the last one's output; without that key it would stop one layer early, i.e. -2).
- The image processor takes 196 x 196 RGB with no resize or crop effect (GazeScenes images are
  already that size), mean = std = 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from gaze_edge.train.tokenizer import IMAGE

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the tiny LLaVA (defaults: the shipped model, about 2 M parameters)."""

    image_size: int = 196
    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 192
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 512
    max_positions: int = 1024
    vocab_size: int = 384

    @property
    def n_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


SMOKE_SPEC = ModelSpec(
    vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
    text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1, text_intermediate=64,
    vocab_size=320,
)  # fmt: skip


def llava_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=spec.n_visual_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA (deterministic for a given seed), in float32, eval mode off."""
    import torch

    config = llava_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_processor(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """The processor saved with the model: CLIP preprocessing at the native size, no crop effect."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        resample=3,  # bicubic, like CLIP; a no-op for images already at image_size
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
        image_token=IMAGE,
    )
