"""Mixed precision training: the solver's ``precision`` field (our SolverParameter 5214-5216).

``precision: BF16`` or ``FP16`` runs each forward and backward pass under ``torch.autocast``:
convolutions and inner products compute in the half type, reductions and losses in float32 (the
autocast op lists). The parameters stay float32 tensors — autocast casts a copy per op — so the
weights the update touches ("master weights"), their diffs and Caffe's solver history are all
float32, and snapshots are the same float32 caffemodel/solverstate files as without it.

FP16's narrow exponent range makes small gradients underflow to zero, so FP16 uses dynamic loss
scaling (Micikevicius et al., "Mixed Precision Training", 2018): the loss is multiplied by a
scale S before backward, the diffs are divided by S before the update; a step whose diffs hold
inf/NaN is skipped and S halves; after ``loss_scale_window`` clean steps S doubles. BF16 has
float32's exponent range and needs no scaling.

On CUDA both types are fast on tensor-core GPUs. On the CPU, autocast supports BF16 (oneDNN
uses AVX512-BF16/AMX where the CPU has them); docs/performance.md has what it gives on this
project's CPU. FP32 (the default) changes nothing.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Sequence, Tuple

import torch

from .errors import SolverError
from .log import get_logger
from .proto import caffe_pb2

_P = caffe_pb2.SolverParameter
DTYPES = {_P.FP32: None, _P.BF16: torch.bfloat16, _P.FP16: torch.float16}
GROWTH, BACKOFF = 2.0, 0.5


def next_scale(scale: float, clean_steps: int, overflow: bool, window: int) -> Tuple[float, int]:
    """Dynamic loss scaling: the scale and clean-step count after one step.

    An overflow halves the scale (never below 1) and restarts the count; ``window`` clean steps
    in a row double it.
    """
    if overflow:
        return max(scale * BACKOFF, 1.0), 0
    clean_steps += 1
    if clean_steps >= window:
        return scale * GROWTH, 0
    return scale, clean_steps


def unscale_(diffs: Sequence[torch.Tensor], scale: float) -> bool:
    """Divide the diffs by ``scale`` in place; True when every value is finite (one host sync)."""
    diffs = [d for d in diffs if d is not None]
    if not diffs:
        return True
    torch._foreach_mul_(diffs, 1.0 / scale)
    return bool(torch.stack([torch.isfinite(d).all() for d in diffs]).all())


class MixedPrecision:
    """A solver's precision policy: the autocast context, loss scaling and the skip rule."""

    def __init__(self, precision: int, device: torch.device, loss_scale: float = 65536.0,
                 window: int = 2000):
        self.precision = precision
        self.dtype: Optional[torch.dtype] = DTYPES[precision]
        self.device = device
        self.scale = float(loss_scale) if precision == _P.FP16 else 1.0
        self.window = int(window)
        self.clean_steps = 0

    @classmethod
    def from_solver_param(cls, param, device: torch.device, where: str) -> "MixedPrecision":
        """The policy a SolverParameter asks for, checked (errors name ``where``)."""
        precision = int(param.precision)
        if precision not in DTYPES:
            raise SolverError(f"unknown precision {precision}", where, "use FP32, BF16 or FP16")
        if precision == _P.FP16:
            if not 1.0 <= param.loss_scale < float("inf"):  # inf: every step overflows
                raise SolverError(f"loss_scale must be finite and at least 1, got "
                                  f"{param.loss_scale}", where,
                                  "leave it unset (65536) or give a power of two")
            if param.loss_scale_window < 1:
                raise SolverError("loss_scale_window must be at least 1", where,
                                  "leave it unset (2000)")
        policy = cls(precision, device, param.loss_scale, param.loss_scale_window)
        if policy.dtype is not None:
            get_logger().info("Mixed precision: %s autocast on %s, float32 weights and history%s",
                              _P.Precision.Name(precision), device.type,
                              f", dynamic loss scale from {policy.scale:g}"
                              if precision == _P.FP16 else "")
        return policy

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> ContextManager:
        """The context a forward pass (and the loss) runs in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What to call ``backward`` on: the loss times the current scale (FP16)."""
        return loss * self.scale if self.scale != 1.0 else loss

    def unscale_and_check(self, diffs: Sequence[torch.Tensor]) -> bool:
        """Bring the diffs back to the loss's scale; False when this step must be skipped
        (a diff overflowed). Updates the scale."""
        if self.precision != _P.FP16:
            return True
        finite = unscale_(diffs, self.scale)
        old = self.scale
        self.scale, self.clean_steps = next_scale(self.scale, self.clean_steps, not finite,
                                                  self.window)
        if not finite:
            get_logger().info("FP16 diffs overflowed: update skipped, loss scale %g -> %g",
                              old, self.scale)
        return finite
