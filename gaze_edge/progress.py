"""A progress bar on stderr for long prompt evaluations (images encoded, tokens prefilled).

Shown only when stderr is a terminal (and not asked to be quiet); tqdm draws it. The bar is a
callable ``(done, total)`` as ``GazeModel.chat(progress=...)`` calls it, in context cells.
"""

from __future__ import annotations

import sys

# prompts shorter than this evaluate in well under a second: no bar for them
MIN_CELLS = 256


class PromptProgress:
    """``progress(done, total)`` callback that draws one bar per prompt evaluation."""

    def __init__(self, desc: str = "prompt", stream=None, min_cells: int = MIN_CELLS) -> None:
        self.desc = desc
        self.stream = stream or sys.stderr
        self.min_cells = min_cells
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if done > 0 or total < self.min_cells:
                return
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit="tok", file=self.stream, leave=False,
                             dynamic_ncols=True)
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def prompt_progress(quiet: bool = False, stream=None) -> PromptProgress | None:
    """A bar for a terminal's stderr; None when quiet, when stderr is not a terminal, or without tqdm."""
    stream = stream or sys.stderr
    if quiet or not getattr(stream, "isatty", lambda: False)():
        return None
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return None
    return PromptProgress(stream=stream)
