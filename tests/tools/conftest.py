"""A very small tiny target, built once per test session (a few seconds on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The tools' tests share two small cores with other work: oversubscribed OpenMP threads spin and crawl.
torch.set_num_threads(1)

SMALL_TARGET = {"steps": 30, "hidden_size": 64, "num_layers": 2, "vocab_size": 512, "seq_length": 128}


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemo_automodel_dspark.tools.tiny_target import build_tiny_target

    out = tmp_path_factory.mktemp("targets") / "tiny"
    build_tiny_target(out, seed=0, progress=False, **SMALL_TARGET)
    return out


@pytest.fixture(scope="session")
def small_target_kwargs() -> dict:
    return dict(SMALL_TARGET)
