"""Checks a tool runs on a saved draft before it works with it: finite weights, built for the given target."""

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


def require_draft_fits_target(directory: str | os.PathLike, target_config, target: str, flag: str = "--draft") -> None:
    """Before any weights load: the draft was built for this target (family, hidden size, vocabulary, layers)."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from nemo_automodel_dspark.model.families import family_for
    from nemo_automodel_dspark.model.serving import CONFIG_NAME, read_serving_config

    draft_text, dspark = read_serving_config(directory)  # a folder that is no DSpark draft is a one-line error here
    try:
        family = family_for(target_config)
    except ValueError as err:
        raise ToolError(f"--target {target}: {err}") from err
    text = family.text_config(target_config)
    raw = json.loads((Path(directory) / CONFIG_NAME).read_text())
    problems = []
    try:
        draft_family = family_for(SimpleNamespace(architectures=raw.get("architectures"))).name
    except ValueError:
        draft_family = None
    if draft_family is not None and draft_family != family.name:
        problems.append(f"family {draft_family} vs {family.name}")
    for key in ("hidden_size", "vocab_size"):
        if getattr(draft_text, key, None) != getattr(text, key, None):
            problems.append(f"{key} {getattr(draft_text, key, None)} vs {getattr(text, key, None)}")
    layers = text.num_hidden_layers
    if getattr(draft_text, "num_hidden_layers", None) != layers:
        problems.append(f"target layers {getattr(draft_text, 'num_hidden_layers', None)} vs {layers}")
    outside = [i for i in dspark.target_layer_ids or [] if not -1 <= i < layers]
    if outside:
        problems.append(f"target_layer_ids {outside} outside the target's {layers} layers")
    if problems:
        raise ToolError(
            f"{flag} {directory} was not trained for --target {target} (draft vs target: {'; '.join(problems)})"
        )
