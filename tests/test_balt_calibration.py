"""B-alternation's batch rules (issue 9, item 3): eq. 41 with its threshold calibrated to a target
fraction of units on, and the majority vote, on hand-computed batches and in the solver."""
from __future__ import annotations

import pytest
import torch

from alternation_case import solver_param
from layer_check import make_layer
from pycaffe_alt.alternation.rules import calibrated_threshold, majority_support
from pycaffe_alt.alternation.solver import AlternationSolver
from pycaffe_alt.alternation.support_pass import BatchSupport
from pycaffe_alt.errors import SolverError


# -- the formulas -------------------------------------------------------------------------------
def test_calibrated_threshold_keeps_the_target_fraction():
    sums = torch.tensor([0.0, 4.0, 1.0, 0.0, 3.0, 2.0])
    t = calibrated_threshold(sums, 0.5)  # 3 of 6 units: the 3rd smallest sum is the threshold
    assert float(t) == 1.0
    assert (sums > t).tolist() == [False, True, False, False, True, True]
    assert float(calibrated_threshold(sums, 0.34)) == 2.0  # floor(2.04) = 2 units on
    assert int((sums > calibrated_threshold(sums, 1.0)).sum()) == 6
    assert int((sums > calibrated_threshold(sums, 0.0)).sum()) == 0


def test_calibrated_threshold_never_turns_on_more_than_the_target():
    # Ties at the threshold and units whose sum is zero keep the fraction below the target.
    ties = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert int((ties > calibrated_threshold(ties, 0.5)).sum()) == 0
    sparse = torch.tensor([0.0, 0.0, 0.0, 5.0])  # eq. 41 at beta 0 keeps 1 of 4 already
    assert (sparse > calibrated_threshold(sparse, 0.5)).tolist() == [False, False, False, True]


def test_majority_vote():
    counts = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert majority_support(counts, 4).tolist() == [False, False, False, True, True]
    assert majority_support(counts, 3).tolist() == [False, False, True, True, True]
    assert majority_support(counts, torch.tensor(5.0)).tolist() == [False] * 3 + [True] * 2


# -- BatchSupport on a hand-computed batch ------------------------------------------------------
def layer_with_beta(beta):
    layer = make_layer('type: "HardThreshold"', [(4, 3)])
    with torch.no_grad():
        layer.beta.copy_(torch.tensor(beta))
    return layer


Q = torch.tensor([[1.0, 0.2, -1.0],
                  [2.0, 0.3, 0.5],
                  [-1.0, 0.4, 0.0],
                  [0.5, 0.1, 3.0]])


def test_batch_support_calibrated_on_a_hand_computed_batch():
    layer = layer_with_beta([0.0, 0.0, 0.0])  # KEEP: x = q where q > 0
    # sum_n x^2 per unit: 1 + 4 + 0 + 0.25 = 5.25; 0.04 + 0.09 + 0.16 + 0.01 = 0.30; 0.25 + 9
    sink, betas = {}, {}
    rule = BatchSupport(layer, "thr", 0.0, sink=sink, target_on=0.34, beta_sink=betas)
    mask = rule(Q)
    assert mask.shape == (1, 3)
    # floor(0.34 * 3) = 1 unit: the largest sum, 9.25 (unit 2); threshold 5.25 (per example /4).
    assert mask.tolist() == [[False, False, True]]
    assert float(betas["thr"]) == pytest.approx(5.25 / 4)
    two = BatchSupport(layer, "thr", 0.0, target_on=0.67)(Q)
    assert two.tolist() == [[True, False, True]]
    # Uncalibrated eq. 41 at beta 0 keeps all three (every unit has a positive sum).
    assert BatchSupport(layer, "thr", 0.0)(Q).tolist() == [[True, True, True]]


def test_batch_support_majority_on_a_hand_computed_batch():
    layer = layer_with_beta([0.0, 0.25, 0.4])
    # eq. 12 per example: unit 0: T T F T (3 of 4) -> on; unit 1: F T T F (2 of 4) -> off,
    # unit 2: F T F T (2 of 4) -> off.
    mask = BatchSupport(layer, "thr", 0.0, rule="MAJORITY")(Q)
    assert mask.tolist() == [[True, False, False]]
    # Distributed: all-reducing the counts and N of two identical processes changes nothing.
    doubled = BatchSupport(layer, "thr", 0.0, reduce=lambda s: 2 * s, rule="MAJORITY")(Q)
    assert torch.equal(doubled, mask)


def test_calibration_after_an_all_reduce_is_the_global_batchs():
    layer = layer_with_beta([0.0, 0.0, 0.0])
    local = BatchSupport(layer, "thr", 0.0, target_on=0.34)(Q)
    doubled = BatchSupport(layer, "thr", 0.0, reduce=lambda s: 2 * s, target_on=0.34)(Q)
    assert torch.equal(local, doubled)


# -- in the solver ------------------------------------------------------------------------------
def test_solver_calibrated_batch_alternation_keeps_the_target(tmp_path):
    s = AlternationSolver(solver_param(tmp_path, "mode: BATCH warmup_iter: 2 "
                                       "support_target_on: 0.5"))
    s.step(4)
    assert set(s.last_batch_supports) == {"thr1", "thr2"}
    for name, m in s.last_batch_supports.items():
        on = float(m.float().mean())
        assert on <= 0.5 and on > 0.3, (name, on)
        assert float(s.last_batch_betas[name]) >= 0
    # MaskT uses the same rule.
    res = s.test(masked=True)
    assert "accuracy" in res


def test_solver_majority_vote(tmp_path):
    s = AlternationSolver(solver_param(tmp_path, "mode: BATCH warmup_iter: 2 "
                                       "batch_rule: MAJORITY"))
    s.step(4)
    assert s.batch_rule == "MAJORITY"
    for m in s.last_batch_supports.values():
        assert 0 < float(m.float().mean()) < 1


@pytest.mark.parametrize("bad,what", [
    ("support_target_on: 1.5", "support_target_on must be in"),
    ("support_target_on: 0.5 batch_rule: MAJORITY", "majority vote has no threshold")])
def test_bad_batch_rule_settings(tmp_path, bad, what):
    with pytest.raises(SolverError, match=what):
        AlternationSolver(solver_param(tmp_path, f"mode: BATCH {bad}"))
