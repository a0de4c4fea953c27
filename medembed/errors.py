"""The one exception family the CLI turns into a clean message instead of a traceback."""


class MedembedError(Exception):
    """A user-facing error: bad input, a refused operation. The message names the file/row and the problem."""
