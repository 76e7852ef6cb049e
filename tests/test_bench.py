"""The benchmarks' machinery (not their numbers: timings live in docs/BENCHMARKS.md, never in tests).

Speed: the rows, the visual-KV accounting and the byte counts of a short run on the embedded
model. Quality: the runtime's captions vs the PyTorch reference's on a few scenes. Shapes: the
random-model recipe, at a tiny size, goes through our converter and gives the promised grid.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from gaze_edge.bench import bandwidth
from gaze_edge.config import n_selected

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def model():
    from gaze_edge.runtime.model import GazeModel

    m = GazeModel.load(n_threads=2)
    yield m
    m.close()


def test_byte_accounting():
    assert bandwidth.kv_bytes_per_cell(24, 2, 64, "f16") == 2 * 24 * 2 * 64 * 2
    assert bandwidth.kv_bytes_per_cell(1, 1, 32, "q8_0") == 2 * 34
    assert bandwidth.step_bytes(1000, 10.5, 8.0, 7) == 1000 + 84 + 7


def test_read_bandwidth_is_positive_and_finite():
    bw = bandwidth.read_bandwidth(1, size_mb=16, passes=2)
    assert 1e8 < bw < 1e13


def test_speed_rows_and_accounting(model):
    from gaze_edge.bench import speed

    report = speed.run(model, [300, 100], [0.1, 0.5], rounds=1, per_round=1, bandwidth=20e9)
    assert [r.visual_tokens for r in report.rows] == [196, 392]  # whole 14 x 14 images, ascending targets
    assert [r.n_images for r in report.rows] == [1, 2]
    per_image = model.image_positions(speed._scene_images(1, 0)[0])
    for row in report.rows:
        assert row.n_regions == 49 * row.n_images
        assert row.cached_tokens >= row.n_images * per_image
        assert [m.mode for m in row.modes] == ["dense", "gaze 0.1", "gaze 0.5"]
        dense, g01, g05 = row.modes
        assert dense.vs_dense == 1.0 and dense.visual_kv_fraction == 1.0
        # all regions are 2 x 2 and full: the fraction is k / n_regions exactly, every layer and head
        assert dense.overhead_ms is None and dense.n_nodes is None  # node counts come with --profile
        for m, ratio in ((g01, 0.1), (g05, 0.5)):
            assert m.visual_kv_fraction == pytest.approx(n_selected(0, ratio, row.n_regions) / row.n_regions)
            assert m.n_steps == 1 and m.decode_ms > 0
            # the overhead: what the step costs beyond the text-only step and the attention it keeps
            attention = dense.decode_ms - report.text_only_ms
            assert m.overhead_ms == pytest.approx(m.decode_ms - report.text_only_ms - m.visual_kv_fraction * attention)
        cells = bandwidth.kv_bytes_per_cell(model.n_layer, model.n_head_kv, model.n_embd // model.n_head, "f16")
        assert dense.step_mb * 1e6 == pytest.approx(model.size_bytes() + (row.cached_tokens + 1) * cells)
        assert g01.step_mb < g05.step_mb < dense.step_mb
        assert dense.bound_ms == pytest.approx(1e3 * dense.step_mb * 1e6 / 20e9)
        assert row.peak_rss_mb > 0
    table = speed.format_table(report)
    assert "gaze 0.5" in table and "bound" in table
    assert speed.SpeedReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_speed_rows_for_the_training_free_options(model):
    """--dense-layers / --score-mode: the gaze rows run with the option, and the accounting knows
    a dense layer reads every visual entry (the default model has 3 layers)."""
    from gaze_edge.bench import speed

    report = speed.run(model, [100], [0.1], rounds=1, per_round=1, bandwidth=20e9, score_mode="gqa_max",
                       n_dense_layers=1)
    assert (report.score_mode, report.n_dense_layers) == ("gqa_max", 1)
    (row,) = report.rows
    _, g01 = row.modes
    k = n_selected(0, 0.1, row.n_regions)
    n = model.n_layer
    assert g01.visual_kv_fraction == pytest.approx((1 + (n - 1) * k / row.n_regions) / n)
    assert "score mode gqa_max, first 1 layers dense" in speed.format_table(report)
    assert speed.SpeedReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_speed_by_frames_counts_images(model):
    """--frames: the rows are that many images (video frames), one gaze budget over all of them."""
    from click.testing import CliRunner

    from gaze_edge.bench import speed
    from gaze_edge.cli import main

    report = speed.run(model, [3, 1], [0.1], rounds=1, per_round=1, bandwidth=20e9, frames=True)
    assert [r.n_images for r in report.rows] == [1, 3]
    assert [r.n_regions for r in report.rows] == [49, 3 * 49]
    assert report.rows[1].modes[1].visual_kv_fraction == pytest.approx(n_selected(0, 0.1, 147) / 147)
    assert "images" in speed.format_table(report).splitlines()[3]
    bad = CliRunner().invoke(main, ["bench", "--frames", "8,x"])
    assert bad.exit_code == 2 and "--frames" in bad.output and "'x' is not a count" in bad.output
    both = CliRunner().invoke(main, ["bench", "--frames", "8", "--visual", "4k"])
    assert both.exit_code == 2 and "not both" in both.output


def test_speed_both_restrictions_and_the_node_profile(model):
    from gaze_edge.bench import speed
    from gaze_edge.bench.profile import GROUPS

    report = speed.run(model, [100], [0.25], restrict="both", profile=True, rounds=1, per_round=2, bandwidth=20e9)
    dense, masked, gathered = report.rows[0].modes
    assert [m.mode for m in (dense, masked, gathered)] == ["dense", "gaze 0.25", "gaze 0.25 gather"]
    assert (masked.gather, gathered.gather) == (False, True)
    assert masked.visual_kv_fraction == gathered.visual_kv_fraction == pytest.approx(13 / 49)
    for m in (dense, masked, gathered):
        assert set(m.profile_ms) == {*GROUPS, "per-node overhead"}
        assert all(v >= 0 for v in m.profile_ms.values())
        assert m.profile_ms["attention"] > 0 and m.profile_ms["weights"] > 0
    assert dense.profile_ms["gaze select"] == 0 and masked.profile_ms["gaze select"] > 0
    assert dense.profile_ms["gaze mask/gather"] == 0
    # (on this tiny cache the mask/gather nodes can cost less than a one-node graph: >= 0 here, the
    # attribution itself is checked on synthetic nodes below)
    # gazing adds nodes per layer (descriptors, scores, top-k, the mask or the gathers)
    assert dense.n_nodes > 0 and masked.n_nodes > dense.n_nodes and gathered.n_nodes > dense.n_nodes
    assert "profiled" in speed.format_table(report)
    with pytest.raises(ValueError, match="restrict"):
        speed.run(model, [100], [0.25], restrict="sideways", rounds=1, per_round=1, bandwidth=20e9)


def test_profile_groups_attribute_unnamed_nodes_to_the_gaze_result_they_feed():
    """Unnamed nodes belong to the next named node; llama.cpp names gaze_sel / gaze_kq_mask /
    gaze_k on a reshape, which still closes its group (the fixed one-node cost, the median of the
    no-op nodes, is taken off every node)."""
    from gaze_edge.bench.profile import NodeProfiler

    p = NodeProfiler.__new__(NodeProfiler)
    ms = 1e-3
    p.nodes = [
        ("node_1", "MUL_MAT", 3 * ms), ("gaze_scores-0", "ADD", 1 * ms),           # scores
        ("node_2", "TOP_K", 2 * ms), ("gaze_sel-0", "RESHAPE", 0.0),              # top-k, named on a reshape
        ("node_3", "SET_ROWS", 4 * ms), ("node_4", "GET_ROWS", 5 * ms),
        ("gaze_kq_mask-0", "RESHAPE", 0.0),                                       # the mask
        ("gaze_fattn-0", "FLASH_ATTN_EXT", 7 * ms), ("kqv_out-0", "VIEW", 0.0),
        ("attn_out-0", "MUL_MAT", 6 * ms),
    ]
    g = p.groups()  # fixed cost: the median of the 4 no-op nodes, 0
    assert g["gaze select"] == pytest.approx(6 * ms)
    assert g["gaze mask/gather"] == pytest.approx(9 * ms)
    assert g["attention"] == pytest.approx(7 * ms) and g["weights"] == pytest.approx(6 * ms)
    assert p.n_nodes() == 7


def test_quality_runtime_matches_the_reference(model):
    """Dense and gaze 0.25 through the runtime say what the PyTorch reference says, scene by scene."""
    from gaze_edge.bench import quality
    from gaze_edge.default_model import DEFAULT_HF_DIR

    rows = quality.run(model, [None, 0.25], n_scenes=8, reference=DEFAULT_HF_DIR)
    dense, gazed = rows
    assert dense.runtime_visual_kv == 1.0
    assert gazed.runtime_visual_kv == pytest.approx(math.ceil(0.25 * 49) / 49)
    for r in rows:
        assert r.agreement >= 7 / 8, r
        assert abs(r.runtime_accuracy - r.reference_accuracy) <= 0.1, r
    assert "same caption" in quality.format_table(rows, 8)


def test_bench_cli_json_and_bad_flags(tmp_path):
    from gaze_edge.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["bench", "--visual", "196", "--keep-ratio", "0.25", "--rounds", "1", "--steps", "1",
                               "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [m["mode"] for m in data["rows"][0]["modes"]] == ["dense", "gaze 0.25"]
    for args in (["--visual", "4q"], ["--visual", "0"], ["--keep-ratio", "0"], ["--shape", "nope"],
                 [str(tmp_path), "--shape", "qwen2-0.5b"]):
        res = runner.invoke(main, ["bench", *args])
        assert res.exit_code == 2, (args, res.output)


def test_bench_cli_needs_a_vision_model(tmp_path):
    import shutil

    from gaze_edge.cli import main
    from gaze_edge.default_model import DEFAULT_DIR

    llm = next(p for p in DEFAULT_DIR.glob("*.gguf") if not p.name.startswith("mmproj"))
    shutil.copy(llm, tmp_path / llm.name)
    res = CliRunner().invoke(main, ["bench", str(tmp_path / llm.name), "--visual", "196"])
    assert res.exit_code == 1 and "no vision projector" in res.output, res.output


def test_eval_cli_on_the_runtime_with_a_bad_ratio():
    from gaze_edge.cli import main

    res = CliRunner().invoke(main, ["eval", "--keep-ratio", "2"])
    assert res.exit_code == 2 and "not in (0, 1]" in res.output
    res = CliRunner().invoke(main, ["eval", "--keep-ratio", "dense", "--scenes", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["keep_ratio"] is None


def test_shape_recipe_converts_with_our_converter(monkeypatch, tmp_path):
    """The random-model recipe at a tiny size: converted by gaze_edge.convert, cached, 32 x 32 grid."""
    from gaze_edge.bench import shapes
    from gaze_edge.runtime.model import GazeModel

    tiny = {"text_config": {**shapes.SHAPES["qwen2-0.5b"]["text_config"], "hidden_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128},
            "image_size": 448}
    monkeypatch.setitem(shapes.SHAPES, "tiny-test", tiny)
    monkeypatch.setenv("GAZE_EDGE_CACHE", str(tmp_path))
    out = shapes.ensure("tiny-test", progress=False)
    assert out.parent == tmp_path / "bench" and len(list(out.glob("*.gguf"))) == 2
    assert not list(out.parent.glob(".build-*"))  # the staging folder is gone
    assert shapes.ensure("tiny-test", progress=False) == out  # cached
    m = GazeModel.load(out, n_threads=1)
    try:
        assert (m.arch, m.n_layer, m.n_head_kv) == ("qwen2", 2, 1)
        from gaze_edge.bench.speed import _scene_images

        assert m.image_positions(_scene_images(1, 0)[0]) == 32 * 32 + shapes.GAZE["n_context_tokens"]
    finally:
        m.close()
