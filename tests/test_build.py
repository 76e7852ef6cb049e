"""The patched-runtime builder: cache keys, patch application, sdist checks (no compiler needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gaze_edge.runtime import build


def _patch(path: Path, old: str, new: str, name: str = "hello.txt") -> Path:
    path.write_text(
        f"header: what and why\n\n--- a/{name}\n+++ b/{name}\n@@ -1 +1 @@\n-{old}\n+{new}\n"
    )
    return path


@pytest.fixture
def patches(tmp_path):
    d = tmp_path / "patches"
    d.mkdir()
    _patch(d / "0001-a.patch", "hello", "world")
    return d


def test_key_is_stable_and_changes_with_one_patch_byte(patches, monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    key = build.BuildSpec.from_env(patches).key
    assert key == build.BuildSpec.from_env(patches).key
    p = patches / "0001-a.patch"
    p.write_bytes(p.read_bytes().replace(b"world", b"worle"))
    assert build.BuildSpec.from_env(patches).key != key


def test_key_changes_with_build_flags_and_new_patches(patches, monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    key = build.BuildSpec.from_env(patches).key
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    cuda = build.BuildSpec.from_env(patches)
    assert cuda.key != key and cuda.cmake_args == ("-DGGML_CUDA=on",)
    monkeypatch.delenv("CMAKE_ARGS")
    _patch(patches / "0002-b.patch", "world", "again")
    assert build.BuildSpec.from_env(patches).key != key


def test_patches_apply_in_file_name_order(tmp_path, patches):
    _patch(patches / "0002-b.patch", "world", "again")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    build.apply_patches(tree, build.BuildSpec.from_env(patches).patches)
    assert (tree / "hello.txt").read_text() == "again\n"


def test_a_patch_that_does_not_apply_stops_the_build_naming_it(tmp_path, patches):
    _patch(patches / "0002-broken.patch", "not there", "x")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    with pytest.raises(build.BuildError, match="0002-broken.patch does not apply"):
        build.apply_patches(tree, build.BuildSpec.from_env(patches).patches)
    # the good patch before it applied; nothing half-applied from the broken one
    assert (tree / "hello.txt").read_text() == "world\n"


def test_corrupt_sdist_is_rejected_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("GAZE_EDGE_CACHE", str(tmp_path))
    bad = tmp_path / "sdist" / build.SDIST_NAME
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the sdist")
    with pytest.raises(build.BuildError, match="sha256"):
        build.fetch_sdist()
    assert not bad.exists()


def test_missing_patches_folder_is_a_clear_error(tmp_path):
    with pytest.raises(build.BuildError, match="patches folder not found"):
        build.BuildSpec.from_env(tmp_path / "nope")


def test_repo_patches_have_headers_and_apply_to_the_pinned_tree():
    """Every patch starts with a header paragraph; the cached patched tree carries them."""
    spec = build.BuildSpec.from_env()
    assert spec.patches, "no patches found"
    for p in spec.patches:
        head = p.read_text().split("diff --git", 1)[0].strip()
        assert head and len(head.splitlines()) >= 2, f"{p.name} has no header"
    src = build.source_dir(spec)
    llava = (src / "tools/mtmd/models/llava.cpp").read_text()
    assert "ggml_concat(ctx0, model.class_embedding, inp, 1)" in llava
    assert "llama_gaze_version" in (src / "include/llama.h").read_text()
    assert hashlib.sha256(build.fetch_sdist().read_bytes()).hexdigest() == build.SDIST_SHA256


def test_two_processes_unpacking_the_same_source_both_get_it(tmp_path, monkeypatch):
    """A test and a build can unpack the same spec at once: the one that loses the final rename
    takes the winner's identical tree instead of failing ("Directory not empty")."""
    import tarfile

    sdist = tmp_path / "sdist.tar.gz"
    root = tmp_path / "tree" / f"llama_cpp_python-{build.LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    root.mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "tree" / f"llama_cpp_python-{build.LLAMA_CPP_PYTHON_VERSION}",
                arcname=f"llama_cpp_python-{build.LLAMA_CPP_PYTHON_VERSION}")
    monkeypatch.setattr(build, "fetch_sdist", lambda: sdist)
    spec = build.BuildSpec(patches=(), cmake_args=())
    monkeypatch.setattr(build.BuildSpec, "entry", lambda self: tmp_path / "cache")
    real_apply = build.apply_patches

    def other_process_finishes_first(llama_dir, patches):
        real_apply(llama_dir, patches)
        winner = tmp_path / "cache" / "src" / "vendor" / "llama.cpp"
        winner.mkdir(parents=True)
        (winner / "hello.txt").write_text("hello\n")

    monkeypatch.setattr(build, "apply_patches", other_process_finishes_first)
    src = build.prepare_source(spec)
    assert (src / "vendor" / "llama.cpp" / "hello.txt").read_text() == "hello\n"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["src"]  # our temporary copy is gone
