"""The golden LeNet (tests/fixtures/golden/nets/lenet_loss) in TRAIN phase with a fixed batch,
for tests that drive a whole pass (layer callbacks, call sequences)."""
import os

import numpy as np

import pycaffe_alt as caffe

LENET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden", "nets",
                     "lenet_loss")


def lenet(**kwargs) -> caffe.Net:
    """The net with its Caffe weights, data uniform in [0, 1) (seed 0), labels 0..9 in turn."""
    net = caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                    caffe.TRAIN, **kwargs)
    net.blobs["data"].data[...] = np.random.RandomState(0).rand(*net.blobs["data"].data.shape)
    net.blobs["label"].data[...] = np.arange(net.blobs["label"].data.shape[0]) % 10
    return net


def lenet_solver(tmp_path, **fields) -> caffe.SGDSolver:
    """An SGD solver (momentum 0.9, rate 0.01, 3 iterations, seed 5) of the same net from its
    text, snapshots under ``tmp_path``; ``fields`` override SolverParameter fields."""
    from google.protobuf import text_format

    from pycaffe_alt.proto import caffe_pb2

    p = caffe_pb2.SolverParameter()
    with open(os.path.join(LENET, "net.prototxt")) as f:
        text_format.Parse(f.read(), p.net_param)
    p.base_lr, p.lr_policy, p.max_iter, p.display, p.momentum = 0.01, "fixed", 3, 0, 0.9
    p.snapshot_after_train = False
    p.snapshot_prefix = str(tmp_path / "s")
    p.random_seed = 5
    for k, v in fields.items():
        setattr(p, k, v)
    return caffe.SGDSolver(p, device="cpu")
