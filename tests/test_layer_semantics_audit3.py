"""Third audit of layer semantics against Caffe's C++ (BVLC master and the SSD fork, which agree
on every layer here), for what the first two audits (tests/test_layer_semantics_audit.py and
tests/test_layer_semantics_audit2.py) do not cover.

Found and fixed:
- DummyData's constant tops. DummyDataLayer::LayerSetUp runs Forward once with ``refill_``
  inverted, so a top whose filler is "constant" (the default filler too) is filled at set-up and
  never again; Forward fills only the other tops. What pycaffe writes into such a blob (NetSpec
  nets use ``L.DummyData`` as the input placeholder and assign ``net.blobs['data'].data``) is what
  every later pass reads, an in-place layer on it compounds from pass to pass (as on an Input
  blob), and DummyDataLayer::Reshape does nothing, so a blob the user reshaped keeps its shape.
  We refilled those tops at every forward: the written data was silently replaced by zeros.

Audited and found to agree (kept below as regression cases): LSTMUnit's gates and cont, PReLU on
3-D and 5-D bottoms, Scale/Bias with a second bottom at a negative axis (with Scale's bias blob),
Im2col with rectangular kernel, stride, pad and dilation, Softmax over axis 0, Log/Exp with a
base and scale/shift, Tile at a negative axis, Crop of a 5-D blob with one offset per axis, ELU
with a negative alpha, SoftmaxWithLoss whose labels are all ignored (VALID normalizer max(1, 0)),
EuclideanLoss with propagate_down false on one bottom, and (by reading, not repeated here)
BatchNorm's phase default, LRN/MVN/Pooling/SPP/Convolution set-up checks, PriorBox, Reduction,
ArgMax, Concat/Slice legacy axes, Reshape's 0/-1/axis/num_axes rules and Embed's defaults.

Expected values are float64 numpy transcriptions of the C++ (the harness, one-layer nets built
from prototxt text with the fixtures' tolerances, is the first audit's).
"""
from __future__ import annotations

import numpy as np
import pytest

import pycaffe_alt as caffe
from test_layer_semantics_audit import Case, _r, _sigm, _softmax, check_case, run_net


def _net(tmp_path, text: str, phase: int = caffe.TEST) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), phase)


# -- DummyData: constant tops are filled once, at set-up ------------------------------------------
_PLACEHOLDER = ('layer { name: "d" type: "DummyData" top: "data" top: "noise" dummy_data_param { '
                'shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 0.5 } '
                'data_filler { type: "gaussian" std: 1 } } }\n'
                'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "y" '
                'inner_product_param { num_output: 2 bias_term: false } }\n'
                'layer { name: "s" type: "Silence" bottom: "noise" }\n')


def test_dummydata_constant_top_keeps_what_pycaffe_writes(tmp_path):
    net = _net(tmp_path, _PLACEHOLDER)
    w = _r(1, 2, 3)
    net.params["ip"][0].data[...] = w
    # Filled at set-up (Caffe's LayerSetUp runs Forward once), before any pass.
    np.testing.assert_array_equal(net.blobs["data"].data, np.full((2, 3), 0.5, np.float32))
    x = _r(2, 2, 3).astype(np.float32)
    net.blobs["data"].data[...] = x
    for _ in range(2):  # every later pass reads what was written: Forward never refills it
        y = net.forward()["y"]
        np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(net.blobs["data"].data, x)
    noise1 = net.blobs["noise"].data.copy()
    net.forward()
    assert not np.array_equal(noise1, net.blobs["noise"].data)  # gaussian: drawn at each pass


def test_dummydata_default_filler_top_is_an_input_placeholder(tmp_path):
    # No data_filler: constant 0, the placeholder NetSpec writes (L.DummyData(shape=...)).
    net = _net(tmp_path, 'layer { name: "d" type: "DummyData" top: "data" dummy_data_param { '
                         'shape { dim: 1 dim: 4 } } }\n'
                         'layer { name: "p" type: "Power" bottom: "data" top: "y" '
                         'power_param { scale: 3 } }\n')
    net.blobs["data"].data[...] = [[1, 2, 3, 4]]
    np.testing.assert_array_equal(net.forward()["y"], [[3, 6, 9, 12]])


def test_dummydata_constant_top_written_in_place_compounds(tmp_path):
    # The blob is never refilled, so an in-place layer's output is what the next pass starts
    # from (as with an Input blob): 1 -> 2 -> 4 -> 8.
    net = _net(tmp_path, 'layer { name: "d" type: "DummyData" top: "a" dummy_data_param { '
                         'shape { dim: 2 } data_filler { type: "constant" value: 1 } } }\n'
                         'layer { name: "p" type: "Power" bottom: "a" top: "a" '
                         'power_param { scale: 2 } }\n')
    seen = []
    for _ in range(3):
        net.forward()
        seen.append(float(net.blobs["a"].data[0]))
    assert seen == [2.0, 4.0, 8.0]


def test_dummydata_constant_top_keeps_a_users_reshape(tmp_path):
    # DummyDataLayer::Reshape is empty: net.reshape() leaves the blob's shape (and data) alone,
    # so a NetSpec placeholder can take another batch size, as an Input blob can.
    net = _net(tmp_path, 'layer { name: "d" type: "DummyData" top: "data" dummy_data_param { '
                         'shape { dim: 1 dim: 3 } } }\n'
                         'layer { name: "r" type: "Reduction" bottom: "data" top: "y" '
                         'reduction_param { axis: 1 } }\n')
    net.blobs["data"].reshape(4, 3)
    net.reshape()
    x = _r(3, 4, 3).astype(np.float32)
    net.blobs["data"].data[...] = x
    y = net.forward()["y"]
    assert net.blobs["data"].data.shape == (4, 3)
    np.testing.assert_allclose(y, x.sum(1), rtol=1e-5)


def test_dummydata_constant_top_in_a_training_net_gets_its_diff(tmp_path):
    net = _net(tmp_path, 'force_backward: true\n'
                         'layer { name: "d" type: "DummyData" top: "a" top: "t" dummy_data_param { '
                         'shape { dim: 3 dim: 2 } } }\n'
                         'layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "t" top: "loss" }\n',
               caffe.TRAIN)
    a, t = _r(4, 3, 2).astype(np.float32), _r(5, 3, 2).astype(np.float32)
    for _ in range(2):  # a second pass reads the same written values and gives the same diff
        net.blobs["a"].data[...] = a
        net.blobs["t"].data[...] = t
        net.forward()
        net.backward()
        np.testing.assert_allclose(net.blobs["a"].diff, (a - t) / 3, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(net.blobs["loss"].data), ((a - t) ** 2).sum() / 6, rtol=1e-5)


# -- layers and parameters the earlier audits do not reach ----------------------------------------
def _lstm_unit(v, _):
    """LSTMUnitLayer: gates i, f, o, g in that order along the last axis; c = cont*f*c_prev + i*g."""
    c0, x, cont = v["c0"], v["x"], v["cont"]
    d = c0.shape[2]
    i, f, o = _sigm(x[..., :d]), _sigm(x[..., d:2 * d]), _sigm(x[..., 2 * d:3 * d])
    g = np.tanh(x[..., 3 * d:])
    c = cont[..., None] * f * c0 + i * g
    return {"c": c, "h": o * np.tanh(c)}


def _im2col(x, k, s, p, d):
    """Caffe's im2col buffer: channel-major rows (c, kh, kw), one column per output position."""
    n, c, h, w = x.shape
    oh = (h + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    ow = (w + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    xp = np.zeros((n, c, h + 2 * p[0], w + 2 * p[1]))
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    y = np.zeros((n, c * k[0] * k[1], oh, ow))
    for ci in range(c):
        for a in range(k[0]):
            for b in range(k[1]):
                y[:, (ci * k[0] + a) * k[1] + b] = xp[:, ci, a * d[0]:a * d[0] + s[0] * (oh - 1) + 1:s[0],
                                                      b * d[1]:b * d[1] + s[1] * (ow - 1) + 1:s[1]]
    return y


def _prelu_nd(v, p):
    x, slope = v["x"], p[("n", 0)]
    return {"y": np.where(x > 0, x, slope.reshape((1, -1) + (1,) * (x.ndim - 2)) * x)}


MORE = [
    Case("lstm_unit_cont", 'layer { name: "u" type: "LSTMUnit" bottom: "c0" bottom: "x" bottom: "cont" top: "c" top: "h" }',
         {"c0": _r(301, 1, 3, 2), "x": _r(302, 1, 3, 8), "cont": np.array([[1.0, 0.0, 1.0]])}, {},
         _lstm_unit, grad_inputs=["c0", "x"]),
    Case("prelu_5d", 'layer { name: "n" type: "PReLU" bottom: "x" top: "y" }', {"x": _r(303, 2, 3, 2, 1, 2)},
         {("n", 0): np.array([0.1, -0.3, 0.5])}, _prelu_nd, grad_inputs=["x"]),
    Case("prelu_3d", 'layer { name: "n" type: "PReLU" bottom: "x" top: "y" }', {"x": _r(304, 2, 3, 4)},
         {("n", 0): np.array([0.1, -0.3, 0.5])}, _prelu_nd, grad_inputs=["x"]),
    Case("scale_second_bottom_axis_minus2_bias", 'layer { name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: -2 bias_term: true } }',
         {"x": _r(305, 2, 3, 4), "s": _r(306, 3, 4)}, {("sc", 0): _r(307, 3, 4)},
         lambda v, p: {"y": v["x"] * v["s"] + p[("sc", 0)]}, grad_inputs=["x", "s"]),
    Case("bias_second_bottom_axis_minus1", 'layer { name: "b" type: "Bias" bottom: "x" bottom: "b" top: "y" bias_param { axis: -1 } }',
         {"x": _r(308, 2, 3, 4), "b": _r(309, 4)}, {}, lambda v, _: {"y": v["x"] + v["b"]}, grad_inputs=["x", "b"]),
    Case("im2col_rect_stride_pad_dilation", 'layer { name: "i" type: "Im2col" bottom: "x" top: "y" convolution_param { '
         'kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 dilation: 2 } }',
         {"x": _r(310, 2, 2, 5, 4)}, {}, lambda v, _: {"y": _im2col(v["x"], (2, 3), (2, 1), (1, 2), (2, 2))},
         grad_inputs=["x"]),
    Case("softmax_axis0", 'layer { name: "s" type: "Softmax" bottom: "x" top: "y" softmax_param { axis: 0 } }',
         {"x": _r(311, 3, 2, 2)}, {}, lambda v, _: {"y": _softmax(v["x"], 0)}, grad_inputs=["x"]),
    Case("log_base2_scale_shift", 'layer { name: "l" type: "Log" bottom: "x" top: "y" log_param { base: 2 scale: 0.5 shift: 1 } }',
         {"x": np.abs(_r(312, 2, 3)) + 0.1}, {}, lambda v, _: {"y": np.log2(1 + 0.5 * v["x"])}, grad_inputs=["x"]),
    Case("exp_base_half_scale_shift", 'layer { name: "l" type: "Exp" bottom: "x" top: "y" exp_param { base: 0.5 scale: 2 shift: -1 } }',
         {"x": _r(313, 2, 3)}, {}, lambda v, _: {"y": 0.5 ** (-1 + 2 * v["x"])}, grad_inputs=["x"]),
    Case("tile_axis_minus2", 'layer { name: "t" type: "Tile" bottom: "x" top: "y" tile_param { axis: -2 tiles: 2 } }',
         {"x": _r(314, 2, 3, 2)}, {}, lambda v, _: {"y": np.tile(v["x"], (1, 2, 1))}, grad_inputs=["x"]),
    Case("crop_5d_offset_per_axis", 'layer { name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { axis: 2 offset: 1 offset: 0 offset: 2 } }',
         {"x": _r(315, 2, 2, 3, 3, 4), "r": np.zeros((2, 2, 2, 2, 2))}, {},
         lambda v, _: {"y": v["x"][:, :, 1:3, 0:2, 2:4]}, grad_inputs=["x"]),
    Case("elu_negative_alpha", 'layer { name: "e" type: "ELU" bottom: "x" top: "y" elu_param { alpha: -0.5 } }',
         {"x": _r(316, 2, 5)}, {}, lambda v, _: {"y": np.where(v["x"] > 0, v["x"], -0.5 * (np.exp(v["x"]) - 1))},
         grad_inputs=["x"]),
]


@pytest.mark.parametrize("case", MORE, ids=lambda c: c.name)
def test_more_layers_match_caffe(case: Case):
    assert not check_case(case)


def test_softmax_loss_with_every_label_ignored_is_zero():
    # get_normalizer returns max(1, valid_count): loss 0 and gradient 0, not NaN.
    net = run_net('layer { name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" '
                  'loss_param { ignore_label: 1 } }',
                  {"x": _r(317, 2, 3).astype(np.float32), "label": np.ones(2, np.float32)}, {},
                  {"loss": np.float32(1.0)})
    assert float(net.blobs["loss"].data) == 0.0
    assert not np.any(net.blobs["x"].diff)


def test_euclidean_propagate_down_false_leaves_that_bottom(tmp_path):
    # Without force_backward, propagate_down: false keeps the gradient from bottom 0 (a
    # Parameter blob here) while bottom 1 gets -(a - b) / num.
    net = _net(tmp_path, 'layer { name: "in" type: "Input" top: "b" input_param { shape { dim: 3 dim: 4 } } }\n'
                         'layer { name: "pa" type: "Parameter" top: "a" parameter_param { shape { dim: 3 dim: 4 } } }\n'
                         'layer { name: "pb" type: "Parameter" top: "c" parameter_param { shape { dim: 3 dim: 4 } } }\n'
                         'layer { name: "e" type: "Eltwise" bottom: "b" bottom: "c" top: "bc" }\n'
                         'layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "bc" top: "loss" '
                         'propagate_down: false propagate_down: true }\n', caffe.TRAIN)
    a, b = _r(318, 3, 4).astype(np.float32), _r(319, 3, 4).astype(np.float32)
    net.params["pa"][0].data[...] = a
    net.blobs["b"].data[...] = b
    net.forward()
    net.backward()
    assert not np.any(net.params["pa"][0].diff)
    np.testing.assert_allclose(net.params["pb"][0].diff, -(a - b) / 3, rtol=1e-5, atol=1e-7)
