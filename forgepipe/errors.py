"""The one exception type for mistakes a user can make.

The CLI prints a ForgeError as one line and exits 2; any other exception is a bug and keeps
its traceback. An error about one config value carries its dotted key (`train.lr`), and its
text names the option that sets it (`--lr: must be positive, got 0`), from options.py's table.
"""

from __future__ import annotations

from forgepipe.options import label


class ForgeError(Exception):
    """A user-caused error: bad option, missing file, malformed data, impossible config."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        if self.key is None:
            return self.message
        return f"{label(self.key)}: {self.message}"
