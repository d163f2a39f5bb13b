"""tools/time: per-layer forward/backward timing like `caffe time`, and the soundness of its
layer-by-layer backward (it must compute the same gradients as the net's own backward)."""
import io
import os
import re

import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError
from pycaffe_alt.log import setup_logging
from pycaffe_alt.tools import time_net

HERE = os.path.dirname(os.path.abspath(__file__))
LENET = os.path.join(HERE, "fixtures", "golden", "nets", "lenet_loss", "net.prototxt")
SOLVER_CASE = os.path.join(HERE, "fixtures", "golden", "solvers", "sgd_fixed")


def test_layer_by_layer_backward_equals_the_nets_backward():
    net = caffe.Net(LENET, caffe.TRAIN)
    timer = time_net.LayerTimer(net)
    inputs = timer.feed_inputs(torch.Generator().manual_seed(3))
    grads = {}
    timer.backward(timer.forward(inputs), param_grads=grads)
    for name, t in inputs.items():
        net.blobs[name].data[...] = t.numpy()
    net.forward()
    net.backward()
    checked = 0
    for layer, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            param = net.layer_modules[layer].blobs[i]
            np.testing.assert_allclose(grads[param].numpy(), blob.diff, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{layer}[{i}]")
            assert np.abs(blob.diff).max() > 0
            checked += 1
    assert checked == 8


def test_caffe_time_report_lines():
    net = caffe.Net(LENET, caffe.TRAIN)
    stream = io.StringIO()
    setup_logging(stream)
    try:
        result = time_net.time_net(net, 2)
    finally:
        setup_logging()
    text = stream.getvalue()
    names = [s.name for s in result.layers]
    assert names == ["data", "label", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"]
    for name in names:
        assert re.search(rf"\] +{name}\tforward: [0-9.e+-]+ ms\.$", text, re.M), name
        assert re.search(rf"\] +{name}\tbackward: [0-9.e+-]+ ms\.$", text, re.M), name
    for head in ("Average Forward pass: ", "Average Backward pass: ", "Average Forward-Backward: ",
                 "Total Time: "):
        assert re.search(re.escape(head) + r"[0-9.e+-]+ ms\.$", text, re.M), head
    assert "Iteration: 2 forward-backward time:" in text
    by = {s.name: s for s in result.layers}
    assert by["conv1"].forward_ms > 0 and by["conv1"].backward_ms > 0
    assert by["data"].backward_ms == 0 and by["label"].backward_ms == 0  # no gradient to compute
    # per-layer times are parts of the pass times
    assert sum(s.forward_ms for s in result.layers) <= result.forward_ms + 1e-6
    assert sum(s.backward_ms for s in result.layers) <= result.backward_ms + 1e-6
    assert result.total_ms >= sum(result.iteration_ms) - 1e-6


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_cli_on_a_data_layer_net(phase, monkeypatch):
    monkeypatch.chdir(SOLVER_CASE)  # the net's LMDB paths are relative to the case folder
    assert time_net.main(["--model", "net.prototxt", "--iterations", "1", "--phase", phase,
                          "--weights", "init.caffemodel"]) == 0


def test_bad_iterations():
    net = caffe.Net(LENET, caffe.TRAIN)
    with pytest.raises(CaffeError, match="at least 1"):
        time_net.time_net(net, 0)
