"""Checks a tool runs on a saved draft before it works with it: the draft's weights are finite."""

from __future__ import annotations

import os

from nemo_automodel_dspark.errors import ToolError


def require_finite_draft(directory: str | os.PathLike, flag: str = "--draft") -> None:
    """A ToolError naming the tensors when the draft's weights (single file or shards) hold a NaN or an infinity."""
    import torch
    from safetensors import safe_open

    from nemo_automodel_dspark.model.serving import DraftFormatError, weight_files

    try:
        paths = weight_files(directory)
    except DraftFormatError as err:
        raise ToolError(f"{flag} {err}") from err
    bad = []
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        bad.append(name)
        except Exception as err:  # a truncated or foreign file: name it rather than show the reader's traceback
            raise ToolError(f"{flag} {directory}: {path.name} cannot be read ({err})") from err
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ToolError(
            f"{flag} {directory}: non-finite weights in {shown}; the run that wrote it diverged, use an earlier "
            "checkpoint"
        )
