"""A GazeSession saved to bytes or a file, and restored with its gaze registry.

llama.cpp's ``llama_state_seq_get_data`` saves the sequence's KV cells but not the gaze registry
(RUNTIME.md: a state load forgets every image, so decode would be dense). The saved form keeps
what the session knows besides the cells (its history: tokens and images with their grids and
regions) and, on load, registers every image again with ``llama_gaze_add_image``; the runtime
then recomputes the descriptors from the restored keys, so the next steps equal the uninterrupted
session's.

Layout: ``MAGIC``, a little-endian u32 length, that many bytes of JSON (the session's metadata),
then llama.cpp's sequence state.
"""

from __future__ import annotations

import ctypes
import json
import struct

from gaze_edge.errors import GazeEdgeError
from gaze_edge.runtime import bindings

llama_cpp = bindings._llama_cpp

MAGIC = b"GAZESESS1\n"
FORMAT = 1


class SavedStateError(GazeEdgeError):
    """Saved session state that cannot be restored (corrupt, or from another model or context)."""


def dump(session) -> bytes:
    """The session as bytes (see the module docstring)."""
    from gaze_edge.runtime.session import SEQ

    session._check_open()
    history = [item if isinstance(item, int) else {
        "pos": item.pos, "grid": list(item.grid), "region": list(item.region) if item.region else None,
        "n_regions": item.n_regions, "n_context_tokens": item.n_context_tokens, "registered": item.id >= 0,
    } for item in session.history]
    meta = {
        "format": FORMAT, "model": session.model.files.model.name, "n_vocab": session.model.n_vocab,
        "n_layer": session.model.n_layer, "n_ctx": session.n_ctx, "n_past": session.n_past,
        "n_cells": session.n_cells, "history": history, "starts": session._starts,
    }
    size = llama_cpp.llama_state_seq_get_size(session._ctx, SEQ)
    buf = (ctypes.c_uint8 * max(1, size))()
    written = llama_cpp.llama_state_seq_get_data(session._ctx, buf, size, SEQ)
    if written != size:
        raise RuntimeError(f"llama.cpp saved {written} of {size} bytes of the sequence state")
    header = json.dumps(meta, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + bytes(buf[:size])


def restore(session, data: bytes) -> None:
    """Replace what ``session`` holds with the saved ``data`` (same model, a context as large)."""
    from gaze_edge.runtime.session import SEQ, SessionImage

    session._check_open()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise SavedStateError("not a saved gaze-edge session")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        meta = json.loads(data[start:start + n])
    except ValueError:
        raise SavedStateError("the saved session's metadata is corrupt") from None
    model = session.model
    if meta.get("format") != FORMAT:
        raise SavedStateError(f"saved session format {meta.get('format')!r}, this version reads {FORMAT}")
    if (meta["model"], meta["n_vocab"], meta["n_layer"]) != (model.files.model.name, model.n_vocab, model.n_layer):
        raise SavedStateError(f"the session was saved with model {meta['model']}, not {model.files.model.name}")
    if meta["n_cells"] > session.n_ctx:
        raise SavedStateError(f"the saved session holds {meta['n_cells']} cells, the context {session.n_ctx}")
    state = data[start + n:]
    session.truncate(0)
    buf = (ctypes.c_uint8 * max(1, len(state))).from_buffer_copy(state or b"\0")
    if len(state) and llama_cpp.llama_state_seq_set_data(session._ctx, buf, len(state), SEQ) != len(state):
        session.truncate(0)
        raise SavedStateError("llama.cpp refused the saved sequence state (corrupt, or another model?)")
    history, images = [], []
    for item in meta["history"]:
        if isinstance(item, int):
            history.append(item)
            continue
        image_id = -1
        if item["registered"]:
            (rh, rw), (ny, nx) = item["region"], item["grid"]
            desc = bindings.llama_gaze_image(SEQ, item["pos"], nx, ny, rw, rh)
            image_id = bindings.llama_gaze_add_image(session._ctx, ctypes.byref(desc))
            if image_id < 0:
                session.truncate(0)
                raise SavedStateError(f"the runtime refused to register a saved image ({image_id})")
            session._n_registered = image_id + 1
        image = SessionImage(id=image_id, pos=item["pos"], grid=tuple(item["grid"]),
                             region=tuple(item["region"]) if item["region"] else None,
                             n_regions=item["n_regions"], n_context_tokens=item["n_context_tokens"])
        history.append(image)
        images.append(image)
    session.history, session.images = history, images
    session._starts = [tuple(s) for s in meta["starts"]]
    session.n_past, session.n_cells = meta["n_past"], meta["n_cells"]
    session._has_logits = False
    session._last_step_gazed = False
