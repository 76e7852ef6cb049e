"""Which llama.cpp pre-tokenizer a new BPE vocabulary can use.

llama.cpp's converter recognises a pre-tokenizer by hashing the token ids of a test string, so a
newly trained vocabulary (like gaze-edge's own) is unknown to it even when it splits text exactly
like GPT-2. When tokenizer.json shows GPT-2's split (byte-level, GPT-2's regex, no prefix space,
no normaliser), llama.cpp's ``gpt-2`` pre-tokenizer (the same regex, llama-vocab.cpp) is exact.
Anything else is left to the hash check, which then fails loudly rather than guess.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def _is_byte_level(node: dict[str, Any], *, use_regex: bool) -> bool:
    return (node.get("type") == "ByteLevel" and not node.get("add_prefix_space", True)
            and bool(node.get("use_regex", True)) == use_regex)


def _is_gpt2_split(node: dict[str, Any]) -> bool:
    return (node.get("type") == "Split" and node.get("pattern") == {"Regex": GPT2_REGEX}
            and node.get("behavior") == "Isolated" and not node.get("invert", False))


def is_gpt2_pre_tokenizer(tokenizer_json: dict[str, Any]) -> bool:
    """True when this tokenizer.json splits text exactly as GPT-2 does before BPE."""
    if tokenizer_json.get("normalizer") is not None:
        return False
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return False
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if _is_byte_level(pre, use_regex=True):
        return True
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    return (isinstance(parts, list) and len(parts) == 2 and _is_gpt2_split(parts[0])
            and _is_byte_level(parts[1], use_regex=False))


def pre_tokenizer_fallback(folder: Path) -> str | None:
    """'gpt-2' when the checkpoint's tokenizer.json is GPT-2-split BPE, else None."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "gpt-2" if is_gpt2_pre_tokenizer(data) else None
