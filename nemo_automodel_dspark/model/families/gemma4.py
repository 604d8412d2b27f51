"""Gemma4 targets (text stack of the multimodal model, or the text-only CausalLM) with a Gemma4-style draft.

The draft layer is a Gemma4 decoder layer of the target's **full-attention** type (DSpark layers attend over the
whole context, never a sliding window): sandwich norms, q/k RMSNorm and a scale-less v RMSNorm, attention scale 1.0,
the full-attention head dim / kv heads / RoPE, and keys reused as values when `attention_k_eq_v`. Tensor names are
HF Gemma4's, so `layers.{i}.*` of a draft loads into a `Gemma4TextDecoderLayer` of the same shape.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nemo_automodel_dspark.model.families import DecoderParts, TargetFamily, register_family
from nemo_automodel_dspark.model.layers import ContextBlockAttention, RMSNorm, SwiGLU, apply_rope

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}


def draft_text_config(config):
    """The target's text config seen as the draft sees it: every layer full attention, one head dim, one kv count.

    transformers keeps Gemma4's full-attention `head_dim` / `num_key_value_heads` as per-layer overrides, and reading
    them globally raises. The draft view makes the full-attention values global (`layer_types` all full,
    `per_layer_config` empty), keeps every other field, and also records them under the keys serving engines read
    (`global_head_dim`, `num_global_key_value_heads`). Idempotent, so a saved draft's config.json reloads to itself.
    """
    text = config.get_text_config()
    full = text.per_layer_config["full_attention"]  # the resolved config of a full-attention layer
    fields = text.to_dict()
    fields.update(
        head_dim=full.head_dim,
        num_key_value_heads=full.num_key_value_heads,
        layer_types=["full_attention"] * text.num_hidden_layers,
        per_layer_config={},  # without it __post_init__ would re-add its default global head dim (512)
    )
    view = type(text).from_dict(fields)
    view.global_head_dim, view.num_global_key_value_heads = full.head_dim, full.num_key_value_heads
    return view


def check_supported(text) -> None:
    """Refuse target variants a dense Gemma4 draft layer cannot mirror, naming the config field."""
    if getattr(text, "enable_moe_block", False):
        raise ValueError("Gemma4 target with enable_moe_block: true (MoE blocks) is not supported by the Gemma4 draft")
    if getattr(text, "hidden_size_per_layer_input", 0):
        raise ValueError(
            f"Gemma4 target with hidden_size_per_layer_input: {text.hidden_size_per_layer_input} (per-layer input "
            "embeddings) is not supported by the Gemma4 draft; it needs hidden_size_per_layer_input: 0"
        )
    if getattr(text, "use_double_wide_mlp", False) and getattr(text, "num_kv_shared_layers", 0):
        raise ValueError(
            f"Gemma4 target with use_double_wide_mlp: true and num_kv_shared_layers: {text.num_kv_shared_layers} "
            "(KV-shared layers with a double-width MLP) is not supported by the Gemma4 draft"
        )
    if text.hidden_activation not in _ACTIVATIONS:
        raise ValueError(f"Gemma4 target hidden_activation: {text.hidden_activation!r} is not one of {[*_ACTIVATIONS]}")


def _norm(dim: int, eps: float) -> RMSNorm:
    """Gemma4RMSNorm's order: normalise and multiply by the weight in fp32, cast after."""
    return RMSNorm(dim, eps, multiply_in_fp32=True)


def _unit_rms_norm(x: Tensor, eps: float) -> Tensor:
    """Gemma4's `v_norm`: RMSNorm without a scale, computed in fp32."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Gemma4ContextAttention(ContextBlockAttention):
    """Context+block attention with Gemma4's value path: v = v_norm(v_proj(x)), or v_norm(k_proj(x)) when K=V."""

    def __init__(self, config) -> None:
        hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        bias = bool(config.attention_bias)
        super().__init__(
            hidden,
            heads,
            config.num_key_value_heads,
            head_dim,
            config.rms_norm_eps,
            scale=1.0,
            bias=bias,
            make_norm=_norm,
        )
        self.k_eq_v = bool(config.attention_k_eq_v)
        if self.k_eq_v:
            self.v_proj = None  # values are the raw key projection (HF `use_alternative_attention`)
        self.eps = config.rms_norm_eps

    def context_kv(self, rows: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Rows [B, T, H] → keys (k_norm, RoPE) and values (v_norm, no RoPE), each [B, kv, T, D]."""
        k_raw = self._heads(self.k_proj(rows), self.kv_heads)
        if self.k_eq_v:
            v_raw = k_raw
        else:
            assert self.v_proj is not None  # dropped only when k_eq_v
            v_raw = self._heads(self.v_proj(rows), self.kv_heads)
        return apply_rope(self.k_norm(k_raw), *rope), _unit_rms_norm(v_raw, self.eps)


class Gemma4DraftLayer(nn.Module):
    """Sandwich-norm Gemma4 decoder layer whose attention also reads the projected target context (HF tensor names)."""

    layer_scalar: Tensor  # buffer registered in __init__

    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = _norm(hidden, eps)
        self.self_attn = Gemma4ContextAttention(config)
        self.post_attention_layernorm = _norm(hidden, eps)
        self.pre_feedforward_layernorm = _norm(hidden, eps)
        self.mlp = SwiGLU(hidden, config.intermediate_size, _ACTIVATIONS[config.hidden_activation])
        self.post_feedforward_layernorm = _norm(hidden, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # HF Gemma4 keeps (and serves) this per-layer constant

    def reset_parameters(self) -> None:
        """This layer's own tensor (its children reset themselves): `layer_scalar` = 1."""
        with torch.no_grad():
            self.layer_scalar.fill_(1.0)

    def forward(self, x: Tensor, ctx: Tensor | None, rope_q, rope_kv, mask, ctx_kv=None) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), ctx, rope_q, rope_kv, mask, ctx_kv)
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


def _decoder_parts(model: nn.Module) -> DecoderParts:
    """Gemma4ForConditionalGeneration nests the text stack at `model.language_model`; Gemma4ForCausalLM does not."""
    return DecoderParts.of(model, cast(nn.Module, getattr(model.model, "language_model", model.model)))


def _model_class(config):
    import transformers

    return getattr(transformers, next(a for a in config.architectures if a in GEMMA4.architectures))


GEMMA4 = register_family(
    TargetFamily(
        name="gemma4",
        architectures=(
            "Gemma4ForConditionalGeneration",
            "Gemma4ForCausalLM",
            "Gemma4UnifiedForConditionalGeneration",
            "Gemma4UnifiedForCausalLM",
        ),
        draft_architecture="Gemma4DSparkModel",
        text_config=draft_text_config,
        decoder_parts=_decoder_parts,
        build_layer=Gemma4DraftLayer,
        # Gemma4's RMSNorm scales by `w` (init 1), unlike Gemma 2/3's `1 + w`.
        build_norm=lambda config: _norm(config.hidden_size, config.rms_norm_eps),
        model_class=_model_class,
        check_supported=check_supported,
        embed_scale=lambda config: config.hidden_size**0.5,
        logit_softcap=lambda config: config.final_logit_softcapping,
    )
)
