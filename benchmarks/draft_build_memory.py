"""Host memory and parameter bytes per rank while 2 CPU ranks build an FSDP2 draft: eager vs meta, side by side.

Eager (before): every rank builds the whole fp32 draft (`DSparkDrafter.from_embeddings`), then `fully_shard`
keeps its half. Meta (now, `recipe.sharded_draft.build_draft`): the draft is built on the meta device, sharded,
then each rank draws the same initial weights one tensor at a time and keeps its slice. The target's embedding
and `lm_head` ([V, H], fp32) exist before the build in both modes and are not counted. Each mode runs in fresh
processes; memory is the private resident set (`RssAnon`) growth from just before the build, its peak sampled
every 2 ms, and again after `malloc_trim`. The two modes' gathered weights are compared bit for bit.

    python benchmarks/draft_build_memory.py                 # ~1 minute on 2 cores
    python benchmarks/draft_build_memory.py --vocab 64000 --hidden 2048

Ends with one JSON line: per mode and rank those figures, the parameter bytes held and the meta / eager ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from target_load_memory import MIB, PeakSampler, _free_port, rss_mib  # noqa: E402

sys.path.pop(0)  # benchmarks/ must not shadow anything later imports


def _setup(args: dict):
    from nemo_automodel_dspark.model.config import DSparkConfig
    from nemo_automodel_dspark.target.tiny import tiny_config

    h = args["hidden"]
    config = tiny_config(
        "qwen3",
        vocab_size=args["vocab"],
        hidden_size=h,
        intermediate_size=3 * h,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=h // 8,
    )
    dspark = DSparkConfig(mask_token_id=5, draft_num_hidden_layers=5, block_size=7, markov_rank=64)
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(args["vocab"], h, generator=g)
    lm_head = torch.randn(args["vocab"], h, generator=g)
    return config, dspark, embed, lm_head


def _worker(rank: int, port: int, mode: str, args: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from nemo_automodel_dspark import distributed as D
    from nemo_automodel_dspark.model.drafter import DSparkDrafter
    from nemo_automodel_dspark.recipe.sharded_draft import build_draft

    info = D.init_distributed("gloo", 10)
    config, dspark, embed, lm_head = _setup(args)
    D.barrier()
    before = rss_mib()
    sampler = PeakSampler()
    if mode == "meta":
        _, model = build_draft(config, dspark, embed, lm_head, info=info, strategy="fsdp2", seed=0)
    else:  # what the recipe did before: a whole fp32 draft per rank, then fully_shard
        torch.manual_seed(0)
        draft = DSparkDrafter.from_embeddings(config, dspark, embed, lm_head)
        model = D.wrap_draft(draft, "fsdp2", info)
        del draft
    D.barrier()
    peak = sampler.stop()
    built = rss_mib() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss_mib() - before
    gathered = {k: D.full_tensor(v.detach()) for k, v in model.state_dict().items()}  # collective: every rank
    if rank == 0:
        torch.save(gathered, Path(out, f"{mode}_weights.pt"))
    full_mib = sum(v.numel() * v.element_size() for v in gathered.values()) / MIB
    report = {
        "built_mib": built,
        "peak_rss_growth_mib": peak - before,
        "trimmed_mib": trimmed,
        "param_mib": D.local_bytes(model) / MIB,
        "full_draft_mib": full_mib,
    }
    Path(out, f"{mode}{rank}.json").write_text(json.dumps(report))
    D.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    args = vars(parser.parse_args())
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("eager", "meta"):
            mp.spawn(_worker, args=(_free_port(), mode, args, tmp), nprocs=2, join=True)
            results[mode] = [json.loads(Path(tmp, f"{mode}{r}.json").read_text()) for r in range(2)]
        eager_w, meta_w = (torch.load(Path(tmp, f"{m}_weights.pt")) for m in ("eager", "meta"))
        identical = eager_w.keys() == meta_w.keys() and all(torch.equal(eager_w[k], meta_w[k]) for k in eager_w)
    full = results["eager"][0]["full_draft_mib"]
    print(f"draft: {full:.0f} MiB in fp32 (vocab {args['vocab']}, hidden {args['hidden']}); 2 CPU ranks (gloo), FSDP2")
    print("private memory (RssAnon) growth from just before the build: right after it, peak (2 ms), after malloc_trim")
    columns = ["mode", "rank", "built", "peak", "trimmed", "param MiB"]
    print("  ".join(f"{c:>10}" for c in columns))
    for mode, ranks in results.items():
        for rank, r in enumerate(ranks):
            cells = [mode, str(rank), *(f"{r[k]:.0f}M" for k in ("built_mib", "peak_rss_growth_mib", "trimmed_mib"))]
            print("  ".join(f"{c:>10}" for c in [*cells, f"{r['param_mib']:.1f}"]))
    ratios = {
        f"{key}_ratio_rank{rank}": results["meta"][rank][key] / max(results["eager"][rank][key], 1e-9)
        for key in ("built_mib", "peak_rss_growth_mib", "trimmed_mib", "param_mib")
        for rank in range(2)
    }
    for name, value in ratios.items():
        print(f"meta / eager {name}: {value:.2f}")
    print(f"gathered weights identical: {identical}")
    print(json.dumps({"ranks": 2, "identical": identical, **results, **{k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
