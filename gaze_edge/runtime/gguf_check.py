"""Check a GGUF file before llama.cpp opens it, so that a corrupt file is a clear error, not a crash.

llama.cpp's GGUF reader refuses most malformed files cleanly, but what comes after it trusts the
metadata: clip.cpp reads its hyperparameters with getters that abort on a wrong value type
(``gguf_get_val_u32`` asserts the type), loads most tensors as optional and then builds its
graph on null pointers or mismatched shapes (SIGSEGV, GGML_ASSERT), sizes vectors from counts in
the file; llama.cpp's vocabulary asserts that tokens are unique, its hyperparameters assert a
layer count in range. One changed byte in a file that gguf-py still reads is enough.

``check_model(path)`` and ``check_projector(path)`` read the file with a bounded parser of their
own (every count and length is checked against the bytes left before anything is read or
allocated, so a file claiming absurd sizes costs nothing) and raise ``InvalidGGUFError`` with one
line naming the file and the problem:

- structure: magic, version, KV and tensor counts bounded by the file size, key and value types,
  string and array lengths inside the file, alignment, tensor names, dims (1 to 4, each positive,
  the element count representable), tensor types (one-dimensional ones F32), each tensor's
  offset where llama.cpp expects it and its bytes (shape x type) inside the file;
- the language model: the architecture named; what llama.cpp's load_hparams asserts (layer count
  1 to 512, expert counts, a known rope scaling type); head counts consistent; norm epsilons
  finite and >= 0 (ggml asserts it when the graph runs); a sliding window below 2^24 (llama.cpp
  reserves memory by it); the gaze top_k an int32 and keep_ratio in [1e-6, 1]; tokens unique;
  a SentencePiece vocabulary with a token for every byte (llama.cpp's byte fallback throws
  through llama_tokenize otherwise);
- the projector: every ``clip.*`` key clip.cpp reads with a scalar getter holds that type; the
  vision hyperparameters in range and consistent with each other (and Gemma 3's pooling with the
  patch grid); every tensor the encoder's graph uses is there, with the shape the
  hyperparameters say; its output as wide as the language model's embeddings.

Each rule guards a crash seen by scripts/fuzz.py or read in the code it names (docs/FUZZ.md);
a file that passes is not promised to be a good model, only not to crash llama.cpp for these
reasons.

Reading costs one pass over the metadata (the tensor data is never read): milliseconds for the
default model, about a tenth of a second for a 150k-token vocabulary.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gaze_edge.errors import GazeEdgeError


class InvalidGGUFError(GazeEdgeError, ValueError):
    """A GGUF file that llama.cpp must not be given: corrupt, truncated, or inconsistent."""


GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_STRING = 1 << 30  # GGUF_MAX_STRING_LENGTH in ggml/src/gguf.cpp
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name is shorter
MAX_DIMS = 4
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
MAX_SLIDING_WINDOW = 1 << 24  # tokens; far above any model's window
MIN_KEEP_RATIO = 1e-6

# GGUF value types (gguf.h): id -> (name, struct format or None for string/array)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, T_UINT64, T_INT64, \
    T_FLOAT64 = range(13)
_SCALAR = {T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
           T_FLOAT32: "<f", T_BOOL: "<B", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d"}
TYPE_NAMES = {T_UINT8: "uint8", T_INT8: "int8", T_UINT16: "uint16", T_INT16: "int16", T_UINT32: "uint32",
              T_INT32: "int32", T_FLOAT32: "float32", T_BOOL: "bool", T_STRING: "string", T_ARRAY: "array",
              T_UINT64: "uint64", T_INT64: "int64", T_FLOAT64: "float64"}

# ggml types a GGUF may hold (ggml.h of the pinned tree): id -> (name, block size, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

# types a one-dimensional tensor may have (converters and llama-quantize keep them F32)
VECTOR_TYPES = (0, 26)  # F32, I32

# Keys clip.cpp reads with a scalar getter (tools/mtmd/clip.cpp, clip-impl.h): gguf_get_val_<type>
# aborts the process when the stored type differs, so each must hold exactly this type.
# "%s" is each modality's prefix: vision, audio, gen.audio.
_CLIP_U32 = (
    "clip.%s.embedding_length", "clip.%s.feed_forward_length", "clip.%s.block_count", "clip.%s.projection_dim",
    "clip.%s.attention.head_count", "clip.%s.attention.head_count_kv", "clip.%s.attention.head_dim",
    "clip.vision.image_size", "clip.vision.patch_size", "clip.vision.image_min_pixels",
    "clip.vision.image_max_pixels", "clip.vision.preproc_min_tiles", "clip.vision.preproc_max_tiles",
    "clip.vision.preproc_image_size", "clip.vision.projector.scale_factor", "clip.vision.projector.query_side",
    "clip.vision.projector.window_side", "clip.vision.spatial_merge_size", "clip.vision.gaze.n_ctx_tokens",
    "clip.vision.n_wa_pattern", "clip.vision.window_size", "clip.minicpmv_query_num",
    "clip.vision.sam.head_count", "clip.vision.sam.block_count", "clip.vision.sam.embedding_length",
    "clip.vision.expert_used_count", "clip.audio.num_mel_bins", "clip.audio.projector.stack_factor",
    "clip.audio.chunk_size", "clip.audio.conv_kernel_size", "clip.audio.max_pos_emb",
    "clip.audio.projector.window_size", "clip.audio.projector.downsample_rate", "clip.audio.projector.head_count",
    "clip.audio.rvq.num_quantizers", "clip.audio.window_size", "clip.audio.local_block_count",
    "clip.audio.local_group_size", "clip.audio.subsampling_factor",
)
_CLIP_TYPED = {
    **{k: T_UINT32 for k in _CLIP_U32},
    "clip.%s.attention.layer_norm_epsilon": T_FLOAT32, "clip.vision.swiglu_clamp": T_FLOAT32,
    "clip.minicpmv_version": T_INT32,
    "clip.has_vision_encoder": T_BOOL, "clip.has_audio_encoder": T_BOOL, "clip.has_gen_audio_encoder": T_BOOL,
    "clip.use_gelu": T_BOOL, "clip.use_silu": T_BOOL,
    "clip.projector_type": T_STRING, "clip.vision.projector_type": T_STRING, "clip.audio.projector_type": T_STRING,
    "clip.gen.audio.projector_type": T_STRING, "clip.gen.audio.model_variant": T_STRING,
    "clip.vision.gaze.ctx_tokens_mode": T_STRING, "clip.vision.mm_patch_merge_type": T_STRING,
    "general.name": T_STRING, "general.description": T_STRING,
}
CLIP_KEY_TYPES = {k.replace("%s", p): t for k, t in _CLIP_TYPED.items()
                  for p in (("vision", "audio", "gen.audio") if "%s" in k else ("",))}

# rope scaling types llama.cpp knows (llama_rope_scaling_type_from_string); another one asserts
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


@dataclass
class KV:
    type: int  # the value's type; T_ARRAY for arrays
    value: object = None  # scalars; for arrays the values when few (see GGUFInfo.SMALL_ARRAY), else None
    item_type: int | None = None  # arrays
    count: int = 1


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne0)
    type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFInfo:
    """What the bounded parser read: the metadata, the tensors, the data section's start."""

    path: Path
    size: int
    version: int
    kv: dict[str, KV] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_offset: int = 0
    tokens: list[bytes] | None = None  # tokenizer.ggml.tokens, when the file has them

    SMALL_ARRAY = 64  # arrays up to this many items keep their values

    def get(self, key: str, default=None):
        kv = self.kv.get(key)
        return default if kv is None else kv.value

    def fail(self, problem: str) -> InvalidGGUFError:
        return InvalidGGUFError(f"{self.path} is not a usable GGUF file: {problem}")


class _Reader:
    """Little-endian reads from a memory map, each checked against the bytes left."""

    def __init__(self, buf, size: int, fail) -> None:
        self.buf, self.size, self.pos, self.fail = buf, size, 0, fail

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes (llama.cpp's limit is {MAX_STRING})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Parse the metadata and tensor infos of ``path`` with every read bounded; InvalidGGUFError
    for a file llama.cpp would refuse or misread."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the map
    except OSError as e:
        raise InvalidGGUFError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        if size < 24:
            raise InvalidGGUFError(f"{path} is not a usable GGUF file: only {size} bytes (a GGUF header has 24)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf, size)


def _parse(path: Path, buf, size: int) -> GGUFInfo:
    info = GGUFInfo(path, size, 0)
    r = _Reader(buf, size, info.fail)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise InvalidGGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    r.pos = 4
    info.version = r.u32("the version")
    if info.version not in (2, 3):
        raise info.fail(f"GGUF version {info.version} (llama.cpp reads versions 2 and 3)")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the key count")
    # the smallest key-value pair takes 8 + 1 + 4 + 1 bytes, the smallest tensor info 8 + 1 + 4 + 4 + 8
    if n_kv > (size - r.pos) // 14:
        raise info.fail(f"it claims {n_kv} metadata keys, more than {size} bytes can hold")
    if n_tensors > (size - r.pos) // 25:
        raise info.fail(f"it claims {n_tensors} tensors, more than {size} bytes can hold")
    for i in range(n_kv):
        _read_kv(info, r, i)
    alignment = info.kv.get("general.alignment")
    align = DEFAULT_ALIGNMENT
    if alignment is not None:
        if alignment.type != T_UINT32 or alignment.value == 0 or alignment.value & (alignment.value - 1):
            raise info.fail("general.alignment must be a power of two (uint32)")
        align = alignment.value
    expected = 0
    for i in range(n_tensors):
        t = _read_tensor_info(info, r, i)
        if t.offset != expected:
            raise info.fail(f"tensor '{t.name}' starts at data offset {t.offset}, llama.cpp expects {expected} "
                            "(the tensor infos before it do not add up)")
        expected += -(-t.nbytes // align) * align
    info.data_offset = -(-r.pos // align) * align if n_tensors else r.pos
    for t in info.tensors.values():
        end = info.data_offset + t.offset + t.nbytes
        if end > size:
            raise info.fail(f"tensor '{t.name}' ({t.nbytes} bytes at byte {info.data_offset + t.offset}) runs past "
                            f"the end of the file ({size} bytes): truncated, or a wrong shape or type")
    return info


def _read_kv(info: GGUFInfo, r: _Reader, i: int) -> None:
    raw = r.string(f"key {i}")
    if not raw:
        raise info.fail(f"key {i} is empty")
    key = _text(raw)
    if key in info.kv:
        raise info.fail(f"key '{key}' appears twice")
    vtype = r.u32(f"the type of '{key}'")
    if vtype == T_ARRAY:
        item = r.u32(f"the item type of '{key}'")
        count = r.u64(f"the length of '{key}'")
        if item == T_ARRAY or item not in TYPE_NAMES:
            raise info.fail(f"key '{key}' is an array of unknown type {item}")
        width = 8 if item == T_STRING else struct.calcsize(_SCALAR[item])
        if count > (r.size - r.pos) // width:
            raise info.fail(f"key '{key}' claims {count} items, more than the file holds")
        kv = KV(T_ARRAY, None, item, count)
        keep_tokens = key == "tokenizer.ggml.tokens" and item == T_STRING
        if item == T_STRING:
            values = _strings(r, count, count <= GGUFInfo.SMALL_ARRAY or keep_tokens, key)
            if keep_tokens:
                info.tokens = values
            kv.value = [_text(v) for v in values] if values is not None and count <= GGUFInfo.SMALL_ARRAY else None
        else:
            fmt = _SCALAR[item]
            n = struct.calcsize(fmt)
            if count <= GGUFInfo.SMALL_ARRAY:
                kv.value = [struct.unpack_from(fmt, r.buf, r.pos + j * n)[0] for j in range(count)]
            r.pos += count * n
        info.kv[key] = kv
    elif vtype == T_STRING:
        info.kv[key] = KV(T_STRING, _text(r.string(f"the value of '{key}'")))
    elif vtype in _SCALAR:
        info.kv[key] = KV(vtype, r.scalar(_SCALAR[vtype], f"the value of '{key}'"))
    else:
        raise info.fail(f"key '{key}' has unknown value type {vtype}")


def _strings(r: _Reader, count: int, keep: bool, key: str) -> list[bytes] | None:
    """Walk ``count`` strings of an array (a vocabulary has 10^5), keeping them if ``keep``."""
    unpack, buf, size, pos = struct.Struct("<Q").unpack_from, r.buf, r.size, r.pos
    out: list[bytes] | None = [] if keep else None
    for j in range(count):
        if pos + 8 > size:
            r.pos = pos
            raise r.fail(f"item {j} of '{key}' at byte {pos} runs past the end of the file ({size} bytes)")
        n = unpack(buf, pos)[0]
        pos += 8
        if n > size - pos:
            r.pos = pos
            raise r.fail(f"item {j} of '{key}' claims {n} bytes at byte {pos}, past the end of the file ({size} bytes)")
        if out is not None:
            out.append(buf[pos:pos + n])
        pos += n
    r.pos = pos
    return out


def _read_tensor_info(info: GGUFInfo, r: _Reader, i: int) -> TensorInfo:
    raw = r.string(f"the name of tensor {i}")
    name = _text(raw)
    if not raw or len(raw) >= MAX_NAME:
        raise info.fail(f"tensor {i} has a name of {len(raw)} bytes (1 to {MAX_NAME - 1})")
    if name in info.tensors:
        raise info.fail(f"tensor '{name}' appears twice")
    n_dims = r.u32(f"the dimension count of '{name}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise info.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS})")
    shape = tuple(r.u64(f"dimension {j} of '{name}'") for j in range(n_dims))
    if any(d == 0 or d >= 2**62 for d in shape):
        raise info.fail(f"tensor '{name}' has shape {list(shape)} (every dimension must be positive)")
    n = math.prod(shape)
    ttype = r.u32(f"the type of '{name}'")
    if ttype not in GGML_TYPES:
        raise info.fail(f"tensor '{name}' has unknown ggml type {ttype}")
    tname, block, block_bytes = GGML_TYPES[ttype]
    if shape[0] % block:
        raise info.fail(f"tensor '{name}' has rows of {shape[0]} values, not a multiple of {tname}'s block ({block})")
    nbytes = n // block * block_bytes
    if nbytes > info.size:
        raise info.fail(f"tensor '{name}' claims {nbytes} bytes ({list(shape)} x {tname}), more than the whole "
                        f"file ({info.size} bytes)")
    if sum(d > 1 for d in shape) <= 1 and ttype not in VECTOR_TYPES:
        # biases, norms, scales: added to or multiplied with f32 activations, which ggml's CPU
        # binary ops cannot do with an f16 or quantized operand (GGML_ABORT "unsupported types")
        raise info.fail(f"tensor '{name}' ({list(shape)}) is {tname}; one-dimensional tensors must be F32")
    offset = r.u64(f"the data offset of '{name}'")
    t = TensorInfo(name, shape, ttype, offset, nbytes)
    info.tensors[name] = t
    return t


# --------------------------------------------------------------------------- the language model


def check_model(path: str | os.PathLike) -> GGUFInfo:
    """InvalidGGUFError unless ``path`` is a language-model GGUF llama.cpp can load without crashing."""
    info = read_gguf(path)
    arch = info.get("general.architecture")
    if info.kv.get("general.architecture", KV(T_STRING)).type != T_STRING or not arch:
        raise info.fail("general.architecture is missing or not a string")
    if arch == "clip":
        raise InvalidGGUFError(f"{info.path} is a projector (mmproj), not a language model")

    def uint(key: str) -> int | None:
        kv = info.kv.get(f"{arch}.{key}")
        if kv is None:
            return None
        if kv.type not in (T_UINT32, T_INT32, T_UINT64, T_INT64, T_UINT16, T_UINT8):
            return None  # llama.cpp refuses a wrong type itself, cleanly
        return int(kv.value)

    n_layer = uint("block_count")
    if n_layer is not None and not 1 <= n_layer <= MAX_LAYERS:
        raise info.fail(f"{arch}.block_count is {n_layer} (llama.cpp takes 1 to {MAX_LAYERS} layers)")
    nextn = uint("nextn_predict_layers")
    if nextn is not None and n_layer is not None and nextn > n_layer:
        raise info.fail(f"{arch}.nextn_predict_layers ({nextn}) exceeds the layer count ({n_layer})")
    n_embd = uint("embedding_length")
    if n_embd is not None and n_embd <= 0:
        raise info.fail(f"{arch}.embedding_length is {n_embd}")
    _check_heads(info, arch, n_layer or 1, n_embd)
    _check_experts(info, arch, uint)
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = info.kv.get(f"{arch}.{key}")  # ggml's norm ops assert eps >= 0 when they run
        if eps is not None and eps.type in (T_FLOAT32, T_FLOAT64) and not (math.isfinite(eps.value) and eps.value >= 0):
            raise info.fail(f"{arch}.{key} is {eps.value} (a small positive number)")
    top_k = uint("attention.gaze.top_k")  # the C API takes an int32
    if top_k is not None and not 0 <= top_k < 2**31:
        raise info.fail(f"{arch}.attention.gaze.top_k is {top_k}")
    ratio = info.kv.get(f"{arch}.attention.gaze.keep_ratio")
    if ratio is not None and ratio.type in (T_FLOAT32, T_FLOAT64) and not MIN_KEEP_RATIO <= ratio.value <= 1:
        # llama.cpp takes (0, 1]; the model's metadata reaches Python as "%f" text, where a
        # ratio below 5e-7 reads as 0
        raise info.fail(f"{arch}.attention.gaze.keep_ratio is {ratio.value} (a fraction in [{MIN_KEEP_RATIO}, 1])")
    window = uint("attention.sliding_window")
    if window is not None and window > MAX_SLIDING_WINDOW:
        # llama_kv_cache::set_input_kq_mask reserves n_tokens + n_swa indices per sequence and step:
        # a window of 2^31 is an 8 GiB allocation at the first decode (std::bad_alloc, an abort)
        raise info.fail(f"{arch}.attention.sliding_window is {window} (at most {MAX_SLIDING_WINDOW})")
    rope = info.get(f"{arch}.rope.scaling.type")
    if isinstance(rope, str) and rope not in ROPE_SCALING_TYPES:
        raise info.fail(f"{arch}.rope.scaling.type is '{rope[:40]}' (one of {', '.join(ROPE_SCALING_TYPES)})")
    if info.tokens is not None:
        seen: set[bytes] = set()
        for i, token in enumerate(info.tokens):
            token = token or f"[EMPTY_{i}]".encode()  # what llama.cpp names an empty token
            if token in seen:
                raise info.fail(f"token {i} ({_text(token)[:40]!r}) appears twice in tokenizer.ggml.tokens")
            seen.add(token)
        if info.get("tokenizer.ggml.model") == "llama":
            # SentencePiece falls back to byte tokens for a character outside the vocabulary;
            # llama_vocab::byte_to_token throws std::out_of_range through llama_tokenize (an abort)
            # when the byte has neither a "<0xXX>" token nor a one-byte token
            for b in range(256):
                if f"<0x{b:02X}>".encode() not in seen and bytes([b]) not in seen:
                    raise info.fail(f"the SentencePiece vocabulary has no token for byte 0x{b:02X} ('<0x{b:02X}>'), "
                                    "which llama.cpp needs for characters outside it")
    return info


def _per_layer(info: GGUFInfo, key: str, n_layer: int) -> list[int] | None:
    kv = info.kv.get(key)
    if kv is None:
        return None
    if kv.type == T_ARRAY:
        if kv.value is None or kv.item_type in (T_STRING, T_FLOAT32, T_FLOAT64, T_BOOL):
            return None  # llama.cpp checks the type and the length itself
        return [int(v) for v in kv.value[:n_layer]]
    if kv.type in (T_UINT32, T_INT32, T_UINT16, T_UINT8, T_UINT64, T_INT64):
        return [int(kv.value)] * n_layer
    return None


def _check_heads(info: GGUFInfo, arch: str, n_layer: int, n_embd: int | None) -> None:
    heads = _per_layer(info, f"{arch}.attention.head_count", n_layer)
    kv_heads = _per_layer(info, f"{arch}.attention.head_count_kv", n_layer) or heads
    if heads is None:
        return
    has_key_length = f"{arch}.attention.key_length" in info.kv
    for il, (h, hk) in enumerate(zip(heads, kv_heads or heads, strict=False)):
        if h < 0 or hk < 0 or h > 1 << 16 or hk > 1 << 16:
            raise info.fail(f"layer {il} has {h} attention heads and {hk} KV heads")
        if h and hk == 0 or hk and h % hk:
            raise info.fail(f"layer {il}: {h} attention heads cannot share {hk} KV heads "
                            f"({arch}.attention.head_count_kv must divide head_count)")
    if n_embd and heads[0] and not has_key_length and n_embd % heads[0]:
        raise info.fail(f"{arch}.embedding_length ({n_embd}) is not a multiple of the head count ({heads[0]})")


def _check_experts(info: GGUFInfo, arch: str, uint) -> None:
    """llama.cpp asserts these (load_hparams): experts at most LLAMA_MAX_EXPERTS, used ones among them."""
    n_expert = uint("expert_count") or 0
    per_layer = _per_layer(info, f"{arch}.expert_used_count", MAX_LAYERS)  # a number or one per layer
    used = max(per_layer) if per_layer else None
    if n_expert > MAX_EXPERTS:
        raise info.fail(f"{arch}.expert_count is {n_expert} (at most {MAX_EXPERTS})")
    if used is not None and (used > n_expert or (n_expert and not used)):
        raise info.fail(f"{arch}.expert_used_count ({used}) does not fit expert_count ({n_expert})")
    groups = uint("expert_group_count") or 0
    if groups and (n_expert == 0 or groups >= n_expert):
        raise info.fail(f"{arch}.expert_group_count ({groups}) does not fit expert_count ({n_expert})")


# --------------------------------------------------------------------------- the projector

# projector types whose encoder is clip.cpp's standard ViT layers (all but these few)
_NO_STANDARD_LAYERS = ("gemma3nv", "qwen3tts_spkenc", "pockettts_gen")
# projector types gaze-edge converts, with the tensors their graph uses unconditionally
# (clip.cpp loads them as optional and dereferences them when building the graph)
_PROJECTOR_TENSORS = {
    "mlp": ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.0.bias", "mm.2.weight",
            "mm.2.bias"),
    "qwen2vl_merger": ("v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.0.bias", "mm.2.weight",
                       "mm.2.bias"),
    "qwen2.5vl_merger": ("v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.0.bias", "mm.2.weight",
                         "mm.2.bias"),
    "gemma3": ("v.patch_embd.weight", "mm.input_projection.weight", "mm.soft_emb_norm.weight"),
}
# ... and the ones their graph asserts are absent (clip_graph_qwen2vl::build)
_PROJECTOR_WITHOUT = {
    "qwen2vl_merger": ("v.class_embd", "v.patch_embd.bias"),
    "qwen2.5vl_merger": ("v.class_embd", "v.patch_embd.bias"),
}
# projectors that take a fixed-size square image (image_size) and add learned position embeddings
_FIXED_SIZE = ("mlp", "gemma3")


def check_projector(path: str | os.PathLike, n_embd_text: int | None = None) -> GGUFInfo:
    """InvalidGGUFError unless ``path`` is a projector GGUF clip.cpp can load and run without
    crashing; ``n_embd_text``: the language model's embedding width, which the projector's output
    must match."""
    info = read_gguf(path)
    arch = info.get("general.architecture")
    if arch is not None and arch != "clip":
        raise InvalidGGUFError(f"{info.path} is a language model ({str(arch)[:40]}), not a projector (mmproj)")
    for key, want in CLIP_KEY_TYPES.items():
        kv = info.kv.get(key)
        if kv is not None and kv.type != want:
            got = TYPE_NAMES.get(kv.type, str(kv.type))
            if kv.type == T_ARRAY:
                got = f"array of {TYPE_NAMES.get(kv.item_type, kv.item_type)}"
            raise info.fail(f"{key} is {got}, clip.cpp reads it as {TYPE_NAMES[want]}")
    if info.get("clip.has_vision_encoder"):
        _check_vision(info, n_embd_text)
    return info


def _vision_hparams(info: GGUFInfo) -> dict:
    g = info.get
    p = {
        "n_embd": g("clip.vision.embedding_length"), "n_head": g("clip.vision.attention.head_count"),
        "n_ff": g("clip.vision.feed_forward_length"), "n_layer": g("clip.vision.block_count"),
        "image_size": g("clip.vision.image_size"), "patch_size": g("clip.vision.patch_size"),
        "eps": g("clip.vision.attention.layer_norm_epsilon"),
    }
    for key, value in p.items():
        if value is None:
            raise info.fail(f"clip.vision.{_KEY_NAMES[key]} is missing")
    p["n_head_kv"] = g("clip.vision.attention.head_count_kv", p["n_head"])
    p["head_dim"] = g("clip.vision.attention.head_dim")
    p["proj"] = g("clip.projector_type") or g("clip.vision.projector_type") or ""
    return p


_KEY_NAMES = {"n_embd": "embedding_length", "n_head": "attention.head_count", "n_ff": "feed_forward_length",
              "n_layer": "block_count", "image_size": "image_size", "patch_size": "patch_size",
              "eps": "attention.layer_norm_epsilon"}


def _check_vision(info: GGUFInfo, n_embd_text: int | None) -> None:
    p = _vision_hparams(info)
    n_embd, n_head, n_head_kv, n_layer = p["n_embd"], p["n_head"], p["n_head_kv"], p["n_layer"]
    if not 0 < n_embd <= 1 << 16:
        raise info.fail(f"clip.vision.embedding_length is {n_embd}")
    if not 0 < n_head <= n_embd or not 0 < n_head_kv <= n_head or n_head % n_head_kv:
        raise info.fail(f"the vision encoder's head counts ({n_head} heads, {n_head_kv} KV heads) do not fit "
                        f"its width ({n_embd})")
    head_dim = p["head_dim"] or n_embd // n_head
    if not p["head_dim"] and n_embd % n_head:
        raise info.fail(f"clip.vision.embedding_length ({n_embd}) is not a multiple of the head count ({n_head})")
    if not 0 < n_layer <= MAX_LAYERS:
        raise info.fail(f"clip.vision.block_count is {n_layer}")
    if not (math.isfinite(p["eps"]) and p["eps"] > 0):
        raise info.fail(f"clip.vision.attention.layer_norm_epsilon is {p['eps']}")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        values = info.get(key)
        if isinstance(values, list) and not all(isinstance(v, float) and math.isfinite(v) for v in values[:3]):
            raise info.fail(f"{key} holds {values[:3]}")
    std = info.get("clip.vision.image_std")
    if isinstance(std, list) and any(v == 0 for v in std[:3]):
        raise info.fail(f"clip.vision.image_std holds a zero ({std[:3]})")
    proj = p["proj"]
    patch, image_size = p["patch_size"], p["image_size"]
    if proj in _FIXED_SIZE and not 0 < patch <= image_size:
        raise info.fail(f"clip.vision.image_size ({image_size}) holds no {patch}-pixel patch")
    _check_gaze(info)
    if proj in _NO_STANDARD_LAYERS:
        return
    t = info.tensors
    q_width, kv_width = n_head * head_dim, n_head_kv * head_dim
    for il in range(n_layer):
        _check_layer(info, il, n_embd, q_width, kv_width, proj)
    for name in _PROJECTOR_TENSORS.get(proj, ()):
        if name not in t:
            raise info.fail(f"the {proj} projector needs tensor '{name}', which is not in the file")
    for name in _PROJECTOR_WITHOUT.get(proj, ()):
        if name in t:
            raise info.fail(f"the {proj} projector cannot have tensor '{name}'")
    _want(info, "v.patch_embd.weight", (patch, patch, 3, n_embd))
    _want(info, "v.patch_embd.weight.1", (patch, patch, 3, n_embd))
    _want(info, "v.class_embd", (n_embd,))
    for name in ("v.pre_ln.weight", "v.pre_ln.bias", "v.post_ln.weight", "v.post_ln.bias", "v.patch_embd.bias"):
        _want(info, name, (n_embd,))
    pos = t.get("v.position_embd.weight")
    side = image_size // patch
    if pos is not None and proj in _FIXED_SIZE:
        # llava looks rows up (get_rows: at least one per patch, and the class token's); SigLIP
        # adds the table to the patches (exactly one row per patch)
        rows = side * side + (1 if "v.class_embd" in t and proj == "mlp" else 0)
        have = pos.shape[1] if len(pos.shape) > 1 else 1
        if pos.shape[0] != n_embd or len(pos.shape) > 2 or have < rows or (proj == "gemma3" and have != rows):
            raise info.fail(f"tensor 'v.position_embd.weight' has shape {list(pos.shape)}; a {image_size}-pixel image "
                            f"in {patch}-pixel patches needs [{n_embd}, {rows}]")
    if proj == "gemma3":  # average-pooled by n_merge x n_merge patches (clip.cpp: 4 unless the file says)
        merge = info.get("clip.vision.projector.scale_factor", 4)
        if not 0 < merge <= side or side % merge:
            raise info.fail(f"clip.vision.projector.scale_factor ({merge}) must divide the {side} patches per side "
                            f"({image_size}-pixel image, {patch}-pixel patches)")
    out = _projector_output(info, proj, n_embd)
    if out is not None and n_embd_text is not None and out != n_embd_text:
        raise InvalidGGUFError(f"the projector {info.path} outputs {out}-wide embeddings, the language model takes "
                               f"{n_embd_text}: not this model's mmproj")
    ctx = t.get("v.gaze.ctx_tok")
    if ctx is not None and out is not None and ctx.shape[0] != out:
        raise info.fail(f"tensor 'v.gaze.ctx_tok' has rows of {ctx.shape[0]}, the projector outputs {out}")


def _check_gaze(info: GGUFInfo) -> None:
    region = info.kv.get("clip.vision.gaze.region_size")
    if region is not None:
        if region.type != T_ARRAY or region.item_type not in (T_UINT32, T_INT32) or region.count != 2:
            raise info.fail("clip.vision.gaze.region_size must be two integers [h, w]")
        h, w = region.value
        if not (0 < h <= 1 << 12 and 0 < w <= 1 << 12):
            raise info.fail(f"clip.vision.gaze.region_size is {h} x {w}")
    n_ctx = info.get("clip.vision.gaze.n_ctx_tokens")
    if n_ctx is not None and not 0 <= n_ctx <= 1 << 12:
        raise info.fail(f"clip.vision.gaze.n_ctx_tokens is {n_ctx}")


def _want(info: GGUFInfo, name: str, shape: tuple[int, ...]) -> None:
    """If the file has tensor ``name``, its shape must be ``shape`` (trailing 1s ignored)."""
    t = info.tensors.get(name)
    if t is None:
        return
    got = list(t.shape)
    while len(got) > len(shape) and got[-1] == 1:
        got.pop()
    if tuple(got) != shape:
        raise info.fail(f"tensor '{name}' has shape {list(t.shape)}, the hyperparameters say {list(shape)}")


def _check_layer(info: GGUFInfo, il: int, n_embd: int, q_width: int, kv_width: int, proj: str) -> None:
    t = info.tensors
    pre = f"v.blk.{il}."
    if f"{pre}attn_qkv.weight" not in t:
        for part in ("attn_q", "attn_k", "attn_v"):
            if f"{pre}{part}.weight" not in t:
                raise info.fail(f"vision layer {il} of {info.get('clip.vision.block_count')} has no '{pre}{part}.weight'")
        _want(info, f"{pre}attn_q.weight", (n_embd, q_width))
        _want(info, f"{pre}attn_k.weight", (n_embd, kv_width))
        _want(info, f"{pre}attn_v.weight", (n_embd, kv_width))
        _want(info, f"{pre}attn_q.bias", (q_width,))
        _want(info, f"{pre}attn_k.bias", (kv_width,))
        _want(info, f"{pre}attn_v.bias", (kv_width,))
    if f"{pre}attn_out.weight" not in t:
        raise info.fail(f"vision layer {il} has no '{pre}attn_out.weight'")
    _want(info, f"{pre}attn_out.weight", (q_width, n_embd))
    _want(info, f"{pre}attn_out.bias", (n_embd,))
    for norm in ("ln1", "ln2"):
        _want(info, f"{pre}{norm}.weight", (n_embd,))
        _want(info, f"{pre}{norm}.bias", (n_embd,))
    if f"{pre}ffn_gate_exps.weight" in t:
        return  # a mixture-of-experts block: clip.cpp's MoE path
    up, down = t.get(f"{pre}ffn_up.weight"), t.get(f"{pre}ffn_down.weight")
    if up is None or down is None:
        raise info.fail(f"vision layer {il} has no '{pre}ffn_up.weight' or '{pre}ffn_down.weight'")
    up_b, down_b = f"{pre}ffn_up.bias", f"{pre}ffn_down.bias"
    if down.shape[0] == n_embd:  # clip.cpp swaps up and down for older conversions
        up, down, up_b, down_b = down, up, down_b, up_b
    hidden = up.shape[1] if len(up.shape) > 1 else 1
    if up.shape[0] != n_embd or len(up.shape) != 2 or tuple(down.shape) != (hidden, n_embd):
        raise info.fail(f"vision layer {il}'s feed-forward tensors have shapes {list(up.shape)} and "
                        f"{list(down.shape)}; the width is {n_embd}")
    _want(info, up_b, (hidden,))
    _want(info, down_b, (n_embd,))
    _want(info, f"{pre}ffn_gate.weight", (n_embd, hidden))
    _want(info, f"{pre}ffn_gate.bias", (hidden,))


def _projector_output(info: GGUFInfo, proj: str, n_embd: int) -> int | None:
    """The projector's output width (clip_n_mmproj_embd), after checking its tensors chain; None
    for projector types this module does not know."""
    t = info.tensors
    if proj == "mlp" or proj.startswith("qwen2"):
        w0, w2 = t["mm.0.weight"], t["mm.2.weight"]
        if proj == "mlp":
            layers = info.get("clip.vision.feature_layer")
            n_in = n_embd * max(1, len(set(layers)) if isinstance(layers, list) else 1)
        else:  # Qwen2-VL merges neighbouring patches first: rows of a multiple of the width
            n_in = n_embd * max(1, w0.shape[0] // n_embd)
        if len(w0.shape) != 2 or w0.shape[0] != n_in:
            raise info.fail(f"tensor 'mm.0.weight' has shape {list(w0.shape)}; the encoder gives rows of {n_in}")
        hidden = w0.shape[1]
        _want(info, "mm.0.bias", (hidden,))
        if len(w2.shape) != 2 or w2.shape[0] != hidden:
            raise info.fail(f"tensor 'mm.2.weight' has shape {list(w2.shape)}; 'mm.0.weight' gives rows of {hidden}")
        _want(info, "mm.2.bias", (w2.shape[1],))
        return w2.shape[1]
    if proj == "gemma3":
        w = t["mm.input_projection.weight"]
        if len(w.shape) != 2 or w.shape[1] != n_embd:
            raise info.fail(f"tensor 'mm.input_projection.weight' has shape {list(w.shape)}; the encoder's width "
                            f"is {n_embd}")
        _want(info, "mm.soft_emb_norm.weight", (n_embd,))
        return w.shape[0]
    return None
