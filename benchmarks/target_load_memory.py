"""Host memory and parameter bytes per rank when 2 CPU ranks load a target: replicated vs sharded, side by side.

Replicated (`shard_dense_target: false`): every rank runs `from_pretrained` and keeps the whole target. Sharded
(`true`): every rank builds the target on the meta device and FSDP2-shards it; rank 0 alone reads the safetensors
file, one tensor at a time, and each rank receives only its shard. A random Qwen3 target (default ~267M
parameters) is saved once in bf16 and loaded in fp32 (the CPU compute dtype), so every loaded weight is private
memory; each mode runs in fresh processes. Memory is the private resident set (`RssAnon`): the checkpoint's
mmapped pages (`RssFile`) are page cache shared by all processes on the node and are reported apart.

    python benchmarks/target_load_memory.py                 # ~1 minute on 2 cores
    python benchmarks/target_load_memory.py --hidden 1024 --layers 16

Private memory is read right after loading, after one forward (which touches every weight) and after
`malloc_trim` (glibc keeps freed all-gather buffers); peaks are sampled every 2 ms, while loading ("load peak")
and over loading and the forward ("peak"). Ends with one JSON line:
per mode and rank those figures, the parameter bytes held, and the sharded / replicated ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

MIB = 2**20


def rss_mib(kind: str = "RssAnon") -> float:
    """Resident memory of this process: `RssAnon` (private, what a copy per rank costs) or `RssFile` (page cache)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {kind}")


class PeakSampler:
    """Samples this process's RSS every few milliseconds in a thread; `.peak` is the highest seen (MiB)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mib())


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
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)  # saved in bf16, as hub checkpoints are
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _worker(rank: int, port: int, mode: str, path: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from nemo_automodel_dspark import distributed as D
    from nemo_automodel_dspark.recipe.sharded_target import load_sharded_target
    from nemo_automodel_dspark.target.capture import capture_target_features
    from nemo_automodel_dspark.target.loading import load_target

    info = D.init_distributed("gloo", 10)
    D.barrier()
    before, file_before = rss_mib(), rss_mib("RssFile")
    sampler = PeakSampler()
    if mode == "sharded":
        model = load_sharded_target(path, dtype=torch.float32, info=info)
    else:
        model = load_target(path, dtype=torch.float32, device=info.device)
    D.barrier()
    load_peak = sampler.stop()
    loaded = rss_mib() - before
    sampler = PeakSampler()
    # one forward touches every weight (safetensors may map pages lazily until then)
    capture_target_features(model, torch.ones(1, 32, dtype=torch.long), None, [0])
    D.barrier()
    peak = max(sampler.stop(), load_peak)
    after_forward = rss_mib() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what glibc keeps from freed gather buffers
    report = {
        "loaded_mib": loaded,
        "after_forward_mib": after_forward,
        "rss_growth_mib": rss_mib() - before,
        "load_peak_rss_growth_mib": load_peak - before,  # while loading only
        "peak_rss_growth_mib": peak - before,  # loading and the forward (gloo all-gathers into host buffers)
        "param_mib": D.local_bytes(model) / MIB,
        "page_cache_mib": rss_mib("RssFile") - file_before,  # the mmapped checkpoint, shared between processes
    }
    Path(out, f"{mode}{rank}.json").write_text(json.dumps(report))
    D.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = save_target(Path(tmp) / "target", args.hidden, args.layers, args.vocab)
        results: dict[str, list[dict]] = {}
        for mode in ("replicated", "sharded"):
            mp.spawn(_worker, args=(_free_port(), mode, str(Path(tmp) / "target"), tmp), nprocs=2, join=True)
            results[mode] = [json.loads(Path(tmp, f"{mode}{r}.json").read_text()) for r in range(2)]
    print(f"target: {params / 1e6:.1f}M parameters, {params * 4 / MIB:.0f} MiB in fp32; 2 CPU ranks (gloo)")
    print(
        "private memory (RssAnon) growth from just before loading: right after loading, after one forward, after "
        "malloc_trim; peak sampled every 2 ms"
    )
    columns = ["mode", "rank", "loaded", "load peak", "after fwd", "trimmed", "peak", "param MiB", "page cache"]
    print("  ".join(f"{c:>10}" for c in columns))
    for mode, ranks in results.items():
        for rank, r in enumerate(ranks):
            keys = (
                "loaded_mib",
                "load_peak_rss_growth_mib",
                "after_forward_mib",
                "rss_growth_mib",
                "peak_rss_growth_mib",
            )
            cells = [mode, str(rank), *(f"{r[k]:.0f}M" for k in keys), f"{r['param_mib']:.1f}"]
            print("  ".join(f"{c:>10}" for c in [*cells, f"{r['page_cache_mib']:.0f}M"]))
    ratios = {
        f"{key}_ratio_rank{rank}": results["sharded"][rank][key] / max(results["replicated"][rank][key], 1e-9)
        for key in ("loaded_mib", "load_peak_rss_growth_mib", "rss_growth_mib", "peak_rss_growth_mib", "param_mib")
        for rank in range(2)
    }
    for name, value in ratios.items():
        print(f"sharded / replicated {name}: {value:.2f}")
    print(json.dumps({"target_params": params, "ranks": 2, **results, **{k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
