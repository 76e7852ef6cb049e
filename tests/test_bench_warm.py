"""The warm-vs-cold turn-2 benchmark's machinery (its numbers live in docs/BENCHMARKS.md, never in
tests: nothing here asserts a timing threshold).

One round on the embedded model: the report's fields, the tokens the warm call reused (turn 1's
prompt, more than nothing and less than everything), a cold call reusing none, and warm and cold
answering with the same text; the command line's JSON and its errors.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
from click.testing import CliRunner

from gaze_edge.bench import warm

pytestmark = pytest.mark.runtime

REPORT_KEYS = {
    "model", "arch", "n_layer", "n_images", "n_ctx", "gaze", "threads", "cpu", "logical_cpus", "load_average",
    "load_average_after", "max_tokens", "turn1_prompt_tokens", "turn1_prompt_seconds", "turn1_text",
    "prompt_tokens", "cold_cached_tokens", "warm_cached_tokens", "cold_prompt_seconds", "warm_prompt_seconds",
    "warm_vs_cold", "target", "target_met", "same_text", "rounds",
}
ROUND_KEYS = {"cold_prompt_seconds", "warm_prompt_seconds", "cold_text", "warm_text", "warm_first"}


@pytest.fixture(scope="module")
def model():
    from gaze_edge.runtime.model import GazeModel

    m = GazeModel.load(n_threads=2)
    yield m
    m.close()


def _check_report(data: dict, *, n_images: int, rounds: int) -> None:
    assert set(data) == REPORT_KEYS
    assert data["n_images"] == n_images and len(data["rounds"]) == rounds
    assert all(set(r) == ROUND_KEYS for r in data["rounds"])
    assert [r["warm_first"] for r in data["rounds"]] == [i % 2 == 1 for i in range(rounds)]
    # warm reuses turn 1's prompt at least (images included), never all of turn 2; cold nothing
    assert data["turn1_prompt_tokens"] <= data["warm_cached_tokens"] < data["prompt_tokens"]
    assert data["warm_cached_tokens"] > 0 and data["cold_cached_tokens"] == 0
    assert data["prompt_tokens"] > data["turn1_prompt_tokens"]
    # the same answer both ways, every round, and the flag says so
    assert all(r["warm_text"] == r["cold_text"] for r in data["rounds"]) and data["same_text"] is True
    assert data["turn1_text"].strip()
    # the summary is computed from the rounds (what the doc reports), whatever the timings are
    for which in ("cold", "warm"):
        times = [r[f"{which}_prompt_seconds"] for r in data["rounds"]]
        assert all(math.isfinite(t) and t >= 0 for t in times)
        assert data[f"{which}_prompt_seconds"] == pytest.approx(statistics.median(times))
    assert data["warm_vs_cold"] == pytest.approx(data["warm_prompt_seconds"] / data["cold_prompt_seconds"])
    assert data["target"] == 0.05 and data["target_met"] == (data["warm_vs_cold"] <= 0.05)
    assert data["cpu"] and data["threads"] == 2 and len(data["load_average"]) == 3


def test_one_round_gaze(model):
    report = warm.run(model, n_images=1, rounds=1, max_tokens=16)
    data = json.loads(json.dumps(report.to_json()))
    _check_report(data, n_images=1, rounds=1)
    assert data["gaze"] is True
    # with gaze the answer's K/V came from a restricted attention: warm reuses exactly turn 1's prompt
    assert data["warm_cached_tokens"] == data["turn1_prompt_tokens"]
    table = warm.format_table(report)
    assert "warm / cold" in table and "target <= 5%" in table and report.cpu in table
    assert warm.WarmReport.from_json(data) == report


def test_two_rounds_dense_reuse_the_answer_too(model):
    report = warm.run(model, n_images=1, rounds=2, max_tokens=16, gaze=False)
    data = report.to_json()
    _check_report(data, n_images=1, rounds=2)
    assert data["gaze"] is False
    # dense answer tokens are reusable: warm keeps turn 1's prompt and (part of) the answer
    assert data["warm_cached_tokens"] > data["turn1_prompt_tokens"]


def test_turn2_messages_strip_the_answer_as_chat_does():
    messages = warm.turn2_messages(["a.png"], " top left: red circle.\n")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "top left: red circle."
    assert messages[0]["content"][-1]["text"] == "Describe the image."
    assert warm.turn1_messages(["a.png", "b.png"])[0]["content"][-1]["text"] == "Describe the images."


def test_command_line_json_and_errors():
    result = CliRunner().invoke(warm.main, ["--rounds", "1", "--threads", "2", "--max-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    _check_report(data, n_images=1, rounds=1)
    result = CliRunner().invoke(warm.main, ["--shape", "no-such-shape"])
    assert result.exit_code != 0 and "unknown shape 'no-such-shape'" in result.output
