"""The one error type the tools raise for a user mistake; the CLI prints it as one line, without a traceback."""


class ToolError(RuntimeError):
    """A refused request (bad configuration, a resume that does not match, a path in the way)."""
