"""Vision layers (Convolution, Deconvolution, Im2col, Pooling, SPP): Caffe's geometry rules on
hand-computed examples, pooling against a direct loop transcription of Caffe's windows, float64
gradchecks, parameter errors, and parity with Caffe's golden outputs."""
from __future__ import annotations

import itertools
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_golden import ROOT as GOLDEN_ROOT
from test_golden import test_golden_case as golden_case
from layer_check import gradcheck_layer, make_layer
from pycaffe_alt.errors import NetError
from pycaffe_alt.layers import TRAIN
from pycaffe_alt.layers.vision import (PoolGeometry, ave_pool, ave_pool_exact, caffe_pooled_size,
                                       max_pool, max_pool_exact, pooled_shape, spp_level_geometry,
                                       torch_pool_is_exact)

FLT_MAX = float(np.finfo(np.float32).max)


# -- a direct transcription of Caffe's pooling loops (tiny inputs only) ------------------------
def reference_pool(x: np.ndarray, g: PoolGeometry, method: str):
    n_, c_, h, w = x.shape

    def size(i, k, s, p):  # computed here independently of the code under test
        out = (math.ceil if g.ceil else math.floor)((i + 2 * p - k) / s) + 1
        # Caffe clips both axes when either has padding (`if (pad_h_ || pad_w_)`).
        return out - 1 if any(g.pad) and (out - 1) * s >= i + p else out

    oh = size(h, g.kernel[0], g.stride[0], g.pad[0])
    ow = size(w, g.kernel[1], g.stride[1], g.pad[1])
    y = np.zeros((n_, c_, oh, ow))
    mask = np.full((n_, c_, oh, ow), -1.0)
    for n, c, i, j in itertools.product(range(n_), range(c_), range(oh), range(ow)):
        hs, ws = i * g.stride[0] - g.pad[0], j * g.stride[1] - g.pad[1]
        if method == "max":
            he, we = min(hs + g.kernel[0], h), min(ws + g.kernel[1], w)
            best = -FLT_MAX
            for a in range(max(hs, 0), he):
                for b in range(max(ws, 0), we):
                    if x[n, c, a, b] > best:  # strict: the first maximum wins
                        best, mask[n, c, i, j] = x[n, c, a, b], a * w + b
            y[n, c, i, j] = best
        else:
            he, we = min(hs + g.kernel[0], h + g.pad[0]), min(ws + g.kernel[1], w + g.pad[1])
            size = (he - hs) * (we - ws)
            total = sum(x[n, c, a, b] for a in range(max(hs, 0), min(he, h)) for b in range(max(ws, 0), min(we, w)))
            with np.errstate(all="ignore"):
                y[n, c, i, j] = np.float64(total) / size
    return y, mask


def _random_geometries(count: int, seed: int):
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        h, w = rng.randint(1, 8), rng.randint(1, 8)
        k = (rng.randint(1, 4), rng.randint(1, 4))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        p = (rng.randint(0, k[0] - 1), rng.randint(0, k[1] - 1))
        g = PoolGeometry(k, s, p, rng.random() < 0.6)
        if min(pooled_shape(g, h, w)) >= 1:
            out.append((h, w, g))
    return out


GEOMETRIES = _random_geometries(120, seed=1)


# -- output size ------------------------------------------------------------------------------
@pytest.mark.parametrize("size, k, s, p, ceil, want", [
    (6, 3, 2, 1, True, 4),    # (6+2-3)/2 = 2.5 -> 3, +1; last start 6 < 6+1 is kept
    (6, 3, 2, 1, False, 3),   # floor(2.5) + 1
    (7, 2, 2, 0, True, 4),    # overhang: last window [6, 8) covers one input column
    (7, 2, 2, 0, False, 3),
    (10, 3, 2, 0, True, 5),   # (10-3)/2 = 3.5 -> 4, +1
    (10, 3, 2, 0, False, 4),
    (5, 2, 2, 1, True, 3),    # ceil(5/2)+1 = 4, but window 3 would start at 6 >= 5+1: dropped
    (5, 2, 2, 1, False, 3),
    (7, 3, 2, 1, True, 4),
    (5, 1, 3, 0, True, 3),    # no pad: Caffe keeps a last window that starts past the input
    (9, 9, 1, 0, True, 1),    # global
])
def test_caffe_pooled_size(size, k, s, p, ceil, want):
    assert caffe_pooled_size(size, k, s, p, ceil) == want


def test_padding_on_one_axis_clips_both_axes():
    # PoolingLayer::Reshape: `if (pad_h_ || pad_w_)` then clips pooled_height_ AND pooled_width_
    # when the last window would start at or past size + pad. Width here has no padding, yet
    # its last window (start 6 >= 6 + 0) is dropped: 3 x 2, not 3 x 3.
    assert caffe_pooled_size(6, 2, 3, 0, True, padded=True) == 2
    assert caffe_pooled_size(6, 2, 3, 0, True) == 3
    x = torch.arange(36.0).view(1, 1, 6, 6)
    for pool in ("MAX", "AVE"):
        layer = make_layer(f'type: "Pooling" pooling_param {{ pool: {pool} kernel_h: 2 kernel_w: 2 '
                           'stride_h: 3 stride_w: 3 pad_h: 1 pad_w: 0 }', [x.shape])
        assert layer.top_shapes([x.shape]) == [(1, 1, 3, 2)]
        y = layer(x)
        assert y.shape == (1, 1, 3, 2) and torch.isfinite(y).all()


def test_pooling_layer_round_modes():
    x = (1, 1, 6, 7)
    ceil = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }', [x])
    floor = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 '
                       'round_mode: FLOOR }', [x])
    assert ceil.top_shapes([x]) == [(1, 1, 4, 4)]
    assert floor.top_shapes([x]) == [(1, 1, 3, 4)]


def test_forks_ceil_mode_chooses_the_rounding():
    x = (1, 1, 6, 7)
    floor = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 '
                       'ceil_mode: false }', [x])
    ceil = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 '
                      'ceil_mode: true }', [x])
    assert floor.top_shapes([x]) == [(1, 1, 3, 4)] and ceil.top_shapes([x]) == [(1, 1, 4, 4)]
    with pytest.raises(NetError, match="ceil_mode and round_mode disagree"):
        make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 '
                   'ceil_mode: false round_mode: CEIL }', [x])


# -- pooling against the reference loops -------------------------------------------------------
@pytest.mark.parametrize("h, w, g", GEOMETRIES)
def test_pooling_matches_caffe_loops(h, w, g):
    torch.manual_seed(h * 10 + w)
    x = torch.randn(2, 2, h, w, dtype=torch.float64)
    ref_max, ref_mask = reference_pool(x.numpy(), g, "max")
    ref_ave, _ = reference_pool(x.numpy(), g, "ave")
    # The dispatching functions and the explicit-padding paths must both be exact.
    for fn in (max_pool, max_pool_exact):
        y, mask = fn(x, g, True)
        np.testing.assert_allclose(y.numpy(), ref_max, rtol=1e-12)
        np.testing.assert_array_equal(mask.numpy(), ref_mask)
    for fn in (ave_pool, ave_pool_exact):
        np.testing.assert_allclose(fn(x, g).numpy(), ref_ave, rtol=1e-12, equal_nan=True)


def test_geometries_cover_both_paths():
    fast = sum(torch_pool_is_exact(g, h, w) for h, w, g in GEOMETRIES)
    assert 0 < fast < len(GEOMETRIES)


def test_max_pool_ties_go_to_first_maximum():
    torch.manual_seed(0)
    x = torch.randint(0, 3, (2, 3, 7, 8)).double()  # many ties
    for g in (PoolGeometry((3, 3), (2, 2), (1, 1)), PoolGeometry((3, 3), (2, 2), (2, 2)),
              PoolGeometry((2, 3), (1, 2), (0, 0), False)):
        ref_max, ref_mask = reference_pool(x.numpy(), g, "max")
        for fn in (max_pool, max_pool_exact):
            y, mask = fn(x, g, True)
            np.testing.assert_array_equal(mask.numpy(), ref_mask)
        # The gradient goes to the same (first) maximum.
        xr = x.clone().requires_grad_(True)
        max_pool(xr, g)[0].sum().backward()
        want = np.zeros(x.numel())
        flat_mask = (ref_mask + (np.arange(x.shape[0] * x.shape[1]) * x.shape[2] * x.shape[3])[:, None]
                     .reshape(x.shape[0], x.shape[1], 1, 1)).ravel().astype(int)
        np.add.at(want, flat_mask, 1.0)
        np.testing.assert_array_equal(xr.grad.numpy().ravel(), want)


def test_pool_ave_pad_and_overhang_divisors_by_hand():
    # 1x1x3x3 of ones, kernel 2, stride 2, pad 1: windows [-1,1), [1,3) per axis; all counts 2.
    layer = make_layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }',
                       [(1, 1, 3, 3)])
    y = layer(torch.ones(1, 1, 3, 3))
    # corner: one input in a 2x2 padded window -> 1/4; edges: 2/4; centre window (1..3)^2 -> 4/4
    np.testing.assert_allclose(y[0, 0].numpy(), [[0.25, 0.5], [0.5, 1.0]])
    # overhang without pad: 3 columns, kernel 2, stride 2 -> window [2, 4) clipped to 1 column.
    layer = make_layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 2 }', [(1, 1, 1, 3)])
    y = layer(torch.tensor([[[[1.0, 3.0, 5.0]]]]))
    np.testing.assert_allclose(y.numpy().ravel(), [2.0, 5.0])


def test_window_past_the_input_keeps_caffe_values():
    # kernel 1, stride 3, no pad on 5 columns: ceil(4/3)+1 = 3 windows, the last starts at 6 > 4.
    # Caffe keeps it: MAX leaves -FLT_MAX with mask -1; AVE divides 0 by min(7, 5) - 6 = -1.
    x = torch.arange(5.0).view(1, 1, 1, 5)
    mx = make_layer('type: "Pooling" top: "y" top: "m" pooling_param { pool: MAX kernel_size: 1 stride: 3 }',
                    [x.shape])
    y, m = mx(x)
    assert y.tolist() == [[[[0.0, 3.0, -FLT_MAX]]]]
    assert m.tolist() == [[[[0.0, 3.0, -1.0]]]]
    av = make_layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 1 stride: 3 }', [x.shape])
    assert av(x).tolist() == [[[[0.0, 3.0, 0.0]]]]


@pytest.mark.parametrize("tops", ['top: "y"', 'top: "y" top: "mask"'])
def test_global_pooling_non_square(tops):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 7)
    mx = make_layer(f'type: "Pooling" {tops} pooling_param {{ pool: MAX global_pooling: true }}', [x.shape])
    av = make_layer(f'type: "Pooling" top: "y" pooling_param {{ pool: AVE global_pooling: true }}', [x.shape])
    out = mx(x)
    y = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(y, x.amax(dim=(2, 3), keepdim=True))
    if isinstance(out, tuple):
        torch.testing.assert_close(out[1].view(2, 3).long(), x.view(2, 3, -1).argmax(-1))
    torch.testing.assert_close(av(x), x.mean(dim=(2, 3), keepdim=True))
    # Reshaped bottoms get a new global kernel.
    x2 = torch.randn(1, 3, 4, 2)
    torch.testing.assert_close(av(x2), x2.mean(dim=(2, 3), keepdim=True))


def test_global_max_pooling_gradient_goes_to_the_first_maximum():
    # Caffe's strict '>' scan records the first maximum as the argmax; the whole top diff goes
    # there (not split between tied maxima).
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX global_pooling: true }', [(1, 1, 2, 2)])
    x = torch.tensor([[[[1.0, 3.0], [3.0, 0.0]]]], requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


def test_rectangular_pooling_h_w_fields():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 8, 7, dtype=torch.float64)
    layer = make_layer('type: "Pooling" pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 '
                       'stride_w: 1 pad_h: 1 pad_w: 0 }', [x.shape])
    g = PoolGeometry((3, 2), (2, 1), (1, 0))
    np.testing.assert_allclose(layer.double()(x).numpy(), reference_pool(x.numpy(), g, "ave")[0], rtol=1e-12)


def test_max_mask_top_numbers_unpadded_plane():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 7, 8)
    layer = make_layer('type: "Pooling" top: "y" top: "m" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }',
                       [x.shape])
    y, m = layer(x)
    _, ref_mask = reference_pool(x.double().numpy(), PoolGeometry((3, 3), (2, 2), (1, 1)), "max")
    assert m.dtype == x.dtype and not m.requires_grad
    np.testing.assert_array_equal(m.numpy(), ref_mask)


# -- stochastic pooling -----------------------------------------------------------------------
def test_stochastic_test_phase_weighted_average():
    x = torch.tensor([[[[1.0, 3.0, 0.0], [0.0, 0.0, 2.0]]]])
    layer = make_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 1 }', [x.shape])
    y = layer(x)
    np.testing.assert_allclose(y.numpy().ravel(), [(1 + 9) / 4.0, (9 + 4) / 5.0])
    z = layer(torch.zeros(1, 1, 2, 3))  # sum 0 -> 0, without NaN
    assert torch.equal(z, torch.zeros_like(z))


def test_stochastic_train_samples_in_proportion():
    torch.manual_seed(4)
    layer = make_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }',
                       [(1, 4000, 2, 2)], phase=TRAIN)
    x = torch.tensor([1.0, 0.0, 0.0, 3.0]).view(1, 1, 2, 2).expand(1, 4000, 2, 2).contiguous()
    x.requires_grad_(True)
    y = layer(x)
    assert set(y.detach().unique().tolist()) <= {1.0, 3.0}
    frac = (y == 3.0).float().mean().item()
    assert abs(frac - 0.75) < 0.03
    y.sum().backward()  # the gradient lands on the sampled input only
    assert torch.equal(x.grad.sum(dim=(2, 3)).view(-1), torch.ones(4000))
    assert torch.equal(x.grad[0, :, 0, 1], torch.zeros(4000))


def test_stochastic_rejects_padding():
    with pytest.raises(NetError, match="padding"):
        make_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 pad: 1 }', [(1, 1, 5, 5)])


# -- SPP --------------------------------------------------------------------------------------
def test_spp_level_geometry_and_shape():
    # 9x9, 4 bins: kernel ceil(9/4) = 3, remainder 3, pad 2 (> kernel/2: the exact path).
    assert spp_level_geometry(2, 9, 9) == PoolGeometry((3, 3), (3, 3), (2, 2))
    assert spp_level_geometry(1, 9, 6) == PoolGeometry((5, 3), (5, 3), (1, 0))
    layer = make_layer('type: "SPP" spp_param { pyramid_height: 3 pool: AVE }', [(2, 3, 9, 6)])
    assert layer.top_shapes([(2, 3, 9, 6)]) == [(2, 3 * (1 + 4 + 16))]
    one = make_layer('type: "SPP" spp_param { pyramid_height: 1 }', [(2, 3, 9, 6)])
    assert one.top_shapes([(2, 3, 9, 6)]) == [(2, 3, 1, 1)]


def test_shape_inference_does_not_leak_fake_tensors():
    # top_shapes runs forward under fake tensors; nothing it computes may be reused for real runs.
    for text in ('type: "SPP" spp_param { pyramid_height: 3 pool: AVE }',
                 'type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 }'):
        layer = make_layer(text, [(2, 3, 9, 6)])
        layer.top_shapes([(2, 3, 9, 6)])
        assert type(layer(torch.randn(2, 3, 9, 6))) is torch.Tensor


def test_spp_matches_reference():
    torch.manual_seed(5)
    x = torch.randn(2, 2, 9, 7, dtype=torch.float64)
    for method in ("MAX", "AVE"):
        layer = make_layer(f'type: "SPP" spp_param {{ pyramid_height: 3 pool: {method} }}', [x.shape]).double()
        parts = [reference_pool(x.numpy(), spp_level_geometry(i, 9, 7), method.lower())[0].reshape(2, -1)
                 for i in range(3)]
        np.testing.assert_allclose(layer(x).numpy(), np.concatenate(parts, axis=1), rtol=1e-12)


def test_spp_rejects_pad_not_below_kernel():
    # 5 rows in 4 bins: kernel 2, remainder 3, pad 2 -> Caffe's pooling check pad < kernel fails.
    with pytest.raises(NetError, match="pad"):
        make_layer('type: "SPP" spp_param { pyramid_height: 3 }', [(1, 1, 5, 5)])


# -- convolution ------------------------------------------------------------------------------
def test_conv_weight_shapes_and_default_fillers():
    conv = make_layer('type: "Convolution" convolution_param { num_output: 6 kernel_h: 3 kernel_w: 1 group: 2 }',
                      [(1, 4, 8, 8)])
    assert conv.weight.shape == (6, 2, 3, 1) and conv.bias.shape == (6,)
    assert torch.count_nonzero(conv.weight) == 0  # FillerParameter defaults to constant 0
    deconv = make_layer('type: "Deconvolution" convolution_param { num_output: 6 kernel_size: 4 group: 2 '
                        'bias_term: false }', [(1, 4, 8, 8)])
    assert deconv.weight.shape == (4, 3, 4, 4) and len(deconv.blobs) == 1
    assert deconv.blob_names[:1] == ("weight",)


@pytest.mark.parametrize("text, shape, want", [
    ("kernel_size: 3", (1, 2, 9, 9), (1, 5, 7, 7)),
    ("kernel_size: 3 stride: 2 pad: 1", (1, 2, 10, 11), (1, 5, 5, 6)),
    ("kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (1, 2, 9, 7), (1, 5, 5, 7)),
    ("kernel_size: 3 dilation: 2 pad: 2", (1, 2, 9, 9), (1, 5, 9, 9)),
    ("kernel_size: 3 kernel_size: 2 stride: 1 stride: 2", (1, 2, 9, 9), (1, 5, 7, 4)),
    ("kernel_size: 3", (1, 2, 9), (1, 5, 7)),                     # 1-D
    ("kernel_size: 3 pad: 1", (1, 2, 4, 5, 6), (1, 5, 4, 5, 6)),  # 3-D
    ("kernel_size: 3 axis: 2", (2, 3, 2, 9, 9), (2, 3, 5, 7, 7)),  # leading axes act as batch
])
def test_conv_output_shapes(text, shape, want):
    layer = make_layer(f'type: "Convolution" convolution_param {{ num_output: 5 {text} }}', [shape])
    assert layer.top_shapes([shape]) == [want]


def test_conv_matches_torch_for_group_dilation_rect():
    torch.manual_seed(6)
    x = torch.randn(2, 4, 9, 8)
    layer = make_layer('type: "Convolution" convolution_param { num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 '
                       'dilation: 2 stride: 2 pad: 1 weight_filler { type: "gaussian" std: 1 } '
                       'bias_filler { type: "gaussian" std: 1 } }', [x.shape])
    want = F.conv2d(x, layer.weight, layer.bias, stride=2, padding=1, dilation=2, groups=2)
    torch.testing.assert_close(layer(x), want)


def test_conv_axis2_and_multiple_bottoms():
    torch.manual_seed(7)
    x = torch.randn(2, 3, 2, 6, 6)
    layer = make_layer('type: "Convolution" bottom: "a" bottom: "b" top: "c" top: "d" convolution_param { '
                       'num_output: 4 kernel_size: 3 axis: 2 weight_filler { type: "xavier" } }', [x.shape, x.shape])
    c, d = layer(x, 2 * x)
    want = F.conv2d(x.reshape(6, 2, 6, 6), layer.weight, layer.bias).reshape(2, 3, 4, 4, 4)
    torch.testing.assert_close(c, want)
    torch.testing.assert_close(d, 2 * want)


def test_deconv_output_size_and_values():
    torch.manual_seed(8)
    x = torch.randn(2, 4, 5, 6)
    layer = make_layer('type: "Deconvolution" convolution_param { num_output: 3 kernel_size: 4 stride: 2 pad: 1 '
                       'dilation: 2 weight_filler { type: "gaussian" std: 1 } }', [x.shape])
    y = layer(x)
    # stride*(in-1) + dilation*(k-1)+1 - 2*pad
    assert y.shape == (2, 3, 2 * 4 + 7 - 2, 2 * 5 + 7 - 2)
    torch.testing.assert_close(y, F.conv_transpose2d(x, layer.weight, layer.bias, stride=2, padding=1, dilation=2))


def test_im2col_layout():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    layer = make_layer('type: "Im2col" convolution_param { kernel_size: 2 stride: 1 pad: 1 }', [x.shape])
    y = layer(x)
    assert y.shape == (2, 3 * 4, 5, 6)
    # Channel (c, i, j) of the column buffer at output (oh, ow) is x[c, oh*s-p+i, ow*s-p+j].
    c, i, j, oh, ow = 2, 1, 0, 3, 4
    assert y[1, c * 4 + i * 2 + j, oh, ow] == x[1, c, oh - 1 + i, ow - 1 + j]


@pytest.mark.parametrize("text, shape, match", [
    ("num_output: 4", (1, 2, 5, 5), "no kernel size"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5), "both"),
    ("num_output: 4 kernel_size: 3 kernel_size: 3", (1, 2, 5, 5, 5), "3 spatial axes"),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), "group"),
    ("num_output: 4 kernel_size: 3 group: 3", (1, 4, 5, 5), "group"),
    ("kernel_size: 3", (1, 2, 5, 5), "num_output"),
    ("num_output: 4 kernel_size: 7", (1, 2, 5, 5), "empty output"),
    ("num_output: 4 kernel_size: 3 stride: 0", (1, 2, 5, 5), "stride"),
    ("num_output: 4 kernel_h: 3 kernel_w: 3", (1, 2, 5), "2-D"),
    ("num_output: 4 kernel_size: 1", (1, 2, 3, 3, 3, 3), "not supported"),
])
def test_conv_errors_name_layer(text, shape, match):
    with pytest.raises(NetError, match=match) as err:
        make_layer(f'name: "c1" type: "Convolution" convolution_param {{ {text} }}', [shape])
    assert "'c1'" in str(err.value)


@pytest.mark.parametrize("text, match", [
    ("pool: MAX", "kernel_size"),
    ("pool: MAX kernel_size: 3 kernel_h: 3 kernel_w: 3", "kernel_size"),
    ("pool: MAX kernel_h: 3", "kernel_size"),
    ("pool: MAX global_pooling: true kernel_size: 2", "global"),
    ("pool: MAX global_pooling: true stride: 2", "global"),
    ("pool: MAX kernel_size: 3 pad: 3", "pad"),
    ("pool: MAX kernel_size: 3 pad_h: 1", "pad_h"),
    ("pool: MAX kernel_size: 3 stride: 0", "stride"),
])
def test_pooling_errors_name_layer(text, match):
    with pytest.raises(NetError, match=match) as err:
        make_layer(f'name: "p1" type: "Pooling" pooling_param {{ {text} }}', [(1, 1, 6, 6)])
    assert "'p1'" in str(err.value)


def test_pooling_errors_shape_and_mask_top():
    with pytest.raises(NetError, match="4-axis"):
        make_layer('type: "Pooling" pooling_param { kernel_size: 2 }', [(1, 6, 6)])
    with pytest.raises(NetError, match="second"):
        make_layer('type: "Pooling" top: "a" top: "b" pooling_param { pool: AVE kernel_size: 2 }', [(1, 1, 6, 6)])


# -- gradients --------------------------------------------------------------------------------
def _distinct(shape, seed):
    """Inputs with well-separated values so MAX pooling has no near-ties for finite differences."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return (torch.randperm(n, generator=g).double() / n + 0.01).view(shape)


@pytest.mark.parametrize("text, shape", [
    ("num_output: 4 kernel_size: 3 stride: 2 pad: 1 weight_filler { type: 'gaussian' std: 0.5 } "
     "bias_filler { type: 'gaussian' std: 0.5 }", (1, 2, 5, 4)),
    ("num_output: 4 group: 2 kernel_h: 3 kernel_w: 2 dilation: 2 weight_filler { type: 'gaussian' std: 0.5 }",
     (1, 4, 7, 6)),
    ("num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: 'gaussian' std: 0.5 }", (1, 2, 5)),
    ("num_output: 2 kernel_size: 2 weight_filler { type: 'gaussian' std: 0.5 }", (1, 2, 3, 3, 4)),
])
def test_conv_gradcheck(text, shape):
    torch.manual_seed(9)
    layer = make_layer(f'type: "Convolution" convolution_param {{ {text} }}', [shape])
    assert gradcheck_layer(layer, [torch.randn(shape)])


def test_deconv_gradcheck():
    torch.manual_seed(10)
    layer = make_layer('type: "Deconvolution" convolution_param { num_output: 4 group: 2 kernel_size: 3 stride: 2 '
                       'pad: 1 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 1 } }',
                       [(1, 4, 3, 4)])
    assert gradcheck_layer(layer, [torch.randn(1, 4, 3, 4)])


def test_im2col_gradcheck():
    layer = make_layer('type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 }', [(1, 2, 5, 4)])
    assert gradcheck_layer(layer, [torch.randn(1, 2, 5, 4)])


@pytest.mark.parametrize("param", [
    "pool: MAX kernel_size: 3 stride: 2",            # ceil overhang, fast path
    "pool: MAX kernel_size: 3 stride: 2 pad: 2",     # pad > kernel/2: exact path
    "pool: AVE kernel_size: 3 stride: 2 pad: 1",
    "pool: AVE kernel_size: 3 stride: 2 pad: 2",
    "pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 2 round_mode: FLOOR",
    "pool: STOCHASTIC kernel_size: 2 stride: 2",     # TEST-phase weighted average
    "pool: MAX global_pooling: true",
])
def test_pooling_gradcheck(param):
    layer = make_layer(f'type: "Pooling" pooling_param {{ {param} }}', [(1, 2, 7, 6)])
    assert gradcheck_layer(layer, [_distinct((1, 2, 7, 6), 11)])


def test_spp_gradcheck():
    for method in ("MAX", "AVE"):
        layer = make_layer(f'type: "SPP" spp_param {{ pyramid_height: 3 pool: {method} }}', [(1, 2, 9, 7)])
        assert gradcheck_layer(layer, [_distinct((1, 2, 9, 7), 12)])


# -- golden parity (through the Net, like tests/test_golden.py) -------------------------------
VISION_CASES = ["layers/" + c for c in sorted(os.listdir(os.path.join(GOLDEN_ROOT, "layers")))
                if c.split("_")[0] in ("conv", "deconv", "pool", "spp")]
# Whole nets made mostly of these layers (with LRN, BatchNorm, Scale, Softmax from norm.py).
NET_CASES = ["nets/allcnn_c_deploy", "nets/cifar10_full_deploy", "nets/inception_block", "nets/resnet_block"]


@pytest.mark.parametrize("case", VISION_CASES + NET_CASES)
def test_golden_parity(case):
    golden_case(os.path.join(GOLDEN_ROOT, case))


def test_golden_cases_present():
    assert len(VISION_CASES) == 16
    assert all(os.path.isdir(os.path.join(GOLDEN_ROOT, c)) for c in NET_CASES)
