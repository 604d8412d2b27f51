"""Checks a tool runs on a saved draft before it works with it: the draft's weights are finite."""

from __future__ import annotations

import os
from pathlib import Path

from nemo_automodel_dspark.errors import ToolError

WEIGHTS_FILE = "model.safetensors"


def require_finite_draft(directory: str | os.PathLike, flag: str = "--draft") -> None:
    """A ToolError naming the tensors when the draft's `model.safetensors` holds a NaN or an infinity."""
    import torch
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ToolError(f"{flag} {directory}: no {WEIGHTS_FILE}")
    bad = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
    except Exception as err:  # a truncated or foreign file: name it rather than show the reader's traceback
        raise ToolError(f"{flag} {directory}: {WEIGHTS_FILE} cannot be read ({err})") from err
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ToolError(
            f"{flag} {directory}: non-finite weights in {shown}; the run that wrote it diverged, use an earlier "
            "checkpoint"
        )
