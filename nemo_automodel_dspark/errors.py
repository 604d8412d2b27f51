"""The one error type the tools raise for a user mistake; the CLI prints it as one line, without a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class ToolError(RuntimeError):
    """A refused request (bad configuration, a resume that does not match, a path in the way)."""


def require_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a Path, or a ToolError naming the flag when it is not a file."""
    if not Path(path).is_file():
        raise ToolError(f"{flag} {path}: no such file")
    return Path(path)


def require_draft_dir(path: str | os.PathLike, flag: str = "--draft") -> Path:
    """A saved DSpark draft folder (has config.json), or a ToolError that says what to pass instead."""
    if not (Path(path) / "config.json").is_file():
        raise ToolError(
            f"{flag} {path}: not a saved DSpark draft (no config.json); pass a checkpoint folder such as "
            "OUTPUT_DIR/checkpoints/epoch_E_step_S"
        )
    return Path(path)
