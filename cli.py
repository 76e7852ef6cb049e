"""The ``gaze-edge`` command: a thin Click layer over the library (installed as gaze_edge.cli)."""

from __future__ import annotations

import sys

import click


class UserError(click.ClickException):
    """An error the user can fix; printed as one line, exit code 1."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gaze-edge")
def main() -> None:
    """Gaze Attention for multimodal LLMs on a patched llama.cpp."""


@main.group()
def runtime() -> None:
    """The patched llama.cpp runtime (llama-cpp-python built with patches/)."""


@runtime.command("build")
def runtime_build() -> None:
    """Build (once, cached) and install the patched llama-cpp-python into this environment."""
    from gaze_edge.runtime import build

    sys.exit(build.main(["install"]))


if __name__ == "__main__":
    main()
