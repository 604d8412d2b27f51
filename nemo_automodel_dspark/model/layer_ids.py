"""Which target layers feed the draft: the id convention, the servable range and the default spread, in one place.

SPEC §2 ids: -1 = embeddings, 0..n-2 = output of decoder layer id, n-1 = the final-norm output (transformers'
`hidden_states[id + 1]`). Serving engines (vLLM, SGLang, speculators) capture the residual stream *entering* layer
id+1, which equals that state only for ids in [0, n-2]: -1 has no capture point, and n-1 would need a layer n (or is
captured before the final norm). So the default spread stays inside [1, n-2] and `unservable_ids` names the rest.
Model-level knowledge (the draft's `fc` input width depends on it); `target.capture` reads the same ids.
"""

from __future__ import annotations


def servable_range(num_layers: int) -> tuple[int, int]:
    """(lowest, highest) id that every serving engine captures as the state we train on: [0, n-2]."""
    return 0, num_layers - 2


def unservable_ids(layer_ids: list[int], num_layers: int) -> list[int]:
    """The ids outside `servable_range` (the embeddings -1 and the final-norm n-1)."""
    low, high = servable_range(num_layers)
    return [i for i in layer_ids if not low <= i <= high]


def default_target_layer_ids(num_layers: int, num_features: int) -> list[int]:
    """`num_features` ids spread evenly over [1, n−2] (28 layers, 5 features → [1, 7, 14, 20, 26]; 4, 1 → [2]).

    Every id is servable; duplicates from rounding on a shallow target are merged (fewer features, never an id twice).
    A 1- or 2-layer target has no id in [1, n-2]; it gets its deepest servable id (or 0 when there is none).
    """
    last = num_layers - 2
    if last < 1:
        return [max(last, 0)]
    if num_features == 1:
        return [last]
    return sorted({round(1 + i * (last - 1) / (num_features - 1)) for i in range(num_features)})


def validate_target_layer_ids(layer_ids: list[int], num_layers: int) -> list[int]:
    """Non-empty, strictly increasing, each in [-1, n−1]. Servability is `draft_checks`' business (`serve_with`)."""
    if not layer_ids:
        raise ValueError("target_layer_ids must not be empty")
    for i in layer_ids:
        if not -1 <= i <= num_layers - 1:
            raise ValueError(f"target_layer_ids: id {i} is out of range; valid ids are -1..{num_layers - 1}")
    if any(b <= a for a, b in zip(layer_ids, layer_ids[1:], strict=False)):
        raise ValueError(f"target_layer_ids must be strictly increasing, got {layer_ids}")
    return list(layer_ids)
