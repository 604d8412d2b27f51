"""Drafts built and saved by NeMo AutoModel 0.7.0's own code (the reader and `dspark export` must take them)."""

from __future__ import annotations

import torch
from nemo_automodel.components.speculative.dspark.draft_qwen3 import Qwen3DSparkModel


def nemo_saved_draft(target, directory, *, sharded: bool, markov_rank: int, confidence_alpha: float, layer_ids):
    """A draft built and saved by NeMo AutoModel's own code (its `build_draft_config` omits the keys of an off head)."""
    from nemo_automodel.components.config.loader import ConfigNode
    from nemo_automodel.components.speculative.dspark.config import build_draft_config

    args: dict = dict(
        num_draft_layers=2,
        target_layer_ids=list(layer_ids),
        confidence_head_alpha=confidence_alpha,
        markov_rank=markov_rank,
        block_size=4,
        mask_token_id=target.config.vocab_size - 1,
        num_anchors=6,
    )
    if confidence_alpha > 0:
        args["confidence_head_with_markov"] = markov_rank > 0
    if markov_rank > 0:
        args["markov_head_type"] = "gated"
    config = build_draft_config(target.config, ConfigNode(args))
    config._attn_implementation = "sdpa"
    torch.manual_seed(5)
    nemo = Qwen3DSparkModel(config).eval()
    nemo.initialize_embeddings_and_head(embed_tokens=target.model.embed_tokens, lm_head=target.lm_head)
    with torch.no_grad():
        for name, p in nemo.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    nemo.save_pretrained(directory, max_shard_size="40KB" if sharded else "1GB")
    return nemo
