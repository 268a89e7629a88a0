"""The one exception type for mistakes a user can make.

The CLI prints a ForgeError as one line and exits non-zero; any other exception
is a bug and keeps its traceback.
"""


class ForgeError(Exception):
    """A user-caused error: bad option, missing file, malformed data, impossible config."""
