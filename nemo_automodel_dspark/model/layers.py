"""Building blocks shared by every draft family: RMSNorm, fp32 RoPE, and context+block attention."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_compiled_flex = None


class RMSNorm(nn.Module):
    """RMSNorm as the family's transformers module computes it: normalise in fp32, then scale by the weight.

    Qwen3/Llama (`multiply_in_fp32=False`) cast the normalised x to the input dtype and then multiply by the weight,
    as the serving engines do; Gemma4 multiplies in fp32 and casts after. In bf16 the two orders round differently
    (~1e-2 in the logits), so each family must use its target's order for the draft to compute what engines compute.
    `offset=1.0` gives Gemma 2/3's `(1 + w)` scaling.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0, *, multiply_in_fp32: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.offset = offset
        self.multiply_in_fp32 = multiply_in_fp32
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initial scale: 1 (or 0 under the `1 + w` offset), whether built eagerly or materialised from meta."""
        with torch.no_grad():
            self.weight.fill_(0.0 if self.offset else 1.0)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight + self.offset if self.offset else self.weight
        if self.multiply_in_fp32:
            return (normed * scale.float()).to(x.dtype)
        return scale * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE whose inverse frequencies stay fp32 whatever `.to(dtype)` does to the module (SPEC §1)."""

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self._initial = inv_freq.detach().float().cpu()  # plain attribute: kept by `_apply`, for `reset_parameters`
        self.register_buffer("inv_freq", self._initial.clone(), persistent=False)
        self.attention_scaling = attention_scaling

    def reset_parameters(self) -> None:
        """Restore the constructor's frequencies (after `to_empty`, when the draft was built on the meta device)."""
        with torch.no_grad():
            self.inv_freq.copy_(self._initial)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fp32 = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = fp32.to(self.inv_freq.device)  # keep the fp32 values, follow the device
        return self

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin tables [B, T, head_dim] for integer positions [B, T], computed in fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rope_inv_freq(config, head_dim: int) -> tuple[Tensor, float]:
    """Inverse frequencies for a HF text config (default RoPE, or any `rope_type` transformers knows).

    Draft layers are full (non-sliding) attention, so a config with RoPE per layer type (Gemma4:
    `rope_parameters = {"sliding_attention": ..., "full_attention": ...}`) uses its full-attention entry.
    """
    params = getattr(config, "rope_parameters", None) or {}
    per_type = {"layer_type": "full_attention"} if "full_attention" in params else {}
    params = params.get("full_attention", params)
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **per_type)
        return inv_freq.float(), float(scaling)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return inv_freq, 1.0


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, D], cos/sin [B, T, D] → rotated x."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """Attention with a dense boolean mask (SDPA), a FlexAttention BlockMask, or None (all visible); GQA both."""
    if mask is None or isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)


class ContextBlockAttention(nn.Module):
    """Block slots query `[context | blocks]`; the layer's own k/v projections read both (DFlash-style).

    `bias` (the target's `attention_bias`) goes on q/k/v and o_proj alike, as in the target's and engines' layers.
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        *,
        scale: float,
        bias: bool = False,
        make_norm: Callable[[int, float], nn.Module] = RMSNorm,
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        # None in subclasses that reuse the key projection as values (they override `context_kv`)
        self.v_proj: nn.Linear | None = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)  # transformers: o_proj follows attention_bias
        self.q_norm = make_norm(head_dim, eps)
        self.k_norm = make_norm(head_dim, eps)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)  # [B, n, T, D]

    def context_kv(self, ctx: Tensor, rope_ctx: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Keys/values of rows [B, T, H] → ([B, kv, T, D], [B, kv, T, D]); context rows can be cached across rounds."""
        assert self.v_proj is not None, "a subclass without v_proj must override context_kv"
        k = apply_rope(self.k_norm(self._heads(self.k_proj(ctx), self.kv_heads)), *rope_ctx)
        return k, self._heads(self.v_proj(ctx), self.kv_heads)

    def forward(
        self,
        x: Tensor,
        ctx: Tensor | None,
        rope_q: tuple[Tensor, Tensor],
        rope_kv: tuple[Tensor, Tensor],
        mask,
        ctx_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x [B, Q, H] block slots; context as rows ctx [B, S, H] or precomputed `ctx_kv` → [B, Q, H].

        `rope_kv` covers `[context | block]` positions when `ctx` is given, only the block positions with `ctx_kv`.
        """
        q = apply_rope(self.q_norm(self._heads(self.q_proj(x), self.heads)), *rope_q)
        if ctx_kv is None:
            assert ctx is not None, "ContextBlockAttention needs context rows `ctx` or cached `ctx_kv`"
            k, v = self.context_kv(torch.cat([ctx, x], dim=1), rope_kv)  # rows [B, S + Q, H]
        else:
            k_blk, v_blk = self.context_kv(x, rope_kv)  # the block's own keys/values, same projections
            k, v = torch.cat([ctx_kv[0], k_blk], dim=2), torch.cat([ctx_kv[1], v_blk], dim=2)
        out = attend(q, k, v, mask, self.scale)  # [B, heads, Q, D]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """HF-named gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
