"""What differs between the supported model families, as data (in the spirit of gguf-py's
tensor_mapping.py): which llama.cpp converter class writes the language model, who writes the
vision projector, and which config values llama.cpp's graphs hard-code.

Adding a family is adding a row to FAMILIES (plus a tiny checkpoint in tiny.py and its parity
test).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gaze_edge.convert.errors import ConvertError

# Who writes the mmproj.
MMPROJ_CLIP_MLP = "clip-mlp"  # ours, with the gguf library (clip_mmproj.py)
MMPROJ_LLAMA_CPP = "llama.cpp"  # the pinned convert_hf_to_gguf.py --mmproj class for the architecture


@dataclass(frozen=True)
class Requirement:
    """A config value the llama.cpp side hard-codes: the checkpoint must have one of ``allowed``.

    path: dotted path into config.json ("vision_config.window_size"); ``default`` is the value
    transformers uses when the key is absent.
    """

    path: str
    allowed: tuple[Any, ...]
    why: str
    default: Any = None

    def value(self, config: Mapping[str, Any]) -> Any:
        node: Any = config
        for part in self.path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return self.default
            node = node[part]
        return node


@dataclass(frozen=True)
class Family:
    """One row of the table.

    name: what users call it (used in messages and file docs).
    architectures: config.json ``architectures[0]`` values of this family.
    text_converters: language model's ``model_type`` -> the architecture name under which
      llama.cpp's convert_hf_to_gguf.py registers the text class to use.
    mmproj: MMPROJ_CLIP_MLP or MMPROJ_LLAMA_CPP.
    requires: config values the pinned llama.cpp supports for this family.
    """

    name: str
    architectures: tuple[str, ...]
    text_converters: Mapping[str, str]
    mmproj: str
    requires: tuple[Requirement, ...] = field(default_factory=tuple)


_LLAVA = Family(
    name="LLaVA-1.5 (CLIP vision, MLP projector)",
    architectures=("LlavaForConditionalGeneration",),
    # the text model's own class: a Qwen2 decoder inside LLaVA keeps its q/k/v biases
    text_converters={"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"},
    mmproj=MMPROJ_CLIP_MLP,
    requires=(
        Requirement("vision_config.model_type", ("clip_vision_model",),
                    "only a CLIP vision tower is supported for LLaVA", "clip_vision_model"),
        Requirement("vision_config.hidden_act", ("quick_gelu", "gelu"),
                    "mtmd's CLIP encoder has quick_gelu or gelu", "quick_gelu"),
        Requirement("vision_feature_select_strategy", ("default",),
                    "mtmd drops the CLS token (the 'default' strategy)", "default"),
        Requirement("projector_hidden_act", ("gelu",), "mtmd's MLP projector applies GELU", "gelu"),
        Requirement("multimodal_projector_bias", (True,), "mtmd's MLP projector adds biases", True),
    ),
)

_QWEN_TEXT = {"qwen2_vl_text": "Qwen2VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
_QWEN25_TEXT = {"qwen2_5_vl_text": "Qwen2_5_VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_QWEN_VISION = (
    Requirement("vision_config.spatial_merge_size", (2,), "mtmd merges 2 x 2 patches for Qwen-VL", 2),
    Requirement("vision_config.temporal_patch_size", (2,),
                "llama.cpp splits the Conv3D patch embedding into 2 frames", 2),
)

_QWEN2VL = Family(
    name="Qwen2-VL",
    architectures=("Qwen2VLForConditionalGeneration",),
    text_converters=_QWEN_TEXT,
    mmproj=MMPROJ_LLAMA_CPP,
    requires=_QWEN_VISION,
)

_QWEN25VL = Family(
    name="Qwen2.5-VL",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    text_converters=_QWEN25_TEXT,
    mmproj=MMPROJ_LLAMA_CPP,
    requires=_QWEN_VISION + (
        Requirement("vision_config.window_size", (112,), "mtmd hard-codes 112 px attention windows", 112),
    ),
)

FAMILIES: tuple[Family, ...] = (_LLAVA, _QWEN2VL, _QWEN25VL)


def supported() -> str:
    """'LLaVA-1.5 (...) [LlavaForConditionalGeneration], ...' for error messages and docs."""
    return ", ".join(f"{f.name} [{', '.join(f.architectures)}]" for f in FAMILIES)


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's config: ``text_config`` when nested (transformers 5), else the top level."""
    return config.get("text_config") or config


def family_for(config: Mapping[str, Any]) -> Family:
    """The row for this config.json, after checking the values llama.cpp hard-codes."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    family = next((f for f in FAMILIES if arch in f.architectures), None)
    if family is None:
        raise ConvertError(f"unsupported architecture {arch!r}; supported: {supported()}")
    text_type = text_config(config).get("model_type")
    if text_type not in family.text_converters:
        raise ConvertError(
            f"{family.name}: unsupported language model type {text_type!r}; "
            f"supported: {', '.join(family.text_converters)}")
    for req in family.requires:
        got = req.value(config)
        if got not in req.allowed:
            raise ConvertError(f"{family.name}: {req.path} = {got!r} is not supported ({req.why}; "
                               f"supported: {', '.join(map(repr, req.allowed))})")
    return family


def text_converter(family: Family, config: Mapping[str, Any]) -> str:
    """llama.cpp's converter architecture name for this checkpoint's language model."""
    return family.text_converters[text_config(config)["model_type"]]
