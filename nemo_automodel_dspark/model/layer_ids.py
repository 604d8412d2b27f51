"""Which target layers feed the draft (SPEC §2 ids: -1 = embeddings, 0..n-2 = decoder layers, n-1 = final norm).

Model-level knowledge (the draft's `fc` input width depends on it), so it lives in `model/`; `target.capture`
reads the same ids when it hooks the target.
"""

from __future__ import annotations

import warnings


def default_target_layer_ids(num_layers: int, num_features: int) -> list[int]:
    """`num_features` ids spread evenly over [1, n−1] (28 layers, 5 features → [1, 8, 14, 20, 27])."""
    if num_features == 1:
        return [num_layers - 1]
    ids = (round(1 + i * (num_layers - 2) / (num_features - 1)) for i in range(num_features))
    return sorted({min(max(i, 1), num_layers - 1) for i in ids})


def validate_target_layer_ids(layer_ids: list[int], num_layers: int) -> list[int]:
    """Non-empty, strictly increasing, each in [-1, n−1]; warns on ids common serving engines cannot capture."""
    if not layer_ids:
        raise ValueError("target_layer_ids must not be empty")
    for i in layer_ids:
        if not -1 <= i <= num_layers - 1:
            raise ValueError(f"target_layer_ids: id {i} is out of range; valid ids are -1..{num_layers - 1}")
    if any(b <= a for a, b in zip(layer_ids, layer_ids[1:], strict=False)):
        raise ValueError(f"target_layer_ids must be strictly increasing, got {layer_ids}")
    if -1 in layer_ids or num_layers - 1 in layer_ids:
        warnings.warn(
            f"target_layer_ids {layer_ids} include -1 or {num_layers - 1}: serving engines that capture "
            "'the input of layer id+1' cannot serve such a draft",
            stacklevel=2,
        )
    return list(layer_ids)
