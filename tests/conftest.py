"""Tiny random targets (built by `nemo_automodel_dspark.target.tiny`, no downloads) and the gpu marker."""

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
    """The shared tiny Qwen3 (or Qwen3-MoE, every layer sparse) of the model/loss tests: vocabulary 96."""
    from nemo_automodel_dspark.target.tiny import tiny_target

    extra = {"decoder_sparse_step": 1} if moe else {}
    family = "qwen3_moe" if moe else "qwen3"
    return tiny_target(
        family, seed=seed, vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=128, **extra
    )


@pytest.fixture(scope="session")
def qwen3_target():
    return tiny_qwen3()


@pytest.fixture(scope="session")
def qwen3_moe_target():
    return tiny_qwen3(moe=True)


@pytest.fixture(scope="session", autouse=True)
def _tokenized_cache_in_a_temporary_folder(tmp_path_factory):
    """Recipe runs cache their tokenised rows (data/cache.py); never in the user's ~/.cache from the tests."""
    import os

    previous = os.environ.get("DSPARK_CACHE_DIR")
    os.environ["DSPARK_CACHE_DIR"] = str(tmp_path_factory.mktemp("dspark_cache"))
    yield
    if previous is None:
        os.environ.pop("DSPARK_CACHE_DIR", None)
    else:
        os.environ["DSPARK_CACHE_DIR"] = previous
