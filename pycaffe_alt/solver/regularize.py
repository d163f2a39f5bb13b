"""Gradient preparation before an update rule: clipping, iter_size normalization, weight decay.

Caffe's ``SGDSolver::ApplyUpdate`` runs, for every iteration:

1. :func:`clip_gradients` on the global L2 norm of all learnable diffs; note that this happens
   *before* normalization, i.e. on the gradient summed over ``iter_size`` forward/backward passes;
2. per parameter :func:`normalize` (``iter_size``), then :func:`regularize` (weight decay), then
   the update rule (:mod:`pycaffe_alt.solver.rules`).

All functions work in place on lists of tensors and return only what a caller has to log.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import SolverError


def local_decay(weight_decay: float, decay_mult: float) -> float:
    """``weight_decay * decay_mult`` rounded like Caffe's float32 ``local_decay``."""
    return float(np.float32(weight_decay) * np.float32(decay_mult))


def _l2(data: torch.Tensor, diff: torch.Tensor, decay: float) -> None:
    diff.add_(data, alpha=decay)


def _l1(data: torch.Tensor, diff: torch.Tensor, decay: float) -> None:
    diff.add_(torch.sign(data), alpha=decay)


# regularization_type -> "diff += decay * penalty'(data)"
REGULARIZERS: Dict[str, Callable[[torch.Tensor, torch.Tensor, float], None]] = {
    "L2": _l2,
    "L1": _l1,
}


def regularizer(regularization_type: str) -> Callable[[torch.Tensor, torch.Tensor, float], None]:
    """The weight-decay gradient for ``regularization_type`` (``L2``: decay * w, ``L1``: decay * sign(w))."""
    try:
        return REGULARIZERS[regularization_type]
    except KeyError:
        raise SolverError(f'unknown regularization type "{regularization_type}"',
                          where="regularization_type",
                          hint="use one of: " + ", ".join(REGULARIZERS)) from None


def regularize(datas: Sequence[torch.Tensor], diffs: Sequence[torch.Tensor],
               local_decays: Sequence[float], regularization_type: str = "L2") -> None:
    """Add weight decay to each diff in place: L2 ``diff += d * data``, L1 ``diff += d * sign(data)``.

    ``local_decays[i] = weight_decay * decay_mult[i]`` (see :func:`local_decay`). As in Caffe,
    a parameter whose local decay is 0 is left untouched. L2 runs as one fused ``foreach`` add
    per distinct decay value (usually one or two), the same arithmetic as per-tensor ``add_``.
    """
    apply = regularizer(regularization_type)
    if apply is _l2:
        groups: Dict[float, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
        for data, diff, decay in zip(datas, diffs, local_decays):
            if decay:
                group = groups.setdefault(decay, ([], []))
                group[0].append(diff)
                group[1].append(data)
        for decay, (ds, ws) in groups.items():
            torch._foreach_add_(ds, ws, alpha=decay)
        return
    for data, diff, decay in zip(datas, diffs, local_decays):
        if decay:
            apply(data, diff, decay)


def normalize(diffs: Sequence[torch.Tensor], iter_size: int) -> None:
    """Average gradients accumulated over ``iter_size`` passes (Caffe's ``Normalize``).

    Caffe multiplies by the float32 value of ``1 / iter_size`` (not a division), so do we.
    """
    if iter_size == 1:
        return
    if iter_size < 1:
        raise SolverError(f"iter_size must be >= 1 (got {iter_size})", where="iter_size",
                          hint="iter_size is the number of batches accumulated per update")
    torch._foreach_mul_(list(diffs), float(np.float32(1.0) / np.float32(iter_size)))


class Clipping(NamedTuple):
    """What :func:`clip_gradients` did: the global norm, the threshold and the scale applied."""

    norm: float
    clip: float
    scale: float

    def message(self) -> str:
        """Caffe's log line for this event."""
        return (f"Gradient clipping: scaling down gradients (L2 norm {self.norm:g} > "
                f"{self.clip:g}) by scale factor {self.scale:g}")


def global_norm(diffs: Sequence[torch.Tensor]) -> float:
    """L2 norm of all diffs together, as a float32 value like Caffe's ``sqrt(sum sumsq_diff)``."""
    diffs = list(diffs)
    if not diffs:
        return 0.0
    # Per-tensor norms in one fused kernel; their squares summed in double (Caffe sums the
    # float32 per-blob sums of squares; the difference is far below float32 resolution).
    norms = torch.stack([n.double() for n in torch._foreach_norm(diffs)])
    return float(np.float32(math.sqrt(float((norms * norms).sum()))))


def clip_gradients(diffs: Sequence[torch.Tensor], clip: float) -> Optional[Clipping]:
    """Scale all diffs by ``clip / norm`` when their global L2 norm exceeds ``clip``.

    ``clip < 0`` disables clipping (caffe.proto's default -1). Returns the event to log, or
    None when nothing was scaled.
    """
    if clip < 0:
        return None
    norm = global_norm(diffs)
    if not norm > clip:
        return None
    scale = float(np.float32(clip) / np.float32(norm))
    torch._foreach_mul_(list(diffs), scale)
    return Clipping(norm=norm, clip=float(clip), scale=scale)
