"""Decode speed, dense vs gaze, on one prefilled cache per visual-token count.

For each target count of visual tokens (ascending), the session is extended with more images (the
GazeScenes test scenes, through mtmd like any user image) up to the target, then closed with a
line of text. Prefill is timed per increment. Then every mode decodes on that same cache: a step
appends one generated token and rewinds it. Modes run in rounds (the machine's speed drifts over
minutes): per round and mode one untimed step (the graph is rebuilt when settings change; this step
also records the trace for the visual-KV fraction), then ``per_round`` timed steps, as in a real
generation where consecutive steps reuse the graph. Reported per mode: the median step time, its
ratio to dense, the visual KV fraction, the bytes the step must read and the bandwidth bound
(gaze_edge.bench.bandwidth), and the process's peak RSS after the row.

The attention share of a dense step is (dense step - text-only step) / dense step, the text-only
step being a step of the same model over a short text-only cache, timed in the same run.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

from gaze_edge.bench.bandwidth import kv_bytes_per_cell, read_bandwidth, step_bytes
from gaze_edge.errors import GazeEdgeError

PROMPT_HEAD = "USER: "
PROMPT_TAIL = "\nDescribe the images.\nASSISTANT:"
STEP_TOKEN_TEXT = " top"  # the token every timed step appends (any token of the vocabulary would do)


@dataclass
class ModeResult:
    mode: str  # "dense", "gaze 0.25" (mask mode) or "gaze 0.25 gather"
    keep_ratio: float | None
    gather: bool
    decode_ms: float  # median
    decode_ms_spread: tuple[float, float]  # 25th and 75th percentiles
    vs_dense: float  # decode_ms / dense decode_ms
    visual_kv_fraction: float
    step_mb: float  # MB one step must read
    bound_ms: float  # step_mb / bandwidth
    x_bound: float  # decode_ms / bound_ms
    n_steps: int
    profile_ms: dict[str, float] | None = None  # --profile: ms per step per group (gaze_edge.bench.profile)
    # what gazing costs beyond the attention it keeps: decode_ms - text-only step - visual KV fraction x
    # dense attention (dense step - text-only step); None for the dense row
    overhead_ms: float | None = None
    n_nodes: int | None = None  # --profile: graph nodes computed per step (views and reshapes excluded)


@dataclass
class Row:
    visual_tokens: int  # grid tokens of all images
    n_images: int
    cached_tokens: int
    n_regions: int
    prefill_s: float  # for this row's increment
    prefill_tokens: int
    attention_share: float  # of a dense step
    peak_rss_mb: float
    modes: list[ModeResult] = field(default_factory=list)


@dataclass
class SpeedReport:
    model: str
    arch: str
    n_layer: int
    weights_mb: float
    kv_type: str
    threads: int
    restrict: str  # how gaze restricts attention: "mask", "gather" or "both" (each gaze ratio twice)
    bandwidth_gbs: float
    text_only_ms: float
    profiled: bool = False  # steps were timed node by node: slower, not comparable with unprofiled runs
    rows: list[Row] = field(default_factory=list)
    score_mode: str | None = None  # the gaze rows' score mode (None: the model's)
    n_dense_layers: int | None = None  # the gaze rows' dense first layers (None: the model's)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SpeedReport:
        def mode(m: dict) -> ModeResult:
            return ModeResult(**{**m, "decode_ms_spread": tuple(m["decode_ms_spread"])})

        rows = [Row(**{**r, "modes": [mode(m) for m in r["modes"]]}) for r in data["rows"]]
        return cls(**{**data, "rows": rows})


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _scene_images(n: int, start: int):
    from gaze_edge.scenes import render, split_scenes

    return [render(s) for s in split_scenes("test", n, start=start)]


class _Stepper:
    """Times generated-token steps on a session without changing what it holds."""

    def __init__(self, session, token: int) -> None:
        self.s = session
        self.token = token

    def step(self, trace: bool = False) -> tuple[float, object]:
        self.s.configure(trace=trace)
        t0 = time.perf_counter()
        self.s.append(self.token)
        dt = time.perf_counter() - t0
        tr = self.s.trace() if trace else None
        self.s.rewind(1)
        return dt, tr


def text_only_ms(model, token: int, n_steps: int) -> float:
    """Median ms of a generated-token step over a short text-only cache."""
    with model.session(gaze=False, n_ctx=256, trace=False) as s:
        s.add_text(PROMPT_HEAD + "Describe the shapes." + PROMPT_TAIL)
        st = _Stepper(s, token)
        st.step()
        return 1e3 * statistics.median(st.step()[0] for _ in range(n_steps))


def run(model, visual: list[int], ratios: list[float], *, rounds: int = 4, per_round: int = 3,
        kv_type: str = "f16", restrict: str = "mask", bandwidth: float | None = None, profile: bool = False,
        score_mode: str | None = None, n_dense_layers: int | None = None, frames: bool = False,
        progress=None) -> SpeedReport:
    """Benchmark ``model`` (a loaded GazeModel with a projector) at each visual-token count.

    frames: ``visual`` counts images (video frames: each its own grid and context tokens, one gaze
      budget over all), not visual tokens.

    score_mode / n_dense_layers: the gaze rows' selection options (GAZE_SPEC.md; None: the model's),
    to time what an option costs per step.
    profile: time every graph node too (gaze_edge.bench.profile); steps get slower.
    progress: a callable taking a line of text (None: quiet).
    """
    say = progress or (lambda _line: None)
    if restrict not in ("mask", "gather", "both"):
        raise ValueError(f"restrict must be mask, gather or both, got {restrict!r}")
    if not model.has_vision:
        raise GazeEdgeError(f"{model.files.model.name} has no vision projector (mmproj): nothing to gaze at")
    visual = sorted(set(visual))
    probe = _scene_images(1, 0)[0]
    per_image_pos = model.image_positions(probe)
    token = model.tokenize(STEP_TOKEN_TEXT)[-1]

    say("timing a text-only step")
    base_ms = text_only_ms(model, token, n_steps=rounds * per_round)

    weights = model.size_bytes()
    head_dim = model.n_embd // model.n_head
    cell_bytes = kv_bytes_per_cell(model.n_layer, model.n_head_kv, head_dim, kv_type)
    report = SpeedReport(
        model=model.files.model.name, arch=model.arch, n_layer=model.n_layer, weights_mb=weights / 1e6,
        kv_type=kv_type, threads=model.n_threads, restrict=restrict, bandwidth_gbs=0.0,
        text_only_ms=base_ms, profiled=profile, score_mode=score_mode, n_dense_layers=n_dense_layers,
    )
    profiler = None
    if profile:
        from gaze_edge.bench.profile import NodeProfiler

        profiler = NodeProfiler()

    # every scene image takes the same positions; its grid is at most those minus the context tokens
    grid_max = per_image_pos - model.gaze_defaults().n_context_tokens
    n_ctx = 256 + ((visual[-1] if frames else math.ceil(visual[-1] / grid_max)) + 2) * per_image_pos
    session = model.session(gaze=True, n_ctx=n_ctx, kv_type=kv_type, trace=False, score_mode=score_mode,
                            n_dense_layers=n_dense_layers, eval_callback=profiler.callback if profiler else None)
    n_images = grid_tokens = 0
    tail: list[int] = []
    try:
        session.add_text(PROMPT_HEAD)
        for target in visual:
            session.rewind(len(tail))  # the closing text goes after the new images
            t0, p0 = time.perf_counter(), session.n_past
            while (n_images < target) if frames else (grid_tokens < target or n_images == 0):
                img = session.add_image(_scene_images(1, n_images)[0])
                n_images += 1
                grid_tokens += img.grid[0] * img.grid[1]
                say(f"  prefill: image {n_images}, {grid_tokens} visual tokens, {session.n_past} positions")
            tail = session.add_text(PROMPT_TAIL)
            row = Row(visual_tokens=grid_tokens, n_images=n_images, cached_tokens=session.n_past,
                      n_regions=session.n_regions, prefill_s=time.perf_counter() - t0,
                      prefill_tokens=session.n_past - p0, attention_share=0.0, peak_rss_mb=0.0)
            say(f"decoding at {grid_tokens} visual tokens ({session.n_past} cached)")
            _time_modes(session, token, row, ratios, rounds, per_round, report, cell_bytes, head_dim, profiler)
            row.peak_rss_mb = _peak_rss_mb()
            report.rows.append(row)
    finally:
        session.close()
    # last: its buffer would otherwise be the peak RSS of every row
    say(f"measuring the read bandwidth with {model.n_threads} threads")
    report.bandwidth_gbs = (bandwidth or read_bandwidth(model.n_threads)) / 1e9
    for row in report.rows:
        for m in row.modes:
            m.bound_ms = 1e3 * m.step_mb * 1e6 / (report.bandwidth_gbs * 1e9)
            m.x_bound = m.decode_ms / m.bound_ms
    return report


def _time_modes(session, token, row: Row, ratios, rounds, per_round, report: SpeedReport, cell_bytes, head_dim,
                profiler=None):
    stepper = _Stepper(session, token)
    gathers = {"mask": [False], "gather": [True], "both": [False, True]}[report.restrict]
    modes: list[tuple[float | None, bool]] = [(None, False)] + [(r, g) for r in ratios for g in gathers]
    times: dict[tuple, list[float]] = {m: [] for m in modes}
    groups: dict[tuple, dict[str, float]] = {m: {} for m in modes}
    fractions: dict[tuple, float] = {(None, False): 1.0}
    nodes: dict[tuple, int] = {}
    for _ in range(rounds):
        for m in modes:
            ratio, gather = m
            if ratio is None:
                session.configure(gaze=False, gather=False)
            else:
                session.configure(gaze=True, keep_ratio=ratio, gather=gather)
            _, tr = stepper.step(trace=ratio is not None)  # untimed: rebuilds the graph
            if ratio is not None:
                fractions[m] = tr.visual_kv_fraction() if tr is not None else 1.0
            if profiler:
                profiler.reset()
            times[m] += [stepper.step()[0] for _ in range(per_round)]
            if profiler:
                for g, sec in profiler.groups().items():
                    groups[m][g] = groups[m].get(g, 0.0) + sec
                nodes[m] = profiler.n_nodes() // per_round
    dense_ms = 1e3 * statistics.median(times[(None, False)])
    row.attention_share = max(0.0, (dense_ms - report.text_only_ms) / dense_ms)
    dense_attention_ms = dense_ms - report.text_only_ms
    n_text = row.cached_tokens + 1 - row.visual_tokens  # text, context tokens and the new token
    descriptors = row.n_regions * head_dim * session.model.n_head_kv * 4 * session.model.n_layer
    for m in modes:
        ratio, gather = m
        ms = 1e3 * statistics.median(times[m])
        frac = fractions[m]
        nbytes = step_bytes(
            int(report.weights_mb * 1e6), n_text + frac * row.visual_tokens, cell_bytes,
            0 if ratio is None else descriptors,
        )
        name = "dense" if ratio is None else f"gaze {ratio:g}" + (" gather" if gather else "")
        row.modes.append(ModeResult(
            mode=name, keep_ratio=ratio, gather=gather, decode_ms=ms,
            decode_ms_spread=(1e3 * _percentile(times[m], 0.25), 1e3 * _percentile(times[m], 0.75)),
            vs_dense=ms / dense_ms, visual_kv_fraction=frac, step_mb=nbytes / 1e6, bound_ms=0.0,
            x_bound=0.0, n_steps=len(times[m]),  # bound: once the bandwidth is measured
            profile_ms=_per_step(groups[m], times[m]) if profiler else None,
            overhead_ms=None if ratio is None else ms - report.text_only_ms - frac * dense_attention_ms,
            n_nodes=nodes.get(m),
        ))


def _per_step(groups: dict[str, float], times: list[float]) -> dict[str, float]:
    n = len(times)
    out = {g: 1e3 * sec / n for g, sec in groups.items()}
    out["per-node overhead"] = max(0.0, 1e3 * sum(times) / n - sum(out.values()))
    return out


def format_table(report: SpeedReport) -> str:
    r = report
    lines = [
        f"model {r.model} ({r.arch}, {r.n_layer} layers, {r.weights_mb:.0f} MB of weights), KV {r.kv_type}, "
        f"{r.threads} threads, gaze restricts attention by {r.restrict.replace('both', 'mask and by gather')}"
        + (f", score mode {r.score_mode}" if r.score_mode else "")
        + (f", first {r.n_dense_layers} layers dense" if r.n_dense_layers else ""),
        f"read bandwidth {r.bandwidth_gbs:.1f} GB/s (measured); text-only step {r.text_only_ms:.1f} ms",
        "",
        f"{'images':>6} {'visual':>7} {'cached':>7} {'prefill':>16} {'mode':>16} {'ms/token':>9} {'vs dense':>8} "
        f"{'visual KV':>9} {'overhead':>8} {'MB/step':>8} {'bound ms':>8} {'x bound':>7} {'attn':>5} {'peak RSS':>9}",
    ]
    for row in r.rows:
        for i, m in enumerate(row.modes):
            first = i == 0
            prefill = f"{row.prefill_s:.1f} s {row.prefill_tokens / max(row.prefill_s, 1e-9):.0f} t/s" if first else ""
            lines.append(
                f"{row.n_images if first else '':>6} {row.visual_tokens if first else '':>7} "
                f"{row.cached_tokens if first else '':>7} {prefill:>16} "
                f"{m.mode:>16} {m.decode_ms:>9.1f} {m.vs_dense:>7.2f}x {100 * m.visual_kv_fraction:>8.1f}% "
                f"{(f'{m.overhead_ms:.1f}' if m.overhead_ms is not None else ''):>8} {m.step_mb:>8.0f} {m.bound_ms:>8.1f} {m.x_bound:>6.2f}x "
                f"{(f'{100 * row.attention_share:.0f}%' if first else ''):>5} "
                f"{(f'{row.peak_rss_mb:.0f} MB' if first else ''):>9}"
            )
    if r.profiled:
        lines += ["", "profiled (each node timed on its own: slower than above; ms per step):"]
        for row in r.rows:
            for m in row.modes:
                parts = ", ".join(f"{g} {ms:.1f}" for g, ms in (m.profile_ms or {}).items())
                lines.append(f"{row.visual_tokens:>7} {m.mode:>16}: {parts}; {m.n_nodes} nodes")
    lines.append("")
    lines.append("ms/token: median decode step; vs dense: ratio to the dense step on the same cache; visual KV: grid "
                 "tokens read / all grid tokens; overhead: ms/token - text-only step - visual KV x dense attention "
                 "(what gazing costs beyond the attention it keeps); bound: MB/step over the read bandwidth; "
                 "attn: share of the dense "
                 "step spent on attention (dense - text-only step); peak RSS: the process's, up to that row.")
    return "\n".join(lines)
