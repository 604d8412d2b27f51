"""Tiny targets of every supported family, built from transformers config classes (no downloads).

The one place that knows how to make a small Qwen3 / Qwen3-MoE / Gemma4 config: the tests, the benchmarks and
`dspark build-tiny-target` all build theirs here, overriding only the fields they care about. Defaults: vocabulary
64, hidden 32, 3 layers, 4 heads of 8 (2 kv heads), 256 positions. A family's own defaults (MoE experts, Gemma4's
sliding/full layer pattern and soft-capping) are filled in; explicit fields always win.
"""

from __future__ import annotations

from typing import Any

import torch

FAMILIES = ("qwen3", "qwen3_moe", "gemma4", "gemma4_causal", "gemma4_unified")
COMMON: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)
MOE: dict[str, Any] = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
GEMMA4: dict[str, Any] = dict(
    global_head_dim=16,
    num_global_key_value_heads=1,
    sliding_window=8,
    final_logit_softcapping=30.0,
    bos_token_id=None,
)


def gemma4_layer_types(num_layers: int) -> list[str]:
    """One sliding-window layer first, then full attention: both kinds in the smallest stack."""
    return ["sliding_attention"] + ["full_attention"] * (num_layers - 1)


def tiny_config(family: str = "qwen3", **fields: Any):
    """A transformers config for `family` (see FAMILIES) with `architectures` set; `fields` override the defaults.

    Gemma4 fields go to the text config; `gemma4` wraps it in `Gemma4Config` (ForConditionalGeneration),
    `gemma4_causal` is the bare text config (ForCausalLM), `gemma4_unified` the Unified variant.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    values = {**COMMON, **(MOE if family == "qwen3_moe" else {}), **fields}
    if family == "qwen3":
        return _with_architecture(transformers.Qwen3Config(**values), "Qwen3ForCausalLM")
    if family == "qwen3_moe":
        return _with_architecture(transformers.Qwen3MoeConfig(**values), "Qwen3MoeForCausalLM")
    values = {**GEMMA4, **values}
    values.setdefault("layer_types", gemma4_layer_types(values["num_hidden_layers"]))
    if family == "gemma4_unified":
        unified = transformers.Gemma4UnifiedTextConfig(**values)
        return _with_architecture(
            transformers.Gemma4UnifiedConfig(text_config=unified), "Gemma4UnifiedForConditionalGeneration"
        )
    text = transformers.Gemma4TextConfig(**{"hidden_size_per_layer_input": 0, **values})
    if family == "gemma4_causal":
        return _with_architecture(text, "Gemma4ForCausalLM")
    return _with_architecture(transformers.Gemma4Config(text_config=text), "Gemma4ForConditionalGeneration")


def _with_architecture(config, architecture: str):
    config.architectures = [architecture]
    return config


def tiny_target(family: str = "qwen3", *, seed: int = 0, **fields: Any) -> torch.nn.Module:
    """A randomly initialised target of `family` (`torch.manual_seed(seed)` first), in eval mode, fp32."""
    import transformers

    config = tiny_config(family, **fields)
    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    return cls(config).eval()
