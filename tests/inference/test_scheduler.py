"""Algorithm 1: the paper's Appendix A example, the non-anticipating early stop, and the SPS table."""

import random

import pytest
import torch

from nemo_automodel_dspark.inference.calibration import RoundsTable
from nemo_automodel_dspark.inference.scheduler import SPSCurve, schedule, simulate

PAPER_SPS = SPSCurve({1: 1.0, 2: 0.5, 3: 0.45})


def test_appendix_a_early_stop_verifies_nothing_whatever_x1_turns_out_to_be():
    """a_1 = 0.8: Θ_0 = 1.0 > Θ_1 = 1.8·0.5 = 0.9, so Algorithm 1 stops before looking at c_2 (which needs x_1)."""
    for c2 in (0.9, 0.0):
        plan = schedule([[0.8, c2]], PAPER_SPS)
        assert plan.lengths == [0] and plan.throughput == pytest.approx(1.0) and plan.batch_tokens == 1


def test_appendix_a_global_search_leaks_x1_into_its_own_admission():
    """Without the break, x_1 is verified iff it leads to a confident continuation — the paper's counterexample."""
    high = schedule([[0.8, 0.9]], PAPER_SPS, early_stop=False)
    assert high.lengths == [2] and high.throughput == pytest.approx((1 + 0.8 + 0.72) * 0.45)  # 1.134
    low = schedule([[0.8, 0.0]], PAPER_SPS, early_stop=False)
    assert low.lengths == [0] and low.throughput == pytest.approx(1.0)


def test_admission_of_a_token_never_depends_on_confidences_computed_from_it():
    """Whether x_{r,k} is verified (ℓ_r ≥ k) is unchanged by any change of c_{r,k+1..γ}, on random instances; the
    retrospective global search fails the same check on some of them (so the check has power)."""
    rng = random.Random(0)
    violations = {True: 0, False: 0}
    for _ in range(400):
        requests, gamma = rng.randint(1, 4), rng.randint(1, 5)
        sizes = range(1, requests * (gamma + 1) + 1)
        sps = SPSCurve({b: 1.0 / (b ** rng.uniform(0.2, 1.2)) + rng.uniform(0, 0.05) for b in sizes})
        conf = [[rng.random() for _ in range(gamma)] for _ in range(requests)]
        r, k = rng.randrange(requests), rng.randint(1, gamma)
        changed = [row[:] for row in conf]
        changed[r][k:] = [rng.random() for _ in range(gamma - k)]  # c_{r,k+1..γ} (paper indices) depend on x_{r,k}
        for early_stop in (True, False):
            before = schedule(conf, sps, early_stop=early_stop).lengths[r] >= k
            after = schedule(changed, sps, early_stop=early_stop).lengths[r] >= k
            violations[early_stop] += before != after
    assert violations[True] == 0
    assert violations[False] > 0


def test_greedy_order_and_stop():
    # Two requests; flat-then-steep SPS. Candidates by survival: (0,1)=0.9, (1,1)=0.8, (0,2)=0.72, (1,2)=0.4 ...
    sps = SPSCurve({2: 1.0, 3: 1.0, 4: 1.0, 5: 0.5})
    plan = schedule([[0.9, 0.8, 0.5], [0.8, 0.5, 0.5]], sps)
    assert plan.lengths == [1, 1] and plan.batch_tokens == 4
    assert plan.expected_tokens == pytest.approx(2 + 0.9 + 0.8)


def test_free_verification_admits_every_token():
    flat = SPSCurve({1: 1.0, 64: 1.0})
    assert schedule([[0.9, 0.1, 0.05], [0.3, 0.2, 0.1]], flat).lengths == [3, 3]


def test_sps_curve_interpolates_and_extrapolates():
    sps = SPSCurve({2: 10.0, 4: 6.0, 8: 4.0})
    assert sps(4) == 6.0 and sps(3) == pytest.approx(8.0) and sps(6) == pytest.approx(5.0)
    assert sps(1) == 10.0  # below the table: the smallest profiled size
    assert sps(16) == pytest.approx(2.0)  # above: constant tokens/s, B·SPS(B) = 32
    with pytest.raises(ValueError):
        SPSCurve({})


def test_simulation_scheduled_vs_full_block():
    """High-confidence rounds that are accepted, low ones that are not: at high load the scheduler drops the low
    ones and realises more tokens/s than verifying every block; under free verification both are equal."""
    rows = []
    for i in range(40):
        good = i % 2 == 0
        rows.append(
            {"verify_len": 4, "num_accepted": 4 if good else 0, "confidence_logits": [4.0] * 4 if good else [-4.0] * 4}
        )
    table = RoundsTable.from_rows(rows)
    steep = SPSCurve({1: 100.0, 4: 100.0, 8: 60.0, 16: 30.0, 40: 12.0})
    (busy,) = simulate(table, table.confidences(), steep, [8], batches=20)
    assert busy["scheduled"]["mean_verify_len"] < busy["full_block"]["mean_verify_len"]
    assert busy["scheduled"]["realised_tokens_per_s"] > busy["full_block"]["realised_tokens_per_s"]
    (free,) = simulate(table, table.confidences(), SPSCurve({1: 1.0, 64: 1.0}), [4], batches=20)
    assert free["realised_gain"] == pytest.approx(1.0)
    assert free["scheduled"]["mean_verify_len"] == pytest.approx(4.0)
    assert torch.isfinite(torch.tensor(busy["scheduled"]["expected_tokens_per_s"]))
