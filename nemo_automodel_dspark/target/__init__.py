"""Frozen target: feature capture at `target_layer_ids` and the final-norm hidden (SPEC §2)."""
