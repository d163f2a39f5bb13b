"""Exact continuation: N iterations + snapshot + restore + N iterations == 2N straight, bit for bit.

The net is LeNet-sized, reads the golden MNIST LMDB with random crops and mirroring in TRAIN,
has Dropout (torch's generator), and a test net whose data cursor moves between tests, so the
snapshot must carry data cursors and random generator states (train/resume.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
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


def run(param, iters, restore=None, recorder=None):
    s = caffe.get_solver(param, device="cpu")
    rec = Recorder() if recorder is None else recorder
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


# ---------------------------------------------------------------------------------------------
# lr_policy "plateau" (the SSD fork): its state travels in the solverstate.

PLATEAU_NET = """
layer { name: "d" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
    data_filler { type: "uniform" min: -1 max: 1 } data_filler { type: "uniform" min: 0 max: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }"""


def plateau_param(tmp_path, fmt="BINARYPROTO", extra="") -> caffe_pb2.SolverParameter:
    p = caffe_pb2.SolverParameter()
    text_format.Parse(PLATEAU_NET, p.net_param)
    text_format.Parse('type: "Nesterov" momentum: 0.9 base_lr: 0.1 lr_policy: "plateau" '
                      "gamma: 0.5 plateau_winsize: 1 plateau_winsize: 2 plateau_winsize: 3 "
                      "max_iter: 12 random_seed: 3 snapshot_after_train: false " + extra,
                      p)
    p.snapshot_format = getattr(caffe_pb2.SolverParameter, fmt)
    p.snapshot_prefix = str(tmp_path / "plateau")
    return p


class PlateauRecorder:
    """Each iteration's smoothed loss (as the fork's GetLearningRate sees it) and the state after."""

    def __init__(self):
        self.smoothed, self.raw, self.states = [], [], []

    def after_backward(self, solver, loss):
        self.smoothed.append(float(loss))
        self.raw.append(float(solver.net.loss().detach()))

    def after_step(self, solver, loss):
        self.states.append((solver.minimum_loss, solver.iter_last_event, solver.current_step))


def run_plateau(param, iters, restore=None):
    return run(param, iters, restore, PlateauRecorder())


def forks_plateau(smoothed, winsizes, start=0):
    """The fork's GetLearningRate bookkeeping restated on a list of smoothed losses."""
    minimum, last, step, out = float(np.finfo(np.float32).max), 0, 0, []
    for it, loss in enumerate(smoothed, start):
        if loss < minimum:
            minimum, last = loss, it
        if step < len(winsizes) and it >= last + winsizes[step]:
            step, last = step + 1, it
        out.append((minimum, last, step))
    return out


def test_plateau_reads_this_iterations_smoothed_loss(tmp_path):
    # average_loss 3: the fork compares the window's mean, updated with this iteration's loss
    # before ApplyUpdate (Solver::Step smooths, displays, then updates).
    param = plateau_param(tmp_path, extra="average_loss: 3")
    s, rec = run_plateau(param, 12)
    assert rec.states == forks_plateau(rec.smoothed, [1, 2, 3])
    assert rec.states[-1][2] >= 2  # the sequence plateaus: the rate dropped at least twice
    # The previous iteration's smoothed loss, or the plain loss, would give other events: the
    # test tells them apart.
    assert forks_plateau([float("inf")] + rec.smoothed[:-1], [1, 2, 3]) != rec.states
    assert forks_plateau(rec.raw, [1, 2, 3]) != rec.states
    assert s.lr == pytest.approx(0.1 * 0.5 ** rec.states[-1][2])


def test_plateau_logs_as_the_fork(tmp_path, caplog):
    param = plateau_param(tmp_path, extra="display: 1")
    with caplog.at_level("INFO", logger="pycaffe_alt"):
        _, rec = run_plateau(param, 12)
    lines = [r.getMessage() for r in caplog.records]
    drops = [it for it in range(12) if rec.states[it][2] != (rec.states[it - 1][2] if it else 0)]
    assert drops and [m for m in lines if m.endswith(tuple(f"step = {rec.states[it][2]}"
                                                            for it in drops))] == \
        [f"Plateau Status: Iteration {it}, step = {rec.states[it][2]}" for it in drops]
    # display 1: the minimum is reported at every event (a new minimum or a drop).
    events = [it for it in range(12) if rec.states[it][1] == it]
    assert [m for m in lines if "current minimum_loss" in m] == \
        [f"Plateau Status: Iteration {it}, current minimum_loss = {rec.states[it][0]:g}"
         for it in events]
    first = lines.index(f"Plateau Status: Iteration {drops[0]}, step = {rec.states[drops[0]][2]}")
    assert lines[first + 2] == f"Iteration {drops[0]}, lr = {0.1 * 0.5 ** rec.states[drops[0]][2]:g}"


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_plateau_n_plus_resume_plus_n_equals_2n_bitwise(tmp_path, fmt):
    param = plateau_param(tmp_path, fmt)
    straight, rec = run_plateau(param, 12)
    first, rec1 = run_plateau(param, 5)
    _, state = first.snapshot()
    resumed, rec2 = run_plateau(param, 7, restore=state)
    # The rate drops on both sides of the snapshot, whose window is open (last event at 4): a
    # lost iter_last_event (0) would drop at 5, a lost minimum would make 5 an event.
    assert rec.states[4][1:] == (4, 1) and rec.states[5][1:] == (4, 1)
    assert rec.states[-1][2] > 1
    assert rec1.states + rec2.states == rec.states
    assert rec1.smoothed + rec2.smoothed == rec.smoothed
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    assert resumed.lr == straight.lr


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_plateau_state_in_the_forks_fields(tmp_path, fmt):
    import h5py

    def fields(path):
        if fmt == "HDF5":  # the fork's hdf5_save_int and hdf5_save_float<float>
            with h5py.File(path, "r") as f:
                if "minimum_loss" not in f and "iter_last_event" not in f:
                    return None
                assert f["iter_last_event"].dtype == np.int32 and f["iter_last_event"].shape == (1,)
                assert f["minimum_loss"].dtype == np.float32 and f["minimum_loss"].shape == (1,)
                return (float(f["minimum_loss"][0]), int(f["iter_last_event"][0]),
                        int(f["current_step"][0]))
        proto = caffe_pb2.SolverState.FromString(Path(path).read_bytes())
        if not proto.HasField("minimum_loss") and not proto.HasField("iter_last_event"):
            return None
        return proto.minimum_loss, proto.iter_last_event, proto.current_step

    first, rec = run_plateau(plateau_param(tmp_path, fmt), 5)
    assert fields(first.snapshot()[1]) == rec.states[-1]
    # Other policies write none (the fork writes them always): their files stay BVLC Caffe's.
    other, _ = run(make_param(tmp_path, fmt), 1)
    assert fields(other.snapshot()[1]) is None


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_solverstate_without_plateau_fields_restores_the_protos_defaults(tmp_path, fmt):
    """A solverstate without the fields (BVLC Caffe's, another policy's): the fork's binaryproto
    restore takes the proto defaults, 1e38 and 0 (its HDF5 restore would abort; we do the same
    as for binaryproto), and the run goes on from there."""
    from pycaffe_alt.solver.snapshot import read_any_solverstate, write_solverstate_h5

    param = plateau_param(tmp_path, fmt)
    first, _ = run_plateau(param, 5)
    _, path = first.snapshot()
    data = read_any_solverstate(path)
    bare = str(tmp_path / ("bare.solverstate" + (".h5" if fmt == "HDF5" else "")))
    write = write_solverstate_h5 if fmt == "HDF5" else write_solverstate
    write(bare, data.iter, data.current_step, data.learned_net, data.history, data.resume_state)
    resumed = caffe.get_solver(param, device="cpu")
    resumed.minimum_loss, resumed.iter_last_event = 0.5, 3
    resumed.restore(bare)
    assert (resumed.minimum_loss, resumed.iter_last_event, resumed.current_step) == \
        (float(np.float32(1e38)), 0, data.current_step)
    rec = PlateauRecorder()
    resumed.add_hook(rec)
    resumed.step(1)
    # Any loss is below 1e38: iteration 5 is an event, which restarts the window (no drop).
    assert rec.states == [(rec.smoothed[0], 5, data.current_step)]
