"""Fuzz round 15: layer callbacks and NCCL of one solver, solver-level call sequences, the
tools' unusual but valid invocations."""
import os

import numpy as np
import pytest

import pycaffe_alt as caffe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = os.path.join(ROOT, "tests", "fixtures", "golden", "nets", "lenet_loss")


def lenet(**kwargs):
    net = caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                    caffe.TRAIN, **kwargs)
    net.blobs["data"].data[...] = np.random.RandomState(0).rand(*net.blobs["data"].data.shape)
    net.blobs["label"].data[...] = np.arange(net.blobs["label"].data.shape[0]) % 10
    return net


def pass_state(net):
    """Every blob's data and diff and every parameter's data and diff after a pass."""
    state = {}
    for name, blob in net.blobs.items():
        state[name], state[name + ".diff"] = blob.data.copy(), blob.diff.copy()
    for name, blobs in net.params.items():
        for i, p in enumerate(blobs):
            state[f"{name}[{i}]"], state[f"{name}[{i}].diff"] = p.data.copy(), p.diff.copy()
    return state


@pytest.mark.parametrize("kind", ["before_forward", "after_forward"])
def test_a_forward_run_from_a_forward_callback_leaves_the_outer_pass_right(kind):
    # A callback that runs net.forward() inside the pass (Caffe's ForwardFromTo allows it: the
    # blobs then hold that pass's values, which the outer pass's next layers read). The outer
    # pass's record of in-place outputs was replaced by the inner one's: ip1's diff (ip1 is
    # rewritten in place by relu1) came out as the gradient of a value no loss depends on.
    plain = lenet()
    plain.forward()
    plain.backward()
    net = lenet()
    ran = []

    def forward_once(layer):
        if layer == 4 and not ran:
            ran.append(layer)
            net.forward()

    getattr(net, kind)(forward_once)
    net.forward()
    net.backward()
    assert ran == [4]
    got, want = pass_state(net), pass_state(plain)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
