"""Peak memory of the DSpark objective's forward+backward, LM head and teacher projection included: fused vs unfused.

Run from the repository root (the unfused formula needs ~9 GiB of free RAM at the default size on CPU):

    python benchmarks/loss_memory.py                      # V = 151,936 and V = 262,144; 1,024 rows, fp32, CPU
    python benchmarks/loss_memory.py --device cuda        # peak from torch.cuda.max_memory_allocated
    python benchmarks/loss_memory.py --vocab 32000 --rows 512

The objective's inputs are the draft's hidden rows `[R, H]`, its Markov features `[R, r]`, the target's final hidden
at the teacher positions `[R, H]`, the frozen LM head `[V, H]` and the trainable Markov W2 `[V, r]`. Three versions
run, each in its own subprocess on identical inputs:

- `unfused`: today's formula spelled out: draft logits `h·Wᵀ + m·W2ᵀ` and teacher logits `t·Wᵀ` materialised, then
  the unchunked objective (`dspark_loss(chunk_rows=0)`);
- `logits_chunked`: the same materialised logits into the chunked objective (what the recipe did before the fusion);
- `fused`: `dspark_head_loss`: the projections run chunk by chunk inside the objective.

On CPU the peak is the process's peak resident set (`resource.getrusage`) minus its resident set once the inputs
exist; on CUDA it is `max_memory_allocated` minus the allocation after the inputs. Both count the gradients the
backward produces (`[R, H]`, `[R, r]`, `[V, r]`), which every version makes. The script prints each peak, the ratio
fused / unfused per vocabulary (target ≤ 0.10), the loss agreement, and ends with one JSON line; it exits 1 if a ratio
is over the target or the losses disagree by more than 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys

import torch

from nemo_automodel_dspark.loss import LogitHead, LossConfig, default_chunk_rows, dspark_head_loss, dspark_loss

LOSS = LossConfig(loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0)
BLOCK_SIZE = 7
MAX_RATIO, MAX_LOSS_REL = 0.10, 1e-4
VOCABS = (151_936, 262_144)
MODES = ("unfused", "logits_chunked", "fused")
GIB = 2**30


def _inputs(rows: int, vocab: int, hidden: int, rank: int, device: str, seed: int = 0) -> tuple:
    """(head, hidden, Markov features, teacher hidden, ids, mask, confidence logits) with `rows` supervised slots."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = math.ceil(rows / BLOCK_SIZE)
    shape = (1, blocks, BLOCK_SIZE)
    weight = torch.randn(vocab, hidden, generator=g, device=device) / hidden**0.5  # frozen, as in training
    w2 = (torch.randn(vocab, rank, generator=g, device=device) / rank**0.5).requires_grad_()
    h = torch.randn(*shape, hidden, generator=g, device=device).requires_grad_()
    m = torch.randn(*shape, rank, generator=g, device=device).requires_grad_()
    t = torch.randn(*shape, hidden, generator=g, device=device)
    ids = torch.randint(0, vocab, shape, generator=g, device=device)
    mask = (torch.arange(blocks * BLOCK_SIZE, device=device) < rows).reshape(shape)
    conf = torch.randn(shape, generator=g, device=device).requires_grad_()
    return LogitHead(weight, w2, None), h, m, t, ids, mask, conf


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _loss_and_backward(inputs: tuple, mode: str) -> float:
    head, h, m, t, ids, mask, conf = inputs
    if mode == "fused":
        out = dspark_head_loss(head, h, m, t, ids, mask, conf, LOSS)
    else:
        logits, teacher = head.draft_logits(h, m), head.teacher_logits(t)
        out = dspark_loss(logits, teacher, ids, mask, conf, LOSS, chunk_rows=0 if mode == "unfused" else None)
    out.loss.backward()
    return out.loss.item()


def _worker(args: argparse.Namespace) -> None:
    """Measure one version in this (fresh) process and print one JSON line."""
    _loss_and_backward(_inputs(BLOCK_SIZE * 2, 64, 8, 4, args.device), args.worker)  # load the kernels first
    inputs = _inputs(args.rows, args.vocab, args.hidden, args.rank, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = _loss_and_backward(inputs, args.worker)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _current_rss_bytes()
        loss = _loss_and_backward(inputs, args.worker)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB on Linux
    print(json.dumps({"peak_bytes": peak, "loss": loss}))


def _measure(mode: str, vocab: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", mode, "--vocab", str(vocab), "--rows", str(args.rows)]
    cmd += ["--hidden", str(args.hidden), "--rank", str(args.rank), "--device", args.device]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _compare(vocab: int, args: argparse.Namespace) -> tuple[float, bool]:
    """Peaks of the three versions at one vocabulary; returns (fused / unfused, losses agree)."""
    print(f"V={vocab} rows={args.rows} H={args.hidden} r={args.rank} chunk_rows={default_chunk_rows(vocab)}")
    peaks = {mode: _measure(mode, vocab, args) for mode in MODES}
    for mode, result in peaks.items():
        print(f"  {mode:<15} peak {result['peak_bytes'] / GIB:7.3f} GiB  loss={result['loss']:.6f}")
    unfused = peaks["unfused"]
    ratio = peaks["fused"]["peak_bytes"] / unfused["peak_bytes"]
    before = peaks["logits_chunked"]["peak_bytes"] / unfused["peak_bytes"]
    print(f"  ratio fused/unfused {ratio:.3f} (target <= {MAX_RATIO}); logits_chunked/unfused {before:.3f}")
    agree = all(abs(r["loss"] - unfused["loss"]) <= MAX_LOSS_REL * abs(unfused["loss"]) for r in peaks.values())
    return ratio, agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=None, help=f"one vocabulary (default: both of {VOCABS})")
    parser.add_argument("--rows", type=int, default=1_024, help="supervised rows (blocks of K = 7)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rank", type=int, default=256, help="Markov rank r")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    figures, ok = {}, True
    for vocab in (args.vocab,) if args.vocab else VOCABS:
        ratio, agree = _compare(vocab, args)
        figures[f"ratio_v{vocab}"] = round(ratio, 4)
        ok = ok and agree and ratio <= MAX_RATIO
    print("PASS" if ok else "FAIL")
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
