"""Errors the toolkit raises for bad input.

Every error a user can cause is a :class:`ToolkitError`; the CLI prints its message on one line and exits
with code 2. Anything else escaping the engine is a bug.
"""


class ToolkitError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch between artifacts.

    The message must fit on one line and say what is wrong and, where possible, how to fix it.
    """
