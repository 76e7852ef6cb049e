"""A low-rank adapter (LoRA) on the text model's attention projections, merged for saving.

Each targeted ``nn.Linear`` W (q_proj, k_proj, v_proj, o_proj of every text layer) computes
``W x + scale * B (A x)`` while the adapter is attached, with A ``(r, in)`` (Kaiming-uniform,
seeded) and B ``(out, r)`` (zeros: attaching a fresh adapter changes nothing), scale = alpha / r
with alpha = r. The adapter works through forward hooks, so the model's own modules and
state-dict names never change; ``merge()`` adds ``scale * B A`` into each W and detaches, after
which the model is a plain transformers model again (it saves and converts like any other).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def target_modules(text_model: nn.Module) -> dict[str, nn.Linear]:
    """The attention projections of the text model, by module name."""
    found = {name: m for name, m in text_model.named_modules()
             if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(m, nn.Linear)}
    if not found:
        raise ValueError("the text model has no q/k/v/o_proj linear layers to adapt")
    return found


class LoraAdapter(nn.Module):
    """Rank-``rank`` adapters for every projection of ``target_modules(text_model)``."""

    def __init__(self, text_model: nn.Module, rank: int, seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scale = 1.0  # alpha / rank with alpha = rank
        self._targets = target_modules(text_model)
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for name, linear in self._targets.items():
            key = name.replace(".", "__")
            bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear's
            a = (torch.rand(rank, linear.in_features, generator=generator) * 2 - 1) * bound
            self.a[key] = nn.Parameter(a.to(linear.weight.device))
            self.b[key] = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        self._hooks: list = []

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self) -> None:
        """Add the adapters to the projections' outputs (idempotent)."""
        if self._hooks:
            return
        for name, linear in self._targets.items():
            key = name.replace(".", "__")
            self._hooks.append(linear.register_forward_hook(self._hook(key)))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _hook(self, key: str):
        def add_delta(module, args, output):
            x = args[0]
            a, b = self.a[key], self.b[key]
            return output + self.scale * nn.functional.linear(nn.functional.linear(x, a.to(x.dtype)), b.to(x.dtype))

        return add_delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into the weights (in float32, stored in each weight's dtype) and
        detach: the model then computes what it computed with the adapters attached."""
        self.detach()
        for name, linear in self._targets.items():
            key = name.replace(".", "__")
            delta = self.scale * (self.b[key].float() @ self.a[key].float())
            linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
