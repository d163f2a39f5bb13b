"""Vision layers: Convolution, Deconvolution, Im2col, Pooling and SPP, with Caffe's geometry.

Convolutions map straight onto torch's (Caffe stores weights in the same layouts). Pooling is the
part that needs care: Caffe's output size rounds up and drops a last window that would start in
the padding, AVE divides by the window clipped to the *padded* input, and MAX reports argmax
indices into the unpadded plane. Torch's pooling kernels agree with all of that for most shapes;
``pool2d`` uses them directly when they provably do (the "fast path") and otherwise pads
explicitly to Caffe's exact extent and divides by an exact divisor map.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..compile_ops import keeps_max_pool_whole, max_pool2d_with_indices
from ..errors import NetError
from ..registry import LAYERS
from .base import Layer, Shape

Pair = Tuple[int, int]

# PoolingParameter.PoolMethod / RoundMode (wire facts; SPPParameter uses the same numbers).
MAX, AVE, STOCHASTIC = 0, 1, 2
CEIL, FLOOR = 0, 1
# Caffe's MAX pooling starts each window at -FLT_MAX (whatever the Dtype): a window that covers
# no input keeps that value.
_FLT_MAX = 3.4028234663852886e38


# ============================================================================================
# Convolution geometry
# ============================================================================================
@dataclass(frozen=True)
class ConvGeometry:
    """Per-spatial-axis kernel, stride, pad and dilation of a convolution."""

    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    pad: Tuple[int, ...]
    dilation: Tuple[int, ...]

    def out_size(self, size: Tuple[int, ...]) -> Tuple[int, ...]:
        """Caffe's ``compute_output_shape`` for a forward convolution."""
        return tuple((i + 2 * p - (d * (k - 1) + 1)) // s + 1
                     for i, k, s, p, d in zip(size, self.kernel, self.stride, self.pad, self.dilation))

    def deconv_out_size(self, size: Tuple[int, ...]) -> Tuple[int, ...]:
        """Caffe's Deconvolution output: stride*(in-1) + dilated kernel - 2*pad."""
        return tuple(s * (i - 1) + (d * (k - 1) + 1) - 2 * p
                     for i, k, s, p, d in zip(size, self.kernel, self.stride, self.pad, self.dilation))


def _conv_axis_values(layer: Layer, cp, name: str, hw: Optional[Tuple[str, str]], n: int,
                      default: Optional[int]) -> Tuple[int, ...]:
    """One geometry field, given as a repeated value (once or once per axis) or as ``_h``/``_w``."""
    values = list(getattr(cp, "kernel_size" if name == "kernel" else name))
    if hw is not None and (cp.HasField(hw[0]) or cp.HasField(hw[1])):
        if n != 2:
            raise layer.error(f"{hw[0]}/{hw[1]} can only be used for 2-D convolution ({n} spatial axes here)",
                              f"give '{name}' once per spatial axis instead")
        if values:
            raise layer.error(f"both {name} and {hw[0]}/{hw[1]} are given", "give one form, not both")
        return (int(getattr(cp, hw[0])), int(getattr(cp, hw[1])))
    if len(values) == 0:
        if default is None:
            raise layer.error("no kernel size given", "set kernel_size (or kernel_h and kernel_w)")
        return (default,) * n
    if len(values) not in (1, n):
        field = "kernel_size" if name == "kernel" else name
        raise layer.error(f"{field} is given {len(values)} times for {n} spatial axes",
                          f"give {field} once, or once per spatial axis")
    return tuple(int(values[0 if len(values) == 1 else i]) for i in range(n))


def conv_geometry(layer: Layer, cp, n: int) -> ConvGeometry:
    """Parse a ConvolutionParameter's geometry for ``n`` spatial axes with Caffe's rules."""
    g = ConvGeometry(
        kernel=_conv_axis_values(layer, cp, "kernel", ("kernel_h", "kernel_w"), n, None),
        stride=_conv_axis_values(layer, cp, "stride", ("stride_h", "stride_w"), n, 1),
        pad=_conv_axis_values(layer, cp, "pad", ("pad_h", "pad_w"), n, 0),
        dilation=_conv_axis_values(layer, cp, "dilation", None, n, 1),
    )
    for what, vals in (("kernel size", g.kernel), ("stride", g.stride), ("dilation", g.dilation)):
        if any(v <= 0 for v in vals):
            raise layer.error(f"{what} must be positive, got {vals}", f"set a positive {what}")
    return g


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvolutionBase(Layer):
    """Shared set-up of Convolution, Deconvolution and Im2col (Caffe's BaseConvolutionLayer)."""

    num_bottoms = (1, None)
    num_tops = (1, None)
    equal_bottom_top = True
    blob_names = ("weight", "bias")
    # Deconvolution swaps the roles of input and output channels in the weight blob.
    transposed = False
    has_weights = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        cp = param.convolution_param
        shape = tuple(bottom_shapes[0])
        for i, s in enumerate(bottom_shapes[1:], 1):
            if tuple(s) != shape:
                raise self.error(f"bottom {i} has shape {tuple(s)} but bottom 0 has {shape}",
                                 "all bottoms of a convolution must have the same shape")
        self.axis = self.canonical_axis(int(cp.axis), len(shape))
        self.n_spatial = len(shape) - self.axis - 1
        if self.n_spatial not in _CONV:
            raise self.error(f"{self.n_spatial} spatial axes (bottom shape {shape}, channel axis {self.axis}) "
                             "are not supported", "use 1, 2 or 3 spatial axes")
        self.geom = conv_geometry(self, cp, self.n_spatial)
        self.channels = int(shape[self.axis])
        self.group = int(cp.group)
        spatial = tuple(int(d) for d in shape[self.axis + 1:])
        self._check_output(spatial)
        if not self.has_weights:
            return
        self.num_output = int(cp.num_output)
        if self.num_output <= 0:
            raise self.error("num_output must be positive", "set convolution_param { num_output: N }")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise self.error(f"group {self.group} must divide both the input channels ({self.channels}) "
                             f"and num_output ({self.num_output})", "change group or num_output")
        if self.transposed:
            wshape = (self.channels, self.num_output // self.group) + self.geom.kernel
        else:
            wshape = (self.num_output, self.channels // self.group) + self.geom.kernel
        self.add_blob(wshape, cp.weight_filler)  # FillerParameter defaults to constant 0, as Caffe
        self.bias_term = bool(cp.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), cp.bias_filler)

    def _check_output(self, spatial: Tuple[int, ...]) -> None:
        out = self.geom.deconv_out_size(spatial) if self.transposed else self.geom.out_size(spatial)
        ext = tuple(d * (k - 1) + 1 for k, d in zip(self.geom.kernel, self.geom.dilation))
        too_big = any(i + 2 * p < e for i, p, e in zip(spatial, self.geom.pad, ext)) and not self.transposed
        if too_big or any(o <= 0 for o in out):
            raise self.error(f"input of spatial size {spatial} gives an empty output with kernel "
                             f"{self.geom.kernel}, pad {self.geom.pad}, stride {self.geom.stride}, "
                             f"dilation {self.geom.dilation}", "use a larger input or a smaller kernel")

    def _flatten_batch(self, x: torch.Tensor) -> torch.Tensor:
        # Caffe treats every axis before the channel axis as batch ("num_").
        return x.reshape((-1,) + tuple(x.shape[self.axis:])) if self.axis != 1 else x

    def _unflatten_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(tuple(x.shape[:self.axis]) + tuple(y.shape[1:])) if self.axis != 1 else y

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *bottoms: torch.Tensor):
        if len(bottoms) == 1 and self.axis == 1:
            # The usual layer (one bottom, channels on axis 1): no per-bottom reshaping to do,
            # and a small net's step notices a generator and tuple per layer.
            return self._run(bottoms[0])
        tops = tuple(self._unflatten_batch(x, self._run(self._flatten_batch(x))) for x in bottoms)
        return tops[0] if len(tops) == 1 else tops


@LAYERS.register("Convolution")
class Convolution(_ConvolutionBase):
    """N-D (1-3 spatial axes) grouped, dilated convolution; weight (num_output, C/group, *kernel)."""

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geom
        return _CONV[self.n_spatial](x, self.weight, self.bias if self.bias_term else None,
                                     stride=g.stride, padding=g.pad, dilation=g.dilation, groups=self.group)


@LAYERS.register("Deconvolution")
class Deconvolution(_ConvolutionBase):
    """Transposed convolution; weight (C_in, num_output/group, *kernel) exactly as Caffe stores it."""

    transposed = True

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geom
        return _DECONV[self.n_spatial](x, self.weight, self.bias if self.bias_term else None,
                                       stride=g.stride, padding=g.pad, dilation=g.dilation, groups=self.group)


@LAYERS.register("Im2col")
class Im2col(_ConvolutionBase):
    """Caffe's Im2col: (N, C, H, W) -> (N, C*kh*kw, out_h, out_w), channel-major like Caffe's buffer."""

    has_weights = False
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if self.n_spatial != 2:
            raise self.error(f"only 2-D im2col is supported ({self.n_spatial} spatial axes here)",
                             "use a 4-axis bottom (N, C, H, W)")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geom
        out = g.out_size(tuple(x.shape[2:]))
        cols = F.unfold(x, g.kernel, dilation=g.dilation, padding=g.pad, stride=g.stride)
        return cols.reshape(x.shape[0], cols.shape[1], *out)


# ============================================================================================
# Pooling geometry (pure functions of integers)
# ============================================================================================
@dataclass(frozen=True)
class PoolGeometry:
    """Kernel, stride and pad per spatial axis (h, w) and the rounding of the output size."""

    kernel: Pair
    stride: Pair
    pad: Pair
    ceil: bool = True


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool = True,
                      padded: Optional[bool] = None) -> int:
    """Caffe's pooled extent: round (size+2*pad-kernel)/stride up (or down) and add 1; when the
    layer has padding (``padded``: on either axis, default ``pad > 0``), drop a last window that
    would start at or beyond size+pad. Caffe's PoolingLayer::Reshape tests ``pad_h_ || pad_w_``
    once and then clips both axes, so padding one axis clips the other as well."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if (pad > 0 if padded is None else padded) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _torch_pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """The output size torch's pooling kernels produce (ATen's pooling_output_shape)."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pooled_shape(geom: PoolGeometry, h: int, w: int) -> Pair:
    """Caffe's (pooled_height, pooled_width)."""
    padded = any(geom.pad)
    return (caffe_pooled_size(h, geom.kernel[0], geom.stride[0], geom.pad[0], geom.ceil, padded),
            caffe_pooled_size(w, geom.kernel[1], geom.stride[1], geom.pad[1], geom.ceil, padded))


def torch_pool_is_exact(geom: PoolGeometry, h: int, w: int) -> bool:
    """Whether torch's max/avg pooling with the same kernel/stride/pad/ceil gives Caffe's result.

    Torch clips AVE windows to the padded input exactly as Caffe does and picks the first maximum
    in row-major order; the two differ only in the output size (torch also drops windows that
    start past the input when there is no padding) and torch refuses pad > kernel/2. The tests
    compare both paths with a loop transcription of Caffe on CPU.

    Eager calls remember the answer per geometry and input size (every pass of a net asks the
    same question; the arithmetic cost a LeNet pass ~10 us). While torch.compile traces, the
    answer is computed: a lookup in a dict that grows would make Dynamo guard on its contents.
    """
    if torch.compiler.is_compiling():
        return _torch_pool_is_exact(geom, h, w)
    key = (geom, int(h), int(w))
    exact = _POOL_IS_EXACT.get(key)
    if exact is None:
        if len(_POOL_IS_EXACT) >= _POOL_IS_EXACT_LIMIT:  # a program reshaping to ever new sizes
            _POOL_IS_EXACT.clear()
        exact = _POOL_IS_EXACT[key] = _torch_pool_is_exact(geom, h, w)
    return exact


_POOL_IS_EXACT: Dict[Tuple[PoolGeometry, int, int], bool] = {}
_POOL_IS_EXACT_LIMIT = 4096


def _torch_pool_is_exact(geom: PoolGeometry, h: int, w: int) -> bool:
    if any(p > k // 2 for k, p in zip(geom.kernel, geom.pad)):
        return False
    sizes = zip(pooled_shape(geom, h, w), (h, w), geom.kernel, geom.stride, geom.pad)
    return all(caffe >= 1 and caffe == _torch_pooled_size(size, k, s, p, geom.ceil)
               for caffe, size, k, s, p in sizes)


def window_counts(size: int, out: int, kernel: int, stride: int, pad: int) -> List[int]:
    """Caffe's AVE divisor along one axis: each window clipped to [-pad, size+pad), padding counted.

    (Windows that start beyond size+pad give a count <= 0, as in Caffe's formula.)
    """
    counts = []
    for o in range(out):
        start = o * stride - pad
        counts.append(min(start + kernel, size + pad) - start)
    return counts


@functools.lru_cache(maxsize=256)
def ave_divisors(geom: PoolGeometry, h: int, w: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Caffe's AVE divisors per output row and column (the window area is their product);
    computed once per geometry and input size. Plain integers are cached, not tensors, so a
    shape-inference run under fake tensors cannot leak into real runs."""
    oh, ow = pooled_shape(geom, h, w)
    return (tuple(window_counts(h, oh, geom.kernel[0], geom.stride[0], geom.pad[0])),
            tuple(window_counts(w, ow, geom.kernel[1], geom.stride[1], geom.pad[1])))


def _pad_to_windows(x: torch.Tensor, geom: PoolGeometry, value: float) -> torch.Tensor:
    """Pad (or crop) so that an unpadded floor-mode pooling yields exactly Caffe's windows."""
    h, w = x.shape[-2:]
    oh, ow = pooled_shape(geom, h, w)
    extra = []
    for size, out, k, s, p in ((w, ow) + (geom.kernel[1], geom.stride[1], geom.pad[1]),
                               (h, oh) + (geom.kernel[0], geom.stride[0], geom.pad[0])):
        # Left: the pad; right: up to the end of the last window (negative = unused rows cropped).
        extra += [p, (out - 1) * s + k - p - size]
    return F.pad(x, extra, value=value)


def max_pool(x: torch.Tensor, geom: PoolGeometry, with_mask: bool = False):
    """Caffe's MAX pooling of a (N, C, H, W) tensor; returns (top, mask or None).

    The mask is Caffe's: the argmax as an index h*W+w into the unpadded plane (as a float), -1
    for a window that covers no input. Ties go to the first maximum in row-major order.
    """
    if not torch_pool_is_exact(geom, *x.shape[-2:]):
        return max_pool_exact(x, geom, with_mask)
    if keeps_max_pool_whole(x):  # under torch.compile on the CPU: ATen's kernels, not loops
        y, idx = max_pool2d_with_indices(x, geom.kernel, geom.stride, geom.pad, geom.ceil)
        return y, (idx.to(x.dtype) if with_mask else None)
    if not with_mask:
        # torch.max_pool2d is what F.max_pool2d calls without indices, minus its argument
        # dispatch wrapper (a few us of a small net's pass).
        return torch.max_pool2d(x, geom.kernel, geom.stride, geom.pad, ceil_mode=geom.ceil), None
    # Torch's indices already number the unpadded plane, like Caffe's.
    y, idx = F.max_pool2d(x, geom.kernel, geom.stride, geom.pad, ceil_mode=geom.ceil, return_indices=True)
    return y, idx.to(x.dtype)


def gather_switches(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """MAX pooling with given switches: ``y[n, c, i, j] = x[n, c].flat[idx[n, c, i, j]]``.

    ``idx`` is Caffe's mask (``h * W + w`` in the unpadded plane, int64); its batch axis may be
    1 (one set of switches for every example). Linear in ``x``.
    """
    n, c = x.shape[:2]
    idx = idx.expand(n, c, *idx.shape[2:])
    return x.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1).clamp_min(0)).view(idx.shape)


def max_pool_exact(x: torch.Tensor, geom: PoolGeometry, with_mask: bool = False):
    """MAX pooling for any Caffe geometry: explicit -inf padding to Caffe's windows, then a plain
    pooling. -inf padding never wins a window that holds an input value (Caffe skips padding)."""
    h, w = x.shape[-2:]
    xp = _pad_to_windows(x, geom, float("-inf"))
    y, idx = F.max_pool2d(xp, geom.kernel, geom.stride, 0, return_indices=True)
    wp = xp.shape[-1]
    row = idx // wp - geom.pad[0]
    col = idx % wp - geom.pad[1]
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    oh, ow = y.shape[-2:]
    if (oh - 1) * geom.stride[0] - geom.pad[0] >= h or (ow - 1) * geom.stride[1] - geom.pad[1] >= w:
        # Some window lies wholly past the input: Caffe leaves it at -FLT_MAX.
        y = torch.where(inside, y, torch.full_like(y, -_FLT_MAX))
    if not with_mask:
        return y, None
    mask = torch.where(inside, row * w + col, torch.full_like(idx, -1))
    return y, mask.to(x.dtype)


def ave_pool(x: torch.Tensor, geom: PoolGeometry) -> torch.Tensor:
    """Caffe's AVE pooling: window sum / window size clipped to the padded input (pad counts)."""
    if not torch_pool_is_exact(geom, *x.shape[-2:]):
        return ave_pool_exact(x, geom)
    return F.avg_pool2d(x, geom.kernel, geom.stride, geom.pad, ceil_mode=geom.ceil, count_include_pad=True)


def ave_pool_exact(x: torch.Tensor, geom: PoolGeometry) -> torch.Tensor:
    """AVE pooling for any Caffe geometry: window sums over zero padding / the exact divisor map."""
    rows, cols = ave_divisors(geom, *x.shape[-2:])
    div_h = torch.tensor(rows, dtype=x.dtype, device=x.device)
    div_w = torch.tensor(cols, dtype=x.dtype, device=x.device)
    return _sum_pool(x, geom) / (div_h[:, None] * div_w[None, :])


def _sum_pool(x: torch.Tensor, geom: PoolGeometry) -> torch.Tensor:
    """Sum of the input over each Caffe window (zero padding)."""
    xp = _pad_to_windows(x, geom, 0.0)
    return F.avg_pool2d(xp, geom.kernel, geom.stride, 0, divisor_override=1)


def stochastic_pool_test(x: torch.Tensor, geom: PoolGeometry) -> torch.Tensor:
    """Caffe's TEST-phase stochastic pooling: the probability-weighted average sum(x^2)/sum(x)
    over each window (0 where sum(x) <= 0)."""
    s1 = _sum_pool(x, geom)
    s2 = _sum_pool(x * x, geom)
    positive = s1 > 0
    return torch.where(positive, s2 / torch.where(positive, s1, torch.ones_like(s1)), torch.zeros_like(s1))


def stochastic_pool_train(x: torch.Tensor, geom: PoolGeometry) -> torch.Tensor:
    """Caffe's TRAIN-phase stochastic pooling: sample one input per window with probability
    proportional to its value (the first position whose running sum reaches u * window sum);
    the gradient goes to the sampled input."""
    n, c = x.shape[:2]
    oh, ow = pooled_shape(geom, *x.shape[-2:])
    xp = _pad_to_windows(x, geom, 0.0)
    cols = F.unfold(xp, geom.kernel, stride=geom.stride).reshape(n, c, -1, oh * ow)
    running = cols.detach().cumsum(dim=2)
    threshold = torch.rand((n, c, 1, oh * ow), dtype=x.dtype, device=x.device) * running[:, :, -1:]
    first = (running >= threshold).to(torch.uint8).argmax(dim=2, keepdim=True)
    return cols.gather(2, first).reshape(n, c, oh, ow)


def pool2d(x: torch.Tensor, geom: PoolGeometry, method: int, training: bool, with_mask: bool = False):
    """Caffe pooling of a 4-D tensor by method; returns (top, MAX mask if asked else None)."""
    if method == MAX:
        return max_pool(x, geom, with_mask)
    if method == AVE:
        return ave_pool(x, geom), None
    if training:
        return stochastic_pool_train(x, geom), None
    return stochastic_pool_test(x, geom), None


def four_axes(layer: Layer, shape: Sequence[int]) -> Tuple[int, ...]:
    """``shape`` as a tuple, or the layer's error when it is not (N, C, H, W) (pooling layers)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
        raise layer.error(f"needs a 4-axis bottom (N, C, H, W), got shape {shape}",
                          "reshape the input to 4 axes")
    return shape


def _check_pool_geometry(layer: Layer, geom: PoolGeometry, method: int) -> None:
    """Caffe's LayerSetUp checks on a pooling geometry (padding only for MAX/AVE, pad < kernel)."""
    if any(k <= 0 for k in geom.kernel):
        raise layer.error(f"kernel size must be positive, got {geom.kernel}", "set kernel_size")
    if any(s <= 0 for s in geom.stride):
        raise layer.error(f"stride must be positive, got {geom.stride}", "set stride")
    if any(geom.pad):
        if method not in (MAX, AVE):
            raise layer.error("padding is implemented only for MAX and AVE pooling", "remove pad")
        if geom.pad[0] >= geom.kernel[0] or geom.pad[1] >= geom.kernel[1]:
            raise layer.error(f"pad {geom.pad} must be smaller than the kernel {geom.kernel}",
                              "lower pad or enlarge the kernel")


# ============================================================================================
# Pooling and SPP layers
# ============================================================================================
@LAYERS.register("Pooling")
class Pooling(Layer):
    """MAX / AVE / STOCHASTIC pooling with Caffe's output size and windows.

    A second top (MAX only) receives Caffe's argmax mask. STOCHASTIC samples in TRAIN and takes
    the probability-weighted average in TEST; its TEST gradient is the exact one of that average
    (Caffe has no meaningful TEST backward for it).

    ``fixed_switches`` (MAX only): ``None``, or a callable ``f(x) -> int64 indices`` of the top's
    shape (each window's argmax as ``h * W + w`` in the unpadded plane, as Caffe's mask top) that
    the alternation solver sets; the top then gathers ``x`` at those positions, so the layer is
    linear in ``x`` (the stored switches of eq. 13, docs/exact_steps.md).
    """

    num_bottoms = (1, 1)
    num_tops = (1, 2)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        pp = param.pooling_param
        self.method = int(pp.pool)
        if self.method not in (MAX, AVE, STOCHASTIC):
            raise self.error(f"unknown pooling method {self.method}", "use MAX, AVE or STOCHASTIC")
        if len(param.top) > 1 and self.method != MAX:
            raise self.error("only MAX pooling has a second (mask) top", "remove the second top")
        if pp.round_mode not in (CEIL, FLOOR):
            raise self.error(f"unknown round_mode {pp.round_mode}", "use CEIL or FLOOR")
        self.ceil = pp.round_mode == CEIL
        if pp.HasField("ceil_mode"):  # a fork's boolean (DenseNet-Caffe's prototxts)
            if pp.HasField("round_mode") and pp.ceil_mode != self.ceil:
                raise self.error("ceil_mode and round_mode disagree", "keep one of them")
            self.ceil = bool(pp.ceil_mode)
        self.global_pooling = bool(pp.global_pooling)
        has_h, has_w = pp.HasField("kernel_h"), pp.HasField("kernel_w")
        if self.global_pooling:
            if pp.HasField("kernel_size") or has_h or has_w:
                raise self.error("global_pooling takes its kernel from the bottom; a kernel size is also given",
                                 "remove kernel_size/kernel_h/kernel_w")
            self.kernel: Optional[Pair] = None
        elif pp.HasField("kernel_size") and not (has_h or has_w):
            self.kernel = (int(pp.kernel_size), int(pp.kernel_size))
        elif has_h and has_w and not pp.HasField("kernel_size"):
            self.kernel = (int(pp.kernel_h), int(pp.kernel_w))
        else:
            raise self.error("the kernel is given as kernel_size OR both kernel_h and kernel_w",
                             "e.g. kernel_size: 3, or kernel_h: 3 kernel_w: 2")
        self.pad = self._pair(pp, "pad", "pad_h", "pad_w")
        self.stride = self._pair(pp, "stride", "stride_h", "stride_w")
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.error("global pooling allows only pad 0 and stride 1", "remove pad/stride")
        self.with_mask = len(param.top) > 1
        # Every pass has the same geometry except global pooling's (its kernel is the input's).
        self._fixed_geometry = None if self.kernel is None else \
            PoolGeometry(self.kernel, self.stride, self.pad, self.ceil)
        shape = four_axes(self, bottom_shapes[0])
        _check_pool_geometry(self, self._geometry(shape[2], shape[3]), self.method)
        self._pooled_size(shape[2], shape[3])
        self.fixed_switches = None

    def _pooled_size(self, h: int, w: int) -> Pair:
        """Caffe's pooled size for an ``h x w`` input, or the error its Reshape CHECK gives on
        a negative (or empty) top. Caffe's Reshape works the size out again for each input, so a
        net reshaped to a smaller image (SE-ResNet's fixed 7 x 7 pool5 fed 96 x 96) fails here
        too, not inside torch's pooling."""
        geom = self._geometry(h, w)
        out = pooled_shape(geom, h, w)
        if min(out) < 1:
            raise self.error(f"the kernel {geom.kernel} (pad {self.pad}) does not fit the {h}x{w} "
                             f"input: the output would be {out[0]}x{out[1]}",
                             "use a smaller kernel, padding, or global_pooling: true")
        return out

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        shape = four_axes(self, bottom_shapes[0])
        top = tuple(shape[:2]) + tuple(self._pooled_size(shape[2], shape[3]))
        return [top] * (2 if self.with_mask else 1)  # the mask top is shaped as the pooled one

    def _pair(self, pp, name: str, hname: str, wname: str) -> Pair:
        has_h, has_w = pp.HasField(hname), pp.HasField(wname)
        if has_h or has_w:
            if pp.HasField(name) or not (has_h and has_w):
                raise self.error(f"{name} is given as {name} OR both {hname} and {wname}",
                                 f"use {name}: N, or {hname}: N {wname}: M")
            return (int(getattr(pp, hname)), int(getattr(pp, wname)))
        return (int(getattr(pp, name)), int(getattr(pp, name)))

    def _geometry(self, h: int, w: int) -> PoolGeometry:
        return self._fixed_geometry or PoolGeometry((int(h), int(w)), self.stride, self.pad,
                                                    self.ceil)

    @property
    def replays_exactly(self) -> bool:
        return not (self.method == STOCHASTIC and self.training)  # TRAIN samples each window

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:  # the check alone on the pass's path: no tuple built per pass
            four_axes(self, x.shape)
        h, w = x.shape[-2:]
        if self.fixed_switches is not None and self.method == MAX:
            idx = self.fixed_switches(x).to(device=x.device, dtype=torch.long)
            y = gather_switches(x, idx)
            return (y, idx.to(x.dtype)) if self.with_mask else y
        if self.global_pooling and self.method != STOCHASTIC:
            # The whole plane is one window: plain reductions are exact and fastest.
            if self.method == AVE:
                return x.mean(dim=(2, 3), keepdim=True)
            if not self.with_mask:
                # One window over the plane: max pooling's gradient goes to the first maximum,
                # as Caffe's strict '>' scan does (amax would split it between tied maxima).
                return F.max_pool2d(x, (h, w))
        y, mask = pool2d(x, self._geometry(h, w), self.method, self.training, self.with_mask)
        return (y, mask) if self.with_mask else y


def spp_level_geometry(level: int, h: int, w: int) -> PoolGeometry:
    """Caffe's SPP pooling for pyramid level ``level``: 2^level bins per axis, kernel = stride =
    ceil(size/bins), pad = ceil((kernel*bins - size)/2)."""
    bins = 2 ** level
    kh, kw = -(-h // bins), -(-w // bins)
    ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
    return PoolGeometry((kh, kw), (kh, kw), (ph, pw), True)


@LAYERS.register("SPP")
class SPP(Layer):
    """Spatial pyramid pooling: the flattened poolings of every level, concatenated (Caffe's SPP).

    With pyramid_height 1 the single level's (N, C, 1, 1) pooling is the top, as in Caffe.
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        sp = param.spp_param
        self.height = int(sp.pyramid_height)
        self.method = int(sp.pool)
        if self.height < 1:
            raise self.error(f"pyramid_height must be at least 1, got {self.height}",
                             "set spp_param { pyramid_height: N }")
        if self.method not in (MAX, AVE, STOCHASTIC):
            raise self.error(f"unknown pooling method {self.method}", "use MAX, AVE or STOCHASTIC")
        shape = four_axes(self, bottom_shapes[0])
        self._levels(shape[2], shape[3])

    def _levels(self, h: int, w: int):
        if h <= 0 or w <= 0:
            raise self.error(f"input plane {h}x{w} is empty", "feed a non-empty input")
        # Each level is checked as it is made, as Caffe sets up its Pooling layers one by one:
        # a level with more bins than pixels is refused there, before a pyramid_height of 2^32
        # would build (and compute 2^level for) billions of levels.
        levels = []
        for i in range(self.height):
            levels.append(spp_level_geometry(i, h, w))
            try:
                _check_pool_geometry(self, levels[-1], self.method)
            except NetError as e:  # name the field the user set, not the derived pad and kernel
                raise self.error(f"pyramid_height {self.height}: level {i} ({2 ** i} bins a side) "
                                 f"does not fit the {h}x{w} input ({e.what})",
                                 f"lower pyramid_height to {i} or less") from None
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self._levels(*x.shape[-2:])
        outs = [pool2d(x, g, self.method, self.training)[0] for g in levels]
        if self.height == 1:
            return outs[0]
        return torch.cat([o.flatten(1) for o in outs], dim=1)
