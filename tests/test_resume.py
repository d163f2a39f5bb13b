"""Exact continuation: N iterations + snapshot + restore + N iterations == 2N straight, bit for bit.

The net is LeNet-sized, reads the golden MNIST LMDB with random crops and mirroring in TRAIN,
has Dropout (torch's generator), and a test net whose data cursor moves between tests, so the
snapshot must carry data cursors and random generator states (train/resume.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.errors import SolverError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.solver.snapshot import read_solverstate, write_solverstate

DATA = Path(__file__).parent / "fixtures" / "golden" / "data"

NET = """
name: "LeNetish"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 crop_size: 24 mirror: true }
  data_param { source: "%(train)s" batch_size: 8 backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 crop_size: 24 }
  data_param { source: "%(test)s" batch_size: 8 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 32 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def make_param(tmp_path, fmt="BINARYPROTO") -> caffe_pb2.SolverParameter:
    p = caffe_pb2.SolverParameter()
    text_format.Parse(NET % {"train": DATA / "mnist_train_lmdb", "test": DATA / "mnist_test_lmdb"},
                      p.net_param)
    text_format.Parse("""
      type: "Nesterov" base_lr: 0.02 momentum: 0.9 weight_decay: 0.0005
      lr_policy: "step" gamma: 0.5 stepsize: 3
      test_iter: 1 test_interval: 3 display: 0 max_iter: 8 random_seed: 7
      snapshot_after_train: false""", p)
    p.snapshot_format = getattr(caffe_pb2.SolverParameter, fmt)
    p.snapshot_prefix = str(tmp_path / "lenet")
    return p


class Recorder:
    def __init__(self):
        self.losses, self.tests = [], []

    def after_backward(self, solver, loss):
        self.losses.append(float(solver.net.loss().detach()))

    def on_test(self, solver, net_id, results):
        self.tests.append((solver.iter, results["accuracy"], results["loss"]))


def run(param, iters, restore=None):
    s = caffe.get_solver(param, device="cpu")
    rec = Recorder()
    s.add_hook(rec)
    if restore:
        s.restore(restore)
    s.step(iters)
    return s, rec


def weights(s):
    return [p.detach().clone() for p in (i.param for i in s.net.learnable_params)]


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_n_plus_resume_plus_n_equals_2n_bitwise(tmp_path, fmt):
    param = make_param(tmp_path, fmt)
    straight, rec = run(param, 8)
    first, rec1 = run(param, 4)
    _, state = first.snapshot()
    resumed, rec2 = run(param, 4, restore=state)
    assert resumed.iter == 8 and resumed.current_step == straight.current_step
    assert rec1.losses + rec2.losses == rec.losses  # exact float equality
    assert rec1.tests + rec2.tests == rec.tests
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    for a, b in zip(straight.history, resumed.history):
        assert torch.equal(a, b)


def test_restore_logs_caffes_literal_line(tmp_path, caplog):
    # Caffe's restore functions live in SGDSolver and print "SGDSolver: restoring history" for
    # every solver type (the golden Adam/Nesterov/... train_resume.log files show it).
    for fmt, want in (("BINARYPROTO", ["SGDSolver: restoring history"]), ("HDF5", [])):
        param = make_param(tmp_path, fmt)  # Nesterov
        first, _ = run(param, 1)
        _, state = first.snapshot()
        caplog.clear()
        with caplog.at_level("INFO", logger="pycaffe_alt"):
            run(param, 0, restore=state)
        lines = [r.getMessage() for r in caplog.records if "restoring history" in r.getMessage()]
        assert lines == want  # RestoreSolverStateFromHDF5 logs nothing


def test_hdf5_snapshot_has_a_group_for_every_layer(tmp_path):
    import h5py

    param = make_param(tmp_path, "HDF5")
    param.snapshot_diff = True
    first, _ = run(param, 1)
    model, _ = first.snapshot()
    with h5py.File(model, "r") as f:  # Net::ToHDF5 creates data/<layer> (and diff/<layer>) for each
        names = [layer.name for layer in first.net.layers]
        assert sorted(f["data"]) == sorted(names) and sorted(f["diff"]) == sorted(names)
        assert list(f["data/relu1"]) == [] and list(f["data/conv1"]) == ["0", "1"]


@pytest.mark.parametrize("damage", ["torch_short", "numpy_pos", "numpy_pos_far", "caffe_pos_far",
                                    "python_missing", "batch_negative", "batch_far", "world_zero",
                                    "train_not_dict"])
def test_damaged_resume_data_is_one_solver_error(tmp_path, damage):
    param = make_param(tmp_path)
    first, _ = run(param, 2)
    _, path = first.snapshot()
    data = read_solverstate(path)
    state = data.resume_state
    mnist = state["data"]["train"]["mnist"]
    if damage == "torch_short":
        state["rng"]["torch"] = state["rng"]["torch"][:100]
    elif damage == "numpy_pos":
        state["rng"]["numpy"]["pos"] = "x"
    elif damage == "numpy_pos_far":  # numpy accepts it; the next draw would read past the key
        state["rng"]["numpy"]["pos"] = 10 ** 7
    elif damage == "caffe_pos_far":
        state["rng"]["caffe"]["pos"] = 625
    elif damage == "python_missing":
        state["rng"]["python"] = [3]
    elif damage == "batch_negative":
        mnist["batch"] = -4
    elif damage == "batch_far":  # skipping the crop stream that far would take days
        mnist["batch"] = 10 ** 15
    elif damage == "world_zero":
        mnist["world_size"] = 0
    else:
        state["data"]["train"] = 5
    bad = str(tmp_path / "bad.solverstate")
    write_solverstate(bad, data.iter, data.current_step, data.learned_net, data.history, state)
    fresh = caffe.get_solver(param, device="cpu")
    torch_before = torch.get_rng_state().clone()
    with pytest.raises(SolverError, match="resume data .* is damaged") as e:
        fresh.restore(bad)
    assert "bad.solverstate" in str(e.value)
    # The generators are checked before any is set: a damaged file leaves them alone.
    assert torch.equal(torch.get_rng_state(), torch_before)


def test_resume_state_is_needed(tmp_path):
    """Without our continuation data (a Caffe solverstate) the data cursor restarts at the first
    record and the generators are the fresh ones, as in Caffe: the run is a different one."""
    param = make_param(tmp_path)
    straight, rec = run(param, 8)
    first, _ = run(param, 4)
    _, state = first.snapshot()
    data = read_solverstate(state)
    assert data.resume_state["data"]["train"]["mnist"]["batch"] == 4
    caffe_like = str(tmp_path / "caffe_like.solverstate")
    write_solverstate(caffe_like, data.iter, data.current_step, data.learned_net, data.history)
    resumed, rec2 = run(param, 0, restore=caffe_like)
    layer = resumed.net.layer_dict["mnist"].module
    assert layer.state()["batch"] == 0  # Caffe restarts its cursor
    resumed.step(4)
    assert rec2.losses != rec.losses[4:]
    assert resumed.iter == 8


def test_restored_solver_reads_the_same_next_batch(tmp_path):
    param = make_param(tmp_path)
    first, _ = run(param, 3)
    _, state = first.snapshot()
    first.net.run()
    expected = first.net._values["data"].clone(), first.net.layer_dict["mnist"].module.last_indices.clone()
    resumed, _ = run(param, 0, restore=state)
    resumed.net.run()
    assert torch.equal(resumed.net._values["data"], expected[0])
    assert torch.equal(resumed.net.layer_dict["mnist"].module.last_indices, expected[1])


def test_resume_continues_caffes_random_stream(tmp_path):
    """DummyData with a uniform filler draws from Caffe's stream at every forward: the stream's
    position travels in the snapshot, so the resumed run sees the same data as a straight one."""
    p = caffe_pb2.SolverParameter()
    text_format.Parse("""
      layer { name: "d" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
          data_filler { type: "uniform" min: -1 max: 1 } data_filler { type: "uniform" min: 0 max: 1 } } }
      layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
      layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }""",
                      p.net_param)
    text_format.Parse('base_lr: 0.1 lr_policy: "fixed" display: 0 max_iter: 6 random_seed: 3 '
                      'snapshot_after_train: false', p)
    p.snapshot_prefix = str(tmp_path / "dummy")
    straight, rec = run(p, 6)
    first, rec1 = run(p, 3)
    _, state = first.snapshot()
    resumed, rec2 = run(p, 3, restore=state)
    assert rec1.losses + rec2.losses == rec.losses
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
