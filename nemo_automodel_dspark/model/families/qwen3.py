"""Qwen3 dense and Qwen3-MoE targets; both get a dense Qwen3-style draft (MoE targets use `intermediate_size`)."""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from nemo_automodel_dspark.model.families import DecoderParts, TargetFamily, register_family
from nemo_automodel_dspark.model.layers import ContextBlockAttention, RMSNorm, SwiGLU


class Qwen3DraftLayer(nn.Module):
    """Pre-norm Qwen3 decoder layer whose attention also reads the projected target context (HF tensor names)."""

    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = ContextBlockAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            eps,
            scale=head_dim**-0.5,
            bias=bool(getattr(config, "attention_bias", False)),
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, ctx: Tensor | None, rope_q, rope_kv, mask, ctx_kv=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_q, rope_kv, mask, ctx_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


def _decoder_parts(model: nn.Module) -> DecoderParts:
    return DecoderParts.of(model, cast(nn.Module, model.model))


QWEN3 = register_family(
    TargetFamily(
        name="qwen3",
        architectures=("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        draft_architecture="Qwen3DSparkModel",
        text_config=lambda config: config,
        decoder_parts=_decoder_parts,
        build_layer=Qwen3DraftLayer,
        build_norm=lambda config: RMSNorm(config.hidden_size, config.rms_norm_eps),
    )
)
