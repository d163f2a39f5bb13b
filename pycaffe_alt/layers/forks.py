"""Layer types of well-known Caffe forks.

* ``Axpy`` (SENet, hujie-frank/SENet ``axpy_layer.cpp``): ``top = a * x + y`` with ``a`` of shape
  (N, C) or (N, C, 1, 1) scaling each channel of ``x``; it closes every SE block of SE-ResNet and
  SE-ResNeXt.
* ``ConvolutionDepthwise`` (ShuffleNet/MobileNet forks) and ``DepthwiseConvolution``: a
  ``Convolution`` with one group per input channel, read from ``convolution_param`` whatever its
  ``group`` says (the forks' prototxts leave it at 1); weight (num_output, 1, kh, kw) as the
  forks store it.
* ``ShuffleChannel`` (ShuffleNet v1/v2, farmingyard/ShuffleNet ``shuffle_channel_layer.cpp``;
  ``shuffle_channel_param`` is field 164 there and in our caffe.proto): the C channels, seen as a
  ``group`` x C/group grid, are read out column by column.

* ``ROIPooling`` and ``SmoothL1Loss`` (py-faster-rcnn, rbgirshick/caffe-fast-rcnn branch
  faster-rcnn, ``roi_pooling_layer.cpp/.cu``, ``smooth_L1_loss_layer.cu``).
* ``Interp`` (DeepLab v2 / PSPNet, hszhao/PSPNet ``interp_layer.cpp`` and ``util/interp.cpp``) and
  PSPNet's ``BN`` (hszhao/PSPNet ``bn_layer.cpp``). SegNet's ``BN`` (caffe-segnet) has the same
  type and block names but other fields and two blobs: it is recognised by its fields and refused.
* ``Upsample`` (SegNet, alexgkendall/caffe-segnet ``upsample_layer.cpp``): max-unpooling by the
  mask top of a MAX Pooling layer.

Fork types whose parameter block is not in our caffe.proto (R-FCN's ``psroi_pooling_param``...)
are not here; the parser names them as a fork's (see prototxt.py).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..blob_memory import check_blob_fits
from ..registry import LAYERS
from .base import Layer, Shape, legacy_shape
from .loss import LossLayer
from .vision import Convolution


@LAYERS.register("Axpy")
class Axpy(Layer):
    """SENet's Axpy: bottoms (a, x, y) -> a * x + y, ``a`` one scale per sample and channel."""

    num_bottoms = (3, 3)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        a, x, y = (tuple(s) for s in bottom_shapes)
        # The fork's Reshape checks: a matches x in (N, C) and is 1x1 spatially; x and y agree.
        if len(x) < 2 or len(a) < 2 or a[:2] != x[:2] or any(d != 1 for d in a[2:]):
            raise self.error(f"bottom 0 (the scale) has shape {a}; it must be (N, C) or "
                             f"(N, C, 1, 1) of bottom 1's {x}", "feed the SE block's sigmoid output")
        if x != y:
            raise self.error(f"bottom 1 has shape {x} but bottom 2 has {y}",
                             "x and y must have the same shape")

    def forward(self, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = a.reshape(tuple(a.shape[:2]) + (1,) * (x.dim() - 2))
        return torch.addcmul(y, scale, x)


@LAYERS.register("ConvolutionDepthwise", "DepthwiseConvolution")
class ConvolutionDepthwise(Convolution):
    """A Convolution with ``group`` = the input channels (the depthwise forks' layer)."""

    def __init__(self, param, bottom_shapes, ctx):
        shape = tuple(bottom_shapes[0]) if bottom_shapes else ()
        axis = int(param.convolution_param.axis)
        if -len(shape) <= axis < len(shape):  # otherwise Convolution names the bad axis
            depthwise = type(param)()
            depthwise.CopyFrom(param)
            depthwise.convolution_param.group = int(shape[axis])
            param = depthwise
        super().__init__(param, bottom_shapes, ctx)


@LAYERS.register("ShuffleChannel")
class ShuffleChannel(Layer):
    """ShuffleNet's channel shuffle: (N, g * k, ...) -> channel ``j * g + i`` takes ``i * k + j``."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.group = int(param.shuffle_channel_param.group)
        shape = tuple(bottom_shapes[0])
        if self.group <= 0:  # the fork's CHECK_GT(group_, 0)
            raise self.error(f"group {self.group} must be at least 1", "set shuffle_channel_param { group: G }")
        if len(shape) < 2:
            raise self.error(f"bottom has shape {shape}; ShuffleChannel needs a channel axis "
                             "(N, C, ...)")
        if shape[1] % self.group:  # the fork's "Wrong group size." check
            raise self.error(f"group {self.group} does not divide the {shape[1]} channels of the "
                             "bottom", "choose a group that divides the channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        rest = tuple(x.shape[2:])
        grid = x.reshape((n, self.group, c // self.group) + rest)
        return grid.transpose(1, 2).reshape(tuple(x.shape))


# Memory Interp and Upsample hold while making a top, in tops (measured: a 1 GiB top peaked at
# 5.4 GB for Interp, 9.5 GB when it is one row of 2^27, and 5.6 GB for Upsample).
_INTERP_WORK = 10
_UPSAMPLE_WORK = 6


# -- py-faster-rcnn: ROIPooling ------------------------------------------------------------------
def _c_round(x: torch.Tensor) -> torch.Tensor:
    """C's ``round``: halves away from zero (torch.round rounds them to even). In float64, so
    that ``|x| + 0.5`` is exact for every float32 ``x``."""
    x = x.double()
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


# Elements gathered at once by ROIPooling (ROIs x bins x bin area x channels): caps its memory.
_ROI_CHUNK_ELEMENTS = 1 << 24


@LAYERS.register("ROIPooling")
class ROIPooling(Layer):
    """Fast/Faster R-CNN's ROI max pooling (caffe-fast-rcnn ``roi_pooling_layer.cpp``/``.cu``).

    Bottoms: features (N, C, H, W) and ROIs (R, 5) rows ``[batch index, x1, y1, x2, y2]`` (or
    (R, 5, 1, 1)); top (R, C, pooled_h, pooled_w). As the fork: the corners are scaled by
    ``spatial_scale`` (in the blob's precision) and rounded half away from zero; the ROI spans
    ``max(end - start + 1, 1)`` cells; bin ``ph`` covers rows ``[floor(ph * bin_h),
    ceil((ph + 1) * bin_h))`` from the ROI's start, clipped to the map; an empty bin gives 0;
    ties keep the first maximum in row-major order (the fork's strict ``>``).

    Backward (ROIPoolBackward in the .cu; the CPU one is NOT_IMPLEMENTED): each pooled value's
    gradient goes to its argmax; ROIs get none. The kernel only credits cells inside the ROI's
    rounded box, so a malformed ROI (end < start after rounding, pooled as 1x1) sends nothing.
    """

    num_bottoms = (2, 2)
    num_tops = (1, 1)
    blob_names = ()
    shape_by_fake_run = False  # the bins depend on the ROI values

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.roi_pooling_param
        self.pooled_h, self.pooled_w = int(p.pooled_h), int(p.pooled_w)
        self.spatial_scale = float(p.spatial_scale)
        if not math.isfinite(self.spatial_scale):  # NaN or inf rounds every ROI to nothing
            raise self.error(f"spatial_scale {self.spatial_scale:g} must be a finite number",
                             "the feature map's size over the image's, e.g. 0.0625 for stride 16")
        if self.pooled_h <= 0 or self.pooled_w <= 0:  # the fork's CHECK_GT(pooled_h/w, 0)
            raise self.error(f"pooled size {self.pooled_h} x {self.pooled_w} is empty",
                             "set roi_pooling_param { pooled_h: H pooled_w: W } to at least 1")
        data, rois = (tuple(s) for s in bottom_shapes)
        if len(data) != 4:
            raise self.error(f"bottom 0 has shape {data}; it must be the 4-D (N, C, H, W) feature map")
        if len(rois) < 2 or math.prod(rois[1:]) != 5:
            raise self.error(f"bottom 1 has shape {rois}; it must hold one row of 5 numbers per ROI, "
                             "(R, 5): [batch index, x1, y1, x2, y2]", "feed the proposal layer's rois top")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0  # the fork writes no ROI gradient

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        data, rois = bottom_shapes
        return [(int(rois[0]), int(data[1]), self.pooled_h, self.pooled_w)]

    def _bins(self, start: torch.Tensor, length: torch.Tensor, pooled: int, size: int, dtype):
        """[start, end) of each bin along one axis, (R, pooled) each, clipped to [0, size)."""
        bin_size = length.to(dtype) / pooled  # static_cast<Dtype>(roi_height) / pooled_height_
        steps = torch.arange(pooled, device=start.device, dtype=dtype)
        lo = torch.floor(steps[None, :] * bin_size[:, None]).long() + start[:, None]
        hi = torch.ceil((steps[None, :] + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, size), hi.clamp(0, size)

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        r = rois.shape[0]
        rows = rois.detach().reshape(r, 5)
        if not bool(torch.isfinite(rows).all()):
            raise self.error("the ROIs hold a value that is not finite", "feed finite box coordinates")
        batch = torch.trunc(rows[:, 0]).long()  # int roi_batch_ind = bottom_rois[0]
        bad = (batch < 0) | (batch >= n)
        if bool(bad.any()):  # the fork's CHECK_GE/CHECK_LT on the batch index
            raise self.error(f"ROI {int(bad.nonzero()[0, 0])} has batch index "
                             f"{float(rows[bad][0, 0]):g}, outside the {n} images of bottom 0",
                             "column 0 of each ROI must be an image index in [0, N)")
        # round(bottom_rois[k] * spatial_scale_): the product in the blob's precision.
        corners = _c_round(rows[:, 1:5].to(x.dtype) * self.spatial_scale).long()
        x1, y1, x2, y2 = corners.unbind(1)
        hstart, hend = self._bins(y1, (y2 - y1 + 1).clamp(min=1), self.pooled_h, h, x.dtype)
        wstart, wend = self._bins(x1, (x2 - x1 + 1).clamp(min=1), self.pooled_w, w, x.dtype)
        malformed = (x2 < x1) | (y2 < y1)
        if r == 0 or h == 0 or w == 0 or c == 0:  # no ROI, or every bin empty: zeros (the fork)
            return x.new_zeros((r, c, self.pooled_h, self.pooled_w)) + 0 * x.sum()
        kh = max(int((hend - hstart).max()), 1)
        kw = max(int((wend - wstart).max()), 1)
        hwc = x.permute(0, 2, 3, 1)  # (N, H, W, C): one gather yields every channel
        per_roi = self.pooled_h * self.pooled_w * kh * kw * c
        step = max(1, _ROI_CHUNK_ELEMENTS // max(per_roi, 1))
        outs = []
        for lo in range(0, r, step):
            sl = slice(lo, min(r, lo + step))
            # Cell (kh_i, kw_i) of bin (ph, pw): row hstart + kh_i, column wstart + kw_i.
            row = hstart[sl, :, None] + torch.arange(kh, device=x.device)
            col = wstart[sl, :, None] + torch.arange(kw, device=x.device)
            row_ok = row < hend[sl, :, None]
            col_ok = col < wend[sl, :, None]
            row, col = row.clamp(max=h - 1), col.clamp(max=w - 1)
            b = batch[sl].view(-1, 1, 1, 1, 1)
            # (R, PH, KH, PW, KW, C) -> (R, PH, PW, KH * KW, C): within a bin, row-major order.
            vals = hwc[b, row[:, :, :, None, None], col[:, None, None, :, :]]
            ok = (row_ok[:, :, :, None, None] & col_ok[:, None, None, :, :])[..., None]
            vals = torch.where(ok, vals, vals.new_tensor(-math.inf))
            vals = vals.permute(0, 1, 3, 2, 4, 5).reshape(vals.shape[0], self.pooled_h, self.pooled_w,
                                                          kh * kw, c)
            best = vals.max(dim=3).values  # ties: the first, as the fork's strict '>'
            empty = ~(row_ok[:, :, 0][:, :, None] & col_ok[:, None, :, 0])  # (R, PH, PW)
            best = torch.where(empty[..., None], torch.zeros_like(best), best)
            outs.append(best.permute(0, 3, 1, 2))
        out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
        if bool(malformed.any()):
            out = torch.where(malformed.view(-1, 1, 1, 1), out.detach(), out)
        return out


# -- py-faster-rcnn: SmoothL1Loss ----------------------------------------------------------------
@LAYERS.register("SmoothL1Loss")
class SmoothL1Loss(LossLayer):
    """Faster R-CNN's box regression loss (caffe-fast-rcnn ``smooth_L1_loss_layer.cu``; the CPU
    forward and backward are NOT_IMPLEMENTED there).

    ``d = w_in * (b0 - b1)``; ``f(d) = 0.5 * sigma^2 * d^2`` where ``|d| < 1 / sigma^2``, else
    ``|d| - 0.5 / sigma^2``; loss ``sum(w_out * f(d)) / num`` with ``num`` bottom 0's first axis
    (not the number of boxes). Bottoms 2 and 3 (inside and outside weights) come together or not
    at all and get no gradient; the gradient of b0 (and, negated, of b1) is the fork's
    ``f'(d) * w_in * w_out / num``.
    """

    num_bottoms = (2, 4)

    def allow_force_backward(self, bottom_index: int) -> bool:
        # fast_rcnn_layers.hpp: AllowForceBackward is true for every bottom; the backward
        # writes the targets' diff (the negated predictions' one), not the weights'.
        return bottom_index < 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        sigma = float(param.smooth_l1_loss_param.sigma)
        with np.errstate(over="ignore"):
            self.sigma2 = float(np.float32(sigma) * np.float32(sigma))  # sigma2_ is a Dtype
        if not math.isfinite(self.sigma2):  # its square overflows: NaN gradients
            raise self.error(f"smooth_l1_loss_param.sigma {sigma:g}: its square is not a finite "
                             "float", "use a sigma such as 1 or 3")
        if len(bottom_shapes) == 3:
            raise self.error("has 3 bottoms; weights need both the inside (bottom 2) and outside "
                             "(bottom 3) weights", "give 2 bottoms, or 4")
        first = tuple(bottom_shapes[0])
        for i, s in enumerate(bottom_shapes):
            if len(s) > 4:
                raise self.error(f"bottom {i} has {len(s)} axes; the fork reads at most 4 "
                                 "(num, channels, height, width)")
            # The fork's Reshape: channels, height and width agree (LossLayer: num for bottom 1).
            mine, theirs = legacy_shape(s), legacy_shape(first)
            if mine[1:] != theirs[1:] or (i < 2 and mine[0] != theirs[0]) \
                    or math.prod(s) != math.prod(first):
                raise self.error(f"bottom {i} has shape {tuple(s)}, bottom 0 has {first}",
                                 "the targets and weights must match the predictions in shape")

    def forward(self, pred: torch.Tensor, target: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        d = pred - target.reshape(pred.shape)
        if weights:
            d = weights[0].detach().reshape(pred.shape) * d
        # The kernel compares and computes in double (1.0 / sigma2 is a double) and stores floats.
        d64 = d.double()
        a = d64.abs()
        thr = 1.0 / self.sigma2 if self.sigma2 else math.inf
        err = torch.where(a < thr, 0.5 * d64 * d64 * self.sigma2,
                          a - (0.5 / self.sigma2 if self.sigma2 else 0.0)).to(pred.dtype)
        if weights:
            err = weights[1].detach().reshape(pred.shape) * err
        num = pred.shape[0] if pred.dim() else 1
        return err.sum() / num


# -- DeepLab v2 / PSPNet: Interp -----------------------------------------------------------------
def _interp_axis(size_in: int, size_out: int):
    """Caffe's caffe_cpu_interp2 along one axis: the lower source index, the step to the upper
    one (0 at the last row) and the upper weight, in float32 as the fork computes them."""
    ratio = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0)
    pos = np.float32(ratio) * np.arange(size_out, dtype=np.float32)  # h1r = rheight * h2
    low = pos.astype(np.int64)  # const int h1 = h1r (truncation)
    step = (low < size_in - 1).astype(np.int64)
    upper = (pos - low.astype(np.float32)).astype(np.float32)  # h1lambda = h1r - h1
    return low, step, upper


@LAYERS.register("Interp")
class Interp(Layer):
    """DeepLab v2 / PSPNet bilinear resize (hszhao/PSPNet ``interp_layer.cpp``, ``util/interp.cpp``).

    The input is first cropped by ``-pad_beg`` at the top and left (the fork's LayerSetUp only
    allows ``pad_beg``, ``pad_end`` <= 0; both offsets of the crop are ``-pad_beg``) to
    ``(H + pad_beg + pad_end) x (W + pad_beg + pad_end)``. Output size, as the fork's Reshape:
    ``shrink_factor`` alone: ``(in - 1) / s + 1``; ``zoom_factor`` alone: ``in + (in - 1)(z - 1)``;
    else ``height`` and ``width``; both factors: shrink, then zoom. Sampling is align-corners:
    output ``i`` reads source ``i * (in - 1) / (out - 1)`` (ratio and positions in float32), its
    two neighbours weighted ``1 - lambda`` and ``lambda``; same size is a plain copy. The backward
    is the adjoint (the fork's caffe_cpu_interp2_backward), which autograd gives.
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.interp_param
        self.pad_beg, self.pad_end = int(p.pad_beg), int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:  # the fork's CHECK_LE(pad_beg_/pad_end_, 0)
            raise self.error(f"pad_beg {self.pad_beg} and pad_end {self.pad_end} must be <= 0",
                             "the fork only crops (non-positive padding)")
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(f"bottom has shape {shape}; Interp resizes 4-D (N, C, H, W) blobs")
        shrink, zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
        for name, on, v in (("shrink_factor", shrink, p.shrink_factor), ("zoom_factor", zoom, p.zoom_factor)):
            if on and v < 1:
                raise self.error(f"{name} {v} must be at least 1")
        self.shrink = int(p.shrink_factor) if shrink else None
        self.zoom = int(p.zoom_factor) if zoom else None
        self.size = (int(p.height), int(p.width)) if p.HasField("height") and p.HasField("width") \
            else None
        if self.size is None and not (shrink or zoom):  # the fork's LOG(FATAL)
            raise self.error("interp_param gives no output size",
                             "set zoom_factor, shrink_factor (or both), or height and width")
        _, out = self.sizes(shape[2], shape[3])
        # Before any index table is built (one entry per output row and column): the forward
        # holds several top-sized tensors at once (two row gathers, four column gathers).
        check_blob_fits(tuple(shape[:2]) + out, None, self.name, self.where, work=_INTERP_WORK)

    def sizes(self, height: int, width: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """``((cropped H, W), (output H, W))`` for an input of ``height x width``: the fork's
        Reshape, which works them out again for every input size (a net reshaped to another
        input resizes to the new size)."""
        h_eff = int(height) + self.pad_beg + self.pad_end
        w_eff = int(width) + self.pad_beg + self.pad_end
        if h_eff <= 0 or w_eff <= 0:
            raise self.error(f"cropping {-self.pad_beg} and {-self.pad_end} leaves {h_eff} x {w_eff} "
                             f"of the {height} x {width} input", "crop less (pad_beg, pad_end)")

        def zoomed(n: int) -> int:  # zoom_factor - 1 new samples between neighbours
            return n + (n - 1) * (self.zoom - 1)

        def shrunk(n: int) -> int:
            return (n - 1) // self.shrink + 1

        # The fork's Reshape tests in this order: shrink alone, zoom alone, height and width,
        # then shrink and zoom together (so height/width win over the pair of factors).
        if self.shrink and not self.zoom:
            out = (shrunk(h_eff), shrunk(w_eff))
        elif self.zoom and not self.shrink:
            out = (zoomed(h_eff), zoomed(w_eff))
        elif self.size is not None:
            out = self.size
        else:
            out = (zoomed(shrunk(h_eff)), zoomed(shrunk(w_eff)))
        if out[0] <= 0 or out[1] <= 0:
            raise self.error(f"output size {out[0]} x {out[1]} is empty",
                             "set a positive height and width")
        return (h_eff, w_eff), (int(out[0]), int(out[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h1, w1), (h2, w2) = self.sizes(x.shape[2], x.shape[3])
        off = -self.pad_beg
        src = x[:, :, off:off + h1, off:off + w1]
        if (h1, w1) == (h2, w2):  # the fork's "just copy" case
            return src.clone()
        hl, hs, hw = _interp_axis(h1, h2)
        wl, ws, ww = _interp_axis(w1, w2)
        dev, dt = x.device, x.dtype

        def t(a, dtype=torch.long):
            return torch.as_tensor(a, dtype=dtype, device=dev)

        # Dtype(h1r - h1): the float32 weight, then in the blob's precision; h0 = Dtype(1) - h1.
        lam_h, lam_w = t(hw, dt), t(ww, dt)
        h0, h1w = (1 - lam_h).view(-1, 1), lam_h.view(-1, 1)
        w0, w1w = 1 - lam_w, lam_w
        top_rows = src.index_select(2, t(hl))
        bottom_rows = src.index_select(2, t(hl + hs))
        wl_t, wh_t = t(wl), t(wl + ws)
        upper = w0 * top_rows.index_select(3, wl_t) + w1w * top_rows.index_select(3, wh_t)
        lower = w0 * bottom_rows.index_select(3, wl_t) + w1w * bottom_rows.index_select(3, wh_t)
        return h0 * upper + h1w * lower


# -- PSPNet: BN ----------------------------------------------------------------------------------
@LAYERS.register("BN")
class BN(Layer):
    """PSPNet's batch normalisation with its own affine part (hszhao/PSPNet ``bn_layer.cpp``),
    also yjxiong/caffe's (action_recog branch, Temporal Segment Networks), whose blobs are
    (1, C): a caffemodel stored that way gives the blobs that shape (``adopt_stored_shape``).

    Blobs (1, C, 1, 1) each: ``slope`` (slope_filler; Caffe's default filler is constant 0),
    ``bias`` (bias_filler), running ``mean`` (0) and ``variance`` (1 when frozen, else 0).
    ``top = (x - mean) / sqrt(var + eps) * slope + bias`` per channel. TRAIN and not ``frozen``:
    the batch's mean and biased variance over (N, H, W), and the running ones become
    ``(1 - momentum) * batch + momentum * running`` (no unbiasing, unlike BVLC's BatchNorm);
    TEST or ``frozen``: the running ones. The layer sets lr_mult and decay_mult 0 on the
    statistics, and on slope and bias too when frozen (the fork's LayerSetUp), whose frozen
    backward only passes ``top_diff * slope / sqrt(var + eps)`` to the bottom.

    The fork's ``engine`` is not used by its layer factory (BN is always BNLayer); it is ignored.
    A ``bn_param`` with SegNet's fields (``bn_mode``, ``scale_filler``, ``shift_filler``) makes
    the layer SegNet's BN instead (:class:`SegNetBN`).
    """

    num_bottoms = (1, 1)
    num_tops = (1, 3)  # SegNet's BN may add the batch mean and variance tops
    blob_names = ("slope", "bias", "mean", "variance")

    def __new__(cls, *args, **kwargs):
        # Both forks call their layer "BN" with a bn_param; the fields say which one it is.
        # (copy.deepcopy calls __new__ without arguments: then it is this class.)
        param = args[0] if args else kwargs.get("param")
        if cls is BN and param is not None and \
                any(param.bn_param.HasField(f) for f in _SEGNET_BN_FIELDS):
            return SegNetBN(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.bn_param
        if len(param.top) > 1:
            raise self.error(f"has {len(param.top)} tops; PSPNet's BN has one",
                             "remove the extra tops (SegNet's BN, with bn_mode, gives the batch "
                             "mean and variance as tops 2 and 3)")
        shape = tuple(bottom_shapes[0])
        if not 2 <= len(shape) <= 4:
            raise self.error(f"bottom has shape {shape}; BN normalises (N, C[, H[, W]]) blobs per channel")
        self.channels = int(shape[1])
        self.frozen = bool(p.frozen)
        self.momentum = float(p.momentum)
        self.eps = float(p.eps)
        # The fork's LayerSetUp: at least 4 param specs; statistics (and when frozen the affine
        # part) get lr_mult 0 and decay_mult 0, whatever the prototxt says.
        while len(param.param) < 4:
            param.param.add()
        for i in ((0, 1, 2, 3) if self.frozen else (2, 3)):
            param.param[i].lr_mult = 0.0
            param.param[i].decay_mult = 0.0
        blob = (1, self.channels, 1, 1)
        self.add_blob(blob, p.slope_filler).requires_grad_(not self.frozen)
        self.add_blob(blob, p.bias_filler).requires_grad_(not self.frozen)
        self.add_blob(blob, None).requires_grad_(False)
        var = self.add_blob(blob, None).requires_grad_(False)
        if self.frozen:
            with torch.no_grad():
                var.fill_(1.0)

    def adopt_stored_shape(self, index: int, shape: Tuple[int, ...]) -> bool:
        # yjxiong/caffe (action_recog: Temporal Segment Networks' BN-Inception models) has this
        # very layer and bn_param, but its LayerSetUp shapes the four blobs (1, C); PSPNet's
        # copy shapes them (1, C, 1, 1). The prototxt cannot tell them apart, the caffemodel
        # can: the blobs take the file's layout, so net.params and net.save keep the fork's.
        if shape not in ((1, self.channels), (1, self.channels, 1, 1)):
            return False
        blob = self.blobs[index]
        with torch.no_grad():
            blob.data = blob.data.view(shape)
        return True

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return [tuple(bottom_shapes[0])]  # not by a fake run: a TRAIN forward updates the statistics

    @property
    def replays_exactly(self) -> bool:
        return self.frozen or not self.training  # a TRAIN pass updates the running statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise self.error(f"bottom has {x.shape[1]} channels, the blobs have {self.channels}",
                             "feed a blob with the channel count the layer was built for")
        view = (1, self.channels) + (1,) * (x.dim() - 2)
        slope, bias = self.slope.view(view), self.bias.view(view)
        if self.frozen or not self.training:
            mean = self.mean.detach().view(view).to(x.dtype)
            var = self.variance.detach().view(view).to(x.dtype)
            centred = x - mean
        else:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims, keepdim=True)
            centred = x - mean
            var = (centred * centred).mean(dim=dims, keepdim=True)  # biased, (x - mean)^2 averaged
            with torch.no_grad():
                m = self.momentum
                self.mean.mul_(m).add_((1 - m) * mean.detach().reshape(self.mean.shape).to(self.mean.dtype))
                self.variance.mul_(m).add_((1 - m) * var.detach().reshape(self.variance.shape)
                                           .to(self.variance.dtype))
        return centred * (var + self.eps).pow(-0.5) * slope + bias


_SEGNET_BN_FIELDS = ("bn_mode", "scale_filler", "shift_filler")
_SEGNET_INFERENCE = 1  # BNParameter.BNMode INFERENCE (caffe-segnet's enum value)
_SEGNET_BN_EPS = 1e-9  # var_eps_, fixed in the fork's LayerSetUp


class SegNetBN(Layer):
    """SegNet's batch normalisation (alexgkendall/caffe-segnet ``bn_layer.cpp``), the ``BN``
    of SegNet, Bayesian SegNet and ENet prototxts (``bn_param`` with ``bn_mode``,
    ``scale_filler``, ``shift_filler``).

    Blobs (1, C, 1, 1): ``scale`` and ``shift``. ``bn_mode: LEARN`` (the default) normalises
    with the batch's statistics in every phase (SegNet's compute_bn_statistics.py then folds
    dataset statistics into scale and shift and switches to INFERENCE): mean over (N, H, W),
    variance ``E[x^2] - E[x]^2``, ``top = (x - mean) / sqrt(var + 1e-9) * scale + shift``;
    optional tops 2 and 3 are the batch mean and variance (1, C, 1, 1). ``bn_mode: INFERENCE``:
    ``top = x * scale + shift`` (tops 2 and 3 are zeros). The backward is the exact gradient of
    these, which is the fork's hand-written one.
    """

    num_bottoms = (1, 1)
    num_tops = (1, 3)
    blob_names = ("scale", "shift")

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.bn_param
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(f"bottom has shape {shape}; SegNet's BN normalises (N, C, H, W) blobs")
        self.channels = int(shape[1])
        self.inference = p.bn_mode == _SEGNET_INFERENCE
        self.n_tops = max(len(param.top), 1)
        blob = (1, self.channels, 1, 1)
        self.add_blob(blob, p.scale_filler)
        self.add_blob(blob, p.shift_filler)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        stats = (1, self.channels, 1, 1)
        return [tuple(bottom_shapes[0])] + [stats] * (self.n_tops - 1)

    def forward(self, x: torch.Tensor):
        if x.shape[1] != self.channels:
            raise self.error(f"bottom has {x.shape[1]} channels, the blobs have {self.channels}",
                             "feed a blob with the channel count the layer was built for")
        if self.inference:
            top = x * self.scale + self.shift
            stats = [x.new_zeros((1, self.channels, 1, 1))] * 2
        else:
            dims = (0, 2, 3)
            mean = x.mean(dim=dims, keepdim=True)
            var = (x * x).mean(dim=dims, keepdim=True) - mean * mean  # the fork's E[x^2] - E[x]^2
            top = (x - mean) / (var + _SEGNET_BN_EPS).sqrt() * self.scale + self.shift
            stats = [mean.detach(), var.detach()]
        return top if self.n_tops == 1 else (top, *stats[:self.n_tops - 1])


# -- SegNet: Upsample ----------------------------------------------------------------------------
class _Unpool(torch.autograd.Function):
    """Scatter x into the unpooled plane at the mask's indices; backward gathers (the fork's)."""

    @staticmethod
    def forward(ctx, x, index, plane):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        idx = index.reshape(flat.shape)
        # The fork's loop writes in order, so where indices repeat the last source wins.
        order = torch.arange(flat.shape[2], device=x.device).expand_as(idx)
        winner = torch.full(flat.shape[:2] + (plane,), -1, dtype=torch.long, device=x.device)
        winner.scatter_reduce_(2, idx, order, reduce="amax", include_self=True)
        top = torch.where(winner >= 0, flat.gather(2, winner.clamp(min=0)), flat.new_zeros(()))
        ctx.save_for_backward(idx)
        ctx.in_shape = x.shape
        return top

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        # bottom_diff[i] = top_diff[mask[i]]
        return grad.gather(2, idx).reshape(ctx.in_shape), None, None


@LAYERS.register("Upsample")
class Upsample(Layer):
    """SegNet's max-unpooling (alexgkendall/caffe-segnet ``upsample_layer.cpp``).

    Bottoms: the values (N, C, H, W) and the mask top of a MAX Pooling layer, same shape, each
    entry the index ``h * W_out + w`` in the unpooled plane. Top (N, C, upsample_h, upsample_w),
    zero except at the masked positions, which take the values (where two share a position, the
    later one, as the fork's loop). Size: ``upsample_h``/``upsample_w`` if both are set, else
    ``H * scale_h - pad_out_h`` (``scale`` for both axes unless scale_h and scale_w are given).
    Backward gathers the top's diff at the mask (each bottom gets its position's diff); the mask
    gets none.

    With one bottom it is the YOLOv3 forks' nearest-neighbour ``Upsample`` (darknet2caffe,
    caffe-yolov3, MobileNet-YOLO: ``upsample_param { scale: 2 }``): top (N, C, H * s, W * s)
    with ``top[h][w] = bottom[h / s][w / s]``; the backward sums each s x s block.
    """

    num_bottoms = (1, 2)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.upsample_param
        has = p.HasField
        self.nearest = len(bottom_shapes) == 1
        if self.nearest:
            self._init_nearest(p, tuple(bottom_shapes[0]))
            return
        if not ((has("upsample_h") and has("upsample_w"))
                or (not has("scale") and has("scale_h") and has("scale_w"))
                or (not has("scale_h") and not has("scale_w"))):  # the fork's LayerSetUp CHECK
            raise self.error("upsample_param mixes its size settings",
                             "give upsample_h and upsample_w, or scale, or scale_h and scale_w")
        data, mask = (tuple(s) for s in bottom_shapes)
        if len(data) != 4 or data != mask:
            raise self.error(f"bottoms have shapes {data} and {mask}; they must be the same 4-D "
                             "(N, C, H, W) shape", "bottom 1 must be the mask top of the MAX Pooling "
                             "whose output bottom 0 is (or matches)")
        if has("upsample_h") and has("upsample_w"):
            out = (int(p.upsample_h), int(p.upsample_w))
            if min(out) <= 1:  # CHECK_GT(upsample_h_/upsample_w_, 1)
                raise self.error(f"upsample size {out[0]} x {out[1]} must exceed 1 on both axes")
        else:
            sh, sw = (int(p.scale_h), int(p.scale_w)) if has("scale_h") else (int(p.scale), int(p.scale))
            if sh <= 1 or sw <= 1:
                raise self.error(f"scale {sh} x {sw} must exceed 1 on both axes")
            if (p.pad_out_h and sh != 2) or (p.pad_out_w and sw != 2):
                raise self.error("pad_out_h / pad_out_w need a scale of 2 on that axis",
                                 "give upsample_h and upsample_w instead")
            out = (data[2] * sh - int(p.pad_out_h), data[3] * sw - int(p.pad_out_w))
        self.out_size = out
        self.setup_plane = tuple(data[2:])
        # The unpooling keeps an int64 winner map and temporaries next to the top.
        check_blob_fits(tuple(data[:2]) + tuple(out), None, self.name, self.where,
                        work=_UPSAMPLE_WORK)

    def _init_nearest(self, p, data: Shape) -> None:
        if p.HasField("upsample_h") or p.HasField("upsample_w") or p.pad_out_h or p.pad_out_w:
            raise self.error("a one-bottom (nearest) Upsample takes only scale (or scale_h and "
                             "scale_w)", "remove upsample_h/upsample_w/pad_out_*, or give the "
                             "pooling mask as bottom 1 for SegNet's unpooling")
        has = p.HasField
        if has("scale_h") != has("scale_w"):
            raise self.error("upsample_param sets only one of scale_h/scale_w",
                             "give both, or scale for both axes")
        self.scale = (int(p.scale_h), int(p.scale_w)) if has("scale_h") \
            else (int(p.scale), int(p.scale))
        if len(data) != 4:
            raise self.error(f"bottom has shape {data}; Upsample enlarges 4-D (N, C, H, W) blobs")
        if min(self.scale) < 1:
            raise self.error(f"scale {self.scale[0]} x {self.scale[1]} must be at least 1")
        check_blob_fits(self.top_shapes([data])[0], None, self.name, self.where)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        n, c, h, w = (int(d) for d in bottom_shapes[0])
        if self.nearest:  # the forks' Reshape scales the bottom it has now
            return [(n, c, h * self.scale[0], w * self.scale[1])]
        # SegNet's unpooling keeps the size it worked out at set-up (the fork recomputes
        # upsample_h/w only while they are unset), so the mask's indices keep their meaning;
        # a reshaped input would unpool into the old plane (the fork then fails later, at an
        # Eltwise of different sizes or "upsample top index out of range"): say so here.
        if (h, w) != self.setup_plane:
            raise self.error(f"its input is now {h} x {w}, but SegNet's unpooling keeps the "
                             f"{self.out_size[0]} x {self.out_size[1]} output it worked out for "
                             f"{self.setup_plane[0]} x {self.setup_plane[1]} at set-up, as the "
                             "fork does", "build the net with the new input size in the prototxt "
                             "instead of reshaping it")
        return [(n, c) + tuple(self.out_size)]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.nearest:
            # Each input value copied into an s_h x s_w block: exact, and autograd's backward of
            # the broadcast sums each block, as the forks' backward does.
            n, c, h, w = x.shape
            sh, sw = self.scale
            block = x.reshape(n, c, h, 1, w, 1).expand(n, c, h, sh, w, sw)
            return block.reshape(n, c, h * sh, w * sw)
        plane = self.out_size[0] * self.out_size[1]
        index = torch.trunc(mask.detach()).long()  # static_cast<int>(bottom_mask_data[i])
        bad = (index < 0) | (index >= plane) | ~torch.isfinite(mask.detach())
        if bool(bad.any()):  # the fork's LOG(FATAL) "upsample top index ... out of range"
            raise self.error(f"mask index {float(mask.detach()[bad][0]):g} is outside the "
                             f"{self.out_size[0]} x {self.out_size[1]} output",
                             "check that the scale or upsample_h/upsample_w match the input of the "
                             "pooling layer that made the mask")
        if x.numel() == 0:  # nothing to scatter (an empty batch or no channels)
            return x.new_zeros(tuple(x.shape[:2]) + self.out_size) + 0 * x.sum()
        top = _Unpool.apply(x, index, plane)
        return top.reshape(tuple(x.shape[:2]) + self.out_size)
