"""Staleness control of I-alternation (issue 9, item 2): the staleness formula on a hand-computed
case, the staleness_threshold trigger, reset_momentum, learn_beta (the ReLU surrogate under fixed
supports), the thresholded-minus-masked loss that leaves training alone, and exact resume."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from alternation_case import solver_param
from layer_check import make_layer
from pycaffe_alt.alternation.solver import AlternationSolver
from pycaffe_alt.alternation.staleness import StalenessMeter, stale_bits, staleness, threshold_gap
from pycaffe_alt.alternation.support_pass import hard_threshold_layers, thresholded_loss
from pycaffe_alt.errors import SolverError

# No momentum or weight decay unless a test asks: beta then moves only through its gradient.
PLAIN = "momentum: 0 weight_decay: 0"


def make(tmp_path, alternation: str, extra: str = "", **kw) -> AlternationSolver:
    os.makedirs(tmp_path, exist_ok=True)
    # Support passes in batches of 128 (4 forwards over the 512 records): the tests stay quick.
    return AlternationSolver(solver_param(tmp_path, f"{alternation} support_batch_size: 128",
                                          extra, **kw))


def betas(s):
    return {n: ht.beta.detach().clone() for n, ht in hard_threshold_layers(s.net)}


def weights(s):
    return [p.detach().clone() for p in s._datas]


# -- the formula --------------------------------------------------------------------------------
def test_staleness_hand_computed():
    # Two examples, two channels, two positions; beta per channel 0.5 / -1.
    q = torch.tensor([[[0.4, 0.6], [-2.0, 0.0]],
                      [[0.9, 0.1], [-0.5, -1.5]]])
    beta = torch.tensor([0.5, -1.0])
    # Eq. 12 now:      [[F, T], [F, T]],  [[T, F], [T, F]]
    stored = torch.tensor([[[False, True], [False, False]],     # differs at (0,1,1)
                           [[False, False], [True, True]]])     # differs at (1,0,0), (1,1,1)
    differing, total = stale_bits(stored, q, beta)
    assert int(differing) == 3 and total == 8
    assert staleness(stored, q, beta) == pytest.approx(3 / 8)
    # A scalar beta, and a stored mask that equals eq. 12: nothing is stale.
    assert staleness(q > 0.2, q, 0.2) == 0.0


def test_meter_pools_layers_by_their_bits():
    class L:
        beta = torch.tensor(0.0)

    meter = StalenessMeter()
    a = meter.wrap("a", L, lambda q: torch.ones_like(q, dtype=torch.bool))
    b = meter.wrap("b", L, lambda q: q > 0)
    assert meter.read() is None
    q_a = torch.tensor([[1.0, -1.0, -1.0, -1.0]])  # 3 of 4 stale
    q_b = torch.tensor([[1.0, -1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
                         1.0, 1.0, 1.0, 1.0]])      # 0 of 12 stale
    assert torch.equal(a(q_a), torch.ones(1, 4, dtype=torch.bool))
    b(q_b)
    read = meter.read()
    assert read["per_layer"] == {"a": 0.75, "b": 0.0}
    assert read["overall"] == pytest.approx(3 / 16)


def test_threshold_gap_is_relative_to_the_masked_loss():
    g = threshold_gap(0.3, 0.2)
    assert g["gap"] == pytest.approx(0.1) and g["relative"] == pytest.approx(0.5)


# -- the solver ---------------------------------------------------------------------------------
def test_staleness_measured_in_weight_steps_and_logged(tmp_path, caplog):
    s = make(tmp_path, "warmup_iter: 2 gap_iter: 100", "display: 2")
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        s.step(8)
    st = s.last_staleness
    assert set(st["per_layer"]) == {"thr1", "thr2"} and 0 <= st["overall"] <= 1
    assert "alternation: stale support bits" in caplog.text
    assert "alternation: thresholded loss" in caplog.text
    # Right after a support step the stored supports are eq. 12's: zero staleness.
    s.support_step()
    s.step(1)
    assert s.last_staleness["overall"] == 0.0


class StaleLog:
    """Records (iteration, staleness measured in it, phase after it) and support steps."""

    def __init__(self):
        self.measured, self.supports, self._seen = [], [], 0

    def before_step(self, solver):
        if solver.support_steps > self._seen:
            self._seen = solver.support_steps
            self.supports.append(solver.iter)

    def after_step(self, solver, loss):
        st = solver.last_staleness if solver.phase in ("weights", "support") else None
        self.measured.append((solver.iter - 1, st["overall"] if st else None, solver.phase))


@pytest.mark.parametrize("threshold", [0.01])
def test_staleness_threshold_triggers_a_support_step(tmp_path, threshold):
    s = make(tmp_path, f"warmup_iter: 2 gap_epochs: 0 staleness_threshold: {threshold}",
             "base_lr: 0.2")
    log = StaleLog()
    s.add_hook(log)
    s.step(16)
    # A support step follows exactly the iterations whose staleness exceeded the threshold.
    expected = [2] + [it + 1 for it, st, _ in log.measured
                      if st is not None and st > threshold and it + 1 < 16]
    assert log.supports == expected
    assert len(expected) > 2  # it did fire, more than once


def test_staleness_threshold_never_reached_means_no_support_step(tmp_path):
    s = make(tmp_path, "warmup_iter: 2 gap_epochs: 0 staleness_threshold: 0.99")
    s.step(10)
    assert s.support_steps == 1 and s.last_staleness["overall"] < 0.99


def test_staleness_threshold_alone_ends_weight_steps_and_bad_values_fail(tmp_path):
    make(tmp_path, "gap_epochs: 0 staleness_threshold: 0.05")  # valid without gap/patience
    with pytest.raises(SolverError, match="staleness_threshold must be in"):
        make(tmp_path, "gap_epochs: 1 staleness_threshold: 1.5")


@pytest.mark.parametrize("reset", [True, False])
def test_reset_momentum_zeros_the_history_at_support_steps(tmp_path, reset):
    s = make(tmp_path, f"warmup_iter: 2 gap_iter: 100 reset_momentum: {str(reset).lower()}")
    s.step(6)
    assert any(float(h.abs().sum()) > 0 for h in s.history)
    s.support_step()
    zero = all(float(h.abs().sum()) == 0 for h in s.history)
    assert zero == reset


@pytest.mark.parametrize("output", ["KEEP", "SHIFT"])
def test_learn_beta_under_fixed_supports(tmp_path, output):
    runs = {}
    for learn in (False, True):
        s = make(tmp_path / str(learn), f"warmup_iter: 2 gap_iter: 100 learn_beta: "
                 f"{str(learn).lower()}", PLAIN)
        for _, ht in hard_threshold_layers(s.net):
            ht.output = output
        s.step(3)  # warm-up + the first support step + 1 weight iteration
        before = betas(s)
        s.step(5)
        after = betas(s)
        runs[learn] = {n: not torch.equal(before[n], after[n]) for n in before}
    if output == "KEEP":
        assert runs[False] == {"thr1": False, "thr2": False}  # frozen: no gradient
    else:
        assert all(runs[False].values())  # SHIFT has a gradient anyway
    assert all(runs[True].values())


def test_learn_beta_gradient_is_the_relu_surrogate():
    layer = make_layer('type: "HardThreshold"', [(2, 3)]).double()
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64))
    q = torch.tensor([[0.2, 0.4, -1.0], [-0.3, 0.9, 0.1]], dtype=torch.float64)
    fixed = torch.tensor([[True, True, False], [False, False, True]])
    layer.fixed_support = lambda x: fixed
    layer.learn_beta_fixed = True
    z = layer(q)
    assert torch.equal(z, fixed * q)  # the value is eq. 13's
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    z.backward(g)
    live = q > layer.beta.detach()  # [[T, F, F], [F, T, T]]
    assert torch.equal(layer.beta.grad, -(g * live).sum(0))
    assert torch.equal(layer.beta.grad, torch.tensor([-1.0, -5.0, -6.0], dtype=torch.float64))


def test_thresholded_loss_matches_the_thresholded_net_and_leaves_training_alone(tmp_path):
    s = make(tmp_path / "a", "warmup_iter: 2 gap_iter: 100")
    s.step(5)
    s.forward_backward()
    values_before = {k: v.clone() for k, v in s.net.run(start=len(s.net.layers)).items()}
    thr, masked = thresholded_loss(s.net, hard_threshold_layers(s.net))
    values_after = s.net.run(start=len(s.net.layers))
    assert values_before.keys() == values_after.keys()
    assert all(torch.equal(values_before[k], values_after[k]) for k in values_before)
    assert float(masked) == pytest.approx(float(s.net.loss(values_after).detach()))
    # The same batch through the thresholded net, computed by hand.
    for _, ht in hard_threshold_layers(s.net):
        ht.fixed_support = None
    with torch.no_grad():
        want = s.net.loss(s.net.run(start=1))
    assert float(thr) == pytest.approx(float(want), rel=1e-6)
    # Logging the gap at every iteration changes no weight.
    runs = []
    for gap in ("true", "false"):
        r = make(tmp_path / gap, f"warmup_iter: 2 gap_iter: 4 log_threshold_gap: {gap}",
                 "display: 1")
        r.step(10)
        runs.append(weights(r))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_resume_with_staleness_options_is_exact(tmp_path):
    alt = ("warmup_iter: 3 gap_epochs: 0 staleness_threshold: 0.01 reset_momentum: true "
           "learn_beta: true")
    extra = "display: 2 base_lr: 0.2"
    straight = make(tmp_path / "a", alt, extra)
    straight.step(12)
    first = make(tmp_path / "b", alt, extra)
    first.step(6)
    _, state = first.snapshot()
    resumed = make(tmp_path / "b", alt, extra)
    resumed.restore(state)
    resumed.step(6)
    assert straight.support_steps > 2
    assert resumed.support_steps == straight.support_steps
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    for a, b in zip(straight.history, resumed.history):
        assert torch.equal(a, b)
