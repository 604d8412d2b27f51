"""ECE/AUROC formulas on hand-made numbers; which rounds count for which position; STS fixes over-confidence."""

import math

import pytest
import torch
from _helpers.inference_models import random_draft, tiny_target

from nemo_automodel_dspark.inference.calibration import (
    RoundsTable,
    auroc,
    confidence_report,
    ece,
    fit_sts,
    write_confidence_temperatures,
)
from nemo_automodel_dspark.model.drafter import DSparkDrafter


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_ece_by_hand():
    # bin 9: confidences 0.9, 0.9 vs labels 1, 0 → |1.8 − 1| ; bin 1: 0.1, 0.1 vs 0, 0 → 0.2 ; / 4 samples
    assert ece(t([0.9, 0.9, 0.1, 0.1]), t([1, 0, 0, 0])) == pytest.approx((0.8 + 0.2) / 4)
    assert ece(t([0.25, 0.75]), t([0, 1]), bins=2) == pytest.approx(0.25)
    assert ece(t([]), t([])) is None


def test_auroc_by_hand():
    assert auroc(t([0.1, 0.2, 0.8, 0.9]), t([0, 0, 1, 1])) == 1.0
    assert auroc(t([0.9, 0.8, 0.2, 0.1]), t([0, 0, 1, 1])) == 0.0
    assert auroc(t([0.5, 0.5, 0.5]), t([0, 1, 1])) == 0.5  # ties count one half
    assert auroc(t([0.1, 0.4, 0.35, 0.8]), t([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(t([0.1, 0.4]), t([1, 1])) is None


def test_positions_count_only_rounds_that_reached_them():
    rows = [
        {"verify_len": 3, "num_accepted": 0, "confidence_logits": [0.0, 1.0, 2.0]},  # rejected at position 0
        {"verify_len": 3, "num_accepted": 3, "confidence_logits": [0.0, 1.0, 2.0]},  # all accepted
        {"verify_len": 2, "num_accepted": 1, "confidence_logits": [0.0, 1.0]},  # rejected at position 1
    ]
    table = RoundsTable.from_rows(rows)
    conf = table.confidences()
    c, y = table.conditional(1, conf)
    assert y.tolist() == [1.0, 0.0] and c.tolist() == pytest.approx([1 / (1 + math.exp(-1))] * 2)
    c2, y2 = table.conditional(2, conf)
    assert y2.tolist() == [1.0]  # only the all-accepted round reached position 2 (the third verified only 2)
    a, s = table.prefix(1, conf)
    assert s.tolist() == [0.0, 1.0, 0.0] and a[0] == pytest.approx(0.5 / (1 + math.exp(-1)))


def overconfident_rounds(n: int, positions: int = 4, true_temperature: float = 3.0, seed: int = 0) -> list[dict]:
    """Rounds whose realised acceptance follows σ(logit / 3): the raw head σ(logit) is over-confident."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        logits = 1.0 + 2.5 * torch.randn(positions, generator=g, dtype=torch.float64)
        accepted = 0
        while accepted < positions and torch.rand(1, generator=g) < torch.sigmoid(logits[accepted] / true_temperature):
            accepted += 1
        rows.append({"verify_len": positions, "num_accepted": accepted, "confidence_logits": logits.tolist()})
    return rows


def test_sts_reduces_ece_of_prefix_survival_and_recovers_the_temperature():
    fit_table = RoundsTable.from_rows(overconfident_rounds(3000))
    temperatures = fit_sts(fit_table)
    assert 2.0 < temperatures[0] < 4.5  # the data were generated with T = 3
    held_out = RoundsTable.from_rows(overconfident_rounds(3000, seed=1))
    raw, calibrated = confidence_report(held_out), confidence_report(held_out, temperatures)
    for before, after in zip(raw, calibrated, strict=True):
        assert after["prefix_ece"] < before["prefix_ece"]
        assert after["auroc"] == pytest.approx(before["auroc"])  # temperature scaling keeps the ranking


def test_temperatures_are_written_to_config_and_read_back(tmp_path):
    target = tiny_target(32)
    random_draft(target).save_pretrained(tmp_path / "draft")
    write_confidence_temperatures(tmp_path / "draft", [1.5, 2.0, 2.5, 3.0])
    draft = DSparkDrafter.from_pretrained(tmp_path / "draft")
    assert draft.dspark.confidence_temperatures == [1.5, 2.0, 2.5, 3.0]
    assert not list((tmp_path / "draft").glob(".config.json.*"))  # no temp file left behind


def test_calibrating_a_checkpoint_keeps_it_resumable(tmp_path):
    """`dspark calibrate` on a training checkpoint: its manifest follows config.json, so `LATEST` does not skip it."""
    from nemo_automodel_dspark.manifest import MANIFEST, verify
    from nemo_automodel_dspark.recipe.checkpoint import find_latest, step_dir, write_manifest

    target = tiny_target(32)
    older, newest = step_dir(tmp_path, 0, 3), step_dir(tmp_path, 0, 6)
    for folder in (older, newest):
        random_draft(target).save_pretrained(folder)
        (folder / "trainer_state.json").write_text("{}")
        write_manifest(folder)
    write_confidence_temperatures(newest, [1.5, 2.0, 2.5, 3.0])
    warnings: list[str] = []
    assert verify(newest) is None and find_latest(tmp_path, warn=warnings.append) == newest and warnings == []
    assert DSparkDrafter.from_pretrained(newest).dspark.confidence_temperatures == [1.5, 2.0, 2.5, 3.0]

    # A checkpoint damaged before calibration stays detectably damaged (its manifest is not rewritten to match).
    (older / "trainer_state.json").write_text('{"x": 1}')
    manifest = (older / MANIFEST).read_text()
    write_confidence_temperatures(older, [1.0, 1.0, 1.0, 1.0])
    assert (older / MANIFEST).read_text() == manifest and verify(older) is not None
