"""Caffe's weight fillers (FillerParameter), as functions that fill a tensor in place.

Formulas follow Caffe's filler.hpp: fan-in is ``count / shape[0]``, fan-out ``count / shape[1]``;
``sparse`` in the gaussian filler keeps each weight with probability ``sparse / shape[0]``.
Every random filler draws from Caffe's own stream (:mod:`pycaffe_alt.caffe_rng`): with the same
``random_seed`` and net they give Caffe's values bit for bit (``gaussian`` and ``msra`` through
boost's ziggurat normal distribution, :mod:`pycaffe_alt.boost_random.ziggurat`).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import numpy as np
import torch

from . import caffe_rng
from .errors import NetError, UnknownTypeError


class FillerError(NetError):
    """A FillerParameter that Caffe's filler.hpp refuses (the net names the layer)."""

# FillerParameter.VarianceNorm values (wire facts).
FAN_IN, FAN_OUT, AVERAGE = 0, 1, 2


def _fans(t: torch.Tensor):
    count = t.numel()
    fan_in = count // t.shape[0] if t.dim() > 0 and t.shape[0] else count
    fan_out = count // t.shape[1] if t.dim() > 1 and t.shape[1] else count
    return fan_in, fan_out


def _variance_n(t: torch.Tensor, norm: int) -> float:
    fan_in, fan_out = _fans(t)
    if norm == AVERAGE:
        return (fan_in + fan_out) / 2.0
    if norm == FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def _constant(t, p):
    t.fill_(p.value)


def _caffe_uniform(t: torch.Tensor, a: float, b: float) -> None:
    """Fill ``t`` with ``caffe_rng_uniform(count, a, b)``."""
    t.copy_(torch.from_numpy(caffe_rng.stream().uniform(t.numel(), a, b)).reshape(t.shape))


def _uniform(t, p):
    _caffe_uniform(t, p.min, p.max)


def _caffe_gaussian(t: torch.Tensor, mean, std) -> None:
    """Fill ``t`` with ``caffe_rng_gaussian<float>(count, mean, std)``."""
    values = caffe_rng.stream().gaussian(t.numel(), float(mean), float(std))
    t.copy_(torch.from_numpy(values).reshape(t.shape))


def _gaussian(t, p):
    _caffe_gaussian(t, np.float32(p.mean), np.float32(p.std))
    if p.sparse >= 0:
        # Caffe: each weight survives with probability Dtype(sparse) / Dtype(num_outputs)
        # (shape[0]), one caffe_rng_bernoulli<float> draw per weight after the values.
        keep = caffe_rng.stream().bernoulli_float(t.numel(), _sparse_probability(p, t.shape))
        t.mul_(torch.from_numpy(keep).reshape(t.shape).to(t.dtype))


def _sparse_probability(p, shape: Sequence[int]) -> np.float32:
    return np.float32(p.sparse) / np.float32(shape[0])


def _positive_unitball(t, p):
    values = caffe_rng.stream().uniform(t.numel(), 0.0, 1.0)
    rows = values.reshape(t.shape[0] if t.dim() > 0 else 1, -1)
    # Caffe sums each row left to right in float, then divides every element by that sum.
    sums = np.cumsum(rows, axis=1, dtype=np.float32)[:, -1:]
    t.copy_(torch.from_numpy(rows / sums).reshape(t.shape))


def _xavier(t, p):
    # Caffe computes n and the scale in float: sqrt(Dtype(3) / n).
    scale = np.sqrt(np.float32(3.0) / np.float32(_variance_n(t, p.variance_norm)))
    _caffe_uniform(t, -scale, scale)


def _msra(t, p):
    # Caffe: Dtype std = sqrt(Dtype(2) / n), in float.
    _caffe_gaussian(t, 0.0, np.sqrt(np.float32(2.0) / np.float32(_variance_n(t, p.variance_norm))))


def _bilinear(t, p):
    # Upsampling kernel for Deconvolution (Caffe's BilinearFiller), same for every (out, in)
    # pair: f = ceil(w / 2), c = (2f - 1 - f % 2) / (2f), the product in float. That is the
    # reference Caffe's formula (the build behind the golden fixtures, as the SSD branch keeps
    # it). BVLC master changed c to (w - 1) / (2f) in 888597e (2017-10), which differs only for
    # odd kernels with an even f (3, 7, 11, ...), where the older one sits off centre.
    h, w = t.shape[-2], t.shape[-1]
    f = math.ceil(w / 2.0)
    c = np.float32((2 * f - 1 - f % 2) / (2.0 * f))
    x = np.arange(w, dtype=np.float32) / np.float32(f)
    y = np.arange(h, dtype=np.float32) / np.float32(f)
    kernel = (np.float32(1) - np.abs(y[:, None] - c)) * (np.float32(1) - np.abs(x[None, :] - c))
    t.copy_(torch.from_numpy(kernel).to(t.dtype).expand_as(t))


FILLERS: Dict[str, Callable] = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def check(filler_param, shape: Sequence[int]) -> None:
    """Refuse what Caffe's filler.hpp refuses for a blob of ``shape`` (UnknownTypeError,
    FillerError); layers that fill at every forward (DummyData) check once at setup."""
    kind = filler_param.type or "constant"
    if kind not in FILLERS:
        raise UnknownTypeError(f"unknown filler type {kind!r}",
                               hint=f"known fillers: {', '.join(sorted(FILLERS))}")
    # CHECK_GE(sparse, -1) in the gaussian filler, CHECK_EQ(sparse, -1) "Sparsity not supported
    # by this Filler." in every other one.
    sparse = int(filler_param.sparse)
    if (sparse < -1) if kind == "gaussian" else (sparse != -1):
        raise FillerError(f"{kind} filler: sparse {sparse} is not supported",
                          hint="sparse applies to the gaussian filler only (-1: dense, N >= 0: about "
                               "N non-zero weights per output)")
    if kind == "gaussian":
        std = np.float32(filler_param.std)
        if not std > 0:
            # caffe_rng_gaussian's CHECK_GT(sigma, 0) (a NaN fails it too).
            raise FillerError(f"gaussian filler needs std > 0, got std {filler_param.std:g}",
                              hint="e.g. weight_filler { type: \"gaussian\" std: 0.01 }; for "
                                   "all-equal weights use type: \"constant\"")
        if not (np.isfinite(std) and np.isfinite(np.float32(filler_param.mean))):
            # Caffe fills infinities or NaNs and trains on them; never what was meant.
            raise FillerError(f"gaussian filler needs a finite mean and std (as floats), got mean "
                              f"{filler_param.mean:g} std {filler_param.std:g}",
                              hint="e.g. weight_filler { type: \"gaussian\" std: 0.01 }")
        if sparse >= 0 and not len(shape):  # GaussianFiller's CHECK_GE(num_axes, 1)
            raise FillerError("gaussian filler: sparse needs a blob with an output axis, this one "
                              "has none", hint="remove sparse (a 0-axis blob is one value)")
        if sparse >= 0 and shape[0] and not (_sparse_probability(filler_param, shape) <= 1):
            # caffe_rng_bernoulli's CHECK_LE(p, 1) with p = sparse / num_outputs.
            raise FillerError(f"gaussian filler: sparse {sparse} exceeds the blob's {shape[0]} "
                              f"outputs (shape[0])", hint=f"use 0 <= sparse <= {shape[0]}")
    if kind == "constant" and not np.isfinite(np.float32(filler_param.value)):
        raise FillerError(f"constant filler needs a finite value, got {filler_param.value:g}",
                          hint="e.g. bias_filler { type: \"constant\" value: 0 }")
    if kind == "uniform":
        # caffe_rng_uniform's CHECK_LE(a, b); a NaN bound or a span beyond float (-3e38..3e38)
        # would make every draw fall outside [min, max] and the rejection loop never end.
        lo, hi = np.float32(filler_param.min), np.float32(filler_param.max)
        with np.errstate(over="ignore", invalid="ignore"):
            ok = np.isfinite(lo) and np.isfinite(hi) and lo <= hi and np.isfinite(np.float32(hi - lo))
        if not ok:
            raise FillerError(f"uniform filler needs finite min <= max (and max - min within "
                              f"float range), got min {filler_param.min:g} max {filler_param.max:g}",
                              hint="e.g. weight_filler { type: \"uniform\" min: -0.1 max: 0.1 }")
    if kind == "bilinear" and (len(shape) != 4 or shape[-1] != shape[-2]):
        # CHECK_EQ(num_axes, 4) "Blob must be 4 dim.", CHECK_EQ(width, height) "Filter must be
        # square".
        raise FillerError(f"bilinear filler needs a 4-axis blob with a square kernel, got shape "
                          f"{tuple(shape)}", hint="use it on a 2-D Deconvolution with kernel_size "
                          "(not kernel_h != kernel_w)")


def fill(t: torch.Tensor, filler_param) -> torch.Tensor:
    """Fill ``t`` in place according to a caffe_pb2.FillerParameter; returns ``t``."""
    check(filler_param, tuple(t.shape))
    if t.numel() == 0:
        # Caffe's fillers loop over no values and draw nothing; their fan-in and kernel-size
        # divisions (xavier, msra, bilinear) are by zero for an empty blob.
        return t
    fn = FILLERS[filler_param.type or "constant"]
    with torch.no_grad():
        fn(t, filler_param)
    return t
