"""Layers of well-known Caffe forks: SENet's Axpy, the depthwise forks' ConvolutionDepthwise and
ShuffleNet's ShuffleChannel.

Expected values follow the forks' C++ (hujie-frank/SENet axpy_layer.cpp, farmingyard/ShuffleNet
shuffle_channel_layer.cpp), written out here in numpy loops.
"""
import numpy as np
import pytest
import torch

from pycaffe_alt.errors import CaffeError
from layer_check import gradcheck_layer, make_layer

RNG = np.random.RandomState(0)


# -- Axpy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_shape", [(2, 3, 1, 1), (2, 3)])
def test_axpy_forward_and_backward_follow_the_fork(scale_shape):
    a = RNG.randn(*scale_shape).astype(np.float32)
    x = RNG.randn(2, 3, 4, 5).astype(np.float32)
    y = RNG.randn(2, 3, 4, 5).astype(np.float32)
    layer = make_layer('type: "Axpy"', [a.shape, x.shape, y.shape])
    want = y.copy()
    for n in range(2):
        for c in range(3):  # caffe_axpy per (n, c) over the spatial plane
            want[n, c] += a.reshape(2, 3)[n, c] * x[n, c]
    ts = [torch.from_numpy(v).requires_grad_(True) for v in (a, x, y)]
    top = layer(*ts)
    np.testing.assert_allclose(top.detach().numpy(), want, rtol=1e-6, atol=1e-6)
    g = RNG.randn(*top.shape).astype(np.float32)
    top.backward(torch.from_numpy(g))
    # The fork's Backward_cpu: a's diff sums x * top_diff over space, x's is a * top_diff, y's is top_diff.
    np.testing.assert_allclose(ts[0].grad.numpy(), (g * x).sum(axis=(2, 3)).reshape(scale_shape), rtol=1e-5)
    np.testing.assert_allclose(ts[1].grad.numpy(), a.reshape(2, 3, 1, 1) * g, rtol=1e-6)
    np.testing.assert_allclose(ts[2].grad.numpy(), g)
    assert gradcheck_layer(layer, [torch.from_numpy(v) for v in (a, x, y)])


@pytest.mark.parametrize("shapes,match", [
    ([(2, 4, 1, 1), (2, 3, 4, 4), (2, 3, 4, 4)], "bottom 0 .the scale."),
    ([(2, 3, 2, 2), (2, 3, 4, 4), (2, 3, 4, 4)], "bottom 0 .the scale."),
    ([(2, 3, 1, 1), (2, 3, 4, 4), (2, 3, 4, 5)], "bottom 1 has shape"),
])
def test_axpy_shape_mismatch_names_the_layer(shapes, match):
    with pytest.raises(CaffeError, match=match):
        make_layer('type: "Axpy"', shapes)


# -- ConvolutionDepthwise ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ConvolutionDepthwise", "DepthwiseConvolution"])
def test_depthwise_convolution_is_a_convolution_with_a_group_per_channel(kind):
    params = ('convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 '
              'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }')
    dw = make_layer(f'type: "{kind}" {params}', [(2, 6, 7, 7)])
    assert tuple(dw.weight.shape) == (6, 1, 3, 3)
    grouped = make_layer(f'type: "Convolution" {params.replace("num_output: 6", "num_output: 6 group: 6")}',
                         [(2, 6, 7, 7)])
    with torch.no_grad():
        grouped.weight.copy_(dw.weight)
        grouped.bias.copy_(dw.bias)
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(dw(x), grouped(x))
    # Channel multiplier 2 (num_output = 2 C) is a depthwise convolution too.
    assert tuple(make_layer(f'type: "{kind}" {params.replace("num_output: 6", "num_output: 12")}',
                            [(1, 6, 5, 5)]).weight.shape) == (12, 1, 3, 3)


def test_depthwise_convolution_with_num_output_not_a_multiple_of_channels_is_refused():
    with pytest.raises(CaffeError, match="group 6 must divide"):
        make_layer('type: "ConvolutionDepthwise" convolution_param { num_output: 8 kernel_size: 3 }',
                   [(1, 6, 5, 5)])


# -- ShuffleChannel ------------------------------------------------------------------------------
def shuffle_reference(x, group):
    """The fork's Resize_cpu: output channel j * group + i is input channel i * (C / group) + j."""
    out = np.empty_like(x)
    k = x.shape[1] // group
    for i in range(group):
        for j in range(k):
            out[:, j * group + i] = x[:, i * k + j]
    return out


@pytest.mark.parametrize("group,shape", [(3, (2, 12, 3, 4)), (2, (1, 4, 5, 5)), (1, (1, 5, 2, 2)),
                                          (4, (2, 8))])
def test_shuffle_channel_follows_the_fork(group, shape):
    x = RNG.randn(*shape).astype(np.float32)
    layer = make_layer(f'type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}', [shape])
    t = torch.from_numpy(x).requires_grad_(True)
    top = layer(t)
    np.testing.assert_array_equal(top.detach().numpy(), shuffle_reference(x, group))
    g = RNG.randn(*shape).astype(np.float32)
    top.backward(torch.from_numpy(g))
    # Backward is the inverse permutation (the fork's Backward_cpu swaps the grid's sides).
    np.testing.assert_array_equal(shuffle_reference(t.grad.numpy(), group), g)


@pytest.mark.parametrize("group,match", [(0, "at least 1"), (5, "does not divide the 12 channels")])
def test_shuffle_channel_bad_group_is_refused(group, match):
    with pytest.raises(CaffeError, match=match):
        make_layer(f'type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}', [(1, 12, 2, 2)])


SE_SHUFFLE_NET = """name: "se_shuffle"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 5 dim: 5 } } }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "data" top: "dw"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false
                            weight_filler { type: "msra" } } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "dw" top: "sh" shuffle_channel_param { group: 3 } }
layer { name: "squeeze" type: "Pooling" bottom: "sh" top: "sq" pooling_param { pool: AVE global_pooling: true } }
layer { name: "excite" type: "Sigmoid" bottom: "sq" top: "ex" }
layer { name: "axpy" type: "Axpy" bottom: "ex" bottom: "sh" bottom: "data" top: "out" }
"""


def test_fork_layers_in_a_net_run_train_and_round_trip(tmp_path):
    import pycaffe_alt as caffe
    path = tmp_path / "se_shuffle.prototxt"
    path.write_text("force_backward: true\n" + SE_SHUFFLE_NET)
    net = caffe.Net(str(path), caffe.TRAIN)
    x = RNG.randn(2, 6, 5, 5).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["out"].copy()
    w = net.params["dw"][0].data.astype(np.float64)
    dw = np.zeros((2, 6, 5, 5))
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    for c in range(6):
        for i in range(5):
            for j in range(5):
                dw[:, c, i, j] = (padded[:, c, i:i + 3, j:j + 3] * w[c, 0]).sum(axis=(1, 2))
    sh = shuffle_reference(dw, 3)
    ex = 1 / (1 + np.exp(-sh.mean(axis=(2, 3), keepdims=True)))
    np.testing.assert_allclose(out, ex * sh + x, rtol=1e-4, atol=1e-5)
    net.blobs["out"].diff[...] = 1
    net.backward()
    assert np.abs(net.params["dw"][0].diff).sum() > 0 and np.abs(net.blobs["data"].diff).sum() > 0
    weights = str(tmp_path / "se_shuffle.caffemodel")
    net.save(weights)
    again = caffe.Net(str(path), weights, caffe.TEST)
    again.blobs["data"].data[...] = x
    np.testing.assert_array_equal(again.forward()["out"], out)


# -- ROIPooling (py-faster-rcnn) -----------------------------------------------------------------
def c_round(v):
    """C's round(): halves away from zero."""
    return int(np.sign(v) * np.floor(abs(float(v)) + 0.5))


def roi_pool_reference(x, rois, ph_n, pw_n, scale):
    """caffe-fast-rcnn roi_pooling_layer.cpp Forward_cpu, in float32, plus the argmax."""
    n_rois, (n, c, h, w) = rois.shape[0], x.shape
    top = np.zeros((n_rois, c, ph_n, pw_n), np.float32)
    arg = -np.ones((n_rois, c, ph_n, pw_n), np.int64)
    f32 = np.float32
    for r in range(n_rois):
        b = int(rois[r, 0])
        sw, sh, ew, eh = (c_round(f32(rois[r, k]) * f32(scale)) for k in (1, 2, 3, 4))
        rh, rw = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
        bh, bw = f32(rh) / f32(ph_n), f32(rw) / f32(pw_n)
        for ch in range(c):
            for ph in range(ph_n):
                for pw in range(pw_n):
                    hs = min(max(int(np.floor(f32(ph) * bh)) + sh, 0), h)
                    he = min(max(int(np.ceil(f32(ph + 1) * bh)) + sh, 0), h)
                    ws = min(max(int(np.floor(f32(pw) * bw)) + sw, 0), w)
                    we = min(max(int(np.ceil(f32(pw + 1) * bw)) + sw, 0), w)
                    if he <= hs or we <= ws:
                        continue  # empty: 0, argmax -1
                    best = -np.finfo(np.float32).max
                    for hh in range(hs, he):
                        for ww in range(ws, we):
                            if x[b, ch, hh, ww] > best:
                                best, arg[r, ch, ph, pw] = x[b, ch, hh, ww], hh * w + ww
                    top[r, ch, ph, pw] = best
    return top, arg


def roi_pool_backward_reference(x_shape, rois, arg, top_diff, scale):
    """ROIPoolBackward (the .cu): the top diff goes to each argmax, but only from ROIs whose
    rounded box contains the cell (none from a malformed ROI)."""
    diff = np.zeros(x_shape, np.float64)
    w = x_shape[3]
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        sw, sh, ew, eh = (c_round(np.float32(rois[r, k]) * np.float32(scale)) for k in (1, 2, 3, 4))
        for ch, ph, pw in np.ndindex(arg.shape[1:]):
            i = arg[r, ch, ph, pw]
            if i >= 0 and sw <= i % w <= ew and sh <= i // w <= eh:
                diff[b, ch, i // w, i % w] += top_diff[r, ch, ph, pw]
    return diff


ROIS = np.array([[0, 0, 0, 15, 15],       # the whole map at scale 1/2
                 [1, 2.5, 3, 9, 13.9],    # x1 * 0.5 = 1.25, round half cases nearby
                 [0, 5, 5, 5, 5],         # a single cell: most bins empty? no - 1x1 ROI
                 [1, -6, -6, 3, 2],       # partly off the map: clipped bins, some empty
                 [0, 10, 4, 1, 2],        # malformed (x2 < x1): pooled as 1 x 1, no gradient
                 [1, 1, 1, 30, 30],       # beyond the map
                 [0, 3, 3, 3, 12]], np.float32)


@pytest.mark.parametrize("pooled", [(3, 3), (2, 4), (6, 6)])
def test_roi_pooling_follows_the_fork(pooled):
    x = RNG.randn(2, 3, 8, 8).astype(np.float32)
    x[0, 0, :2, :2] = 1.5  # ties: the first in row-major order wins
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: %d pooled_w: %d '
                       'spatial_scale: 0.5 }' % pooled, [x.shape, ROIS.shape])
    want, arg = roi_pool_reference(x, ROIS, pooled[0], pooled[1], 0.5)
    t = torch.from_numpy(x).requires_grad_(True)
    top = layer(t, torch.from_numpy(ROIS))
    assert layer.top_shapes([x.shape, ROIS.shape]) == [tuple(want.shape)]
    np.testing.assert_array_equal(top.detach().numpy(), want)
    g = RNG.randn(*want.shape).astype(np.float32)
    top.backward(torch.from_numpy(g))
    np.testing.assert_allclose(t.grad.numpy(), roi_pool_backward_reference(x.shape, ROIS, arg, g, 0.5),
                               rtol=1e-6, atol=1e-6)


def test_roi_pooling_rounds_halves_away_from_zero_and_takes_rows_of_5():
    x = np.arange(2 * 1 * 6 * 6, dtype=np.float32).reshape(2, 1, 6, 6)
    rois = np.array([[0, 2.5, 0.5, 2.5, 0.5]], np.float32).reshape(1, 5, 1, 1)  # round(2.5) = 3
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 1 pooled_w: 1 }',
                       [x.shape, rois.shape])
    top = layer(torch.from_numpy(x), torch.from_numpy(rois))
    assert top.item() == x[0, 0, 1, 3]  # torch.round would pick (0, 2)
    # Many ROIs in small chunks give the same as one chunk.
    import importlib
    forks = importlib.import_module("pycaffe_alt.layers.forks")
    x = RNG.randn(2, 4, 9, 9).astype(np.float32)
    rois = np.concatenate([ROIS, ROIS[::-1]]).astype(np.float32)
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.5 }',
                       [x.shape, rois.shape])
    whole = layer(torch.from_numpy(x), torch.from_numpy(rois))
    old = forks._ROI_CHUNK_ELEMENTS
    forks._ROI_CHUNK_ELEMENTS = 1
    try:
        chunked = layer(torch.from_numpy(x), torch.from_numpy(rois))
    finally:
        forks._ROI_CHUNK_ELEMENTS = old
    torch.testing.assert_close(whole, chunked, rtol=0, atol=0)


def test_roi_pooling_gradcheck():
    x = torch.from_numpy(RNG.permutation(2 * 2 * 7 * 7).reshape(2, 2, 7, 7) / 10.0)  # no ties
    rois = torch.tensor([[0, 0, 0, 6, 6], [1, 1, 2, 5, 4], [1, 3, 3, 20, 3]], dtype=torch.float64)
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 3 }',
                       [x.shape, rois.shape])
    assert gradcheck_layer(layer, [x, rois], grad_inputs=[True, False], eps=1e-4)


@pytest.mark.parametrize("params,shapes,match", [
    ("pooled_h: 0 pooled_w: 2", [(1, 2, 4, 4), (3, 5)], "pooled size 0 x 2 is empty"),
    ("pooled_h: 2 pooled_w: 2", [(1, 2, 4, 4), (3, 4)], "one row of 5 numbers per ROI"),
    ("pooled_h: 2 pooled_w: 2", [(1, 2, 4), (3, 5)], "4-D .N, C, H, W. feature map"),
])
def test_roi_pooling_bad_setup_is_refused(params, shapes, match):
    with pytest.raises(CaffeError, match=match):
        make_layer(f'type: "ROIPooling" roi_pooling_param {{ {params} }}', shapes)


@pytest.mark.parametrize("row,match", [([2, 0, 0, 1, 1], "batch index 2, outside the 2 images"),
                                       ([-1, 0, 0, 1, 1], "batch index -1"),
                                       ([0, np.nan, 0, 1, 1], "not finite")])
def test_roi_pooling_bad_roi_values_are_refused(row, match):
    rois = np.array([[0, 0, 0, 1, 1], row], np.float32)
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 }',
                       [(2, 1, 4, 4), rois.shape])
    with pytest.raises(CaffeError, match=match):
        layer(torch.zeros(2, 1, 4, 4), torch.from_numpy(rois))


# -- SmoothL1Loss (py-faster-rcnn) ---------------------------------------------------------------
def smooth_l1_reference(b0, b1, sigma, w_in=None, w_out=None):
    """smooth_L1_loss_layer.cu: forward value and the diffs of bottoms 0 and 1 (top diff 1)."""
    s2 = np.float32(sigma) * np.float32(sigma)
    d = (b0 - b1).astype(np.float64)
    if w_in is not None:
        d = w_in * d
    small = np.abs(d) < 1.0 / s2
    err = np.where(small, 0.5 * d * d * s2, np.abs(d) - 0.5 / s2)
    grad = np.where(small, s2 * d, np.sign(d)) / b0.shape[0]
    if w_in is not None:
        err, grad = w_out * err, grad * w_in * w_out
    return err.sum() / b0.shape[0], grad, -grad


@pytest.mark.parametrize("sigma,weighted,shape", [(1.0, False, (4, 8)), (3.0, True, (2, 12, 3, 5)),
                                                  (0.5, True, (3, 4))])
def test_smooth_l1_loss_follows_the_fork(sigma, weighted, shape):
    b0, b1 = (RNG.randn(*shape).astype(np.float32) * 2 for _ in range(2))
    extra = [RNG.randint(0, 2, shape).astype(np.float32), RNG.rand(*shape).astype(np.float32)] \
        if weighted else []
    layer = make_layer(f'type: "SmoothL1Loss" smooth_l1_loss_param {{ sigma: {sigma} }}',
                       [shape] * (2 + len(extra)))
    ts = [torch.from_numpy(v).requires_grad_(True) for v in [b0, b1] + extra]
    loss = layer(*ts)
    want, g0, g1 = smooth_l1_reference(b0, b1, sigma, *extra)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    loss.backward()
    np.testing.assert_allclose(ts[0].grad.numpy(), g0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ts[1].grad.numpy(), g1, rtol=1e-5, atol=1e-7)
    for t in ts[2:]:  # the fork writes no weight gradient
        assert t.grad is None
    assert layer.top_shapes([shape] * (2 + len(extra))) == [()]
    assert gradcheck_layer(layer, [torch.from_numpy(v) for v in [b0, b1] + extra],
                           grad_inputs=[True, True] + [False] * len(extra))


def test_smooth_l1_loss_default_sigma_is_one_and_num_is_the_first_axis():
    b0 = np.array([[0.5, -2.0], [0.0, 3.0]], np.float32).reshape(2, 2, 1, 1)
    layer = make_layer('type: "SmoothL1Loss"', [b0.shape, (2, 2)])
    loss = layer(torch.from_numpy(b0), torch.zeros(2, 2))
    assert loss.item() == pytest.approx((0.125 + 1.5 + 0 + 2.5) / 2)


@pytest.mark.parametrize("shapes,match", [
    ([(2, 4), (2, 4), (2, 4)], "has 3 bottoms"),
    ([(2, 4), (2, 5)], "bottom 1 has shape .2, 5."),
    ([(2, 4), (3, 4)], "different first dimensions"),
    ([(2, 4), (2, 4), (2, 4), (1, 4)], "bottom 3 has shape"),
    ([(2, 4, 1, 1, 1), (2, 4, 1, 1, 1)], "the fork reads at most 4"),
])
def test_smooth_l1_loss_bad_bottoms_are_refused(shapes, match):
    with pytest.raises(CaffeError, match=match):
        make_layer('type: "SmoothL1Loss"', shapes)


FASTER_RCNN_HEAD = """name: "frcnn_head"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "rois" top: "targets" top: "w_in" top: "w_out"
        input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 5 }
                      shape { dim: 2 dim: 8 } shape { dim: 2 dim: 8 } shape { dim: 2 dim: 8 } } }
layer { name: "pool5" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pool5"
        roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.0625 } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "pool5" top: "bbox_pred"
        inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss_bbox" type: "SmoothL1Loss" bottom: "bbox_pred" bottom: "targets"
        bottom: "w_in" bottom: "w_out" top: "loss_bbox" }
"""


def test_faster_rcnn_head_runs_in_a_net(tmp_path):
    import pycaffe_alt as caffe
    path = tmp_path / "head.prototxt"
    path.write_text(FASTER_RCNN_HEAD)
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["data"].data[...] = RNG.randn(1, 3, 8, 8)
    net.blobs["rois"].data[...] = [[0, 0, 0, 127, 127], [0, 16, 16, 64, 100]]
    net.blobs["targets"].data[...] = RNG.randn(2, 8)
    net.blobs["w_in"].data[...] = 1
    net.blobs["w_out"].data[...] = 1
    loss = float(net.forward()["loss_bbox"])
    assert loss > 0 and net.blobs["pool5"].data.shape == (2, 3, 2, 2)
    net.backward()
    assert np.abs(net.blobs["data"].diff).sum() > 0 and np.abs(net.params["bbox_pred"][0].diff).sum() > 0
    assert np.all(net.blobs["rois"].diff == 0)


# -- Interp (DeepLab v2 / PSPNet) ----------------------------------------------------------------
def interp_reference(x, h2, w2, pad_beg=0, pad_end=0):
    """hszhao/PSPNet caffe_cpu_interp2 (not packed) over a crop at (-pad_beg, -pad_beg), and its
    adjoint caffe_cpu_interp2_backward as a matrix (out, in) per plane."""
    n, c, hin, win = x.shape
    h1, w1 = hin + pad_beg + pad_end, win + pad_beg + pad_end
    y0 = x0 = -pad_beg
    out = np.zeros((n, c, h2, w2), np.float32)
    adj = np.zeros((h2 * w2, hin * win))
    if (h1, w1) == (h2, w2):
        for i in range(h2):
            for j in range(w2):
                out[:, :, i, j] = x[:, :, y0 + i, x0 + j]
                adj[i * w2 + j, (y0 + i) * win + x0 + j] += 1
        return out, adj
    f32 = np.float32
    rh = f32(h1 - 1) / f32(h2 - 1) if h2 > 1 else f32(0)
    rw = f32(w1 - 1) / f32(w2 - 1) if w2 > 1 else f32(0)
    for i in range(h2):
        h1r = f32(rh * f32(i))
        hi = int(h1r)
        hp = 1 if hi < h1 - 1 else 0
        l1 = f32(h1r - f32(hi))
        l0 = f32(1) - l1
        for j in range(w2):
            w1r = f32(rw * f32(j))
            wi = int(w1r)
            wp = 1 if wi < w1 - 1 else 0
            m1 = f32(w1r - f32(wi))
            m0 = f32(1) - m1
            p = lambda dy, dx: x[:, :, y0 + hi + dy, x0 + wi + dx]  # noqa: E731
            out[:, :, i, j] = l0 * (m0 * p(0, 0) + m1 * p(0, wp)) + l1 * (m0 * p(hp, 0) + m1 * p(hp, wp))
            base = (y0 + hi) * win + x0 + wi
            for wt, off in ((l0 * m0, 0), (l0 * m1, wp), (l1 * m0, hp * win), (l1 * m1, hp * win + wp)):
                adj[i * w2 + j, base + off] += wt
    return out, adj


@pytest.mark.parametrize("params,size,out", [
    ("zoom_factor: 8", (5, 4), (33, 25)),
    ("shrink_factor: 2", (9, 8), (5, 4)),
    ("shrink_factor: 2 zoom_factor: 3", (9, 8), (13, 10)),
    ("height: 7 width: 1", (4, 6), (7, 1)),
    ("height: 5 width: 6 pad_beg: -1 pad_end: -2", (8, 9), (5, 6)),  # the crop's own size: a copy
    ("zoom_factor: 2 pad_beg: -1 pad_end: 0", (6, 5), (9, 7)),
])
def test_interp_follows_the_fork(params, size, out):
    x = RNG.randn(2, 3, *size).astype(np.float32)
    layer = make_layer(f'type: "Interp" interp_param {{ {params} }}', [x.shape])
    p = layer.param.interp_param
    want, adj = interp_reference(x, out[0], out[1], p.pad_beg, p.pad_end)
    t = torch.from_numpy(x).requires_grad_(True)
    top = layer(t)
    assert tuple(top.shape) == (2, 3) + out and layer.top_shapes([x.shape]) == [(2, 3) + out]
    np.testing.assert_allclose(top.detach().numpy(), want, rtol=1e-6, atol=1e-6)
    g = RNG.randn(*top.shape).astype(np.float32)
    top.backward(torch.from_numpy(g))
    back = (g.reshape(6, -1) @ adj).reshape(x.shape)  # the adjoint accumulation
    np.testing.assert_allclose(t.grad.numpy(), back, rtol=1e-5, atol=1e-5)
    assert gradcheck_layer(layer, [torch.from_numpy(x)])


@pytest.mark.parametrize("params,match", [
    ("pad_beg: 1 zoom_factor: 2", "must be <= 0"),
    ("zoom_factor: 0", "zoom_factor 0 must be at least 1"),
    ("height: 5", "gives no output size"),
    ("", "gives no output size"),
    ("pad_beg: -3 pad_end: -3 zoom_factor: 2", "leaves 0 x 1"),
    ("height: 0 width: 4", "output size 0 x 4 is empty"),
])
def test_interp_bad_parameters_are_refused(params, match):
    with pytest.raises(CaffeError, match=match):
        make_layer(f'type: "Interp" interp_param {{ {params} }}', [(1, 2, 6, 7)])


# -- BN (PSPNet) ---------------------------------------------------------------------------------
def bn_reference(x, slope, bias, mean, var, eps, momentum, batch_stats):
    """hszhao/PSPNet bn_layer.cpp Forward_cpu (float64): output and the new running mean/var."""
    x = x.astype(np.float64)
    if batch_stats:
        m = x.mean(axis=(2, 3)).mean(axis=0)  # spatial mean, then over the batch
        v = ((x - m[None, :, None, None]) ** 2).mean(axis=(2, 3)).mean(axis=0)
        mean = (1 - momentum) * m + momentum * mean
        var_new = (1 - momentum) * v + momentum * var
    else:
        m, v, var_new = mean, var, var
    y = (x - m[None, :, None, None]) * (v + eps)[None, :, None, None] ** -0.5
    return y * slope[None, :, None, None] + bias[None, :, None, None], mean, var_new


@pytest.mark.parametrize("frozen,phase", [(False, "TRAIN"), (False, "TEST"), (True, "TRAIN")])
def test_bn_follows_the_fork(frozen, phase):
    from pycaffe_alt.layers import TEST, TRAIN
    x = (RNG.randn(3, 4, 5, 2) * 2 + 1).astype(np.float32)
    text = ('type: "BN" param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 1 } '
            'bn_param { slope_filler { type: "constant" value: 1 } momentum: 0.95 eps: 1e-4 '
            f'frozen: {str(frozen).lower()} }}')
    layer = make_layer(text, [x.shape], phase=TRAIN if phase == "TRAIN" else TEST)
    assert [tuple(b.shape) for b in layer.blobs] == [(1, 4, 1, 1)] * 4
    np.testing.assert_array_equal(layer.variance.detach().numpy().ravel(), np.full(4, 1.0 if frozen else 0.0))
    # lr_mult / decay_mult 0 on the statistics, and on slope and bias when frozen.
    specs = [(s.lr_mult, s.decay_mult) for s in layer.param.param]
    assert specs[2:] == [(0, 0), (0, 0)] and (specs[:2] == [(0, 0)] * 2) == frozen
    slope, bias = RNG.rand(4) + 0.5, RNG.randn(4)
    mean, var = RNG.randn(4), RNG.rand(4) + 0.5
    with torch.no_grad():
        for blob, v in zip(layer.blobs, (slope, bias, mean, var)):
            blob.copy_(torch.from_numpy(v).view(1, 4, 1, 1))
    batch_stats = phase == "TRAIN" and not frozen
    want, new_mean, new_var = bn_reference(x, slope, bias, mean, var, 1e-4, 0.95, batch_stats)
    t = torch.from_numpy(x).requires_grad_(True)
    top = layer(t)
    np.testing.assert_allclose(top.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.mean.detach().numpy().ravel(), new_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.variance.detach().numpy().ravel(), new_var, rtol=1e-5, atol=1e-6)
    if frozen:  # the fork's frozen Backward_cpu: top_diff * slope / sqrt(var + eps), no blob diffs
        g = RNG.randn(*x.shape).astype(np.float32)
        top.backward(torch.from_numpy(g))
        want_dx = g * (slope / np.sqrt(var + 1e-4))[None, :, None, None]
        np.testing.assert_allclose(t.grad.numpy(), want_dx, rtol=1e-5, atol=1e-6)
        assert layer.slope.grad is None and layer.bias.grad is None
    elif phase == "TRAIN":
        # The fork's Backward_cpu is the exact gradient of the batch-statistics forward.
        assert gradcheck_layer(layer, [torch.from_numpy(x[:2, :, :3])], eps=1e-6)


def test_bn_default_slope_is_zero_like_caffes_constant_filler():
    layer = make_layer('type: "BN"', [(2, 3, 4, 4)])
    assert float(layer.slope.detach().abs().sum()) == 0 and len(layer.param.param) == 4


@pytest.mark.parametrize("text,shape,match", [
    ('bn_param { bn_mode: INFERENCE }', (1, 3, 4), "SegNet's BN normalises \\(N, C, H, W\\)"),
    ('bn_param { frozen: true }', (1, 3, 4, 4, 2), "BN normalises"),
])
def test_bn_bad_input_is_refused(text, shape, match):
    with pytest.raises(CaffeError, match=match):
        make_layer(f'type: "BN" {text}', [shape])


def test_segnet_bn_learn_and_inference_modes():
    """caffe-segnet bn_layer.cpp: LEARN normalises with the batch's statistics (variance as
    E[x^2] - E[x]^2, eps 1e-9) in every phase, tops 2 and 3 being that mean and variance;
    INFERENCE is scale * x + shift. Chosen by SegNet's bn_param fields."""
    from pycaffe_alt.layers import TEST
    from pycaffe_alt.layers.forks import SegNetBN

    x = torch.from_numpy(np.random.RandomState(3).randn(2, 3, 4, 5).astype(np.float32))
    learn = make_layer('type: "BN" top: "y" top: "m" top: "v" bn_param { scale_filler { type: '
                       '"constant" value: 2 } shift_filler { type: "constant" value: 0.5 } }',
                       [x.shape], phase=TEST)
    assert isinstance(learn, SegNetBN) and [tuple(b.shape) for b in learn.blobs] == [(1, 3, 1, 1)] * 2
    y, m, v = learn(x)
    xn = x.numpy()
    mean = xn.mean((0, 2, 3), keepdims=True)
    var = (xn * xn).mean((0, 2, 3), keepdims=True) - mean * mean
    np.testing.assert_allclose(y.detach().numpy(), (xn - mean) / np.sqrt(var + 1e-9) * 2 + 0.5,
                               atol=2e-6)
    np.testing.assert_allclose(m.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(v.numpy(), var, atol=1e-6)
    assert gradcheck_layer(learn, [x.double()], eps=1e-6)
    infer = make_layer('type: "BN" bn_param { bn_mode: INFERENCE scale_filler { type: "constant" '
                       'value: 3 } shift_filler { type: "constant" value: -1 } }', [x.shape])
    np.testing.assert_allclose(infer(x).detach().numpy(), 3 * xn - 1, rtol=1e-6)
    with pytest.raises(CaffeError, match="PSPNet's BN has one"):
        make_layer('type: "BN" top: "y" top: "m" bn_param { frozen: true }', [x.shape])


# -- Upsample (SegNet) ---------------------------------------------------------------------------
def upsample_reference(x, mask, out_h, out_w):
    """caffe-segnet upsample_layer.cpp Forward_cpu (scatter, in order) and Backward_cpu (gather)."""
    n, c = x.shape[:2]
    top = np.zeros((n, c, out_h * out_w), np.float32)
    for i in range(n):
        for j in range(c):
            for k, idx in enumerate(mask[i, j].ravel()):
                top[i, j, int(idx)] = x[i, j].ravel()[k]
    return top.reshape(n, c, out_h, out_w)


@pytest.mark.parametrize("params,size,out", [("scale: 2", (3, 4), (6, 8)),
                                             ("upsample_h: 5 upsample_w: 7", (3, 4), (5, 7)),
                                             ("scale: 2 pad_out_h: true", (3, 4), (5, 8)),
                                             ("scale_h: 3 scale_w: 2", (2, 2), (6, 4))])
def test_upsample_follows_the_fork(params, size, out):
    x = RNG.randn(2, 3, *size).astype(np.float32)
    mask = np.stack([RNG.choice(out[0] * out[1], size[0] * size[1], replace=False)
                     for _ in range(6)]).reshape(x.shape).astype(np.float32)
    layer = make_layer(f'type: "Upsample" upsample_param {{ {params} }}', [x.shape, x.shape])
    t = torch.from_numpy(x).requires_grad_(True)
    top = layer(t, torch.from_numpy(mask))
    assert layer.top_shapes([x.shape, x.shape]) == [(2, 3) + out]
    np.testing.assert_array_equal(top.detach().numpy(), upsample_reference(x, mask, *out))
    g = RNG.randn(*top.shape).astype(np.float32)
    top.backward(torch.from_numpy(g))
    want = np.take_along_axis(g.reshape(2, 3, -1), mask.reshape(2, 3, -1).astype(np.int64), 2)
    np.testing.assert_array_equal(t.grad.numpy(), want.reshape(x.shape))


def test_upsample_repeated_indices_keep_the_last_and_each_gets_the_diff():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    mask = torch.tensor([[[[5.0, 5.0], [0.0, 5.0]]]])
    layer = make_layer('type: "Upsample" upsample_param { scale: 2 }', [x.shape, x.shape])
    top = layer(x, mask)
    assert top.flatten()[5].item() == 4.0 and top.flatten()[0].item() == 3.0 and top.sum().item() == 7.0
    top.backward(torch.arange(16.0).view(1, 1, 4, 4))
    assert x.grad.flatten().tolist() == [5.0, 5.0, 0.0, 5.0]


def test_segnet_unpooling_inverts_max_pooling_in_a_net(tmp_path):
    import pycaffe_alt as caffe
    path = tmp_path / "segnet.prototxt"
    path.write_text("""force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 6 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "pool_mask"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "up" type: "Upsample" bottom: "pool" bottom: "pool_mask" top: "up"
        upsample_param { scale: 2 } }
""")
    net = caffe.Net(str(path), caffe.TEST)
    x = RNG.randn(1, 2, 6, 6).astype(np.float32)
    net.blobs["data"].data[...] = x
    up = net.forward()["up"]
    blocks = x.reshape(1, 2, 3, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(1, 2, 3, 3, 4)
    keep = blocks == blocks.max(axis=-1, keepdims=True)
    want = np.where(keep, blocks, 0).reshape(1, 2, 3, 3, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)
    np.testing.assert_array_equal(up, want)


@pytest.mark.parametrize("params,shapes,match", [
    ("scale: 2", [(1, 2, 3, 3), (1, 2, 3, 4)], "bottoms have shapes"),
    ("scale: 2", [(1, 2, 3), (1, 2, 3)], "same 4-D"),
    ("scale: 1", [(1, 2, 3, 3)] * 2, "scale 1 x 1 must exceed 1"),
    ("upsample_h: 1 upsample_w: 4", [(1, 2, 3, 3)] * 2, "must exceed 1"),
    ("scale: 3 pad_out_w: true", [(1, 2, 3, 3)] * 2, "need a scale of 2"),
    ("scale: 2 scale_h: 2 scale_w: 2", [(1, 2, 3, 3)] * 2, "mixes its size settings"),
])
def test_upsample_bad_setup_is_refused(params, shapes, match):
    with pytest.raises(CaffeError, match=match):
        make_layer(f'type: "Upsample" upsample_param {{ {params} }}', shapes)


# -- Upsample (YOLOv3 forks: one bottom, nearest) -------------------------------------------------
def test_nearest_upsample_copies_blocks_and_sums_them_back():
    x = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3)
    layer = make_layer('type: "Upsample" upsample_param { scale: 2 }', [x.shape])
    assert layer.top_shapes([x.shape]) == [(2, 3, 4, 6)]
    y = layer(x)
    h, w = np.meshgrid(np.arange(4) // 2, np.arange(6) // 2, indexing="ij")
    np.testing.assert_array_equal(y.numpy(), x.numpy()[:, :, h, w])  # top[h][w] = in[h/s][w/s]
    gradcheck_layer(layer, [x.double()])
    rect = make_layer('type: "Upsample" upsample_param { scale_h: 3 scale_w: 1 }', [x.shape])
    assert tuple(rect(x).shape) == (2, 3, 6, 3)
    for params, match in (("scale: 2 upsample_h: 4 upsample_w: 6", "takes only scale"),
                          ("scale: 0", "at least 1")):
        with pytest.raises(CaffeError, match=match):
            make_layer(f'type: "Upsample" upsample_param {{ {params} }}', [x.shape])


@pytest.mark.parametrize("bad", [36.0, -1.0])
def test_upsample_mask_out_of_range_is_refused(bad):
    layer = make_layer('type: "Upsample" upsample_param { scale: 2 }', [(1, 1, 3, 3)] * 2)
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1, 1] = bad
    with pytest.raises(CaffeError, match="outside the 6 x 6 output"):
        layer(torch.ones(1, 1, 3, 3), mask)


def test_smooth_l1_force_backward_reaches_the_targets(tmp_path):
    # fast_rcnn_layers.hpp: AllowForceBackward is true for every bottom; the targets' diff is
    # the negated predictions' one.
    import pycaffe_alt as caffe

    path = tmp_path / "net.prototxt"
    path.write_text("""force_backward: true
    layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "l" type: "SmoothL1Loss" bottom: "a" bottom: "b" top: "l" }""")
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["a"].data[...] = [[0.2, -3, 1], [0, 0.5, 2]]
    net.blobs["b"].data[...] = 0
    net.forward()
    net.backward()
    assert net.blobs["a"].diff.any()
    np.testing.assert_allclose(net.blobs["b"].diff, -net.blobs["a"].diff)


def test_fork_layers_refuse_non_finite_parameters_and_take_empty_inputs():
    from layer_check import make_layer
    from pycaffe_alt.errors import NetError

    with pytest.raises(NetError, match="spatial_scale nan must be a finite number"):
        make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: nan }',
                   [(1, 3, 4, 4), (1, 5)])
    with pytest.raises(NetError, match="sigma 1e\\+20: its square is not a finite"):
        make_layer('type: "SmoothL1Loss" smooth_l1_loss_param { sigma: 1e20 }', [(2, 3), (2, 3)])
    # The fork only squares sigma: a negative one is the positive one, 0 a plain L1 (no refusal).
    negative = make_layer('type: "SmoothL1Loss" smooth_l1_loss_param { sigma: -1 }', [(2, 3), (2, 3)])
    positive = make_layer('type: "SmoothL1Loss"', [(2, 3), (2, 3)])
    a, b = torch.randn(2, 3) * 3, torch.zeros(2, 3)
    assert torch.equal(negative(a, b), positive(a, b))
    roi = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 }',
                     [(1, 3, 0, 4), (1, 5)])
    assert torch.equal(roi(torch.zeros(1, 3, 0, 4), torch.zeros(1, 5)), torch.zeros(1, 3, 2, 2))


def test_interp_and_upsample_count_their_working_memory():
    # About six tops at once while running: a top that fits memory alone but not six times is
    # refused when the net is built, before Interp builds its index tables.
    from layer_check import make_layer
    from pycaffe_alt.errors import NetError
    from pycaffe_alt.host_memory import physical_memory

    side = int((physical_memory() / 4 / 3) ** 0.5)  # a 1 x 1 x side x side top of memory / 3
    with pytest.raises(NetError, match="with the layer working memory"):
        make_layer(f'type: "Interp" interp_param {{ height: {side} width: {side} }}', [(1, 1, 4, 4)])
    with pytest.raises(NetError, match="with the layer working memory"):
        make_layer(f'type: "Upsample" upsample_param {{ upsample_h: {side} upsample_w: {side} }}',
                   [(1, 1, side // 2 + 1, side // 2 + 1), (1, 1, side // 2 + 1, side // 2 + 1)])
    with pytest.raises(NetError, match="more than"):
        make_layer('type: "Interp" interp_param { height: 2147483647 width: 2147483647 }', [(1, 1, 4, 4)])


def test_interp_size_follows_the_forks_order_of_tests():
    # InterpLayer::Reshape: shrink alone, zoom alone, height and width, shrink and zoom: with
    # all four set, height x width wins (we shrank and zoomed).
    layer = make_layer('type: "Interp" interp_param { shrink_factor: 2 zoom_factor: 3 height: 6 '
                       'width: 7 }', [(1, 2, 9, 9)])
    assert layer.top_shapes([(1, 2, 9, 9)]) == [(1, 2, 6, 7)]
    both = make_layer('type: "Interp" interp_param { shrink_factor: 2 zoom_factor: 3 }',
                      [(1, 2, 9, 9)])
    assert both.top_shapes([(1, 2, 9, 9)]) == [(1, 2, 13, 13)]  # (9-1)/2+1 = 5, 5 + 4*2


def test_bn_layers_deep_copy():
    # BN.__new__ picks SegNet's class by bn_param; copy.deepcopy calls __new__ with no arguments.
    import copy

    from pycaffe_alt.layers.forks import SegNetBN

    pspnet = make_layer('type: "BN" bn_param { frozen: true }', [(1, 3, 4, 4)])
    segnet = make_layer('type: "BN" bn_param { bn_mode: INFERENCE }', [(1, 3, 4, 4)])
    assert type(copy.deepcopy(pspnet)).__name__ == "BN"
    assert isinstance(copy.deepcopy(segnet), SegNetBN)


def test_interp_and_nearest_upsample_follow_a_reshaped_input():
    # Both forks work their output size out again in every Reshape: a net reshaped to another
    # input size resizes the whole new input (DeepLab/PSPNet at a new resolution, YOLOv3 at
    # 608 after 416). Before, the set-up size stayed and only its top-left corner was read.
    import pycaffe_alt as caffe
    from pycaffe_alt.prototxt import parse_text
    from pycaffe_alt.proto import caffe_pb2

    def net(h, w):
        return caffe.Net(parse_text(f'''
            layer {{ name: "data" type: "Input" top: "data"
                    input_param {{ shape {{ dim: 1 dim: 2 dim: {h} dim: {w} }} }} }}
            layer {{ name: "zoom" type: "Interp" bottom: "data" top: "zoom"
                    interp_param {{ zoom_factor: 2 pad_beg: -1 }} }}
            layer {{ name: "up" type: "Upsample" bottom: "zoom" top: "up" upsample_param {{ scale: 2 }} }}
            layer {{ name: "cat" type: "Concat" bottom: "up" bottom: "up" top: "cat" }}''',
            caffe_pb2.NetParameter()), caffe.TEST)

    reshaped = net(7, 7)
    reshaped.blobs["data"].reshape(1, 2, 12, 9)
    reshaped.reshape()
    assert reshaped.blobs["zoom"].data.shape == (1, 2, 21, 15)  # (12-1) + 10 zoomed
    assert reshaped.blobs["cat"].data.shape == (1, 4, 42, 30)
    x = RNG.randn(1, 2, 12, 9).astype(np.float32)
    got = reshaped.forward(data=x)
    want = net(12, 9).forward(data=x)
    np.testing.assert_array_equal(got["cat"], want["cat"])


def test_segnet_unpooling_says_it_keeps_its_size_when_the_input_is_reshaped():
    # The fork keeps upsample_h/w from set-up; a reshaped net failed later, at an Eltwise.
    layer = make_layer('type: "Upsample" upsample_param { scale: 2 }', [(1, 2, 4, 4), (1, 2, 4, 4)])
    assert layer.top_shapes([(3, 2, 4, 4), (3, 2, 4, 4)]) == [(3, 2, 8, 8)]  # batch may change
    with pytest.raises(CaffeError, match="keeps the 8 x 8 output"):
        layer.top_shapes([(1, 2, 6, 6), (1, 2, 6, 6)])
