"""Metrics output (SPEC §8): rank-0 JSONL at `<output_dir>/dspark_train_metrics.jsonl` plus a console line."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from nemo_automodel_dspark.io import append_line_durably, atomic_write_bytes

METRICS_FILE = "dspark_train_metrics.jsonl"


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory on GPU, peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsWriter:
    """Appends one JSON object per log step; on resume it first drops records past the resumed step."""

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(f"{ln}\n" for ln in kept).encode())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"timestamp": time.time(), **record}
        append_line_durably(self.path, json.dumps(record))


def console_line(record: dict) -> str:
    """One-line summary of a log record."""
    keys = ("loss", "ce_loss", "l1_loss", "confidence_loss", "tau", "accept_rate", "lr", "grad_norm", "tokens_per_s")
    prefix = "val/" if any(k.startswith("val/") for k in record) else ""
    parts = [f"step {record['step']}", f"epoch {record['epoch']}"]
    for key in keys:
        value = record.get(prefix + key)
        if value is not None:
            parts.append(f"{prefix}{key} {value:.4g}")
    return " | ".join(parts)
