"""Normalisation layers: LRN, BatchNorm, Scale, Bias, MVN and Softmax, with Caffe's exact formulas.

Each forward is written with torch ops so autograd gives the backward; where Caffe's hand-written
backward is not the exact gradient of its forward (MVN with eps), a surrogate keeps Caffe's
gradient and the comment says so.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..registry import LAYERS
from .base import Layer, Shape, legacy_shape

# LRNParameter.NormRegion (wire facts).
ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1



def broadcast_shape(ndim: int, axis: int, param_shape: Sequence[int]) -> Tuple[int, ...]:
    """Shape that lays a parameter of ``param_shape`` over axes ``axis..`` of an ``ndim`` blob.

    Caffe applies scale/bias blobs as (outer, dim, inner): trailing axes get size 1 so torch
    broadcasting reproduces it; leading axes broadcast by themselves.
    """
    return tuple(param_shape) + (1,) * (ndim - axis - len(param_shape))


# -- LRN --------------------------------------------------------------------------------------
def lrn_across_channels(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Caffe's cross-channel LRN: x * (k + alpha/size * sum_{window over channels} x^2)^-beta.

    The channel window is centred and zero-padded by (size-1)/2 on both sides (Caffe's
    ``padded_square``), so a window wider than the channel count is fine (local_size 5 over 3
    channels); the zeros are added explicitly because torch's pooling refuses an input smaller
    than its kernel even when the padding would cover it. An average over the padded windows
    gives sum/size directly.
    """
    pad = (size - 1) // 2
    sq = F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, pad, pad))  # (N, 1, C + 2 pad, H, W)
    avg = F.avg_pool3d(sq, (size, 1, 1), stride=1).squeeze(1)
    return x * (avg * alpha + k).pow(-beta)


def lrn_within_channel(x: torch.Tensor, size: int, alpha: float, beta: float) -> torch.Tensor:
    """Caffe's within-channel LRN: x * (1 + alpha * avg_{size x size} x^2)^-beta.

    Caffe builds it from an AVE pooling (pad (size-1)/2, stride 1) of x^2 and a Power layer with
    shift 1 (``k`` is not used); with that geometry every window divides by size^2.
    """
    avg = F.avg_pool2d(x * x, size, stride=1, padding=(size - 1) // 2, count_include_pad=True)
    return x * (avg * alpha + 1.0).pow(-beta)


@LAYERS.register("LRN")
class LRN(Layer):
    """Local response normalisation (``lrn_param``: local_size, alpha, beta, k, norm_region)."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            raise self.error(f"local_size must be odd, got {self.size}", "use e.g. local_size: 5")
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.region = int(p.norm_region)
        if self.region not in (ACROSS_CHANNELS, WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region}", "use ACROSS_CHANNELS or WITHIN_CHANNEL")
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"needs a 4-axis bottom (N, C, H, W), got shape {tuple(bottom_shapes[0])}",
                             "reshape the input to 4 axes")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region == ACROSS_CHANNELS:
            return lrn_across_channels(x, self.size, self.alpha, self.beta, self.k)
        return lrn_within_channel(x, self.size, self.alpha, self.beta)


# -- BatchNorm --------------------------------------------------------------------------------
@LAYERS.register("BatchNorm")
class BatchNorm(Layer):
    """Caffe's BatchNorm (no affine part; a Scale layer follows it in Caffe nets).

    Blobs: running ``mean`` and ``variance`` (sums weighted by the moving-average fraction) and
    ``scale_factor`` (shape (1,)) that they are divided by. They never receive gradients; in TRAIN
    with batch statistics the forward updates them in place, as Caffe does.

    ``sum_over_ranks`` (default None): the hook of synchronized batch statistics in
    data-parallel training (``DataParallel(..., sync_batchnorm=True)``). When set, it must
    return its 1-D tensor summed over the ranks, differentiably (the gradient of the sum flows
    back to every rank's input, e.g. ``torch.distributed.nn.functional.all_reduce``); the batch
    mean and variance are then those of the global batch (two sums: the per-channel sums with
    the sample count, then the centred squares), so W ranks at batch B normalize, and update
    the running statistics, as one process at batch W*B. Caffe itself keeps per-rank statistics.
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ("mean", "variance", "scale_factor")

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.batch_norm_param
        shape = tuple(bottom_shapes[0])
        self.channels = 1 if len(shape) == 1 else int(shape[1])
        self.maf = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        # Caffe takes any value and divides by sqrt(var + eps): a negative or NaN eps gives NaN.
        if not (math.isfinite(self.eps) and self.eps >= 0 and math.isfinite(self.maf)):
            raise self.error(f"eps {self.eps:g} and moving_average_fraction {self.maf:g} must be "
                             "finite, eps >= 0", "leave eps at its default 1e-5")
        # None = follow the phase at forward time (Caffe: use_global_stats defaults to phase == TEST).
        self.use_global_stats = bool(p.use_global_stats) if p.HasField("use_global_stats") else None
        # Caffe refuses any lr_mult but 0 on the statistics (a 'param { }' without lr_mult means
        # lr_mult 1, refused too) and appends 'param { lr_mult: 0 }' for each blob not covered,
        # so the solver and a saved model see them as fixed.
        for i, spec in enumerate(param.param[:3]):
            if spec.lr_mult != 0:
                raise self.error(f"param {i} has lr_mult {spec.lr_mult}; the statistics cannot be learned",
                                 "remove the lr_mult or set it to 0")
        while len(param.param) < 3:
            param.param.add().lr_mult = 0.0
        for shp in ((self.channels,), (self.channels,), (1,)):
            self.add_blob(shp, None).requires_grad_(False)
        self.sum_over_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        # Not by a fake run: a TRAIN forward would update the running statistics.
        return [tuple(bottom_shapes[0])]

    @property
    def replays_exactly(self) -> bool:
        # A pass on batch statistics updates the running sums.
        return (not self.training) if self.use_global_stats is None else self.use_global_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 1 and x.shape[1] != self.channels:
            raise self.error(f"bottom has {x.shape[1]} channels, the statistics have {self.channels}",
                             "feed a blob with the channel count the layer was built for")
        global_stats = (not self.training) if self.use_global_stats is None else self.use_global_stats
        view = (1, self.channels) + (1,) * (x.dim() - 2) if x.dim() > 1 else (self.channels,)
        dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 1 else [0]
        if global_stats:
            # Stored sums are divided by the scale factor; a zero factor means "no statistics" (0).
            factor = self.scale_factor.detach()[0]
            inv = torch.where(factor == 0, torch.zeros_like(factor), 1.0 / factor)
            mean = (self.mean.detach() * inv).to(x.dtype)
            var = (self.variance.detach() * inv).to(x.dtype)
            return (x - mean.view(view)) / (var + self.eps).sqrt().view(view)
        if self.sum_over_ranks is None:
            mean = x.mean(dim=dims)
            centred = x - mean.view(view)
            var = (centred * centred).mean(dim=dims)  # biased, as Caffe's E((X-EX)^2)
            m = x.numel() // self.channels
        else:
            mean, centred, var, m = self._global_moments(x, dims, view)
        with torch.no_grad():
            correction = m / (m - 1) if m > 1 else 1.0
            self.scale_factor.mul_(self.maf).add_(1.0)
            self.mean.mul_(self.maf).add_(mean.detach().to(self.mean.dtype))
            self.variance.mul_(self.maf).add_(var.detach().to(self.variance.dtype) * correction)
        return centred / (var + self.eps).sqrt().view(view)

    def _global_moments(self, x: torch.Tensor, dims: List[int], view: Tuple[int, ...]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Mean, centred input, biased variance and sample count of the global batch (the
        input of every rank together), through :attr:`sum_over_ranks`; centring before
        squaring keeps the single-batch formula's accuracy (no E(X^2) - E(X)^2)."""
        local = x.numel() // self.channels
        count = torch.full((1,), float(local), dtype=x.dtype, device=x.device)
        sums = self.sum_over_ranks(torch.cat([x.sum(dim=dims), count]))
        total = sums[-1].detach()
        mean = sums[:-1] / total
        centred = x - mean.view(view)
        var = self.sum_over_ranks((centred * centred).sum(dim=dims)) / total
        return mean, centred, var, int(round(float(total)))


# -- Scale and Bias ---------------------------------------------------------------------------
def _param_span(layer: Layer, bottom_shape: Shape, axis: int, num_axes: int, what: str) -> Tuple[int, Tuple[int, ...]]:
    """(canonical axis, shape) of a learned scale/bias blob: bottom axes [axis, axis+num_axes)."""
    ndim = len(bottom_shape)
    a = layer.canonical_axis(axis, ndim)
    if num_axes < -1:
        raise layer.error(f"num_axes must be >= -1, got {num_axes}",
                          "use -1 to extend to the last axis, or a count of axes")
    end = ndim if num_axes == -1 else a + num_axes
    if end > ndim:
        raise layer.error(f"the {what} extends past the bottom's {ndim} axes (axis {a}, num_axes {num_axes})",
                          "lower num_axes or axis")
    return a, tuple(int(d) for d in bottom_shape[a:end])


def _check_operand(layer: Layer, x_shape: Shape, axis: int, operand_shape: Shape, what: str) -> int:
    """Validate a scale/bias operand against the bottom like Caffe's Reshape; returns the axis used."""
    ndim = len(x_shape)
    # A scalar operand is applied everywhere; Caffe ignores axis then.
    a = 0 if len(operand_shape) == 0 else layer.canonical_axis(axis, ndim)
    if a + len(operand_shape) > ndim or tuple(x_shape[a:a + len(operand_shape)]) != tuple(operand_shape):
        raise layer.error(f"{what} of shape {tuple(operand_shape)} does not match bottom shape "
                          f"{tuple(x_shape)} at axis {a}",
                          f"the {what}'s shape must equal the bottom's axes starting at 'axis'")
    return a


def _apply_operand(x: torch.Tensor, operand: torch.Tensor, axis: int) -> torch.Tensor:
    """``operand`` reshaped to broadcast over ``x`` from ``axis`` on."""
    return operand.reshape(broadcast_shape(x.dim(), axis, operand.shape)) if operand.dim() else operand


@LAYERS.register("Bias")
class Bias(Layer):
    """Adds a learned bias blob (one bottom) or a second bottom, laid over axes from ``axis``."""

    num_bottoms = (1, 2)
    num_tops = (1, 1)
    blob_names = ("bias",)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.bias_param
        self.axis = int(p.axis)
        x_shape = tuple(bottom_shapes[0])
        if len(bottom_shapes) == 1:
            _, shape = _param_span(self, x_shape, self.axis, int(p.num_axes), "bias")
            self.add_blob(shape, p.filler)  # FillerParameter defaults to constant 0
        else:
            _check_operand(self, x_shape, self.axis, tuple(bottom_shapes[1]), "bias")

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        b = rest[0] if rest else self.bias
        a = _check_operand(self, tuple(x.shape), self.axis, tuple(b.shape), "bias")
        return x + _apply_operand(x, b, a)


@LAYERS.register("Scale")
class Scale(Layer):
    """Multiplies by a learned scale blob (one bottom) or a second bottom, optionally adds a bias.

    Blob order as Caffe: scale (only with one bottom), then bias (with ``bias_term``). The bias
    spans ``num_axes`` axes, or as many as the second bottom has.
    """

    num_bottoms = (1, 2)
    num_tops = (1, 1)
    blob_names = ("weight", "bias")

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.scale_param
        self.axis = int(p.axis)
        x_shape = tuple(bottom_shapes[0])
        if len(bottom_shapes) == 1:
            _, shape = _param_span(self, x_shape, self.axis, int(p.num_axes), "scale")
            if p.HasField("filler"):
                self.add_blob(shape, p.filler, name="weight")
            else:
                # Caffe defaults the scale to 1 (identity), unlike other fillers.
                self.add_blob(shape, None, name="weight").data.fill_(1.0)
            bias_axes = int(p.num_axes)
        else:
            _check_operand(self, x_shape, self.axis, tuple(bottom_shapes[1]), "scale")
            bias_axes = len(bottom_shapes[1])
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            _, bshape = _param_span(self, x_shape, self.axis, bias_axes, "bias")
            self.add_blob(bshape, p.bias_filler, name="bias")

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        s = rest[0] if rest else self.weight
        a = _check_operand(self, tuple(x.shape), self.axis, tuple(s.shape), "scale")
        y = x * _apply_operand(x, s, a)
        if self.bias_term:
            ba = _check_operand(self, tuple(x.shape), self.axis, tuple(self.bias.shape), "bias")
            y = y + _apply_operand(x, self.bias, ba)
        return y


# -- MVN --------------------------------------------------------------------------------------
class _CaffeStdGrad(torch.autograd.Function):
    """sqrt(var) + eps in value; its derivative w.r.t. var is taken as 1/(2(sqrt(var)+eps)).

    Caffe's MVN backward uses the batch-norm formula (g - mean(g) - mean(g*y)*y) / (sqrt(var)+eps),
    which is the exact gradient only when eps = 0; this surrogate reproduces it exactly.
    """

    @staticmethod
    def forward(ctx, var: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        d = var.sqrt() + eps
        ctx.save_for_backward(d)
        return d

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (d,) = ctx.saved_tensors
        return grad / (2.0 * d), None


@LAYERS.register("MVN")
class MVN(Layer):
    """Mean-variance normalisation per (N, C) or per N (``across_channels``); divides by sqrt(var)+eps."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2 and not self.across_channels:
            raise self.error(f"needs at least 2 axes (N, C, ...), got shape {shape}",
                             "reshape the input or set across_channels: true")
        if len(shape) > 4:  # Caffe's MVN reads num/channels/height/width (legacy accessors)
            raise self.error(f"takes at most 4 axes (N, C, H, W), got shape {shape}",
                             "reshape the input to 4 axes first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = 1 if self.across_channels else 2
        flat = x.reshape(tuple(x.shape[:lead]) + (-1,))
        centred = flat - flat.mean(dim=-1, keepdim=True)
        if self.normalize_variance:
            var = (centred * centred).mean(dim=-1, keepdim=True)
            centred = centred / _CaffeStdGrad.apply(var, self.eps)
        # MVNLayer::Reshape makes the top (num, channels, height, width): a bottom with fewer
        # than 4 axes gets a 4-axis top, the missing axes 1 ((N, D) gives (N, D, 1, 1)).
        return centred.reshape(legacy_shape(x.shape))


# -- Softmax ----------------------------------------------------------------------------------
@LAYERS.register("Softmax")
class Softmax(Layer):
    """Softmax over ``softmax_param.axis`` (default 1, the channels)."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()
    backward_reads_top = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.axis = self.canonical_axis(int(param.softmax_param.axis), len(bottom_shapes[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=self.axis)

    def inplace_backward(self, top_diff: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        # Caffe's backward reads the top buffer: (g - sum_axis(g * y)) * y with y = that buffer.
        return (top_diff - (top_diff * final).sum(dim=self.axis, keepdim=True)) * final
