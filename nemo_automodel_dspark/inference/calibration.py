"""Confidence-head quality against realised acceptance, and Sequential Temperature Scaling (paper §3.2.1).

A round of speculative decoding (one row of `evaluate --save-rounds`) records the raw confidence logits of the
`verify_len` drafted positions and how many of them the target accepted. `c_k = σ(logit_k / T_k)` estimates the
probability that position k survives **given that positions < k were accepted**, so:

* conditional samples of position k are the rounds that *reached* it (k < verify_len and all earlier accepted),
  labelled 1 when it was accepted;
* prefix samples of position k are the rounds that verified it (k < verify_len), scored by the prefix survival
  `a_k = Π_{i≤k} c_i` and labelled 1 when positions 0..k were all accepted (what the scheduler needs).

STS fits `T_0, T_1, …` left to right; each is the grid point minimising the ECE of `a_k`, earlier temperatures fixed.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nemo_automodel_dspark.inference.arguments import DEFAULT_BINS, add_calibrate_arguments

# Log-spaced grid from 0.05 to 20 with T = 1 tried first, so that ties keep the head unchanged.
TEMPERATURE_GRID = [1.0, *[round(10 ** (-1.3 + i * 2.6 / 240), 4) for i in range(241)]]


def ece(confidence: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> float | None:
    """Expected calibration error over equal-width bins: Σ_b |Σ_{i∈b} (c_i − y_i)| / N; None without samples."""
    if confidence.numel() == 0:
        return None
    index = (confidence * bins).long().clamp(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double() - labels.double())
    return float(gap.abs().sum() / confidence.numel())


def auroc(scores: Tensor, labels: Tensor) -> float | None:
    """Area under the ROC curve (Mann–Whitney U, ties count one half); None when a class is missing."""
    positive = labels.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    values, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1
    mean_rank = (first_rank + (counts - 1) / 2.0).double()  # tied scores share their average rank
    rank_sum = float(mean_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class RoundsTable:
    """Rounds as padded tensors: logits [R, K] (NaN past verify_len), verify_len [R], num_accepted [R]."""

    logits: Tensor
    verify_len: Tensor
    num_accepted: Tensor

    @classmethod
    def from_rows(cls, rows: list[dict]) -> RoundsTable:
        rows = [r for r in rows if r.get("confidence_logits")]
        if not rows:
            raise ValueError("no round carries confidence logits (does the draft have a confidence head?)")
        width = max(len(r["confidence_logits"]) for r in rows)
        logits = torch.full((len(rows), width), math.nan, dtype=torch.float64)
        for i, row in enumerate(rows):
            logits[i, : len(row["confidence_logits"])] = torch.tensor(row["confidence_logits"], dtype=torch.float64)
        verify = torch.tensor([r["verify_len"] for r in rows])
        accepted = torch.tensor([r["num_accepted"] for r in rows])
        return cls(logits, verify, accepted)

    @property
    def positions(self) -> int:
        return self.logits.shape[1]

    def confidences(self, temperatures: list[float] | None = None) -> Tensor:
        """c [R, K] = σ(logit / T_k) (T = 1 where no temperature is given)."""
        temps = torch.ones(self.positions, dtype=torch.float64)
        if temperatures:
            n = min(len(temperatures), self.positions)
            temps[:n] = torch.tensor(temperatures[:n], dtype=torch.float64)
        return torch.sigmoid(self.logits / temps)

    def conditional(self, k: int, confidence: Tensor) -> tuple[Tensor, Tensor]:
        """(c_k, accepted) over the rounds that reached position k."""
        reached = (self.verify_len > k) & (self.num_accepted >= k)
        return confidence[reached, k], (self.num_accepted[reached] > k).double()

    def prefix(self, k: int, confidence: Tensor) -> tuple[Tensor, Tensor]:
        """(a_k = Π_{i≤k} c_i, prefix 0..k survived) over the rounds that verified position k."""
        verified = self.verify_len > k
        survival = confidence[verified, : k + 1].prod(dim=1)
        return survival, (self.num_accepted[verified] > k).double()


def fit_sts(table: RoundsTable, bins: int = DEFAULT_BINS, grid: list[float] = TEMPERATURE_GRID) -> list[float]:
    """Sequential Temperature Scaling: one temperature per position, left to right (1.0 where no sample)."""
    temperatures: list[float] = []
    for k in range(table.positions):
        best_t, best_ece = 1.0, math.inf
        for t in grid:
            value = ece(*table.prefix(k, table.confidences([*temperatures, t])), bins=bins)
            if value is not None and value < best_ece - 1e-12:
                best_t, best_ece = t, value
        temperatures.append(best_t)
    return temperatures


def confidence_report(
    table: RoundsTable, temperatures: list[float] | None = None, bins: int = DEFAULT_BINS
) -> list[dict]:
    """Per position: samples reached, ECE and AUROC of c_k, ECE of the prefix survival a_k."""
    confidence = table.confidences(temperatures)
    report = []
    for k in range(table.positions):
        c, y = table.conditional(k, confidence)
        a, s = table.prefix(k, confidence)
        report.append(
            {
                "position": k,
                "reached": int(c.numel()),
                "ece": ece(c, y, bins),
                "auroc": auroc(c, y),
                "prefix_ece": ece(a, s, bins),
            }
        )
    return report


ROUND_KEYS = ("verify_len", "num_accepted", "confidence_logits")


def read_rounds(path: str | Path) -> list[dict]:
    """Rows of `dspark evaluate --save-rounds`; a line that is not one is a ValueError naming it."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # a UTF-8 BOM is accepted, as by every reader of this package
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: bad JSON ({err})") from err
            missing = [key for key in ROUND_KEYS if not isinstance(row, dict) or key not in row]
            if missing:
                raise ValueError(f"{path}:{number}: not an evaluate round (missing {', '.join(missing)})")
            rows.append(row)
    return rows


def read_rounds_table(path: str | Path, flag: str) -> RoundsTable:
    """`read_rounds` + `RoundsTable.from_rows` for the CLI: a user mistake is a one-line ToolError."""
    from nemo_automodel_dspark.errors import ToolError, require_file

    try:
        return RoundsTable.from_rows(read_rounds(require_file(path, flag)))
    except ValueError as err:
        raise ToolError(str(err)) from err


def write_confidence_temperatures(draft_dir: str | Path, temperatures: list[float]) -> Path:
    """Set `confidence_temperatures` in the draft's config.json (atomic rewrite; other keys untouched).

    A training checkpoint's manifest is updated with it, so the calibrated checkpoint still resumes (`LATEST`)."""
    from nemo_automodel_dspark.io import remove_leftover_temps
    from nemo_automodel_dspark.manifest import rewrite_file
    from nemo_automodel_dspark.model.serving import CONFIG_NAME

    path = Path(draft_dir) / CONFIG_NAME
    remove_leftover_temps(draft_dir, (CONFIG_NAME,))
    config = json.loads(path.read_text())
    config["confidence_temperatures"] = [float(t) for t in temperatures]
    rewrite_file(draft_dir, CONFIG_NAME, json.dumps(config, indent=2).encode())
    return path


# ---------------------------------------------------------------------------------------------------- CLI
add_arguments = add_calibrate_arguments


def run(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.draft_checks import require_finite_draft
    from nemo_automodel_dspark.errors import require_count, require_draft_dir, require_output_dir
    from nemo_automodel_dspark.model.serving import read_serving_config

    require_draft_dir(args.draft)
    require_output_dir(args.draft, "--draft")  # its config.json is rewritten at the end
    require_count(args.bins, "--bins")
    read_serving_config(args.draft)  # a folder that is no DSpark draft is one line, before anything is fitted
    require_finite_draft(args.draft)
    table = read_rounds_table(args.rounds, "--rounds")
    temperatures = fit_sts(table, bins=args.bins)
    before = confidence_report(table, None, args.bins)
    after = confidence_report(table, temperatures, args.bins)
    path = write_confidence_temperatures(args.draft, temperatures)
    print(f"[dspark] calibrated {len(table.logits)} rounds; confidence_temperatures written to {path}")
    print("  pos  reached  T      prefix ECE raw → calibrated   AUROC")
    for k, (b, a) in enumerate(zip(before, after, strict=True)):
        print(
            f"  {k:>3}  {b['reached']:>7}  {temperatures[k]:<6.3g} {_fmt(b['prefix_ece'])} → {_fmt(a['prefix_ece'])}"
            f"              {_fmt(b['auroc'])}"
        )
    return 0


def _fmt(value: float | None) -> str:
    return "  n/a " if value is None else f"{value:.4f}"
