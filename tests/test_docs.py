"""Docs that must stay true: the spec copy in docs/ is the team's contract, verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_spec_is_the_shared_contract():
    shared = ROOT.parent / "shared" / "GAZE_SPEC.md"
    if not shared.exists():
        pytest.skip("no ../shared beside this checkout")
    assert (ROOT / "docs" / "GAZE_SPEC.md").read_text() == shared.read_text(), (
        "docs/GAZE_SPEC.md differs from ../shared/GAZE_SPEC.md: change the shared spec first, then copy it"
    )
