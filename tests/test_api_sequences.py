"""Fuzz round 14: sequences of pycaffe API calls on small valid nets and solvers.

The generator (tests/api_sequence_case.py) runs seeded random sequences of forward/backward
forms, blob and parameter writes, reshapes, weight files, sharing, module calls and solver
steps, and checks invariants after each call; below it runs a few fixed seeds, and the
minimized repros of what it found are tests of their own.
"""
import random

import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from api_sequence_case import NETS, Failure, _feed, run_sequence
from pycaffe_alt.errors import NetError


def _net(tmp_path, kind: str) -> caffe.Net:
    text, phase = NETS[kind]
    path = tmp_path / f"{kind}.prototxt"
    path.write_text(text)
    net = caffe.Net(str(path), phase)
    _feed(net, random.Random(0), kind)
    return net


SEEDS = range(20)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences(tmp_path, monkeypatch, seed):
    monkeypatch.chdir(tmp_path)
    try:
        run_sequence(seed, str(tmp_path), length=20)
    except Failure as f:
        pytest.fail(str(f))


# -- minimized repros ---------------------------------------------------------------------------

def test_a_second_backward_keeps_the_dropout_masks_of_the_forward(tmp_path):
    # Caffe's DropoutLayer::Backward reads the mask its Forward stored: backward twice gives the
    # same diffs and leaves the blobs' data alone (a replay drew new masks).
    net = _net(tmp_path, "drop")
    net.forward()
    data = {n: b.data.copy() for n, b in net.blobs.items()}
    net.backward()
    first = {n: b.diff.copy() for n, b in net.blobs.items()}
    w1 = net.params["ip1"][0].diff.copy()
    net.backward()
    for name, blob in net.blobs.items():
        np.testing.assert_array_equal(blob.diff, first[name], err_msg=name)
        np.testing.assert_array_equal(blob.data, data[name], err_msg=name)
    np.testing.assert_allclose(net.params["ip1"][0].diff, 2 * w1, rtol=1e-6)


_CONV_HEAD = """layer { name: "x" type: "Input" top: "x" top: "t"
  input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "c" type: "Convolution" bottom: "x" top: "c"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
"""
_IP_LOSS = """layer { name: "ip" type: "InnerProduct" bottom: "p" top: "y"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "t" top: "l" }
"""
SECOND_BACKWARD = {
    # Stochastic pooling samples its windows in TRAIN: the graph of the pass is kept.
    "stochastic pooling": 'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n'
                          'layer { name: "p" type: "Pooling" bottom: "c" top: "p" '
                          'pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 } }\n',
    # Layers that give the same values again: the graph is freed and recorded again.
    "deterministic layers": 'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n'
                            'layer { name: "p" type: "Pooling" bottom: "c" top: "p" '
                            'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n',
}


@pytest.mark.parametrize("case", sorted(SECOND_BACKWARD))
def test_a_second_backward_repeats_the_first(tmp_path, case):
    path = tmp_path / "net.prototxt"
    path.write_text(_CONV_HEAD + SECOND_BACKWARD[case] + _IP_LOSS)
    net = caffe.Net(str(path), caffe.TRAIN)
    rng = np.random.RandomState(3)
    net.blobs["x"].data[...] = rng.rand(4, 2, 6, 6)
    net.blobs["t"].data[...] = [0, 1, 2, 1]
    net.forward()
    net.backward()
    first = {n: b.diff.copy() for n, b in net.blobs.items()}
    w = net.params["c"][0].diff.copy()
    net.backward()
    for name, blob in net.blobs.items():
        np.testing.assert_allclose(blob.diff, first[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(net.params["c"][0].diff, 2 * w, rtol=1e-5)


def test_a_second_backward_does_not_update_batchnorm_statistics(tmp_path):
    # Only BatchNorm's Forward moves its running averages; Backward leaves the blobs as they are.
    net = _net(tmp_path, "bn")
    net.forward()
    stats = [b.data.copy() for b in net.params["bn1"]]
    conv1 = net.blobs["conv1"].data.copy()
    net.backward()
    net.backward()
    for before, blob in zip(stats, net.params["bn1"]):
        np.testing.assert_array_equal(blob.data, before)
    np.testing.assert_array_equal(net.blobs["conv1"].data, conv1)


def test_a_backward_from_one_loss_past_a_slice_whose_other_top_gets_no_gradient(tmp_path):
    # split: cat -> Slice -> s1 (loss1), s2 (loss2). A backward from loss1 reaches s2 through
    # no layer: its diff stays what it was (zeros), as Caffe's BackwardFromTo leaves it (this
    # raised AttributeError: the gradient hook of s2 got None).
    net = _net(tmp_path, "split")
    net.forward()
    diffs = net.backward(start="loss1", diffs=["s2", "ipb", "conv1"])
    assert not diffs["s2"].any() and not diffs["ipb"].any()
    assert diffs["conv1"].any()
    net.backward(start="loss1", end="conv1")


def test_a_refused_backward_leaves_held_diff_arrays_the_blobs_diffs(tmp_path):
    # A torch backward on the module call's outputs freed the graph, so net.backward() refuses;
    # the diff array the program holds must still be what net.blobs[...].diff reads (the
    # refused call had dropped the blob's diff: a fresh read gave zeros).
    net = _net(tmp_path, "split")
    net.forward()
    net.backward()
    held = net.blobs["ipa"].diff
    before = held.copy()
    assert before.any()
    out = net(**{n: torch.from_numpy(net.blobs[n].data.copy()) for n in net.inputs})
    net.loss(out).backward()
    with pytest.raises(NetError, match="freed"):
        net.backward()
    np.testing.assert_array_equal(net.blobs["ipa"].diff, before)
    np.testing.assert_array_equal(held, before)


def test_a_backward_that_replays_a_layer_with_a_misshapen_parameter_names_the_layer(tmp_path):
    # Net surgery gave ip1's weight another shape; a backward with no forward before it runs
    # the layers to record their graph and must report the layer as a pass does (it raised
    # torch's RuntimeError "mat1 and mat2 shapes cannot be multiplied").
    net = _net(tmp_path, "py")
    net.params["ip1"][0].reshape(2, 4)
    with pytest.raises(NetError, match="ip1") as forward_error:
        net.forward()
    with pytest.raises(NetError, match="ip1") as backward_error:
        net.backward()
    assert "failed on bottoms of shapes" in str(backward_error.value)
    assert "Traceback" not in str(forward_error.value) + str(backward_error.value)


def test_a_parameter_reshaped_wrong_and_back_trains_again(tmp_path):
    # The refused pass on the wrong shape must not keep its graph alive: the weight's gradient
    # accumulator would keep the wrong shape, and the next backward failed in torch.
    net = _net(tmp_path, "deploy")
    blob = net.params["conv1"][0]
    shape, values = blob.shape, blob.data.copy()
    blob.reshape(3, 2, 3, 4)
    with pytest.raises(NetError, match="pool1|conv1"):
        net.forward()
    blob.reshape(*shape)
    blob.data[...] = values
    net.forward()
    net.backward(prob=np.arange(4, dtype=np.float32).reshape(1, 4))
    assert net.params["conv1"][0].diff.any()
