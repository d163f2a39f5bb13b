"""Support rules of the paper, as pure functions of tensors (no layers, no state).

A *support* is the binary mask ``m`` of a layer's units that are "on". The paper gives three ways
to obtain it:

* eq. 12, thresholding: ``m_i = (q_i > beta_i)`` with ``beta`` per channel (axis 1);
* eq. 38, instance-wise reconstruction: ``m_i = (x_i^2 > beta)``, the closed-form minimiser of
  ``||x - m (.) x||^2 + beta ||m||_0`` (eq. 36) for one example;
* eq. 41, batch-wise reconstruction: ``m_i = (sum_n x_i^(n)^2 > beta)``, one mask shared by the
  ``N`` examples of a batch (eq. 39).

Eq. 41 is split in two (:func:`batch_support_sums`, :func:`batch_support`) so that a distributed
trainer can ``torch.distributed.all_reduce`` the per-unit sums of every process before thresholding:
the sum over the global batch is then the sum of the local sums, and every process derives the same
mask. :func:`changed_fraction` measures how much a support moved between two alternation steps.

B-alternation's two sparser batch rules: :func:`calibrated_threshold` (eq. 41 with its threshold
chosen so that a target share of units is on) and :func:`majority_support` (a unit is on for the
batch when it is on for more than half of the examples).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

Number = Union[float, int]

# Number of set bits of each byte value (popcount table for packed masks).
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def channel_view(beta: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``beta`` shaped to broadcast against ``q`` along the channel axis (axis 1).

    ``beta`` is a 0-axis tensor (shared by all channels, stays as is) or has one value per channel
    of ``q`` (``q`` is ``(N, C, ...)``; 2-D ``(N, C)`` included).
    """
    if beta.dim() == 0 or q.dim() < 2:
        return beta
    return beta.reshape((1, -1) + (1,) * (q.dim() - 2))


def threshold_support(q: torch.Tensor, beta: Union[torch.Tensor, Number]) -> torch.Tensor:
    """Eq. 12: ``q > beta`` per unit, ``beta`` per channel (axis 1) or a scalar. A bool tensor."""
    if not isinstance(beta, torch.Tensor):
        return q.detach() > beta
    return q.detach() > channel_view(beta.detach().to(q.dtype), q)


def reconstruction_support(x: torch.Tensor, beta: Number) -> torch.Tensor:
    """Eq. 38: ``x^2 > beta`` per unit (one example's support from its own signal). Bool tensor.

    With ``beta = 0`` this keeps exactly the non-zero units of ``x``.
    """
    x = x.detach()
    return x * x > beta


def batch_support_sums(x: torch.Tensor) -> torch.Tensor:
    """Eq. 41's statistic: ``sum_n x^(n)^2`` per unit over the batch axis 0; shape ``x.shape[1:]``.

    Accumulated in at least float32 (a float16 activation squared and summed over a batch would
    overflow). Distributed training: ``torch.distributed.all_reduce(sums)`` (SUM) before
    :func:`batch_support`, so that every process thresholds the sums of the whole global batch.
    """
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return (x * x).sum(dim=0)


def batch_support(sums: torch.Tensor, beta: Number) -> torch.Tensor:
    """Eq. 41: ``sums > beta`` per unit; one mask shared by every example of the batch (bool)."""
    return sums > beta


def _popcount(a: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a hardware popcount
        return int(np.bitwise_count(a).sum(dtype=np.int64))
    return int(_POPCOUNT[a].sum(dtype=np.int64))


def changed_fraction(old_packed: Union[np.ndarray, torch.Tensor],
                     new_packed: Union[np.ndarray, torch.Tensor],
                     num_bits: Optional[int] = None) -> float:
    """Fraction of support bits that differ between two bit-packed supports of the same layout.

    ``num_bits`` is the number of real (unpadded) bits they hold; by default every bit of the
    arrays counts. Padding bits are zero in both, so they never count as changed.
    """
    old, new = (a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                for a in (old_packed, new_packed))
    if old.shape != new.shape:
        raise ValueError(f"packed supports differ in shape: {old.shape} vs {new.shape}")
    total = old.size * 8 if num_bits is None else int(num_bits)
    if total == 0:
        return 0.0
    return _popcount(np.bitwise_xor(old.astype(np.uint8, copy=False),
                                    new.astype(np.uint8, copy=False))) / total


def count_changed_bits(old_packed: np.ndarray, new_packed: np.ndarray) -> int:
    """Number of bits that differ between two uint8 arrays of the same shape."""
    return _popcount(np.bitwise_xor(old_packed, new_packed))


def calibrated_threshold(sums: torch.Tensor, target_on: float) -> torch.Tensor:
    """Eq. 41's threshold chosen so that ``sums > t`` keeps ``target_on`` of the units on.

    ``sums`` are the per-unit statistics of one layer (any shape, all units pooled);
    ``k = floor(target_on * units)`` units are meant to be on, and ``t`` is the ``(units - k)``-th
    smallest sum, so ``sums > t`` holds for at most ``k`` units: fewer when sums tie at ``t``, in
    particular when more than ``1 - target_on`` of the units have a zero sum (those are never
    turned on unless ``target_on`` is 1: eq. 41 at ``beta = 0`` then already keeps fewer than
    the target). ``target_on >= 1`` gives ``-1`` (every unit on), ``target_on <= 0`` the largest
    sum (none on). A 0-d tensor on ``sums``' device, no host sync.
    """
    flat = sums.detach().reshape(-1)
    units = flat.numel()
    k = int(math.floor(float(target_on) * units + 1e-9))
    if k >= units:
        return torch.full((), -1.0, dtype=flat.dtype, device=flat.device)
    if units == 0:
        return torch.zeros((), dtype=flat.dtype, device=flat.device)
    # kthvalue is 1-based: the (units - k)-th smallest.
    return torch.kthvalue(flat, units - k).values


def majority_support(on_counts: torch.Tensor, examples: Union[torch.Tensor, Number]
                     ) -> torch.Tensor:
    """The majority vote of the paper's Sec. 3.4: a unit is on for the whole batch when its own
    support (eq. 12) is on for more than half of the ``examples``: ``2 * count > N``. Bool.

    ``on_counts`` is the per-unit count of examples whose support is on (summed over the batch,
    and over processes when distributed: all-reduce the counts and ``N`` alike).
    """
    return on_counts * 2 > examples
