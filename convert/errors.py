"""The one exception the converter raises for anything a user can fix."""


class ConvertError(Exception):
    """A conversion that cannot go on; ``str(err)`` is one line a CLI can print as is.

    ``detail`` holds more (e.g. a child process's traceback) for a verbose mode.
    """

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail
