"""Learning-rate policies as closed forms of the iteration (Caffe's ``SGDSolver::GetLearningRate``).

Caffe computes the rate inside the solver with side effects (``current_step_`` advances while the
policy is evaluated). Here every policy is a pure function ``(solver_param, it) -> rate`` looked up
in a table, and the step counter that Caffe stores in the solverstate is derived separately by
:func:`current_step`, so a restored ``current_step`` can be checked instead of trusted.

``plateau`` (the SSD fork, weiliu89/caffe ``ssd``) is the one policy that is not a closed form of
the iteration: it reads the smoothed training loss. Its bookkeeping is the pure
:func:`plateau_advance` over a :class:`PlateauState`, which the solver holds and snapshots; the
rate itself is then ``base_lr * gamma ^ current_step`` like ``multistep``.

Precision: Caffe's rate is a ``Dtype`` (float32) built from float32 proto fields; intermediate
``pow``/``exp`` calls run in double. We evaluate the same expressions in float64 on the float32
field values, with the float32 roundings Caffe performs on its ``Dtype`` sub-expressions, and
round the result to float32. The returned Python float is therefore exactly Caffe's rate.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import numpy as np

from ..errors import SolverError

_f32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
_LN_FLT_MAX = math.log(FLT_MAX)  # float exp overflows above it


def _rounded(x: float) -> float:
    """Round to the float32 value Caffe stores in its ``Dtype rate`` (inf past float's range)."""
    with np.errstate(over="ignore"):
        return float(_f32(x))


def c_pow(x: float, y: float) -> float:
    """C's ``pow``, which Caffe's policies call: an overflow is inf, a negative base with a
    fractional exponent NaN, zero to a negative power inf, where Python's ``math.pow`` raises.
    Caffe then trains on with that rate (and its loss turns NaN), so no policy crashes here."""
    try:
        return math.pow(x, y)
    except OverflowError:
        odd = float(y).is_integer() and int(y) % 2 == 1
        return -math.inf if x < 0 and odd else math.inf
    except ValueError:
        return math.inf if x == 0 else math.nan


def _require(ok: bool, policy: str, what: str, hint: str) -> None:
    # Caffe aborts with a CHECK on these; we tell the user which field to fix instead.
    if not ok:
        raise SolverError(what, where=f'lr_policy "{policy}"', hint=hint)


def multistep_index(stepvalues: Sequence[int], it: int) -> int:
    """Caffe's multistep ``current_step`` after the rate for iteration ``it`` was computed.

    Caffe advances ``current_step`` by at most one per iteration, when ``it >=
    stepvalue[current_step]``. For sorted, distinct step values that is simply the number of
    step values ``<= it``; in general step ``k`` is taken at iteration
    ``t_k = max(stepvalue[k], t_{k-1} + 1)``, which this function follows so that repeated or
    unsorted step values behave exactly as in Caffe (for a run started at iteration 0).
    """
    taken = 0
    previous = None
    for value in stepvalues:
        at = value if previous is None else max(value, previous + 1)
        if at > it:
            break
        taken += 1
        previous = at
    return taken


def _fixed(p, it: int) -> float:
    return _rounded(p.base_lr)


def _step(p, it: int) -> float:
    _require(p.stepsize > 0, "step", f"stepsize must be > 0 (got {p.stepsize})",
             "set stepsize: the number of iterations between rate drops")
    _require(p.gamma >= 0, "step", f"gamma must be >= 0 (got {p.gamma})",
             "gamma is the factor applied at each step, e.g. gamma: 0.1")
    return _rounded(p.base_lr * c_pow(p.gamma, it // p.stepsize))


def _exp(p, it: int) -> float:
    _require(p.gamma >= 0, "exp", f"gamma must be >= 0 (got {p.gamma})",
             "gamma is the per-iteration decay factor, e.g. gamma: 0.999")
    return _rounded(p.base_lr * c_pow(p.gamma, it))


def _inv(p, it: int) -> float:
    _require(p.gamma >= 0, "inv", f"gamma must be >= 0 (got {p.gamma})",
             "inv uses base_lr * (1 + gamma * iter) ^ (-power)")
    # Caffe forms 1 + gamma * iter in float32 before the pow.
    base = _f32(1) + _f32(p.gamma) * _f32(it)
    return _rounded(p.base_lr * c_pow(float(base), -p.power))


def multistep_advance(stepvalues: Sequence[int], step: int, it: int) -> int:
    """Caffe's multistep counter update at iteration ``it`` from the held ``step``: one step
    further when ``it >= stepvalue[step]``. From 0 at iteration 0 it gives
    :func:`multistep_index`; from a restored ``current_step`` it goes on from there, as Caffe
    does (a solverstate resumed under edited step values keeps its count)."""
    return step + 1 if 0 <= step < len(stepvalues) and it >= stepvalues[step] else step


def _multistep(p, it: int, step: Optional[int] = None) -> float:
    _require(p.gamma >= 0, "multistep", f"gamma must be >= 0 (got {p.gamma})",
             "gamma is the factor applied at each stepvalue, e.g. gamma: 0.1")
    if step is None:
        step = multistep_index(p.stepvalue, it)
    return _rounded(p.base_lr * c_pow(p.gamma, step))


class PlateauState(NamedTuple):
    """The SSD fork's plateau bookkeeping: ``SGDSolver::minimum_loss_``, ``iter_last_event_`` and
    the ``current_step_`` it shares with ``step``/``multistep`` (all three go into the
    solverstate). The defaults are a fresh solver's: ``PreSolve`` sets the minimum to
    ``numeric_limits<float>::max()``; the fork leaves ``iter_last_event_`` uninitialized, and 0
    (the solverstate's default) is what it holds in practice. Its value only matters until the
    first finite smoothed loss replaces the minimum, which sets it to that iteration."""

    minimum_loss: float = FLT_MAX
    iter_last_event: int = 0
    current_step: int = 0


def plateau_advance(winsizes: Sequence[int], held: PlateauState, smoothed_loss: float,
                    it: int) -> PlateauState:
    """The fork's plateau update at iteration ``it``, done in ``GetLearningRate`` before the rate.

    ``smoothed_loss`` is Caffe's ``smoothed_loss_`` at that moment: ``Step`` updates it with
    this iteration's loss before ``ApplyUpdate``, so it includes iteration ``it``. First a
    smoothed loss strictly below the minimum becomes the minimum, and that iteration is an
    "event"; then, while steps remain (``current_step < len(winsizes)``), the rate drops one
    step when ``it >= iter_last_event + winsizes[current_step]``, which is an event too (the
    next window counts from it). A NaN loss never compares below, so it never resets the window.
    Comparisons are in float32, the ``Dtype`` both values have in Caffe.
    """
    minimum, last, step = held
    loss = float(_f32(smoothed_loss))
    if loss < minimum:
        minimum, last = loss, it
    if 0 <= step < len(winsizes) and it >= last + winsizes[step]:
        step, last = step + 1, it
    return PlateauState(minimum, last, step)


def _plateau(p, it: int, step: Optional[int] = None) -> float:
    # The fork checks none of these (an empty plateau_winsize trains at base_lr, a window <= 0
    # drops the rate at every iteration); each is a solver file that cannot mean what it says.
    _require(len(p.plateau_winsize) > 0, "plateau", "plateau_winsize is not set, so the rate "
             "would never drop (the SSD fork then trains at base_lr throughout)",
             "add plateau_winsize: N, one per drop: the iterations without a new minimum of the "
             "smoothed loss after which the rate is multiplied by gamma")
    bad = [w for w in p.plateau_winsize if w <= 0]
    _require(not bad, "plateau", f"plateau_winsize values must be > 0 (got {bad[0] if bad else 0})",
             "each value is a number of iterations without a new minimum of the smoothed loss")
    _require(p.gamma >= 0, "plateau", f"gamma must be >= 0 (got {p.gamma})",
             "gamma is the factor applied at each plateau, e.g. gamma: 0.1")
    return _rounded(p.base_lr * c_pow(p.gamma, 0 if step is None else step))


def _poly(p, it: int) -> float:
    _require(p.max_iter > 0, "poly", f"max_iter must be > 0 (got {p.max_iter})",
             "poly decays the rate to zero at max_iter; set max_iter")
    # Caffe: Dtype(1) - Dtype(iter) / Dtype(max_iter), all float32.
    frac = _f32(1) - _f32(it) / _f32(p.max_iter)
    return _rounded(p.base_lr * c_pow(float(frac), p.power))


def _sigmoid(p, it: int) -> float:
    _require(p.stepsize > 0, "sigmoid", f"stepsize must be > 0 (got {p.stepsize})",
             "stepsize is the iteration at the middle of the sigmoid")
    # Caffe's source also CHECKs gamma >= 0 here, but the reference Caffe run in
    # golden/solvers/adadelta_sigmoid uses gamma -0.2 (a decaying sigmoid) and we follow it;
    # a negative gamma is the only way to make the sigmoid policy decrease the rate.
    _require(math.isfinite(p.gamma), "sigmoid", f"gamma must be finite (got {p.gamma})",
             "gamma is the sigmoid's slope, e.g. gamma: 0.001 (negative: a decaying rate)")
    x = -_f32(p.gamma) * (_f32(it) - _f32(p.stepsize))
    # Caffe's float exp overflows to inf far out on the tail, and the rate is then exactly 0.
    e = math.exp(float(x)) if x <= _LN_FLT_MAX else math.inf
    return _rounded(p.base_lr * (1.0 / (1.0 + e)))


LR_POLICIES: Dict[str, Callable[[object, int], float]] = {
    "fixed": _fixed,
    "step": _step,
    "exp": _exp,
    "inv": _inv,
    "multistep": _multistep,
    "poly": _poly,
    "sigmoid": _sigmoid,
    "plateau": _plateau,  # the SSD fork's
}

# Policies whose rate is base_lr * gamma ^ (a held step counter) rather than a function of ``it``.
_HELD_STEP = (_multistep, _plateau)


def _policy(name: str) -> Callable[[object, int], float]:
    try:
        return LR_POLICIES[name]
    except KeyError:
        raise SolverError(f'unknown learning rate policy "{name}"', where="lr_policy",
                          hint="use one of: " + ", ".join(LR_POLICIES)) from None


def learning_rate(solver_param, it: int, step: Optional[int] = None) -> float:
    """The rate Caffe uses (and logs as ``Iteration it, lr = ...``) for the update at ``it``.

    ``solver_param`` is a ``caffe_pb2.SolverParameter``; the result is float32-exact.
    ``step``: the multistep or plateau counter for this iteration (:func:`current_step` with the
    held value; :func:`plateau_advance`); without it, multistep's counter of a run started at
    iteration 0, and plateau's first step (base_lr). Other policies ignore it.
    """
    policy = _policy(solver_param.lr_policy)
    if step is not None and policy in _HELD_STEP:
        return policy(solver_param, it, step)
    return policy(solver_param, it)


def current_step(solver_param, it: int, held: Optional[int] = None) -> Optional[int]:
    """The ``current_step`` Caffe holds after computing the rate for iteration ``it``.

    ``step`` sets it to ``it // stepsize``; ``multistep`` advances the ``held`` value by at most
    one (:func:`multistep_advance`), or, with ``held`` None, gives the count of a run started at
    iteration 0 (:func:`multistep_index`). ``plateau`` moves it from the smoothed loss
    (:func:`plateau_advance`), which this function does not see. The other policies never touch
    it. For those, None is returned and the caller keeps (or advances) whatever value it had (0,
    or the one restored from a solverstate).
    """
    name = solver_param.lr_policy
    _policy(name)  # unknown names fail the same way as in learning_rate
    if name == "multistep" and held is not None:
        return multistep_advance(solver_param.stepvalue, held, it)
    counter = _STEP_COUNTERS.get(name)
    return None if counter is None else counter(solver_param, it)


# Policies whose position Caffe records in SolverState.current_step.
_STEP_COUNTERS: Dict[str, Callable[[object, int], int]] = {
    "step": lambda p, it: it // p.stepsize if p.stepsize > 0 else 0,
    "multistep": lambda p, it: multistep_index(p.stepvalue, it),
}
