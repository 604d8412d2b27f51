"""Host memory and parameter bytes per rank when 2 CPU ranks load a target: replicated vs sharded, side by side.

Replicated (`shard_dense_target: false`): every rank runs `from_pretrained` and keeps the whole target. Sharded
(`true`): every rank builds the target on the meta device and FSDP2-shards it; rank 0 alone reads the safetensors
file and each rank receives only its shard. A random Qwen3 target (default ~134M parameters, 512 MiB in fp32) is
saved once; each mode then runs in fresh processes, so resident memory (RSS) grows from the same baseline.

    python benchmarks/target_load_memory.py                 # ~1 minute on 2 cores
    python benchmarks/target_load_memory.py --hidden 1024 --layers 16

Ends with one JSON line: per mode and rank the RSS growth at load (peak and after), the parameter bytes held,
and the sharded / replicated ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

MIB = 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_target(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    from transformers import Qwen3ForCausalLM

    from nemo_automodel_dspark.target.tiny import tiny_config

    config = tiny_config(
        "qwen3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _worker(rank: int, port: int, mode: str, path: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from nemo_automodel_dspark import distributed as D
    from nemo_automodel_dspark.recipe.sharded_target import load_sharded_target
    from nemo_automodel_dspark.target.loading import load_target

    info = D.init_distributed("gloo", 10)
    D.barrier()
    before, peak_before = rss_mib(), peak_rss_mib()
    if mode == "sharded":
        model = load_sharded_target(path, dtype=torch.float32, info=info)
    else:
        model = load_target(path, dtype=torch.float32, device=info.device)
    D.barrier()
    report = {
        "rss_growth_mib": rss_mib() - before,
        "peak_rss_growth_mib": peak_rss_mib() - max(peak_before, before),
        "param_mib": D.local_bytes(model) / MIB,
    }
    Path(out, f"{mode}{rank}.json").write_text(json.dumps(report))
    D.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = save_target(Path(tmp) / "target", args.hidden, args.layers, args.vocab)
        results: dict[str, list[dict]] = {}
        for mode in ("replicated", "sharded"):
            mp.spawn(_worker, args=(_free_port(), mode, str(Path(tmp) / "target"), tmp), nprocs=2, join=True)
            results[mode] = [json.loads(Path(tmp, f"{mode}{r}.json").read_text()) for r in range(2)]
    print(f"target: {params / 1e6:.1f}M parameters, {params * 4 / MIB:.0f} MiB in fp32; 2 CPU ranks (gloo)")
    print(f"{'mode':<11} {'rank':>4} {'RSS growth':>11} {'peak growth':>12} {'param MiB':>10}")
    for mode, ranks in results.items():
        for rank, r in enumerate(ranks):
            print(
                f"{mode:<11} {rank:>4} {r['rss_growth_mib']:>10.0f}M {r['peak_rss_growth_mib']:>11.0f}M "
                f"{r['param_mib']:>10.1f}"
            )
    ratios = {
        f"{key}_ratio_rank{rank}": results["sharded"][rank][key] / max(results["replicated"][rank][key], 1e-9)
        for key in ("rss_growth_mib", "peak_rss_growth_mib", "param_mib")
        for rank in range(2)
    }
    for name, value in ratios.items():
        print(f"sharded / replicated {name}: {value:.2f}")
    print(json.dumps({"target_params": params, "ranks": 2, **results, **{k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
