"""A target sharded over 2 gloo ranks: the same hidden states as the replicated target, half the bytes per rank."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _helpers.recipe_assets import build_target_dir

FAMILIES = ("qwen3", "qwen3_moe", "gemma4")
LAYER_IDS = [0, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, dirs: dict[str, str], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from nemo_automodel_dspark import distributed as D
    from nemo_automodel_dspark.recipe.sharded_target import load_sharded_target
    from nemo_automodel_dspark.target.capture import capture_target_features
    from nemo_automodel_dspark.target.loading import load_target

    info = D.init_distributed("gloo", 5)
    report = {}
    for family, path in dirs.items():
        replicated = load_target(path, dtype=torch.float32, device=info.device)
        said: list[str] = []
        sharded = load_sharded_target(path, dtype=torch.float32, info=info, log=said.append)
        whole = {**replicated.state_dict(), **dict(replicated.named_buffers())}
        gathered = {**sharded.state_dict(), **dict(sharded.named_buffers())}
        unequal = [k for k in whole if not torch.equal(whole[k], D.full_tensor(gathered[k]))]
        ids = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(rank))
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # a padded row too
        a = capture_target_features(replicated, ids, mask, LAYER_IDS)
        b = capture_target_features(sharded, ids, mask, LAYER_IDS)
        report[family] = {
            "features_equal": torch.equal(a.features, b.features),
            "last_hidden_equal": torch.equal(a.last_hidden, b.last_hidden),
            "replicated_bytes": D.local_bytes(replicated),
            "sharded_bytes": D.local_bytes(sharded),
            "frozen": not any(p.requires_grad for p in sharded.parameters()),
            "same_names": sorted(whole) == sorted(gathered),
            "unequal": unequal,
            "fallback_said": said,
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    D.destroy()


def _bin_checkpoint(folder: Path) -> Path:
    """The same target saved as `pytorch_model.bin` (transformers loads it; the streaming reader does not)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_skeleton_has_the_dtypes_from_pretrained_gives(tmp_path, dtype):
    """A bf16 checkpoint loaded in fp32 (CPU) or bf16 (GPU): the meta skeleton matches tensor by tensor."""
    from transformers import AutoConfig

    from nemo_automodel_dspark.target.loading import load_target, target_skeleton

    folder = build_target_dir(tmp_path / "t")
    model = load_target(str(folder), dtype=torch.bfloat16, device=torch.device("cpu"))
    model.save_pretrained(folder)  # now a bf16 checkpoint
    skeleton = target_skeleton(AutoConfig.from_pretrained(folder), dtype)
    loaded = load_target(str(folder), dtype=dtype, device=torch.device("cpu"))
    assert all(p.is_meta and not p.requires_grad for p in skeleton.parameters())
    dtypes = lambda tensors: {k: v.dtype for k, v in tensors}  # noqa: E731
    assert dtypes(skeleton.state_dict().items()) == dtypes(loaded.state_dict().items())
    assert dtypes(skeleton.named_buffers()) == dtypes(loaded.named_buffers())
    assert any(v.dtype == dtype for v in skeleton.parameters())


@pytest.mark.slow  # two processes, three families
def test_sharded_capture_equals_replicated_with_half_the_bytes(tmp_path):
    """Every tensor and buffer, gathered, equals the replicated target's: streamed from the safetensors files for
    each family (Qwen3-MoE's per-expert tensors fused, Gemma4's tied lm_head), and through rank 0's
    `from_pretrained` for a checkpoint the reader cannot stream (a `pytorch_model.bin`), which is said on rank 0."""
    dirs = {f: str(build_target_dir(tmp_path / f, family=f)) for f in FAMILIES}
    dirs["qwen3_bin"] = str(_bin_checkpoint(build_target_dir(tmp_path / "qwen3_bin", family="qwen3")))
    mp.spawn(_worker, args=(2, _free_port(), dirs, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(report) == {*FAMILIES, "qwen3_bin"}
        for family, r in report.items():
            assert r["features_equal"] and r["last_hidden_equal"], (rank, family)
            assert r["same_names"] and r["unequal"] == [], (rank, family, r["unequal"])
            assert r["frozen"], family
            fallback = family == "qwen3_bin" and rank == 0
            assert [line.split(" (")[0] for line in r["fallback_said"]] == (
                ["target weights: not streamed"] if fallback else []
            ), (rank, family)
            assert r["sharded_bytes"] / r["replicated_bytes"] == pytest.approx(0.5, abs=0.05), (rank, family)
