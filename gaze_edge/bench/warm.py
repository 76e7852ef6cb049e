"""Turn 2 of a conversation, warm vs cold: what the prefix cache saves, measured.

Protocol (issue 12, "Proven, not assumed"): turn 1 is a user message with N GazeScenes test images
and "Describe the image(s).", answered greedily; turn 2 is the same messages, the assistant's
answer (stripped, as ``gaze-edge chat`` keeps it) and a follow-up question. *Cold* answers the whole turn-2 message list in a fresh
conversation (every cell evaluated, images encoded again); *warm* is the conversation that
answered turn 1 answering turn 2, so only what is new is evaluated (with gaze, the answer's
tokens are new too: their K/V came from a restricted attention, GAZE_SPEC.md "Warm
conversations").

Each round starts new conversations and times both, alternating which goes first (the machine's
speed drifts); reported are the medians of ``prompt_seconds``, their ratio, the tokens of the
turn-2 prompt and those the warm call reused, and whether warm and cold answered with the same
text in every round. The target is a warm turn 2 costing at most 5% of the cold evaluation.

    python -m gaze_edge.bench.warm                                   # embedded model, 1 image
    python -m gaze_edge.bench.warm --shape qwen2-0.5b --images 4 --rounds 2
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field

import click

from gaze_edge.errors import GazeEdgeError

TARGET = 0.05  # a warm turn 2 costs at most this share of the cold evaluation
FOLLOW_UP = "Which shapes are red?"


def describe_prompt(n_images: int) -> str:
    return "Describe the image." if n_images == 1 else "Describe the images."


@dataclass
class Turn2:
    """One round's turn 2, timed once cold and once warm."""

    cold_prompt_seconds: float
    warm_prompt_seconds: float
    cold_text: str
    warm_text: str
    warm_first: bool  # which of the two ran first this round


@dataclass
class WarmReport:
    model: str
    arch: str
    n_layer: int
    n_images: int
    n_ctx: int
    gaze: bool  # generated tokens gazed (then the turn-1 answer is evaluated again when warm)
    threads: int
    cpu: str  # lscpu's "Model name"
    logical_cpus: int
    load_average: tuple[float, float, float]  # 1, 5 and 15 minutes, before the first round
    load_average_after: tuple[float, float, float]
    max_tokens: int
    turn1_prompt_tokens: int
    turn1_prompt_seconds: float  # median over rounds (a cold evaluation of turn 1)
    turn1_text: str
    prompt_tokens: int  # of turn 2 (same cold and warm)
    cold_cached_tokens: int  # 0: a fresh conversation holds nothing
    warm_cached_tokens: int  # of prompt_tokens, reused from turn 1
    cold_prompt_seconds: float  # medians over rounds
    warm_prompt_seconds: float
    warm_vs_cold: float  # warm_prompt_seconds / cold_prompt_seconds
    target: float
    target_met: bool
    same_text: bool  # warm and cold turn-2 answers equal in every round
    rounds: list[Turn2] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> WarmReport:
        tuples = {k: tuple(data[k]) for k in ("load_average", "load_average_after")}
        return cls(**{**data, **tuples, "rounds": [Turn2(**t) for t in data["rounds"]]})


def cpu_name() -> str:
    """The CPU's model name as lscpu prints it (else /proc/cpuinfo's, else platform's)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _load_average() -> tuple[float, float, float]:
    try:
        a, b, c = os.getloadavg()
        return (round(a, 2), round(b, 2), round(c, 2))
    except OSError:
        return (float("nan"),) * 3


def scene_images(n: int):
    from gaze_edge.scenes import render, split_scenes

    return [render(s) for s in split_scenes("test", n)]


def turn1_messages(images) -> list[dict]:
    content = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": describe_prompt(len(images))}]}]


def turn2_messages(images, answer: str) -> list[dict]:
    """Turn 1, its answer and the follow-up. The answer is stripped, as ``gaze-edge chat`` keeps it
    (its leading space would otherwise follow the template's "ASSISTANT: ", and its tokens would
    not match those generated)."""
    return turn1_messages(images) + [
        {"role": "assistant", "content": answer.strip()},
        {"role": "user", "content": FOLLOW_UP},
    ]


def context_for(model, images, max_tokens: int) -> int:
    """Cells enough for both turns: the images, the text and two answers, in whole 1024s, at least
    the model's default context."""
    need = sum(model.image_positions(im) for im in images) + 256 + 2 * max_tokens
    return max(model.default_n_ctx(), 1024 * math.ceil(need / 1024))


def run(model, *, n_images: int = 1, rounds: int = 3, max_tokens: int = 32, n_ctx: int | None = None,
        gaze: bool | None = None, progress=None) -> WarmReport:
    """Time turn 2 cold and warm on ``model`` (a loaded GazeModel with a projector), ``rounds`` times.

    gaze: None: the model's own setting (on for gaze models); False: dense.
    progress: a callable taking a line of text (None: quiet).
    """
    say = progress or (lambda _line: None)
    if not model.has_vision:
        raise GazeEdgeError(f"{model.files.model.name} has no vision projector (mmproj): it cannot take images")
    if n_images < 1 or rounds < 1 or max_tokens < 1:
        raise GazeEdgeError("images, rounds and max_tokens must each be >= 1")
    images = scene_images(n_images)
    n_ctx = n_ctx or context_for(model, images, max_tokens)
    options = {"max_tokens": max_tokens, "temperature": 0.0, "gaze": gaze}
    load_before = _load_average()
    turn1_s: list[float] = []
    done: list[Turn2] = []
    turn1 = cold = warm = None
    for r in range(rounds):
        warm_first = r % 2 == 1
        with model.conversation(n_ctx=n_ctx) as conv, model.conversation(n_ctx=n_ctx) as fresh:
            say(f"round {r + 1}/{rounds}: turn 1 ({n_images} image(s))")
            turn1 = conv.chat(turn1_messages(images), **options)
            turn1_s.append(turn1.prompt_seconds)
            messages = turn2_messages(images, turn1.text)
            for which in (("warm", "cold") if warm_first else ("cold", "warm")):
                say(f"round {r + 1}/{rounds}: turn 2 {which}")
                if which == "warm":
                    warm = conv.chat(messages, **options)
                else:
                    cold = fresh.chat(messages, **options)
        done.append(Turn2(cold.prompt_seconds, warm.prompt_seconds, cold.text, warm.text, warm_first))
        if cold.n_prompt_tokens != warm.n_prompt_tokens:
            raise RuntimeError(f"turn 2 has {cold.n_prompt_tokens} tokens cold but {warm.n_prompt_tokens} warm")
    cold_s = statistics.median(t.cold_prompt_seconds for t in done)
    warm_s = statistics.median(t.warm_prompt_seconds for t in done)
    ratio = warm_s / cold_s if cold_s > 0 else float("inf")
    return WarmReport(
        model=model.files.model.name, arch=model.arch, n_layer=model.n_layer, n_images=n_images, n_ctx=n_ctx,
        gaze=(model.gaze_defaults().region_h is not None) if gaze is None else bool(gaze),
        threads=model.n_threads, cpu=cpu_name(), logical_cpus=os.cpu_count() or 0,
        load_average=load_before, load_average_after=_load_average(), max_tokens=max_tokens,
        turn1_prompt_tokens=turn1.n_prompt_tokens, turn1_prompt_seconds=statistics.median(turn1_s),
        turn1_text=turn1.text, prompt_tokens=cold.n_prompt_tokens, cold_cached_tokens=cold.n_cached_tokens,
        warm_cached_tokens=warm.n_cached_tokens, cold_prompt_seconds=cold_s, warm_prompt_seconds=warm_s,
        warm_vs_cold=ratio, target=TARGET, target_met=ratio <= TARGET,
        same_text=all(t.cold_text == t.warm_text for t in done), rounds=done,
    )


def format_table(r: WarmReport) -> str:
    def secs(values) -> str:
        return " ".join(f"{v:.3f}" for v in values)

    lines = [
        f"model {r.model} ({r.arch}, {r.n_layer} layers), {r.n_images} image(s), n_ctx {r.n_ctx}, "
        f"{'gaze' if r.gaze else 'dense'}, greedy, {r.max_tokens} tokens at most per answer",
        f"CPU {r.cpu} ({r.logical_cpus} logical CPUs), {r.threads} threads; load average "
        f"{' '.join(f'{x:.2f}' for x in r.load_average)} before, "
        f"{' '.join(f'{x:.2f}' for x in r.load_average_after)} after",
        f"turn 1: {r.turn1_prompt_tokens} prompt tokens, {r.turn1_prompt_seconds:.3f} s (median); "
        f"turn 2: {r.prompt_tokens} prompt tokens",
        "",
        f"{'turn 2':<10} {'prompt s (median)':>17} {'cached':>7} {'evaluated':>9}  per round (s)",
        f"{'cold':<10} {r.cold_prompt_seconds:>17.3f} {r.cold_cached_tokens:>7} "
        f"{r.prompt_tokens - r.cold_cached_tokens:>9}  {secs(t.cold_prompt_seconds for t in r.rounds)}",
        f"{'warm':<10} {r.warm_prompt_seconds:>17.3f} {r.warm_cached_tokens:>7} "
        f"{r.prompt_tokens - r.warm_cached_tokens:>9}  {secs(t.warm_prompt_seconds for t in r.rounds)}",
        "",
        f"warm / cold: {100 * r.warm_vs_cold:.2f}% (target <= {100 * r.target:.0f}%: "
        f"{'met' if r.target_met else 'not met'}); warm and cold answers "
        f"{'equal' if r.same_text else 'DIFFER'} in {'every' if r.same_text else 'some'} round "
        f"({len(r.rounds)} round(s))",
    ]
    return "\n".join(lines)


def bench_warm(model_dir: str | None, shape: str | None, *, images: int, rounds: int, threads: int | None,
               max_tokens: int, n_ctx: int | None, dense: bool, progress=None) -> WarmReport:
    """Load the model (a folder, a ``--shape``, or the embedded one) and run the benchmark."""
    from gaze_edge.bench import shapes
    from gaze_edge.runtime.model import GazeModel

    if shape and model_dir:
        raise GazeEdgeError("give a model folder or --shape, not both")
    if shape:
        if shape not in shapes.SHAPES:
            raise GazeEdgeError(f"unknown shape {shape!r}; known: {', '.join(sorted(shapes.SHAPES))}")
        model_dir = str(shapes.ensure(shape))
    with GazeModel.load(model_dir, n_threads=threads) as model:
        return run(model, n_images=images, rounds=rounds, max_tokens=max_tokens, n_ctx=n_ctx,
                   gaze=False if dense else None, progress=progress)


@click.command()
@click.argument("model_dir", required=False, type=click.Path(exists=True))
@click.option("--shape", help="A random-weight model of this shape instead (gaze_edge.bench.shapes): qwen2-0.5b.")
@click.option("--images", default=1, show_default=True, type=click.IntRange(1), help="GazeScenes images in turn 1.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1),
              help="Rounds (each: turn 1, then turn 2 cold and warm, alternating which goes first).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: the model's default).")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(1), help="Tokens per answer.")
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(1),
              help="Context cells [default: enough for both turns, at least the model's default].")
@click.option("--dense", is_flag=True, help="Answer densely (no gaze): the turn-1 answer is reused too.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def main(model_dir, shape, images, rounds, threads, max_tokens, n_ctx, dense, as_json) -> None:
    """Turn 2 of a conversation, warm vs cold: prompt time, tokens reused, answers equal."""
    try:
        report = bench_warm(model_dir, shape, images=images, rounds=rounds, threads=threads,
                            max_tokens=max_tokens, n_ctx=n_ctx, dense=dense,
                            progress=lambda line: click.echo(line, err=True))
    except GazeEdgeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else format_table(report))


if __name__ == "__main__":
    main()
