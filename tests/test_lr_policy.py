"""Learning-rate policies: hand-computed tables, Caffe's multistep counter, and Caffe's logged rates."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_alt.errors import SolverError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.solver.lr_policy import (LR_POLICIES, PlateauState, current_step, learning_rate,
                                          multistep_index, plateau_advance)

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "solvers"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "ref.npz").exists())


def solver(text: str) -> caffe_pb2.SolverParameter:
    return text_format.Parse(text, caffe_pb2.SolverParameter())


# (solver fields, [(iteration, rate computed by hand), ...])
TABLE = [
    ('lr_policy: "fixed" base_lr: 0.01', [(0, 0.01), (1, 0.01), (12345, 0.01)]),
    ('lr_policy: "step" base_lr: 0.1 gamma: 0.5 stepsize: 10',
     [(0, 0.1), (9, 0.1), (10, 0.05), (19, 0.05), (20, 0.025), (35, 0.0125)]),
    ('lr_policy: "exp" base_lr: 1 gamma: 0.5', [(0, 1.0), (1, 0.5), (3, 0.125), (10, 1 / 1024)]),
    ('lr_policy: "inv" base_lr: 0.01 gamma: 0.0001 power: 0.75',
     [(0, 0.01), (10000, 0.01 * 2 ** -0.75), (30000, 0.01 * 4 ** -0.75)]),
    ('lr_policy: "multistep" base_lr: 1 gamma: 0.1 stepvalue: 3 stepvalue: 6',
     [(0, 1.0), (2, 1.0), (3, 0.1), (5, 0.1), (6, 0.01), (100, 0.01)]),
    ('lr_policy: "poly" base_lr: 1 power: 2 max_iter: 10',
     [(0, 1.0), (5, 0.25), (8, 0.04), (10, 0.0)]),
    ('lr_policy: "sigmoid" base_lr: 2 gamma: 0.5 stepsize: 5',
     [(5, 1.0), (7, 2 / (1 + math.exp(-1))), (3, 2 / (1 + math.exp(1)))]),
    # Without a held step (no loss seen yet) plateau is at its first step: base_lr.
    ('lr_policy: "plateau" base_lr: 0.1 gamma: 0.5 plateau_winsize: 4', [(0, 0.1), (500, 0.1)]),
]


@pytest.mark.parametrize("fields,expected", TABLE, ids=[t[0].split('"')[1] for t in TABLE])
def test_policy_table(fields, expected):
    param = solver(fields)
    for it, rate in expected:
        got = learning_rate(param, it)
        assert got == pytest.approx(rate, rel=1e-6, abs=1e-12), (it, got, rate)
        # Caffe's rate is a float32 Dtype; ours must be a float32 value too.
        assert got == float(np.float32(got))


def test_every_policy_is_in_the_table():
    assert {t[0].split('"')[1] for t in TABLE} == set(LR_POLICIES)


def test_unknown_policy_names_it_and_lists_known():
    with pytest.raises(SolverError) as e:
        learning_rate(solver('lr_policy: "cosine" base_lr: 0.1'), 0)
    text = str(e.value)
    assert '"cosine"' in text and "multistep" in text and "sigmoid" in text


@pytest.mark.parametrize("fields", [
    'lr_policy: "step" base_lr: 0.1 gamma: 0.1',                 # no stepsize
    'lr_policy: "step" base_lr: 0.1 gamma: -0.1 stepsize: 3',
    'lr_policy: "poly" base_lr: 0.1 power: 1',                   # no max_iter
    'lr_policy: "sigmoid" base_lr: 0.1 gamma: 0.1',              # no stepsize
])
def test_bad_policy_parameters_are_solver_errors(fields):
    with pytest.raises(SolverError) as e:
        learning_rate(solver(fields), 1)
    assert "lr_policy" in str(e.value)


def test_multistep_index_follows_caffe_counter():
    assert [multistep_index([3, 6], it) for it in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    # Caffe advances at most once per iteration: equal step values take two iterations...
    assert [multistep_index([5, 5], it) for it in (4, 5, 6, 7)] == [0, 1, 2, 2]
    # ...and an out-of-order step value is taken on the iteration after the previous one.
    assert [multistep_index([10, 5], it) for it in (9, 10, 11)] == [0, 1, 2]
    assert multistep_index([], 100) == 0


def test_current_step_as_caffe_records_it():
    assert current_step(solver('lr_policy: "step" base_lr: 1 gamma: 0.1 stepsize: 7'), 14) == 2
    assert current_step(solver('lr_policy: "step" base_lr: 1 gamma: 0.1 stepsize: 7'), 13) == 1
    multi = solver('lr_policy: "multistep" base_lr: 1 gamma: 0.1 stepvalue: 5 stepvalue: 12')
    assert [current_step(multi, it) for it in (4, 5, 11, 12)] == [0, 1, 1, 2]
    assert current_step(solver('lr_policy: "inv" base_lr: 1 gamma: 0.1 power: 1'), 50) is None


def test_multistep_goes_on_from_a_restored_counter():
    # Caffe's multistep keeps current_step_ and advances it by at most one per iteration; a
    # solverstate whose counter does not match the step values (edited before resuming) goes
    # on from the stored count: at 15 with counter 0 it takes one step (not two), then the next.
    multi = solver('lr_policy: "multistep" base_lr: 1 gamma: 0.1 stepvalue: 5 stepvalue: 12')
    assert current_step(multi, 15, held=0) == 1 and current_step(multi, 16, held=1) == 2
    assert learning_rate(multi, 15, current_step(multi, 15, held=0)) == pytest.approx(0.1)
    assert learning_rate(multi, 15) == pytest.approx(0.01)  # a run started at 0
    assert [current_step(multi, it, held=0) for it in (4, 5)] == [0, 1]
    assert current_step(multi, 40, held=2) == 2


@pytest.mark.parametrize("case", CASES)
def test_golden_learning_rates(case):
    param = solver((GOLDEN / case / "solver.prototxt").read_text())
    ref = np.load(GOLDEN / case / "ref.npz")
    assert len(ref["lr_iter"]) >= 30
    for it, logged in zip(ref["lr_iter"], ref["lr"]):
        ours = learning_rate(param, int(it))
        # Caffe logs the rate with 6 significant digits: ours must print identically (a
        # relative tolerance below 5e-6 is impossible against a 6-digit log).
        assert f"{ours:.6g}" == f"{logged:.6g}", (case, int(it), ours, logged)
        assert ours == pytest.approx(logged, rel=5e-6)


@pytest.mark.parametrize("case", CASES)
def test_golden_current_step(case):
    """Caffe's iteration-15 snapshot holds the counter left by the rate for iteration 14."""
    param = solver((GOLDEN / case / "solver.prototxt").read_text())
    state = caffe_pb2.SolverState.FromString((GOLDEN / case / "snap_iter_15.solverstate").read_bytes())
    derived = current_step(param, state.iter - 1)
    assert state.current_step == (0 if derived is None else derived)


@pytest.mark.parametrize("fields,it,expected", [
    # C's pow overflows to inf and Caffe trains on (its loss then turns NaN); Python's raised.
    ('lr_policy: "inv" base_lr: 1 gamma: 1 power: -1000', 2, math.inf),
    ('lr_policy: "exp" base_lr: 1 gamma: 1e30', 40, math.inf),
    ('lr_policy: "step" base_lr: 1 gamma: 1e30 stepsize: 1', 40, math.inf),
    ('lr_policy: "multistep" base_lr: 1 gamma: 10 stepvalue: 1', 1, 10.0),
    # poly past max_iter: pow of a negative base with a fractional power is NaN.
    ('lr_policy: "poly" base_lr: 1 power: 0.5 max_iter: 10', 12, math.nan),
    # poly at max_iter with a negative power: pow(0, -1) is inf.
    ('lr_policy: "poly" base_lr: 1 power: -1 max_iter: 10', 10, math.inf),
])
def test_rates_beyond_float_follow_c_pow(fields, it, expected):
    rate = LR_POLICIES[solver(fields).lr_policy](solver(fields), it)
    if math.isnan(expected):
        assert math.isnan(rate)
    else:
        assert rate == expected


# ---------------------------------------------------------------------------------------------
# plateau (the SSD fork's GetLearningRate), against a sequence worked out by hand.

PLATEAU = 'lr_policy: "plateau" base_lr: 0.1 gamma: 0.1 plateau_winsize: 3 plateau_winsize: 2 ' \
          'plateau_winsize: 2'
f32 = lambda x: float(np.float32(x))  # noqa: E731 - Caffe's minimum_loss_ is a float
# (iteration, smoothed loss, expected (minimum_loss, iter_last_event, current_step) after it)
PLATEAU_TRACE = [
    (0, 5.0, (5.0, 0, 0)),            # the first loss is below FLT_MAX: an event at 0
    (1, 4.0, (4.0, 1, 0)),            # new minimum: the window restarts at 1
    (2, 4.0, (4.0, 1, 0)),            # equal is not below: no event
    (3, 4.5, (4.0, 1, 0)),            # 3 < 1 + 3: one iteration short of the window
    (4, 4.2, (4.0, 4, 1)),            # 4 >= 1 + 3: drop, the drop is the new event
    (5, 3.9, (f32(3.9), 5, 1)),       # new minimum (float32) at 5, next window is 2
    (6, 4.0, (f32(3.9), 5, 1)),       # 6 < 5 + 2
    (7, 4.0, (f32(3.9), 7, 2)),       # 7 >= 5 + 2: second drop
    (8, 3.9, (f32(3.9), 7, 2)),       # the same float32 value again: not below
    (9, math.nan, (f32(3.9), 9, 3)),  # NaN never becomes the minimum; 9 >= 7 + 2: third drop
    (10, 1.0, (1.0, 10, 3)),          # new minimum; no window left
    (20, 2.0, (1.0, 10, 3)),          # never drops past the last window
]


def test_plateau_follows_the_forks_rule_by_hand():
    param = solver(PLATEAU)
    state = PlateauState()
    assert state == (float(np.finfo(np.float32).max), 0, 0)  # SGDSolver::PreSolve's minimum
    for it, loss, expected in PLATEAU_TRACE:
        state = plateau_advance(param.plateau_winsize, state, loss, it)
        assert state == expected, it
        rate = learning_rate(param, it, state.current_step)
        # base_lr * pow(gamma, step) on the float32 fields, rounded to the float32 rate
        assert rate == f32(f32(0.1) * f32(0.1) ** expected[2]), it


def test_plateau_goes_on_from_a_restored_state():
    # After a resume the fork goes on from the solverstate's three values, whatever they are.
    param = solver(PLATEAU)
    held = PlateauState(minimum_loss=f32(1e38), iter_last_event=0, current_step=1)
    assert plateau_advance(param.plateau_winsize, held, 7.0, 50) == (7.0, 50, 1)
    held = PlateauState(minimum_loss=1.0, iter_last_event=48, current_step=1)
    assert plateau_advance(param.plateau_winsize, held, 7.0, 49) == (1.0, 48, 1)
    assert plateau_advance(param.plateau_winsize, held, 7.0, 50) == (1.0, 50, 2)
    # current_step does not derive plateau's counter: the solver holds it.
    assert current_step(param, 50, held=2) is None


@pytest.mark.parametrize("fields,what", [
    ('lr_policy: "plateau" base_lr: 0.1 gamma: 0.1', "plateau_winsize is not set"),
    ('lr_policy: "plateau" base_lr: 0.1 gamma: 0.1 plateau_winsize: 5 plateau_winsize: 0',
     r"plateau_winsize values must be > 0 \(got 0\)"),
    ('lr_policy: "plateau" base_lr: 0.1 gamma: 0.1 plateau_winsize: -2',
     r"plateau_winsize values must be > 0 \(got -2\)"),
    ('lr_policy: "plateau" base_lr: 0.1 gamma: -0.1 plateau_winsize: 2', "gamma must be >= 0"),
])
def test_plateau_refuses_what_cannot_be_meant(fields, what):
    with pytest.raises(SolverError, match=what) as e:
        learning_rate(solver(fields), 0)
    assert 'lr_policy "plateau"' in str(e.value)


def test_plateau_refusal_names_the_solver_file_and_field(tmp_path):
    import pycaffe_alt as caffe

    path = tmp_path / "solver.prototxt"
    path.write_text('net_param { layer { name: "x" type: "DummyData" top: "x" '
                    'dummy_data_param { shape { dim: 1 } } } }\n'
                    'base_lr: 0.1 lr_policy: "plateau" gamma: 0.1\n')
    with pytest.raises(SolverError) as e:
        caffe.get_solver(str(path), device="cpu")
    text = str(e.value)
    assert text.startswith(f"{path}: lr_policy \"plateau\": plateau_winsize is not set")
    assert "hint: add plateau_winsize: N" in text
