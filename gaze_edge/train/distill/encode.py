"""A prompt about an image as the model's input, the way ``gaze-edge chat`` would give it.

The prompt is the checkpoint's own chat template (the one the converter writes into the GGUF;
a checkpoint without one gets its family's usual template, as the runtime does) rendered with
``gaze_edge.templates.render_chat`` for one user message (the image, then the text), tokenized
with the checkpoint's tokenizer (special tokens added as its post-processor says, like the
runtime's ``add_bos``), each image placeholder token expanded to the image's grid tokens as the
model's processor does. Pixels come from the checkpoint's image processor.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gaze_edge.errors import GazeEdgeError


@dataclass
class Encoded:
    """prompt_ids: the prompt's token ids (image placeholders expanded); pixels: the image as the
    model takes it (``pixel_values``, and ``image_grid_thw`` for Qwen2-VL)."""

    prompt_ids: list[int]
    pixels: dict[str, torch.Tensor]


def chat_template(folder: Path, tokenizer) -> str | None:
    """The checkpoint's chat template: the tokenizer's, else chat_template.jinja, else the
    ``chat_template`` of chat_template.json or processor_config.json; None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            try:
                found = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            except (OSError, ValueError):
                continue
            if isinstance(found, str) and found:
                return found
    return None


class PromptEncoder:
    """Turns (image, prompt) into model inputs for one checkpoint folder."""

    def __init__(self, folder: str | Path, model) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        from gaze_edge.reference.families import family_of

        folder = Path(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.image_processor = AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GazeEdgeError(f"cannot load the tokenizer and image processor of {folder}: {first}") from None
        self.family = family_of(model)
        self.config = model.config
        self.image_token_id = int(model.config.image_token_id)
        self.template = chat_template(folder, self.tokenizer)
        self.arch = "qwen2vl" if self.family.rope == "mrope" else "llama"
        self._warned = False

    @property
    def pad_id(self) -> int:
        for token in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return int(token)
        return 0

    def eos_ids(self, generation_config=None) -> set[int]:
        """Tokens that end an answer: the tokenizer's EOS and the generation config's."""
        ids = {self.tokenizer.eos_token_id}
        extra = getattr(generation_config, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, list | tuple) else {extra}
        return {int(i) for i in ids if i is not None}

    def prompt_text(self, prompt: str) -> str:
        from gaze_edge.templates import render_chat

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text, warning = render_chat(self.template, messages, arch=self.arch,
                                    bos_token=self.tokenizer.bos_token or "",
                                    eos_token=self.tokenizer.eos_token or "")
        if warning and not self._warned:
            self._warned = True
            warnings.warn(warning, stacklevel=2)
        return text

    def pixels(self, image) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=[image], return_tensors="pt")
        pixels = {"pixel_values": out["pixel_values"].float()}
        if "image_grid_thw" in out:
            pixels["image_grid_thw"] = out["image_grid_thw"]
        return pixels

    def grid_tokens(self, pixels: dict[str, torch.Tensor]) -> int:
        """Language-model tokens the image becomes (what its placeholder expands to)."""
        if "image_grid_thw" in pixels:
            merge = self.config.vision_config.spatial_merge_size
            return int(pixels["image_grid_thw"][0].prod()) // (merge * merge)
        side = pixels["pixel_values"].shape[-1] // self.config.vision_config.patch_size
        return side * side  # the "default" feature strategy: CLS dropped

    def encode(self, image, prompt: str) -> Encoded:
        pixels = self.pixels(image)
        ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=True).input_ids
        if ids.count(self.image_token_id) != 1:
            raise GazeEdgeError(
                f"the chat template put {ids.count(self.image_token_id)} image tokens (id {self.image_token_id}) "
                "in a prompt with one image")
        i = ids.index(self.image_token_id)
        ids = ids[:i] + [self.image_token_id] * self.grid_tokens(pixels) + ids[i + 1:]
        return Encoded(ids, pixels)


def collate_pixels(pixels: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several images' inputs in order, as one call of the model takes them."""
    return {key: torch.cat([p[key] for p in pixels]) for key in pixels[0]}
