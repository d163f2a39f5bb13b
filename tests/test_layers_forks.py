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
