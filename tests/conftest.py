"""Tiny random targets built from transformers config classes (no downloads)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 96
MASK_ID = VOCAB - 1


def pytest_collection_modifyitems(config, items) -> None:
    """`@pytest.mark.gpu` tests need CUDA: skipped (with the reason) on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run with `pytest -m gpu` on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def tiny_qwen3(moe: bool = False, layers: int = 4, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    if moe:
        config = Qwen3MoeConfig(
            **common, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1
        )
        config.architectures = ["Qwen3MoeForCausalLM"]
        return Qwen3MoeForCausalLM(config).eval()
    config = Qwen3Config(**common)
    config.architectures = ["Qwen3ForCausalLM"]
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def qwen3_target():
    return tiny_qwen3()


@pytest.fixture(scope="session")
def qwen3_moe_target():
    return tiny_qwen3(moe=True)
