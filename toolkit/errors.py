"""Errors the toolkit raises for bad input.

Every error a user can cause is a :class:`ToolkitError`; the CLI prints its message on one line and exits
with code 2. Anything else escaping the engine is a bug.
"""


class ToolkitError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch between artifacts.

    The message must fit on one line and say what is wrong and, where possible, how to fix it. It names engine
    parameters, never command-line flags: an error about one parameter passes ``param`` (the engine's name, e.g.
    ``"layers"`` or ``"gen_tokens"``) and a message about its value; ``str(error)`` is then ``"layers: <message>"``,
    and the CLI prints the parameter's flag instead (``error: --layers: <message>``). A message that refers to
    another parameter writes its name in backquotes (``"choose another `name` or pass `force`"``); the CLI prints
    those as flags too.

    Attributes:
        message: the message without the parameter name.
        param: the parameter the error is about, or None.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message
