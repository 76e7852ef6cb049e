"""``GazeSession``: one sequence evaluated token by token in the patched llama.cpp.

Prompt inputs (``add_text``, ``add_tokens``, ``add_image``) are evaluated densely, however they are
batched. ``append(token)`` evaluates a token the model generated: the session marks it as such
(``llama_gaze_set_generated``) and gaze applies (GAZE_SPEC.md, "Generated tokens"). Images go
through mtmd: its helper decodes the grid and the context tokens and registers the grid with the
context, so the runtime knows every region.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gaze_edge import gguf_names
from gaze_edge.config import visual_kv_fraction
from gaze_edge.errors import ContextOverflowError
from gaze_edge.runtime import bindings

llama_cpp = bindings._llama_cpp
mtmd_cpp = bindings._mtmd_cpp

KV_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}

SEQ = 0  # the session's one sequence


@dataclass(frozen=True)
class SessionImage:
    """An image in the sequence.

    id: the runtime's image id (in traces), -1 if the image was not registered (dense);
    pos: position of the first grid token (1-D RoPE) or of the whole grid (M-RoPE);
    grid: (height, width) in tokens; region: (height, width); n_regions: regions of the grid;
    n_context_tokens: context tokens after the grid;
    embeddings: (n_tokens, n_embd) what the projector gave (grid, then context tokens), if kept.
    """

    id: int
    pos: int
    grid: tuple[int, int]
    region: tuple[int, int] | None
    n_regions: int
    n_context_tokens: int
    embeddings: np.ndarray | None = None

    def region_sizes(self) -> np.ndarray:
        """(n_regions,) grid tokens per region, raster order (edge regions may be smaller)."""
        (h, w), (rh, rw) = self.grid, self.region
        rows = [min(rh, h - y) for y in range(0, h, rh)]
        cols = [min(rw, w - x) for x in range(0, w, rw)]
        return np.array([r * c for r in rows for c in cols], dtype=np.int64)


@dataclass(frozen=True)
class StepTrace:
    """The regions one generated-token step selected (the reference's GazeTrace layout).

    selected: (n_layers - n_dense_layers, S, k) region ids ascending of the layers that gazed
      (row i is layer n_dense_layers + i), numbering all regions of the sequence (image order,
      then raster order); S = KV heads for gqa_mean, gqa_max and layer_mean (layer_mean's one
      selection repeated), query heads for per_head.
    n_dense_layers: the first layers, which attended densely (GAZE_SPEC.md "Dense first layers").
    n_regions: regions in the sequence; region_sizes: (n_regions,) grid tokens per region.
    """

    selected: np.ndarray
    k: int
    n_regions: int
    region_sizes: np.ndarray
    n_kv_heads: int | None = None
    n_dense_layers: int = 0

    def visual_kv_fraction(self) -> float:
        """GAZE_SPEC.md "Accounting": grid tokens read, summed over layers and KV heads, / (grid
        tokens x layers x KV heads); a KV head reads the union of its query heads' regions, a
        dense layer every grid token."""
        return visual_kv_fraction(self.selected, self.region_sizes, self.n_kv_heads, self.n_dense_layers)


class GazeSession:
    """One sequence in its own llama.cpp context. Use ``GazeModel.session()`` to make one."""

    def __init__(self, model, *, gaze: bool, keep_regions: int | None, keep_ratio: float | None,
                 score_mode: str | None, gather: bool, n_ctx: int, kv_type: str, trace: bool,
                 eval_callback=None, n_dense_layers: int | None = None) -> None:
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        _check_selection(keep_regions, keep_ratio, score_mode)

        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = min(n_ctx, 2048)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(self.n_batch, 512)
        cparams.n_seq_max = 1
        cparams.n_threads = model.n_threads
        cparams.n_threads_batch = model.n_threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # gaze masks need flash attention
        cparams.type_k = KV_TYPES[kv_type]
        cparams.type_v = KV_TYPES[kv_type]
        cparams.no_perf = True
        if eval_callback is not None:  # ggml_backend_sched_eval_callback (profiling: gaze_edge.bench.profile)
            cparams.cb_eval = eval_callback
            self._eval_callback = eval_callback  # the context calls it: keep it alive
        self._ctx = llama_cpp.llama_init_from_model(model._model, cparams)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self._batch = llama_cpp.llama_batch_ext_init(self._ctx)
        if not self._batch:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
            raise RuntimeError("llama.cpp could not make a batch for the context")
        model._sessions.add(self)  # closed with the model

        self.configure(gaze=gaze, keep_regions=keep_regions, keep_ratio=keep_ratio, score_mode=score_mode,
                       gather=gather, trace=trace, n_dense_layers=n_dense_layers)

        self.n_past = 0  # positions used (an M-RoPE image takes fewer positions than cache cells)
        self.n_cells = 0  # KV-cache cells used (what n_ctx bounds)
        self.images: list[SessionImage] = []
        # what the sequence holds, in order: token ids, and a SessionImage for each image chunk;
        # _starts[i] = (position, cells used) before history[i]
        self.history: list[int | SessionImage] = []
        self._starts: list[tuple[int, int]] = []
        self._has_logits = False
        self._n_registered = 0  # image ids are given in registration order, per context
        self._last_step_gazed = False

    @property
    def closed(self) -> bool:
        return not getattr(self, "_ctx", None)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the session is closed (or its model was)")

    # --- settings ----------------------------------------------------------------------------

    def configure(self, *, gaze: bool | None = None, keep_regions: int | None = None,
                  keep_ratio: float | None = None, score_mode: str | None = None, gather: bool | None = None,
                  trace: bool | None = None, n_dense_layers: int | None = None) -> None:
        """Change settings; the next generated token uses them (None keeps a setting). As in
        ``GazeModel.session``: keep_regions > 0 takes precedence over keep_ratio; giving only
        keep_ratio clears keep_regions."""
        self._check_open()
        _check_selection(keep_regions, keep_ratio, score_mode)
        if gaze is not None:
            bindings.llama_gaze_set_enabled(self._ctx, bool(gaze))
        if keep_regions is not None or keep_ratio is not None:
            cur_k, cur_ratio = self.selection()
            k = keep_regions if keep_regions is not None else (0 if keep_ratio is not None else cur_k)
            ratio = keep_ratio if keep_ratio is not None else cur_ratio
            if not bindings.llama_gaze_set_top_k(self._ctx, k, ratio):
                raise ValueError(f"llama.cpp refused keep_regions={k}, keep_ratio={ratio}")
        if score_mode is not None:
            if not bindings.llama_gaze_set_score_mode(self._ctx, gguf_names.SCORE_MODE_IDS[score_mode]):
                raise ValueError(f"llama.cpp refused score_mode={score_mode!r}")
        if n_dense_layers is not None:
            if n_dense_layers < 0:
                raise ValueError(f"n_dense_layers must be >= 0, got {n_dense_layers}")
            # more than the layers: every layer dense (GAZE_SPEC.md "Dense first layers")
            if not bindings.llama_gaze_set_n_dense_layers(self._ctx, min(int(n_dense_layers), self.model.n_layer)):
                raise ValueError(f"n_dense_layers must be in [0, {self.model.n_layer}], got {n_dense_layers}")
        if gather is not None:
            bindings.llama_gaze_set_gather(self._ctx, bool(gather))
        if trace is not None:
            bindings.llama_gaze_set_trace(self._ctx, bool(trace))

    @property
    def gaze(self) -> bool:
        return bool(bindings.llama_gaze_get_enabled(self._ctx))

    def selection(self) -> tuple[int, float]:
        """(keep_regions, keep_ratio) in effect (keep_regions > 0 takes precedence); the C API and
        GAZE_SPEC.md call keep_regions the gaze top_k."""
        k, ratio = ctypes.c_int32(0), ctypes.c_float(0)
        bindings.llama_gaze_get_top_k(self._ctx, ctypes.byref(k), ctypes.byref(ratio))
        return k.value, ratio.value

    @property
    def score_mode(self) -> str:
        names = {v: k for k, v in gguf_names.SCORE_MODE_IDS.items()}
        return names[int(bindings.llama_gaze_get_score_mode(self._ctx))]

    @property
    def n_regions(self) -> int:
        """Regions of the registered images the sequence holds."""
        n = ctypes.c_int32(0)
        bindings.llama_gaze_n_images(self._ctx, SEQ, ctypes.byref(n))
        return n.value

    # --- inputs ------------------------------------------------------------------------------

    def add_text(self, text: str) -> list[int]:
        """Tokenize and evaluate prompt text (dense); BOS first when the sequence is empty and the
        vocabulary wants one. Returns the tokens."""
        self._check_open()
        tokens = self.model.tokenize(text, add_special=self.n_past == 0 and self.model.add_bos)
        self.add_tokens(tokens)
        return tokens

    def add_tokens(self, tokens: list[int]) -> None:
        """Evaluate prompt tokens (dense), in batches of n_batch."""
        for i in range(0, len(tokens), self.n_batch):
            self._decode(tokens[i : i + self.n_batch], generated=False)

    def _record(self, item: int | SessionImage, n_pos: int, n_cells: int) -> None:
        self._starts.append((self.n_past, self.n_cells))
        self.history.append(item)
        self.n_past += n_pos
        self.n_cells += n_cells

    def add_image(self, image, *, keep_embeddings: bool = False) -> SessionImage:
        """Evaluate an image (a path or a PIL image) the way mtmd does: any begin/end-of-image text
        the model uses, the grid, then the context tokens. Returns what was added."""
        self._check_open()
        if not self.model.has_vision:
            raise RuntimeError("this model has no vision projector (mmproj)")
        added = None
        # the model's one mtmd context (encoder and its output buffer) serves every session: hold
        # the model's lock from tokenizing to decoding the embeddings
        with self.model.lock, _image_chunks(self.model._mtmd, image, add_special=self.n_past == 0) as chunks:
            for i, chunk in enumerate(chunks):
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    added = self._eval_image_chunk(chunk, keep_embeddings)
                else:
                    self._eval_text_chunk(chunk, logits=i == len(chunks) - 1)
        if added is None:
            raise RuntimeError("mtmd produced no image chunk")
        return added

    def add_video(self, video, *, fps: float | None = None, max_frames: int | None = None, labels: bool = True,
                  keep_embeddings: bool = False) -> list[SessionImage]:
        """Evaluate a video's sampled frames, each as an image chunk of its own (its own grid
        regions and context tokens; one gaze budget covers the regions of all frames), each
        after its label ("Frame 1 (0.0 s): ", "\\nFrame 2 (0.5 s): ", ... as ``chat`` lays a video
        out; ``labels=False`` adds the frames alone). ``video``: anything
        ``gaze_edge.video.load_video`` takes (a file, a frame list, a Video), sampled with
        ``fps`` / ``max_frames``. Checks that every frame fits the context before evaluating any
        (ContextOverflowError with the numbers). Returns the frames' SessionImages."""
        from gaze_edge.images import image_key
        from gaze_edge.video import frame_texts, load_video

        self._check_open()
        clip = load_video(video, fps=fps, max_frames=max_frames)
        texts = frame_texts(clip) if labels else [""] * len(clip)
        bos = self.n_past == 0 and self.model.add_bos  # as add_text: BOS first in an empty sequence
        label_tokens = [self.model.tokenize(t, add_special=bos and i == 0) if t else [] for i, t in enumerate(texts)]
        cells_per_size: dict[tuple[int, int], int] = {}
        for frame in clip.frames:  # the frames of a file share one size: tokenize one of each
            if frame.size not in cells_per_size:
                cells_per_size[frame.size] = self.model.image_footprint(frame, key=image_key(frame))[0]
        need = sum(cells_per_size[f.size] for f in clip.frames) + sum(len(t) for t in label_tokens)
        if self.n_cells + need > self.n_ctx:
            raise ContextOverflowError(
                f"the video's {len(clip)} frames need {need} context cells (with their labels), the context "
                f"({self.n_ctx}) has {self.n_ctx - self.n_cells} left; use a larger context or fewer frames"
            )
        added = []
        for tokens, frame in zip(label_tokens, clip.frames, strict=True):
            self.add_tokens(tokens)
            added.append(self.add_image(frame, keep_embeddings=keep_embeddings))
        return added

    def _eval_text_chunk(self, chunk, logits: bool) -> None:
        n = ctypes.c_size_t(0)
        ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
        tokens = [ptr[j] for j in range(n.value)]
        if tokens:
            self.add_tokens(tokens)
            self._has_logits = logits

    def _eval_image_chunk(self, chunk, keep_embeddings: bool) -> SessionImage:
        mtmd_p = self.model._mtmd
        image_tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)
        n_tokens = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))  # cache cells
        if self.n_cells + n_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"the image needs {n_tokens} context cells, the context ({self.n_ctx}) has "
                f"{self.n_ctx - self.n_cells} left; use a larger context or fewer images"
            )
        if mtmd_cpp.mtmd_encode_chunk(mtmd_p, chunk) != 0:
            raise RuntimeError("mtmd could not encode the image")
        embd = mtmd_cpp.mtmd_get_output_embd(mtmd_p)
        embeddings = None
        if keep_embeddings:
            n_embd = int(llama_cpp.llama_model_n_embd_inp(self.model._model))
            embeddings = np.ctypeslib.as_array(embd, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()

        n_before = bindings.llama_gaze_n_images(self._ctx, SEQ, None)
        new_n_past = llama_cpp.llama_pos(0)
        ret = mtmd_cpp.mtmd_helper_decode_image_chunk(
            mtmd_p, self._ctx, chunk, embd, self.n_past, SEQ, self.n_batch, ctypes.byref(new_n_past),
            mtmd_cpp.mtmd_helper_post_decode_callback(), None,  # no callback (a NULL function pointer)
        )
        if ret != 0:
            raise RuntimeError(f"could not decode the image (error {ret})")
        registered = bindings.llama_gaze_n_images(self._ctx, SEQ, None) > n_before

        nx, ny = ctypes.c_int32(0), ctypes.c_int32(0)
        bindings.mtmd_image_tokens_get_grid(image_tokens, ctypes.byref(nx), ctypes.byref(ny))
        rw, rh = ctypes.c_int32(0), ctypes.c_int32(0)
        has_regions = bindings.mtmd_gaze_get_params(mtmd_p, ctypes.byref(rw), ctypes.byref(rh), None)
        grid = (ny.value, nx.value)
        region = (rh.value, rw.value) if has_regions else None
        n_regions = math.ceil(grid[0] / region[0]) * math.ceil(grid[1] / region[1]) if region and nx.value else 0

        image = SessionImage(
            id=self._n_registered if registered else -1,
            pos=self.n_past,
            grid=grid,
            region=region,
            n_regions=n_regions if registered else 0,
            n_context_tokens=int(bindings.mtmd_image_tokens_get_n_ctx_tokens(image_tokens)),
            embeddings=embeddings,
        )
        self._n_registered += int(registered)
        self.images.append(image)
        self._record(image, int(new_n_past.value) - self.n_past, n_tokens)
        self._has_logits = False
        return image

    # --- decoding ----------------------------------------------------------------------------

    def _decode(self, tokens: list[int], generated: bool) -> None:
        self._check_open()
        if self.n_cells + len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"the context is full: {self.n_cells + len(tokens)} cells needed, {self.n_ctx} in the context"
            )
        batch = self._batch
        llama_cpp.llama_batch_ext_clear(batch)
        pos = llama_cpp.llama_pos(0)
        idx = -1
        for i, t in enumerate(tokens):
            idx = llama_cpp.llama_batch_ext_add_token(batch, SEQ, int(t))
            if idx < 0:
                raise RuntimeError(f"could not add token {t} to the batch ({idx})")
            pos.value = self.n_past + i
            if not llama_cpp.llama_batch_ext_set_pos(batch, idx, ctypes.byref(pos)):
                raise RuntimeError(f"could not set the position of token {t} in the batch")
        if not llama_cpp.llama_batch_ext_set_output_logits(batch, idx, True):
            raise RuntimeError("could not ask for the logits of the batch's last token")
        bindings.llama_gaze_set_generated(self._ctx, generated)
        try:
            ret = llama_cpp.llama_process(self._ctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch)
        finally:
            bindings.llama_gaze_set_generated(self._ctx, False)
        if ret != 0:
            raise RuntimeError(f"llama_process failed ({ret})")
        for t in tokens:
            self._record(int(t), 1, 1)
        self._has_logits = True
        self._last_step_gazed = generated

    def logits(self) -> np.ndarray:
        """(n_vocab,) float32 logits at the last position (a copy)."""
        self._check_open()
        if not self._has_logits:
            raise RuntimeError("no logits: the last input was an image (add text after it)")
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def append(self, token: int) -> np.ndarray:
        """Evaluate a token the model generated (gaze applies) and return the logits after it."""
        self._decode([int(token)], generated=True)
        return self.logits()

    def rewind(self, n_tokens: int = 1) -> None:
        """Remove the last ``n_tokens`` tokens from the sequence (and the cache); images cannot be
        cut. The logits are gone until the next input."""
        if n_tokens < 0 or n_tokens > len(self.history):
            raise ValueError(f"cannot rewind {n_tokens} tokens")
        if n_tokens == 0:
            return
        tail = self.history[-n_tokens:]
        if any(isinstance(item, SessionImage) for item in tail):
            raise ValueError(f"the last {n_tokens} items include an image; only tokens can be rewound")
        self.truncate(len(self.history) - n_tokens)

    def truncate(self, n_items: int) -> None:
        """Keep the first ``n_items`` items of ``history`` (tokens and images) and remove the rest
        from the sequence and the cache; images after the cut leave the gaze registry with their
        cells (llama_memory_seq_rm), images before it keep their regions and descriptors. The
        logits are gone until the next input."""
        self._check_open()
        if not 0 <= n_items <= len(self.history):
            raise ValueError(f"cannot keep {n_items} of {len(self.history)} items")
        if n_items == len(self.history):
            return
        pos, cells = self._starts[n_items]
        mem = llama_cpp.llama_get_memory(self._ctx)
        if not llama_cpp.llama_memory_seq_rm(mem, SEQ, pos, -1):
            raise RuntimeError("llama.cpp could not remove the tokens from the cache")
        removed = {id(item) for item in self.history[n_items:] if isinstance(item, SessionImage)}
        self.images = [im for im in self.images if id(im) not in removed]
        del self.history[n_items:]
        del self._starts[n_items:]
        self.n_past, self.n_cells = pos, cells
        self._has_logits = False
        self._last_step_gazed = False

    # --- saved state -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> bytes:
        """The session's state (KV cells, tokens, images and their gaze regions) as bytes; also
        written to ``path`` when given (atomically). ``load`` restores it, gaze included."""
        from gaze_edge.files import write_atomic
        from gaze_edge.runtime import saved

        data = saved.dump(self)
        if path is not None:
            write_atomic(path, data)
        return data

    def load(self, data_or_path: bytes | str | os.PathLike) -> None:
        """Replace what this session holds with a saved state (bytes or a file from ``save``) of
        the same model; the images are registered again, so the next generated token gazes as in
        the uninterrupted session. The logits come back with the next input."""
        from gaze_edge.runtime import saved

        data = data_or_path if isinstance(data_or_path, bytes | bytearray) else Path(data_or_path).read_bytes()
        saved.restore(self, bytes(data))

    # --- trace -------------------------------------------------------------------------------

    def trace(self) -> StepTrace | None:
        """The regions selected at the last ``append``; None when that step was dense (gaze off,
        no registered image, or the last input was not a generated token)."""
        if not self._last_step_gazed:
            return None
        images = {img.id: img for img in self.images if img.id >= 0}
        offset, r0 = {}, 0
        for img in sorted(images.values(), key=lambda im: im.pos):
            offset[img.id] = r0
            r0 += img.n_regions
        n_layer = self.model.n_layer
        n_dense = min(int(bindings.llama_gaze_get_n_dense_layers(self._ctx)), n_layer)
        per_layer = []
        for il in range(n_dense, n_layer):
            n_head = ctypes.c_int32(0)
            k = bindings.llama_gaze_get_trace(self._ctx, il, ctypes.byref(n_head), None, None, 0)
            if k == 0:
                return None
            n = k * n_head.value
            ids, regs = (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
            bindings.llama_gaze_get_trace(self._ctx, il, ctypes.byref(n_head), ids, regs, n)
            if any(i not in offset for i in ids):
                raise RuntimeError("the trace names an image this session does not know")
            sel = np.array([offset[i] + r for i, r in zip(ids, regs, strict=True)], dtype=np.int64)
            sel = np.sort(sel.reshape(n_head.value, k), axis=-1)
            if n_head.value == 1:  # layer_mean: one selection for every KV head
                sel = np.repeat(sel, self.model.n_head_kv, axis=0)
            per_layer.append(sel)
        sizes = np.concatenate([img.region_sizes() for img in sorted(images.values(), key=lambda im: im.pos)])
        if not per_layer:  # every layer dense: a trace with no rows
            k = 0
            selected = np.zeros((0, self.model.n_head_kv, 0), dtype=np.int64)
        else:
            k, selected = int(per_layer[0].shape[-1]), np.stack(per_layer)
        return StepTrace(selected, k, r0, sizes, self.model.n_head_kv, n_dense)

    # --- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_batch", None):
            llama_cpp.llama_batch_ext_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> GazeSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _check_selection(keep_regions: int | None, keep_ratio: float | None, score_mode: str | None) -> None:
    if keep_regions is not None and keep_regions < 0:
        raise ValueError(f"keep_regions must be >= 0, got {keep_regions}")
    if keep_ratio is not None and not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if score_mode is not None and score_mode not in gguf_names.SCORE_MODE_IDS:
        raise ValueError(f"score_mode must be one of {sorted(gguf_names.SCORE_MODE_IDS)}, got {score_mode!r}")


@contextlib.contextmanager
def _image_chunks(mtmd_p, image, add_special: bool):
    """mtmd's chunks (a list) for one image (a path or a PIL image) and the text mtmd puts around it."""
    bitmap = _bitmap(image)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        text = mtmd_cpp.mtmd_input_text()
        marker = mtmd_cpp.mtmd_default_marker()
        text.text = marker
        text.text_len = len(marker)
        text.add_special = add_special
        text.parse_special = True
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        ret = mtmd_cpp.mtmd_tokenize(mtmd_p, chunks, ctypes.byref(text), bitmaps, 1)
        if ret != 0:
            raise RuntimeError(f"mtmd could not tokenize the image (error {ret})")
        yield [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)


def image_positions(model, image) -> int:
    """Positions ``image`` takes in a sequence (its grid, context tokens and any text mtmd puts
    around it), without encoding it."""
    return image_footprint(model, image)[1]


def image_footprint(model, image) -> tuple[int, int]:
    """(KV-cache cells, positions) ``image`` takes in a sequence, with any text mtmd puts around
    it, without encoding it. They differ for M-RoPE models: a grid of nx x ny tokens takes
    nx * ny cells but only max(nx, ny) positions."""
    if not model.has_vision:
        raise RuntimeError("this model has no vision projector (mmproj)")
    with model.lock, _image_chunks(model._mtmd, image, add_special=False) as chunks:
        cells = sum(int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(c)) for c in chunks)
        return cells, sum(int(mtmd_cpp.mtmd_input_chunk_get_n_pos(c)) for c in chunks)


def _bitmap(image):
    """An mtmd bitmap (RGB) from anything ``gaze_edge.images.load_image`` takes."""
    from gaze_edge.images import load_image

    rgb = load_image(image)
    data = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    buf = (ctypes.c_uint8 * data.size).from_buffer_copy(data.tobytes())
    bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.width, rgb.height, buf)
    if not bitmap:
        raise RuntimeError("mtmd could not make a bitmap")
    return bitmap
