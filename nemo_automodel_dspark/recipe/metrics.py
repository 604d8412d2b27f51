"""Metrics output (SPEC §8): rank-0 JSONL at `<output_dir>/dspark_train_metrics.jsonl` plus a console line."""

from __future__ import annotations

import contextlib
import json
import os
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
    """Appends one JSON object per log step; on resume it first drops records past the resumed step.

    A line left half-written (a kill or a full disk during an append) is cut off on the next start with a warning;
    a failed append is rolled back at once, so the file always ends on a complete record.
    """

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> str | None:
        """Keep the records up to `step`; returns a warning naming the file when torn lines were cut off."""
        if not (self.enabled and self.path.exists()):
            return None
        kept, torn = [], []
        for number, line in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                torn.append(number)
            elif record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.path, b"".join(line + b"\n" for line in kept))
        if not torn:
            return None
        where = ", ".join(str(n) for n in torn)
        return f"warning: {self.path}: cut off the incomplete record at line {where} (an interrupted write)"

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"timestamp": time.time(), **record}) + "\n"
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            _append(self.path, line)
        except OSError:
            with contextlib.suppress(OSError):  # roll the torn line back; shrinking a file needs no free space
                os.truncate(self.path, size)
            raise


def _append(path: Path, text: str) -> None:
    append_line_durably(path, text)


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def console_line(record: dict) -> str:
    """One-line summary of a log record (training, `val/` or `decode/`), numbers to 4 significant digits."""
    keys: tuple[str, ...] = ("loss", "ce_loss", "l1_loss", "confidence_loss", "tau", "accept_rate", "lr")
    keys += ("grad_norm", "tokens_per_s")
    prefix = "val/" if any(k.startswith("val/") for k in record) else ""
    if any(k.startswith("decode/") for k in record):
        prefix, keys = "decode/", ("tau", "speedup", "rounds")
    parts = [f"step {record['step']}", f"epoch {record['epoch']}"]
    for key in keys:
        value = record.get(prefix + key)
        if value is not None:
            parts.append(f"{prefix}{key} {value:.4g}")
    return " | ".join(parts)
