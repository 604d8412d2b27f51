"""The default cache root on 2 gloo ranks: both start with it empty; exactly one builds, the other waits and reuses.

Each way of naming the root is tried in one run: `$DSPARK_CACHE_DIR`, `$XDG_CACHE_HOME/nemo_automodel_dspark`, and
`~/.cache/nemo_automodel_dspark` (with `$HOME` a temporary folder). The ranks open the dataset at the same moment
(after a barrier) with `cache_dir=default_cache_root()`, as the recipe does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

SEQ = 64
VARIANTS = ("DSPARK_CACHE_DIR", "XDG_CACHE_HOME", "HOME")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(dataset) -> dict:
    """What a rank trains on: row count, lengths and a hash of every row's ids and loss mask."""
    h = hashlib.sha256()
    for row in dataset:
        h.update(row["input_ids"].numpy().tobytes() + b"|" + row["loss_mask"].numpy().tobytes())
    return {"rows": len(dataset), "lengths": dataset.lengths(), "sha256": h.hexdigest()}


def _point_cache_at(variant: str, folder: Path) -> None:
    """Name the cache root one way only (the other variables unset)."""
    os.environ.pop("DSPARK_CACHE_DIR", None)
    os.environ.pop("XDG_CACHE_HOME", None)
    os.environ[variant] = str(folder)


def _worker(rank: int, world: int, port: int, data: str, tokenizer_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from transformers import AutoTokenizer

    from nemo_automodel_dspark import distributed as D
    from nemo_automodel_dspark.data import cache
    from nemo_automodel_dspark.data.dataset import DSparkChatDataset

    real_build = cache._build

    def counted_build(*args) -> None:
        Path(out, f"built_{os.environ['VARIANT']}_rank{rank}").touch()
        time.sleep(0.5)  # the other rank reaches the lock while this one builds
        real_build(*args)

    cache._build = counted_build
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    D.init_distributed("gloo", 5)
    report = {}
    for variant in VARIANTS:
        os.environ["VARIANT"] = variant
        _point_cache_at(variant, Path(out, variant))
        root = cache.default_cache_root()
        D.barrier()  # both ranks start with an empty root, at the same moment
        dataset = DSparkChatDataset(data, tokenizer, SEQ, cache_dir=root)
        report[variant] = {"root": root, **_digest(dataset)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    D.destroy()


@pytest.mark.slow  # two processes
def test_two_ranks_share_one_build_of_the_default_cache(tmp_path, tokenizer, conversation, write_jsonl):
    from nemo_automodel_dspark.data.dataset import DSparkChatDataset

    rows = [{"messages": conversation(f"hello {i}", "paris." * (1 + i % 4))} for i in range(12)]
    data = str(write_jsonl(tmp_path / "train.jsonl", rows))
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), data, str(tmp_path / "tok"), str(out)), nprocs=2, join=True)
    in_memory = _digest(DSparkChatDataset(data, tokenizer, SEQ, cache_dir=None))
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    expected_roots = {
        "DSPARK_CACHE_DIR": out / "DSPARK_CACHE_DIR",
        "XDG_CACHE_HOME": out / "XDG_CACHE_HOME" / "nemo_automodel_dspark",
        "HOME": out / "HOME" / ".cache" / "nemo_automodel_dspark",
    }
    for variant in VARIANTS:
        builders = sorted(p.name for p in out.glob(f"built_{variant}_rank*"))
        assert len(builders) == 1, (variant, builders)  # exactly one rank built, the other reused its build
        first, second = (r[variant] for r in reports)
        assert first["root"] == second["root"] == str(expected_roots[variant])
        assert first == second, variant  # the same rows on both ranks
        assert {k: first[k] for k in in_memory} == in_memory, variant  # and the rows the in-memory loop reads
        entries = sorted(p.name for p in Path(first["root"]).iterdir())
        assert len(entries) == 2 and entries[1] == entries[0] + ".lock", entries  # one cache, no temporary folder
