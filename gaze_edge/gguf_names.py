"""GGUF key and tensor names for gaze, defined once (the C++ side must use the same strings).

Selection settings live in the language-model GGUF (under the architecture prefix, like
``llama.attention.gaze.top_k``); region size, context-token count and the context-token tensor
live in the mmproj, because mtmd emits image embeddings (context tokens included) and registers
each image's grid with the region size. See docs/FORMAT.md.
"""

# language-model GGUF: "{arch}.attention.gaze.*"
LLM_TOP_K = "{arch}.attention.gaze.top_k"  # u32, 0 = use keep_ratio
LLM_KEEP_RATIO = "{arch}.attention.gaze.keep_ratio"  # f32
LLM_SCORE_MODE = "{arch}.attention.gaze.score_mode"  # u32, index into SCORE_MODE_IDS
LLM_N_DENSE_LAYERS = "{arch}.attention.gaze.n_dense_layers"  # u32, absent = 0; written only when > 0

# mmproj GGUF
MMPROJ_REGION_SIZE = "clip.vision.gaze.region_size"  # u32[2] = [region_h, region_w]
MMPROJ_N_CONTEXT_TOKENS = "clip.vision.gaze.n_ctx_tokens"  # u32
MMPROJ_CONTEXT_TOKENS_MODE = "clip.vision.gaze.ctx_tokens_mode"  # string "pooled"; absent = "learned"
TENSOR_CONTEXT_TOKENS = "v.gaze.ctx_tok"  # f32, ggml shape [n_embd_text, n_ctx_tokens]; absent when pooled

SCORE_MODE_IDS = {"gqa_mean": 0, "per_head": 1, "layer_mean": 2, "gqa_max": 3}


def llm_key(template: str, arch: str) -> str:
    return template.format(arch=arch)
