"""The gaze-edge command: help everywhere, bad flags exit 2, input errors are one line, exit 1."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gaze_edge.cli import main

COMMANDS = [[], ["runtime"], ["runtime", "build"], ["convert"], ["make-gaze"], ["train"], ["eval"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "gaze-edge")
def test_every_command_has_help(args):
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "x", "-o", "out", "--outtype", "q3"],
        ["convert", "x"],
        ["no-such-command"],
        ["make-gaze", ".", "dst", "--region", "2by2"],
        ["make-gaze", ".", "dst", "--keep-ratio", "1.5"],
        ["train", "--out", "o", "--steps", "0"],
    ],
)
def test_bad_flags_exit_2(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output


def test_convert_missing_folder_is_one_line_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaze-edge: error:"), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.gguf"))


def test_verbose_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--verbose", "convert", str(tmp_path / "nope"), "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" in result.output
