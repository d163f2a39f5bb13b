"""Update rules and gradient preparation against steps computed by hand.

Caffe's test_gradient_based_solver idea: a tiny least-squares problem, a few updates, each
expected value computed in numpy float64 from the formula in the rule's docstring.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pycaffe_alt.errors import SolverError
from pycaffe_alt.solver.regularize import (clip_gradients, global_norm, local_decay, normalize,
                                           regularize)
from pycaffe_alt.solver.rules import (UPDATE_RULES, RuleHyper, adam_correction, apply_update,
                                      check_hyper, local_rate, update_rule)

# ---------------------------------------------------------------------------------------------
# A least-squares problem: loss = 1/(2N) |X w + b - y|^2, with weight decay on w only.

RNG = np.random.default_rng(7)
X = RNG.standard_normal((8, 3))
Y = RNG.standard_normal(8)
W0 = RNG.standard_normal(3)
B0 = np.array([0.3])
LR_MULT = [1.0, 2.0]      # as Caffe's solver test: the bias learns twice as fast
DECAY_MULT = [1.0, 0.0]
WEIGHT_DECAY = 0.01
RATES = [0.1, 0.05, 0.02]  # the rate changes every step, which tells Caffe's SGD from torch's
HYPER = RuleHyper(momentum=0.9, momentum2=0.99, delta=1e-6, rms_decay=0.95)


def gradient(w, b):
    r = X @ w + b[0] - Y
    return [X.T @ r / len(Y), np.array([r.mean()])]


def reference_step(name, params, hist, it):
    """One update by the docstring formulas, in numpy float64; returns new params and history."""
    g = gradient(*params)
    g = [gi + WEIGHT_DECAY * dm * p for gi, dm, p in zip(g, DECAY_MULT, params)]
    n = len(params)
    out_p, out_h = [], [h.copy() for h in hist]
    m, m2, delta, rd = HYPER.momentum, HYPER.momentum2, HYPER.delta, HYPER.rms_decay
    for i in range(n):
        lr = RATES[it] * LR_MULT[i]
        if name == "SGD":
            out_h[i] = m * hist[i] + lr * g[i]
            upd = out_h[i]
        elif name == "Nesterov":
            out_h[i] = m * hist[i] + lr * g[i]
            upd = (1 + m) * out_h[i] - m * hist[i]
        elif name == "AdaGrad":
            out_h[i] = hist[i] + g[i] ** 2
            upd = lr * g[i] / (np.sqrt(out_h[i]) + delta)
        elif name == "RMSProp":
            out_h[i] = rd * hist[i] + (1 - rd) * g[i] ** 2
            upd = lr * g[i] / (np.sqrt(out_h[i]) + delta)
        elif name == "AdaDelta":
            out_h[i] = m * hist[i] + (1 - m) * g[i] ** 2
            d = g[i] * np.sqrt((hist[n + i] + delta) / (out_h[i] + delta))
            out_h[n + i] = m * hist[n + i] + (1 - m) * d ** 2
            upd = lr * d
        elif name == "Adam":
            t = it + 1
            out_h[i] = m * hist[i] + (1 - m) * g[i]
            out_h[n + i] = m2 * hist[n + i] + (1 - m2) * g[i] ** 2
            c = math.sqrt(1 - m2 ** t) / (1 - m ** t)
            upd = lr * c * out_h[i] / (np.sqrt(out_h[n + i]) + delta)
        out_p.append(params[i] - upd)
    return out_p, out_h


def run_rule(name, dtype, steps=3):
    """Our pipeline (regularize -> rule -> apply_update) on torch tensors; yields each state."""
    rule = update_rule(name)
    params = [torch.tensor(W0, dtype=dtype), torch.tensor(B0, dtype=dtype)]
    history = rule.new_history(params)
    for it in range(steps):
        diffs = [torch.tensor(gi, dtype=dtype) for gi in gradient(*[p.double().numpy() for p in params])]
        regularize(params, diffs, [local_decay(WEIGHT_DECAY, d) for d in DECAY_MULT], "L2")
        rule.update(diffs, history, [local_rate(RATES[it], m) for m in LR_MULT], HYPER, it)
        apply_update(params, diffs)
        yield [p.clone() for p in params], [h.clone() for h in history]


@pytest.mark.parametrize("name", list(UPDATE_RULES))
def test_rule_matches_hand_computed_steps(name):
    params = [W0.copy(), B0.copy()]
    hist = [np.zeros_like(p) for p in params] * UPDATE_RULES[name].history_sets
    for it, (ours_p, ours_h) in enumerate(run_rule(name, torch.float64)):
        params, hist = reference_step(name, params, hist, it)
        assert len(ours_h) == len(hist)
        for a, b in zip(ours_p, params):
            # Rates are float32 values (as in Caffe), so updates of size ~0.1 agree to ~1e-8.
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-7, err_msg=f"{name} step {it}")
        for a, b in zip(ours_h, hist):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-12, err_msg=f"{name} history {it}")


@pytest.mark.parametrize("name", list(UPDATE_RULES))
def test_rule_in_float32_stays_float32_and_close(name):
    runs64 = list(run_rule(name, torch.float64))
    for (p32, h32), (p64, _) in zip(run_rule(name, torch.float32), runs64):
        assert all(p.dtype == torch.float32 for p in p32 + h32)
        for a, b in zip(p32, p64):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_sgd_keeps_the_learning_rate_inside_the_history():
    # w = 1, g = 0.5, momentum 0.9; step 1 at lr 0.1, step 2 at lr 0.2.
    # h1 = 0.1*0.5 = 0.05, w = 0.95; h2 = 0.2*0.5 + 0.9*0.05 = 0.145, w = 0.805.
    # (torch.optim.SGD would give w = 1 - 0.1*0.5 - 0.2*(0.5 + 0.9*0.5) = 0.76.)
    w = [torch.tensor([1.0], dtype=torch.float64)]
    h = UPDATE_RULES["SGD"].new_history(w)
    for lr in (0.1, 0.2):
        g = [torch.tensor([0.5], dtype=torch.float64)]
        UPDATE_RULES["SGD"].update(g, h, [lr], RuleHyper(momentum=0.9), 0)
        apply_update(w, g)
    assert h[0].item() == pytest.approx(0.145, rel=1e-7)
    assert w[0].item() == pytest.approx(0.805, rel=1e-7)


def test_nesterov_first_step_by_hand():
    # h = 0.1*2 = 0.2; update = 1.9*0.2 - 0.9*0 = 0.38.
    g, h = [torch.tensor([2.0], dtype=torch.float64)], [torch.zeros(1, dtype=torch.float64)]
    UPDATE_RULES["Nesterov"].update(g, h, [0.1], RuleHyper(momentum=0.9), 0)
    assert g[0].item() == pytest.approx(0.38, rel=1e-7) and h[0].item() == pytest.approx(0.2)


def test_adam_first_step_is_about_the_rate_times_the_sign():
    # t = 1: m = 0.1 g, v = 0.001 g^2, c = sqrt(0.001)/0.1, update = lr * g/|g| (delta ~ 0).
    g = [torch.tensor([3.0, -0.2], dtype=torch.float64)]
    h = UPDATE_RULES["Adam"].new_history(g)
    assert len(h) == 2
    UPDATE_RULES["Adam"].update(g, h, [0.01], RuleHyper(momentum=0.9, momentum2=0.999, delta=1e-12), 0)
    np.testing.assert_allclose(g[0].numpy(), [0.01, -0.01], rtol=1e-6)
    assert adam_correction(0.9, 0.999, 0) == pytest.approx(math.sqrt(0.001) / 0.1, rel=1e-6)
    assert adam_correction(0.9, 0.999, 9) == pytest.approx(math.sqrt(1 - 0.999 ** 10) / (1 - 0.9 ** 10), rel=1e-6)


def test_adadelta_first_step_by_hand():
    # g2 = 0.05 * 4 = 0.2; d = 2 * sqrt(1e-2 / (0.2 + 1e-2)); u2 = 0.05 d^2; update = 0.5 d.
    g = [torch.tensor([2.0], dtype=torch.float64)]
    h = UPDATE_RULES["AdaDelta"].new_history(g)
    UPDATE_RULES["AdaDelta"].update(g, h, [0.5], RuleHyper(momentum=0.95, delta=1e-2), 0)
    d = 2 * math.sqrt(1e-2 / 0.21)
    assert h[0].item() == pytest.approx(0.2, rel=1e-6)
    assert h[1].item() == pytest.approx(0.05 * d * d, rel=1e-6)
    assert g[0].item() == pytest.approx(0.5 * d, rel=1e-6)


def test_zero_lr_mult_leaves_the_parameter_alone():
    for name, rule in UPDATE_RULES.items():
        p = [torch.ones(3), torch.ones(2)]
        g = [torch.full((3,), 0.5), torch.full((2,), 0.5)]
        h = rule.new_history(p)
        rule.update(g, h, [0.1, 0.0], RuleHyper(momentum=0.0 if name in ("AdaGrad", "RMSProp") else 0.9), 0)
        apply_update(p, g)
        assert torch.equal(p[1], torch.ones(2)), name
        assert not torch.equal(p[0], torch.ones(3)), name


def test_history_layout_follows_caffe():
    shapes = [(6, 1, 5, 5), (6,), (10, 24), (10,)]
    for name in ("SGD", "Nesterov", "AdaGrad", "RMSProp"):
        assert UPDATE_RULES[name].history_shapes(shapes) == shapes
    for name in ("AdaDelta", "Adam"):   # the second set follows all of the first set
        assert UPDATE_RULES[name].history_shapes(shapes) == shapes + shapes
        hist = UPDATE_RULES[name].new_history([torch.zeros(s) for s in shapes])
        assert [tuple(h.shape) for h in hist] == shapes + shapes
        assert len({id(h) for h in hist}) == len(hist)


def test_unknown_solver_type_lists_known():
    with pytest.raises(SolverError) as e:
        update_rule("Adamax")
    assert '"Adamax"' in str(e.value) and "AdaDelta" in str(e.value)


def test_caffe_constructor_checks():
    with pytest.raises(SolverError, match="momentum"):
        check_hyper("AdaGrad", RuleHyper(momentum=0.9))
    with pytest.raises(SolverError, match="rms_decay"):
        check_hyper("RMSProp", RuleHyper(rms_decay=1.0))
    check_hyper("SGD", RuleHyper(momentum=0.9))


def test_local_rate_and_decay_are_float32_products():
    assert local_rate(0.1, 2.0) == float(np.float32(0.1) * np.float32(2.0))
    assert local_decay(0.0005, 3.0) == float(np.float32(0.0005) * np.float32(3.0))


# ---------------------------------------------------------------------------------------------
# Regularization, normalization, clipping

def test_l2_and_l1_weight_decay():
    data = [torch.tensor([2.0, -3.0, 0.0]), torch.tensor([1.0])]
    diffs = [torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0.5])]
    regularize(data, diffs, [0.5, 0.0], "L2")
    np.testing.assert_allclose(diffs[0].numpy(), [1.1, -1.4, 0.1], rtol=1e-6)
    assert diffs[1].item() == 0.5                      # decay_mult 0: untouched
    diffs = [torch.tensor([0.1, 0.1, 0.1])]
    regularize(data[:1], diffs, [0.5], "L1")
    np.testing.assert_allclose(diffs[0].numpy(), [0.6, -0.4, 0.1], rtol=1e-6)
    with pytest.raises(SolverError) as e:
        regularize(data, diffs, [0.5], "L3")
    assert "L3" in str(e.value) and "L1" in str(e.value)


def test_normalize_multiplies_by_the_float32_reciprocal():
    values = torch.tensor([1.0, 2.0, 7.0, 10.0])
    diffs = [values.clone()]
    normalize(diffs, 3)
    # Caffe scales by Dtype(1) / iter_size, a float32 constant (7 * (1/3) != 7 / 3 in float32).
    assert np.array_equal(diffs[0].numpy(), values.numpy() * (np.float32(1) / np.float32(3)))
    np.testing.assert_allclose(diffs[0].numpy(), values.numpy() / 3, rtol=1e-6)
    same = [values.clone()]
    normalize(same, 1)
    assert torch.equal(same[0], values)
    with pytest.raises(SolverError):
        normalize(same, 0)


def test_clip_gradients_on_the_global_norm():
    diffs = [torch.tensor([3.0]), torch.tensor([[4.0]])]   # global norm 5
    assert global_norm(diffs) == 5.0
    event = clip_gradients(diffs, 1.0)
    assert event is not None and event.norm == 5.0 and event.scale == pytest.approx(0.2)
    np.testing.assert_allclose([diffs[0].item(), diffs[1].item()], [0.6, 0.8], rtol=1e-6)
    assert event.message() == ("Gradient clipping: scaling down gradients (L2 norm 5 > 1) "
                               "by scale factor 0.2")
    untouched = [torch.tensor([3.0]), torch.tensor([4.0])]
    assert clip_gradients(untouched, -1) is None       # caffe.proto default: off
    assert clip_gradients(untouched, 5.0) is None      # not above the threshold
    assert untouched[0].item() == 3.0 and untouched[1].item() == 4.0
