"""Tiny random targets and drafts for the speculative-decoding tests (no downloads, milliseconds per forward)."""

from __future__ import annotations

import torch

from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter


def tiny_target(vocab: int = 64, *, layers: int = 3, seed: int = 0, context: float = 1.0, eos: int | None = None):
    """A Qwen3 target with peaked next-token distributions (large init); `context=0` makes it a bigram model.

    Scaling every attention/MLP output by `context` scales how much the prediction depends on earlier tokens:
    at 0 the residual stream is the current token's embedding, so p_t(· | prefix) = p_t(· | last token).
    """
    from nemo_automodel_dspark.target.tiny import tiny_target as build

    target = build(
        "qwen3",
        seed=seed,
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.5,
        tie_word_embeddings=False,
        eos_token_id=eos,
        pad_token_id=None,
        bos_token_id=None,
    )
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(context)
            layer.mlp.down_proj.weight.mul_(context)
    target.generation_config.eos_token_id = eos
    target.generation_config.pad_token_id = 0
    return target


def random_draft(
    target,
    *,
    head_type: str = "vanilla",
    block_size: int = 4,
    rank: int = 8,
    seed: int = 0,
    confidence: bool = True,
    layer_ids: tuple[int, ...] = (0, 1),
) -> DSparkDrafter:
    vocab = target.config.vocab_size
    torch.manual_seed(seed)
    config = DSparkConfig(
        mask_token_id=vocab - 1,
        draft_num_hidden_layers=1,
        block_size=block_size,
        markov_rank=rank,
        markov_head_type=head_type,
        target_layer_ids=list(layer_ids),
        enable_confidence_head=confidence,
        confidence_head_with_markov=rank > 0,
    )
    return DSparkDrafter.from_target(target, config).eval()


def oracle_draft(target, *, block_size: int = 4, scale: float = 1.0) -> DSparkDrafter:
    """A draft whose distribution is the target's one-token (bigram) prediction, with logits times `scale`.

    The backbone's final norm is zeroed so U = 0, W1 = identity and W2 = bigram logits: Z_k = scale·B[y_{k−1}].
    On a `context=0` target and scale 1 this draft is perfect: p_d = p_t at every slot.
    """
    vocab = target.config.vocab_size
    draft = random_draft(target, block_size=block_size, rank=vocab)
    with torch.no_grad():
        bigram = target(torch.arange(vocab).view(vocab, 1)).logits[:, 0]  # [V, V]: row x = logits after token x
        draft.norm.weight.zero_()
        draft.markov_head.markov_w1.weight.copy_(torch.eye(vocab))
        draft.markov_head.markov_w2.weight.copy_(scale * bigram.T)
    return draft
