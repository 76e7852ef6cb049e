"""Test helpers shared by the reference and runtime-parity tests (a module beside the tests, not a
test file)."""

from __future__ import annotations

import sys

import torch


def capture_queries(text_model):
    """Forward pre-hooks recording each attention module's post-RoPE query: (captured, handles),
    captured[layer] = q (B, heads, L, head_dim); remove the handles when done."""
    captured, handles = {}, []
    for layer, block in enumerate(text_model.layers):
        attn = block.self_attn
        rope = sys.modules[type(attn).__module__]

        def hook(module, args, kwargs, layer=layer, rope=rope):
            hidden = kwargs["hidden_states"]
            q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            if hasattr(rope, "apply_multimodal_rotary_pos_emb"):
                q, _ = rope.apply_multimodal_rotary_pos_emb(q, q, cos, sin, module.rope_parameters["mrope_section"])
            else:
                q, _ = rope.apply_rotary_pos_emb(q, q, cos, sin)
            captured[layer] = q

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    return captured, handles


def reference_inputs(session, image_token_id: int):
    """What the PyTorch reference needs to evaluate the sequence a runtime GazeSession holds (images
    added with keep_embeddings=True): the token ids, each image's grid as the model's image token,
    and ImageFeatures of mtmd's grid embeddings (the context tokens are the reference's own)."""
    from gaze_edge.reference import ImageFeatures
    from gaze_edge.runtime.session import SessionImage

    ids, features, grids = [], [], []
    for item in session.history:
        if isinstance(item, SessionImage):
            n_grid = item.grid[0] * item.grid[1]
            ids += [image_token_id] * n_grid
            features.append(torch.from_numpy(item.embeddings[:n_grid]))
            grids.append(item.grid)
        else:
            ids.append(item)
    return ids, ImageFeatures(features, grids)
