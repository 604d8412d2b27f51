"""Capture target hidden states with forward hooks in one no-grad forward (SPEC §2).

Layer-id convention = HF `hidden_states[id + 1]`: id -1 → embedding output, 0 ≤ id < n−1 → output of decoder layer
id, id = n−1 → the final-norm output. The final-norm output at every position is always returned (the teacher).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nemo_automodel_dspark.model.families import family_for


@dataclass
class CapturedFeatures:
    features: Tensor  # [B, S, L·H] concatenated in ascending layer-id order
    last_hidden: Tensor  # [B, S, H] final-norm output (the teacher's pre-head hidden)


def _output_tensor(output) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output  # MoE / older layers return tuples


@contextmanager
def hidden_state_hooks(target: nn.Module, layer_ids: list[int]) -> Iterator[dict[int, Tensor]]:
    """Inside the block, every forward of `target` fills the yielded dict {layer id: [B, T, H]} (SPEC §2 ids).

    Works for any forward that runs the decoder (the bare decoder, or the CausalLM with a KV cache); the hooks are
    removed on exit even if the forward raises.
    """
    parts = family_for(target.config).decoder_parts(target)
    num_layers = len(parts.layers)
    captured: dict[int, Tensor] = {}

    def keep(layer_id: int):
        return lambda module, args, output: captured.__setitem__(layer_id, _output_tensor(output))

    sources = {-1: parts.embed_tokens, num_layers - 1: parts.norm}
    sources.update({i: parts.layers[i] for i in layer_ids if 0 <= i < num_layers - 1})
    handles = [sources[i].register_forward_hook(keep(i)) for i in sorted(set(layer_ids))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def is_right_padded(attention_mask: Tensor) -> bool:
    """Every row [B, S] is real tokens followed only by padding (1…1 0…0). Host-side check, on CPU batches."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


@torch.no_grad()
def capture_target_features(
    target: nn.Module,
    input_ids: Tensor,  # [B, S]
    attention_mask: Tensor | None,  # [B, S]
    layer_ids: list[int],
    position_ids: Tensor | None = None,  # [B, S] packed rows: positions restart at 0 per document
) -> CapturedFeatures:
    """One forward of the frozen target's decoder (no LM head); hooks are removed even if the forward raises.

    With `position_ids` the padding mask is not passed: transformers then reads the packed format from the
    positions and masks every layer (sliding-window ones included) to the token's own document. Right-padded rows
    (`is_right_padded`) need no mask either: under causal attention padding comes after every real token and cannot
    change it, so callers pass `attention_mask=None` and the target can use fused causal kernels.
    """
    parts = family_for(target.config).decoder_parts(target)
    last = len(parts.layers) - 1
    mask = attention_mask if position_ids is None else None
    with hidden_state_hooks(target, [*layer_ids, last]) as captured:
        parts.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    features = torch.cat([captured[i] for i in layer_ids], dim=-1)
    return CapturedFeatures(features=features, last_hidden=captured[last])
