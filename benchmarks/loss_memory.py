"""Peak memory of the DSpark objective's forward+backward: chunked vs the unchunked formula.

Run from the repository root (needs ~12 GiB of free RAM at the default size on CPU):

    python benchmarks/loss_memory.py                      # V = 151,936, 1,792 supervised rows, fp32, CPU
    python benchmarks/loss_memory.py --device cuda        # peak from torch.cuda.max_memory_allocated
    python benchmarks/loss_memory.py --vocab 32000 --rows 512

Each version runs in its own subprocess on identical inputs. On CPU the peak is the process's peak resident set
(`resource.getrusage`) minus its resident set once the inputs exist (after a tiny warm-up, so that lazily loaded
kernels are not counted); on CUDA it is `max_memory_allocated` minus the allocation after the inputs. The
script prints both peaks in GiB and their ratio (required: ≤ 0.30), the full-size loss agreement (≤ 1e-4
relative) and a small-case check of loss and gradient agreement (≤ 1e-5 relative); it exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys

import torch

from nemo_automodel_dspark.loss import LossConfig, default_chunk_rows, dspark_loss

LOSS = LossConfig(loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0)
BLOCK_SIZE = 7
MAX_RATIO, MAX_LOSS_REL, MAX_GRAD_REL = 0.30, 1e-4, 1e-5
GIB = 2**30


def _inputs(rows: int, vocab: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """`[1, N, K, V]` draft/teacher logits with exactly `rows` supervised slots; no transient copies."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = math.ceil(rows / BLOCK_SIZE)
    shape = (1, blocks, BLOCK_SIZE)
    draft = torch.randn(*shape, vocab, generator=g, device=device).requires_grad_()
    target = torch.randn(*shape, vocab, generator=g, device=device)
    ids = torch.randint(0, vocab, shape, generator=g, device=device)
    mask = (torch.arange(blocks * BLOCK_SIZE, device=device) < rows).reshape(shape)
    conf = torch.randn(shape, generator=g, device=device).requires_grad_()
    return draft, target, ids, mask, conf


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _loss_and_backward(inputs: tuple[torch.Tensor, ...], chunk_rows: int | None) -> float:
    out = dspark_loss(*inputs, LOSS, chunk_rows=chunk_rows)
    out.loss.backward()
    return out.loss.item()


def _worker(args: argparse.Namespace) -> None:
    """Measure one version in this (fresh) process and print one JSON line."""
    chunk_rows = 0 if args.worker == "unchunked" else args.chunk_rows
    _loss_and_backward(_inputs(BLOCK_SIZE * 2, 64, args.device), chunk_rows)  # warm-up of nothing
    inputs = _inputs(args.rows, args.vocab, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = _loss_and_backward(inputs, chunk_rows)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _current_rss_bytes()
        loss = _loss_and_backward(inputs, chunk_rows)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB on Linux
    print(json.dumps({"peak_bytes": peak, "loss": loss}))


def _measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", mode, "--vocab", str(args.vocab), "--rows", str(args.rows)]
    cmd += ["--device", args.device] + (["--chunk-rows", str(args.chunk_rows)] if args.chunk_rows else [])
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _small_case_agreement(device: str) -> tuple[float, float]:
    """Relative loss and gradient differences, chunked (5 rows, not dividing R) vs unchunked, on a small case."""
    results = []
    for chunk_rows in (0, 5):
        inputs = _inputs(96, 1000, device, seed=1)
        loss = _loss_and_backward(inputs, chunk_rows)
        results.append((loss, torch.cat([inputs[0].grad.flatten(), inputs[4].grad.flatten()])))
    (ref_loss, ref_grad), (loss, grad) = results
    grad_rel = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
    return abs(loss - ref_loss) / abs(ref_loss), grad_rel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rows", type=int, default=1_792, help="supervised rows (blocks of K = 7)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: picked from the vocabulary size")
    parser.add_argument("--worker", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    chunk_rows = args.chunk_rows or default_chunk_rows(args.vocab)
    print(f"vocab={args.vocab} rows={args.rows} dtype=float32 device={args.device} chunk_rows={chunk_rows}")
    unchunked, chunked = _measure("unchunked", args), _measure("chunked", args)
    ratio = chunked["peak_bytes"] / unchunked["peak_bytes"]
    loss_rel = abs(chunked["loss"] - unchunked["loss"]) / abs(unchunked["loss"])
    print(f"unchunked peak: {unchunked['peak_bytes'] / GIB:.3f} GiB  loss={unchunked['loss']:.6f}")
    print(f"chunked   peak: {chunked['peak_bytes'] / GIB:.3f} GiB  loss={chunked['loss']:.6f}")
    print(f"ratio chunked/unchunked: {ratio:.3f} (limit {MAX_RATIO})")
    print(f"full-size loss relative difference: {loss_rel:.2e} (limit {MAX_LOSS_REL:.0e})")
    small_loss_rel, small_grad_rel = _small_case_agreement(args.device)
    print(f"small case (R=96, V=1000): loss rel diff {small_loss_rel:.2e}, grad rel diff {small_grad_rel:.2e}")
    ok = ratio <= MAX_RATIO and loss_rel <= MAX_LOSS_REL and small_grad_rel <= MAX_GRAD_REL
    ok = ok and small_loss_rel <= MAX_LOSS_REL
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
