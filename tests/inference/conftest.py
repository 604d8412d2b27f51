"""Tiny models run one op at a time; on a shared CPU, intra-op threads only add spin-wait (100x slower here)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
