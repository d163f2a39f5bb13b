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

Expected values are float64 numpy transcriptions of the C++ (the harness, one-layer nets built
from prototxt text with the fixtures' tolerances, is the first audit's).
"""
from __future__ import annotations

import numpy as np
import pytest

import pycaffe_alt as caffe
from test_layer_semantics_audit import Case, _r, check_case, run_net


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
