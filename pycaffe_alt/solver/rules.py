"""Caffe's update rules as pure functions over lists of tensors.

Each rule has the signature ``rule(diffs, history, local_rates, hyper, it)``:

- ``diffs``: one gradient tensor per learnable parameter, already normalized (iter_size),
  regularized (weight decay) and clipped; the rule overwrites it with the *update value*, as
  Caffe's ``ComputeUpdateValue`` does, and :func:`apply_update` then subtracts it from the
  parameter (``Net::Update``: data -= diff).
- ``history``: the rule's state tensors in Caffe's solverstate order. Rules with two state sets
  (AdaDelta, Adam) keep all first-set tensors, one per parameter, followed by all second-set
  tensors (Caffe's ``AdaDeltaPreSolve``/``AdamPreSolve`` append a second set of ``history_``
  blobs after the first). Updated in place.
- ``local_rates``: per parameter ``rate * lr_mult`` (see :func:`local_rate`).
- ``hyper``: :class:`RuleHyper` (momentum, momentum2, delta, rms_decay).
- ``it``: the iteration being applied (Caffe's ``iter_`` before it is incremented).

Arithmetic follows the order of Caffe's CPU code (scale history first, then add the scaled
gradient, ...), in the tensors' own dtype; the ``torch._foreach_*`` kernels apply each step to
all parameters at once. Unlike ``torch.optim.SGD``, Caffe's SGD keeps the learning rate *inside*
the momentum history, which matters as soon as the rate changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import SolverError

Tensors = List[torch.Tensor]


@dataclass(frozen=True)
class RuleHyper:
    """The hyper-parameters update rules read from ``SolverParameter``.

    Defaults are caffe.proto's: momentum 0, momentum2 0.999, delta 1e-8, rms_decay 0.99.
    """

    momentum: float = 0.0
    momentum2: float = 0.999
    delta: float = 1e-8
    rms_decay: float = 0.99

    @classmethod
    def from_solver_param(cls, solver_param) -> "RuleHyper":
        """Take the fields from a ``caffe_pb2.SolverParameter`` (unset fields give defaults)."""
        return cls(momentum=solver_param.momentum, momentum2=solver_param.momentum2,
                   delta=solver_param.delta, rms_decay=solver_param.rms_decay)


def local_rate(rate: float, lr_mult: float) -> float:
    """``rate * lr_mult`` rounded like Caffe's float32 ``local_rate``."""
    return float(np.float32(rate) * np.float32(lr_mult))


def apply_update(datas: Sequence[torch.Tensor], diffs: Sequence[torch.Tensor]) -> None:
    """Caffe's ``Net::Update``: every parameter moves by minus its update value."""
    torch._foreach_sub_(list(datas), list(diffs))


def _second_set(history: Tensors, n: int) -> Tuple[Tensors, Tensors]:
    return history[:n], history[n:]


def sgd(diffs: Tensors, history: Tensors, local_rates: Sequence[float], hyper: RuleHyper,
        it: int) -> None:
    """SGD with momentum, Caffe style (``sgd_solver.cpp``).

    ``h <- momentum * h + local_rate * g``; ``update = h``. The rate lives inside ``h``.
    """
    torch._foreach_mul_(diffs, list(local_rates))
    torch._foreach_mul_(history, hyper.momentum)
    torch._foreach_add_(history, diffs)
    torch._foreach_copy_(diffs, history)


def nesterov(diffs: Tensors, history: Tensors, local_rates: Sequence[float], hyper: RuleHyper,
             it: int) -> None:
    """Nesterov momentum, Caffe style (``nesterov_solver.cpp``).

    ``h' = momentum * h + local_rate * g``; ``update = (1 + momentum) * h' - momentum * h``;
    ``h <- h'``.
    """
    m = hyper.momentum
    stepped_back = torch._foreach_mul(history, m)
    torch._foreach_mul_(diffs, list(local_rates))
    torch._foreach_mul_(history, m)
    torch._foreach_add_(history, diffs)
    torch._foreach_copy_(diffs, history)
    torch._foreach_mul_(diffs, 1.0 + m)
    torch._foreach_sub_(diffs, stepped_back)


def adagrad(diffs: Tensors, history: Tensors, local_rates: Sequence[float], hyper: RuleHyper,
            it: int) -> None:
    """AdaGrad, Caffe style (``adagrad_solver.cpp``).

    ``h <- h + g^2``; ``update = local_rate * g / (sqrt(h) + delta)``.
    """
    torch._foreach_add_(history, torch._foreach_mul(diffs, diffs))
    denom = torch._foreach_sqrt(history)
    torch._foreach_add_(denom, hyper.delta)
    torch._foreach_div_(diffs, denom)
    torch._foreach_mul_(diffs, list(local_rates))


def _decaying_average_(avg: Tensors, values: Tensors, decay: float) -> None:
    """``avg <- decay * avg + (1 - decay) * values`` (Caffe's axpby order; ``values`` is consumed)."""
    torch._foreach_mul_(values, 1.0 - decay)
    torch._foreach_mul_(avg, decay)
    torch._foreach_add_(avg, values)


def rmsprop(diffs: Tensors, history: Tensors, local_rates: Sequence[float], hyper: RuleHyper,
            it: int) -> None:
    """RMSProp, Caffe style (``rmsprop_solver.cpp``).

    ``h <- rms_decay * h + (1 - rms_decay) * g^2``;
    ``update = local_rate * g / (sqrt(h) + delta)``.
    """
    _decaying_average_(history, torch._foreach_mul(diffs, diffs), hyper.rms_decay)
    denom = torch._foreach_sqrt(history)
    torch._foreach_add_(denom, hyper.delta)
    torch._foreach_div_(diffs, denom)
    torch._foreach_mul_(diffs, list(local_rates))


def adadelta(diffs: Tensors, history: Tensors, local_rates: Sequence[float], hyper: RuleHyper,
             it: int) -> None:
    """AdaDelta, Caffe style (``adadelta_solver.cpp``); history = [g2 set..., u2 set...].

    ``g2 <- momentum * g2 + (1 - momentum) * g^2``;
    ``d = g * sqrt((u2 + delta) / (g2 + delta))``;
    ``u2 <- momentum * u2 + (1 - momentum) * d^2``;
    ``update = local_rate * d``. Caffe adds delta to both averages (not outside the sqrt), and
    applies the learning rate after ``u2`` is updated, so ``u2`` never contains the rate.
    """
    grad_sq, update_sq = _second_set(history, len(diffs))
    m, delta = hyper.momentum, hyper.delta
    _decaying_average_(grad_sq, torch._foreach_mul(diffs, diffs), m)
    ratio = torch._foreach_add(update_sq, delta)
    torch._foreach_div_(ratio, torch._foreach_add(grad_sq, delta))
    torch._foreach_sqrt_(ratio)
    torch._foreach_mul_(diffs, ratio)
    _decaying_average_(update_sq, torch._foreach_mul(diffs, diffs), m)
    torch._foreach_mul_(diffs, list(local_rates))


def adam_correction(momentum: float, momentum2: float, it: int) -> float:
    """Adam's bias correction ``sqrt(1 - momentum2^t) / (1 - momentum^t)`` with ``t = it + 1``.

    Caffe evaluates the powers in double and stores the result as float32.
    """
    t = it + 1
    return float(np.float32(math.sqrt(1.0 - math.pow(momentum2, t)) / (1.0 - math.pow(momentum, t))))


def adam(diffs: Tensors, history: Tensors, local_rates: Sequence[float], hyper: RuleHyper,
         it: int) -> None:
    """Adam, Caffe style (``adam_solver.cpp``); history = [m set..., v set...].

    ``m <- momentum * m + (1 - momentum) * g``; ``v <- momentum2 * v + (1 - momentum2) * g^2``;
    ``update = local_rate * c * m / (sqrt(v) + delta)`` with
    ``c = sqrt(1 - momentum2^t) / (1 - momentum^t)``, ``t = it + 1`` (the correction scales
    the rate; delta is added to the uncorrected ``sqrt(v)``).
    """
    first, second = _second_set(history, len(diffs))
    b1, b2 = hyper.momentum, hyper.momentum2
    corrected = [float(np.float32(r) * np.float32(adam_correction(b1, b2, it)))
                 for r in local_rates]
    _decaying_average_(second, torch._foreach_mul(diffs, diffs), b2)
    _decaying_average_(first, diffs, b1)
    denom = torch._foreach_sqrt(second)
    torch._foreach_add_(denom, hyper.delta)
    torch._foreach_copy_(diffs, first)
    torch._foreach_div_(diffs, denom)
    torch._foreach_mul_(diffs, corrected)


RuleFn = Callable[[Tensors, Tensors, Sequence[float], RuleHyper, int], None]


@dataclass(frozen=True)
class UpdateRule:
    """One solver type: its update function and how many history sets it keeps."""

    name: str
    update: RuleFn
    history_sets: int

    def history_shapes(self, param_shapes: Sequence[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
        """Shapes of the history blobs in solverstate order (all of set 1, then set 2)."""
        return [tuple(s) for s in param_shapes] * self.history_sets

    def new_history(self, params: Sequence[torch.Tensor]) -> Tensors:
        """Zero history tensors like Caffe's PreSolve (same dtype and device as the params)."""
        return [torch.zeros_like(p) for _ in range(self.history_sets) for p in params]


UPDATE_RULES: Dict[str, UpdateRule] = {
    rule.name: rule for rule in (
        UpdateRule("SGD", sgd, 1),
        UpdateRule("Nesterov", nesterov, 1),
        UpdateRule("AdaGrad", adagrad, 1),
        UpdateRule("RMSProp", rmsprop, 1),
        UpdateRule("AdaDelta", adadelta, 2),
        UpdateRule("Adam", adam, 2),
    )
}


def update_rule(type_name: str) -> UpdateRule:
    """The rule registered under Caffe's solver ``type`` string (case-sensitive, as in Caffe)."""
    try:
        return UPDATE_RULES[type_name]
    except KeyError:
        raise SolverError(f'unknown solver type "{type_name}"', where="type",
                          hint="use one of: " + ", ".join(UPDATE_RULES)) from None


def check_hyper(type_name: str, hyper: RuleHyper) -> None:
    """Caffe's constructor CHECKs for AdaGrad and RMSProp, as user errors."""
    if type_name in ("AdaGrad", "RMSProp") and hyper.momentum != 0:
        raise SolverError(f"momentum cannot be used with {type_name} (got {hyper.momentum})",
                          where="momentum", hint="remove momentum from the solver file")
    if type_name == "RMSProp" and not 0 <= hyper.rms_decay < 1:
        raise SolverError(f"rms_decay must be in [0, 1) (got {hyper.rms_decay})",
                          where="rms_decay", hint="a typical value is rms_decay: 0.98")
