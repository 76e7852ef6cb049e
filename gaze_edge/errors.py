"""Errors a user can fix (bad image, bad model folder, bad settings): the CLI prints them as one line."""


class GazeEdgeError(Exception):
    """Base class of gaze-edge's user-facing errors."""


class ImageError(GazeEdgeError, ValueError):
    """An image that cannot be used: missing, not an image, corrupt, or too large."""


class ContextOverflowError(GazeEdgeError):
    """The conversation does not fit the context window."""
