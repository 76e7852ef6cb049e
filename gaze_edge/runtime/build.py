"""Build the patched llama.cpp runtime that gaze-edge runs on.

The pinned llama-cpp-python sdist is downloaded from the package index (its sha256 checked),
every ``patches/*.patch`` is applied in order to its ``vendor/llama.cpp``, and the result is built
into a wheel that is installed into the current environment. Everything lands in a cache folder
keyed by what went into it (sdist, patches, build flags), so an unchanged tree never rebuilds and a
changed patch always does::

    <cache>/runtime/<key>/src/      the unpacked, patched sdist (convert_hf_to_gguf.py, gguf-py, tests)
    <cache>/runtime/<key>/build/    the wheel's CMake build folder
    <cache>/runtime/<key>/build-tests/  test-backend-ops, llama-mtmd-cli & co. (on demand)
    <cache>/runtime/<key>/wheel/    the built llama_cpp_python wheel

Only the standard library is used here: this runs before llama-cpp-python exists.
Run it with ``python -m gaze_edge.runtime.build [install|source|tests|key]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Bumped when this file changes how a build is made, so old cache entries are not reused.
BUILDER_VERSION = 1
# llama.cpp's own binaries, built on demand from the same patched tree.
TEST_TARGETS = ["test-backend-ops", "test-gaze", "llama-mtmd-cli"]
MARKER = ".gaze_edge_build.json"


class BuildError(RuntimeError):
    """A step of the runtime build failed; the message says which and why."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_patches_dir() -> Path:
    return Path(os.environ.get("GAZE_EDGE_PATCHES", repo_root() / "patches"))


def cache_dir() -> Path:
    if os.environ.get("GAZE_EDGE_CACHE"):
        return Path(os.environ["GAZE_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gaze-edge"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[gaze-edge build] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BuildSpec:
    """What goes into a build; its key names the cache entry."""

    patches: tuple[Path, ...]
    cmake_args: tuple[str, ...]

    @classmethod
    def from_env(cls, patches_dir: Path | None = None) -> BuildSpec:
        patches_dir = patches_dir or default_patches_dir()
        if not patches_dir.is_dir():
            raise BuildError(f"patches folder not found: {patches_dir}")
        patches = tuple(sorted(patches_dir.glob("*.patch")))
        user_args = shlex.split(os.environ.get("CMAKE_ARGS", ""))
        return cls(patches=patches, cmake_args=tuple(user_args))

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        h.update(f"builder={BUILDER_VERSION}\nversion={LLAMA_CPP_PYTHON_VERSION}\n".encode())
        h.update(f"sdist={SDIST_SHA256}\n".encode())
        for p in self.patches:
            h.update(f"patch={p.name}:{sha256_file(p)}\n".encode())
        h.update(("cmake=" + json.dumps(list(self.cmake_args)) + "\n").encode())
        return h.hexdigest()[:16]

    def entry(self) -> Path:
        return cache_dir() / "runtime" / self.key


def _run(cmd: list[str], what: str, **kw) -> None:
    _log(" ".join(shlex.quote(str(c)) for c in cmd))
    proc = subprocess.run(cmd, **kw)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")


def fetch_sdist() -> Path:
    """The pinned sdist from the package index, with its sha256 checked."""
    dest_dir = cache_dir() / "sdist"
    dest = dest_dir / SDIST_NAME
    if not dest.exists():
        dest_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", "-d", tmp,
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
                "downloading the llama-cpp-python sdist",
            )
            got = Path(tmp) / SDIST_NAME
            if not got.exists():
                raise BuildError(f"pip did not produce {SDIST_NAME}")
            os.replace(got, dest)
    digest = sha256_file(dest)
    if digest != SDIST_SHA256:
        dest.unlink()
        raise BuildError(
            f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}; "
            "the file was removed, run again to download it afresh"
        )
    return dest


def apply_patches(llama_dir: Path, patches: tuple[Path, ...]) -> None:
    """Apply each patch in order; a hunk that does not apply stops the build, naming the patch."""
    for patch in patches:
        base = ["patch", "-p1", "--batch", "--forward", "--fuzz=0", "-d", str(llama_dir), "-i",
                str(patch.resolve())]
        check = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
        if check.returncode != 0:
            detail = (check.stdout + check.stderr).strip().splitlines()
            raise BuildError(f"patch {patch.name} does not apply to the pinned llama.cpp:\n  "
                             + "\n  ".join(detail[-8:]))
        subprocess.run(base + ["--quiet"], check=True)
        _log(f"applied {patch.name}")


def prepare_source(spec: BuildSpec) -> Path:
    """Unpacked, patched sdist for this spec (made once, atomically)."""
    src = spec.entry() / "src"
    if src.exists():
        return src
    sdist = fetch_sdist()
    spec.entry().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="src.", dir=spec.entry()))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        root = tmp / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        llama_dir = root / "vendor" / "llama.cpp"
        # The sdist carries a gitlink to a submodule folder it does not ship.
        gitlink = llama_dir / ".git"
        if gitlink.is_file():
            gitlink.unlink()
        apply_patches(llama_dir, spec.patches)
        try:
            os.replace(root, src)
        except OSError:
            if not (src / "vendor" / "llama.cpp").is_dir():
                raise
            # another process (a build, a test) unpacked the same spec first: theirs is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    # ggml compiles through ccache when it is installed; paths relative to the cache folder let a
    # new entry (a changed patch) reuse every object whose source did not change.
    env.setdefault("CCACHE_BASEDIR", str(cache_dir() / "runtime"))
    return env


def build_wheel(spec: BuildSpec) -> Path:
    """The patched llama_cpp_python wheel for this spec, built once."""
    wheel_dir = spec.entry() / "wheel"
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.exists() else []
    if wheels:
        _log(f"cached runtime {spec.key}: {wheels[0].name}")
        return wheels[0]
    src = prepare_source(spec)
    env = _build_env()
    env["CMAKE_ARGS"] = " ".join(shlex.quote(a) for a in spec.cmake_args)
    tmp = Path(tempfile.mkdtemp(prefix="wheel.", dir=spec.entry()))
    try:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "-w", str(tmp), str(src),
               f"--config-settings=build-dir={spec.entry() / 'build'}"]
        _log(f"building the patched runtime {spec.key} (a few minutes; CMAKE_ARGS={env['CMAKE_ARGS']})")
        _run(cmd, "building the llama-cpp-python wheel", env=env)
        built = sorted(tmp.glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError("pip wheel produced no llama_cpp_python wheel")
        os.replace(tmp, wheel_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(wheel_dir.glob("llama_cpp_python-*.whl"))[0]


def installed_key() -> str | None:
    """Key of the runtime installed in this environment, or None."""
    try:
        found = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if not found or not found.submodule_search_locations:
        return None
    marker = Path(list(found.submodule_search_locations)[0]) / MARKER
    try:
        return json.loads(marker.read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def install(spec: BuildSpec) -> Path:
    """Build (if needed) and install the patched runtime into this environment."""
    if installed_key() == spec.key:
        _log(f"patched runtime {spec.key} already installed")
        return spec.entry()
    wheel = build_wheel(spec)
    # --force-reinstall --no-deps replaces a stock llama-cpp-python; its own small requirements
    # (numpy, diskcache, jinja2, typing-extensions) come in the second call.
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q",
          str(wheel)], "installing the patched runtime")
    _run([sys.executable, "-m", "pip", "install", "-q", str(wheel)],
         "installing the patched runtime's requirements")
    importlib.invalidate_caches()
    pkg = Path(list(importlib.util.find_spec("llama_cpp").submodule_search_locations)[0])
    (pkg / MARKER).write_text(json.dumps({"key": spec.key, "patches": [p.name for p in spec.patches],
                                          "cmake_args": list(spec.cmake_args)}))
    _log(f"installed patched runtime {spec.key}")
    return spec.entry()


# llama.cpp's own CMake options for the standalone test build (tests and tools on, the rest off).
TEST_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=ON",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
]


def build_tests(spec: BuildSpec, targets: list[str] | None = None) -> Path:
    """llama.cpp's own binaries (test-backend-ops, llama-mtmd-cli, ...) from the same patched tree.

    A standalone CMake build of the patched vendor/llama.cpp in ``<entry>/build-tests`` (the
    wheel's build folder cannot host them: llama-cpp-python adds tools/mtmd itself, and tests carry
    install rules). Only the named targets build; the folder is kept, so later calls are
    incremental. Returns the bin folder.
    """
    llama_dir = source_dir(spec)
    build = spec.entry() / "build-tests"
    if not (build / "build.ninja").exists():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(llama_dir), "-B", str(build), *generator, *TEST_CMAKE_ARGS,
              *spec.cmake_args], "configuring llama.cpp tests", stdout=subprocess.DEVNULL, env=_build_env())
    _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target",
          *(targets or TEST_TARGETS)], "building llama.cpp test binaries", env=_build_env())
    return build / "bin"


def source_dir(spec: BuildSpec | None = None) -> Path:
    """The patched llama.cpp tree (with convert_hf_to_gguf.py, gguf-py, tools/mtmd)."""
    spec = spec or BuildSpec.from_env()
    return prepare_source(spec) / "vendor" / "llama.cpp"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaze_edge.runtime.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", default="install",
                    choices=["install", "wheel", "source", "tests", "key"])
    ap.add_argument("--patches", type=Path, default=None, help="patches folder (default: repo's)")
    ap.add_argument("--target", action="append", help="with 'tests': a CMake target to build")
    args = ap.parse_args(argv)
    try:
        spec = BuildSpec.from_env(args.patches)
        if args.action == "key":
            print(spec.key)
        elif args.action == "source":
            print(source_dir(spec))
        elif args.action == "wheel":
            print(build_wheel(spec))
        elif args.action == "tests":
            print(build_tests(spec, args.target))
        else:
            print(install(spec))
    except BuildError as e:
        print(f"gaze-edge build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
