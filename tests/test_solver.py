"""The Solver: update order, per-blob multipliers, iter_size, test nets, errors, pycaffe API.

Update rules are checked at the Solver level against a hand-computed least-squares problem
(Caffe's own solver test idea): a linear layer with an EuclideanLoss, whose gradient is known in
closed form, trained for a few iterations and compared with Caffe's formulas written out in
numpy (learning rate inside the SGD history, weight decay before the rule, lr_mult per blob).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError, NetError, SolverError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.solver.snapshot import read_any_solverstate

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "solvers"

N, D = 4, 3
X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 1.0, 1.0], [0.0, 2.0, -1.5]], np.float32)
Y = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
W0 = np.array([[0.1, -0.2, 0.3]], np.float32)
B0 = np.array([0.05], np.float32)

LSQ_NET = """
name: "lsq"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
"""


def lsq_param(tmp_path, **fields) -> caffe_pb2.SolverParameter:
    p = caffe_pb2.SolverParameter()
    text_format.Parse(LSQ_NET, p.net_param)
    p.base_lr = 0.1
    p.lr_policy = "fixed"
    p.max_iter = 3
    p.display = 0
    p.snapshot_after_train = False
    p.snapshot_prefix = str(tmp_path / "lsq")
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def lsq_solver(tmp_path, **fields) -> caffe.Solver:
    s = caffe.Solver(lsq_param(tmp_path, **fields), device="cpu")
    s.net.params["ip"][0].data[...] = W0
    s.net.params["ip"][1].data[...] = B0
    s.net.blobs["x"].data[...] = X
    s.net.blobs["y"].data[...] = Y
    return s


def lsq_grads(w, b):
    """EuclideanLoss = sum((Xw' + b - y)^2) / (2N): gradients in closed form (float64)."""
    r = X.astype(np.float64) @ w.T + b - Y
    return (r.T @ X) / N, r.sum(axis=0) / N


def reference(rule, iters, base_lr=0.1, momentum=0.0, wd=0.0, momentum2=0.999, delta=1e-8,
              rms_decay=0.99, lr_at=None):
    """Caffe's update formulas, spelled out, for the two blobs (lr_mult 1/2, decay_mult 1/0)."""
    params = [W0.astype(np.float64), B0.astype(np.float64)]
    lr_mults, decays = [1.0, 2.0], [1.0, 0.0]
    h = [np.zeros_like(p) for p in params]
    h2 = [np.zeros_like(p) for p in params]
    for it in range(iters):
        rate = lr_at(it) if lr_at else base_lr
        grads = list(lsq_grads(*params))
        for i in range(2):
            g = grads[i] + wd * decays[i] * params[i]
            lr = rate * lr_mults[i]
            if rule == "SGD":
                h[i] = momentum * h[i] + lr * g
                upd = h[i]
            elif rule == "Nesterov":
                prev = h[i].copy()
                h[i] = momentum * h[i] + lr * g
                upd = (1 + momentum) * h[i] - momentum * prev
            elif rule == "AdaGrad":
                h[i] = h[i] + g * g
                upd = lr * g / (np.sqrt(h[i]) + delta)
            elif rule == "RMSProp":
                h[i] = rms_decay * h[i] + (1 - rms_decay) * g * g
                upd = lr * g / (np.sqrt(h[i]) + delta)
            elif rule == "AdaDelta":
                h[i] = momentum * h[i] + (1 - momentum) * g * g
                d = g * np.sqrt((h2[i] + delta) / (h[i] + delta))
                h2[i] = momentum * h2[i] + (1 - momentum) * d * d
                upd = lr * d
            elif rule == "Adam":
                h[i] = momentum * h[i] + (1 - momentum) * g
                h2[i] = momentum2 * h2[i] + (1 - momentum2) * g * g
                t = it + 1
                corr = math.sqrt(1 - momentum2 ** t) / (1 - momentum ** t)
                upd = lr * corr * h[i] / (np.sqrt(h2[i]) + delta)
            params[i] = params[i] - upd
    return params


RULES = [
    ("SGD", dict(momentum=0.9, weight_decay=0.01)),
    ("Nesterov", dict(momentum=0.9, weight_decay=0.01)),
    ("AdaGrad", dict(weight_decay=0.01)),
    ("RMSProp", dict(weight_decay=0.01, rms_decay=0.9)),
    ("AdaDelta", dict(momentum=0.95, delta=1e-6, base_lr=1.0)),
    ("Adam", dict(momentum=0.9, momentum2=0.999, weight_decay=0.01, base_lr=0.01)),
]


@pytest.mark.parametrize("rule,fields", RULES, ids=[r for r, _ in RULES])
def test_update_rule_against_hand_computed_steps(rule, fields, tmp_path):
    s = lsq_solver(tmp_path, type=rule, **fields)
    s.step(3)
    assert s.iter == 3
    kw = {k: v for k, v in fields.items() if k != "weight_decay"}
    w, b = reference(rule, 3, wd=fields.get("weight_decay", 0.0), **kw)
    np.testing.assert_allclose(s.net.params["ip"][0].data, w, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(s.net.params["ip"][1].data, b, rtol=2e-5, atol=1e-7)


def test_step_policy_rate_lives_in_sgd_history(tmp_path):
    """With momentum, Caffe's history carries lr * grad: a rate drop does not rescale it."""
    s = lsq_solver(tmp_path, type="SGD", momentum=0.9, lr_policy="step", gamma=0.1, stepsize=2)
    s.step(4)
    w, b = reference("SGD", 4, momentum=0.9, lr_at=lambda it: 0.1 * 0.1 ** (it // 2))
    np.testing.assert_allclose(s.net.params["ip"][0].data, w, rtol=2e-5)
    assert s.current_step == 1  # after the rate of iteration 3 (Caffe's current_step_)


def test_multistep_counter_goes_on_from_a_restored_value(tmp_path):
    # A solverstate at iteration 15 whose current_step (0) does not match the step values
    # [5, 12] (edited before resuming): Caffe takes one step at 15 and the next at 16.
    param = lsq_param(tmp_path, type="SGD", lr_policy="multistep", gamma=0.1, max_iter=20)
    param.stepvalue.extend([5, 12])
    s = caffe.Solver(param, device="cpu")
    s.iter, s.current_step = 15, 0
    assert s.lr == pytest.approx(0.01)
    s.step(1)
    assert s.current_step == 1 and s.lr == pytest.approx(0.001)
    s.step(1)
    assert s.current_step == 2


def test_l1_regularization(tmp_path):
    s = lsq_solver(tmp_path, type="SGD", weight_decay=0.1, regularization_type="L1")
    s.step(1)
    gw, gb = lsq_grads(W0.astype(np.float64), B0.astype(np.float64))
    np.testing.assert_allclose(s.net.params["ip"][0].data, W0 - 0.1 * (gw + 0.1 * np.sign(W0)),
                               rtol=1e-5)
    np.testing.assert_allclose(s.net.params["ip"][1].data, B0 - 0.2 * gb, rtol=1e-5)


def test_clip_gradients_scales_the_global_norm(tmp_path, caplog):
    s = lsq_solver(tmp_path, type="SGD", clip_gradients=0.01)
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        s.step(1)
    gw, gb = lsq_grads(W0.astype(np.float64), B0.astype(np.float64))
    norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    scale = 0.01 / norm
    np.testing.assert_allclose(s.net.params["ip"][0].data, W0 - 0.1 * scale * gw, rtol=1e-5)
    np.testing.assert_allclose(s.net.params["ip"][1].data, B0 - 0.2 * scale * gb, rtol=1e-5)
    assert any("Gradient clipping: scaling down gradients (L2 norm" in r.getMessage()
               for r in caplog.records)


def test_lr_mult_zero_leaves_the_blob_untouched(tmp_path):
    p = lsq_param(tmp_path, type="Adam", momentum=0.9, weight_decay=0.5)
    p.net_param.layer[2].param[1].lr_mult = 0
    p.net_param.layer[2].param[1].decay_mult = 1
    s = caffe.Solver(p, device="cpu")
    s.net.params["ip"][1].data[...] = B0
    s.net.blobs["x"].data[...] = X
    s.net.blobs["y"].data[...] = Y
    before_w = s.net.params["ip"][0].data.copy()
    s.step(3)
    np.testing.assert_array_equal(s.net.params["ip"][1].data, B0)
    assert not np.array_equal(s.net.params["ip"][0].data, before_w)


def test_iter_size_averages_the_accumulated_gradient(tmp_path):
    """iter_size 2 over the same batch = one update with the same gradient; loss averaged."""
    a = lsq_solver(tmp_path, type="SGD", momentum=0.9)
    b = lsq_solver(tmp_path, type="SGD", momentum=0.9, iter_size=2)
    la, lb = a.step(2), b.step(2)
    np.testing.assert_allclose(a.net.params["ip"][0].data, b.net.params["ip"][0].data, rtol=1e-6)
    assert la == pytest.approx(lb, rel=1e-6)


def test_average_loss_smooths_like_caffe(tmp_path):
    s = lsq_solver(tmp_path, type="SGD", average_loss=2)
    seen = []

    class Rec:
        def after_step(self, solver, loss):
            seen.append(float(loss))

    raw = []

    class Raw:
        def after_backward(self, solver, loss):
            raw.append(float(solver.net.loss().detach()))

    s.add_hook(Rec())
    s.add_hook(Raw())
    s.step(4)
    expect = [raw[0], (raw[0] + raw[1]) / 2, (raw[1] + raw[2]) / 2, (raw[2] + raw[3]) / 2]
    np.testing.assert_allclose(seen, expect, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# nets, test nets, display


def golden_param(monkeypatch, tmp_path, case="sgd_fixed"):
    from pycaffe_alt.prototxt import read_solver

    monkeypatch.chdir(GOLDEN / case)
    p = read_solver("solver.prototxt")
    p.snapshot_prefix = str(tmp_path / "snap")
    return p


def test_test_nets_share_the_train_weights_from_the_first_test(monkeypatch, tmp_path):
    # Caffe's Test() shares the train net's weights into the test net (ShareTrainedLayersWith)
    # each time it runs; before the first test the test net has its own, filled or loaded.
    p = golden_param(monkeypatch, tmp_path)
    p.test_interval, p.test_initialization = 1000, False
    s = caffe.SGDSolver(p, device="cpu")
    assert len(s.test_nets) == 1 and s.test_nets[0].phase == caffe.TEST
    test_net = s.test_nets[0]
    assert test_net.params["conv1"][0].param is not s.net.params["conv1"][0].param
    mine = test_net.params["ip2"][0].data.copy()
    s.step(2)  # no test runs: the test net's weights are its own still
    np.testing.assert_array_equal(test_net.params["ip2"][0].data, mine)
    assert not np.array_equal(mine, s.net.params["ip2"][0].data)
    r = s.test(0)
    assert list(r) == ["accuracy", "loss"] and 0 <= r["accuracy"] <= 1
    assert test_net.params["conv1"][0].param is s.net.params["conv1"][0].param
    s.step(1)
    np.testing.assert_array_equal(test_net.params["ip2"][0].data, s.net.params["ip2"][0].data)


def test_a_test_net_loaded_before_training_leaves_the_train_net_alone(monkeypatch, tmp_path):
    # A program loading weights into solver.test_nets[0] (to validate them) before training:
    # in Caffe the train net keeps its filled weights and trains from them.
    p = golden_param(monkeypatch, tmp_path)
    s = caffe.SGDSolver(p, device="cpu")
    before = s.net.params["ip2"][0].data.copy()
    s.test_nets[0].params["ip2"][0].data[...] = 0.5
    np.testing.assert_array_equal(s.net.params["ip2"][0].data, before)


def test_test_interval_and_initialization(monkeypatch, tmp_path):
    p = golden_param(monkeypatch, tmp_path)
    p.test_interval = 2
    p.test_initialization = False
    p.snapshot = 0
    s = caffe.get_solver(p, device="cpu")
    when = []
    s.add_hook(type("H", (), {"on_test": lambda self, sv, i, r: when.append(sv.iter)})())
    s.step(5)
    assert when == [2, 4]


def test_display_lines(monkeypatch, tmp_path, caplog):
    p = golden_param(monkeypatch, tmp_path)
    p.display = 2
    p.test_interval = 0
    del p.test_iter[:]
    p.snapshot = 0
    s = caffe.get_solver(p, device="cpu")
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        s.step(3)
    msgs = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(("Iteration", "    Train"))]
    assert len(msgs) == 6
    for k, it in ((0, 0), (3, 2)):
        assert msgs[k].startswith(f"Iteration {it}, loss = ")
        assert msgs[k + 1].startswith("    Train net output #0: loss = ")
        assert msgs[k + 1].endswith(" loss)") and " (* 1 = " in msgs[k + 1]
        assert msgs[k + 2] == f"Iteration {it}, lr = 0.05"


def test_stages_and_level_reach_the_train_net(tmp_path):
    p = lsq_param(tmp_path)
    extra = p.net_param.layer.add()
    text_format.Parse('name: "only_big" type: "Power" bottom: "p" top: "q" '
                      'include { phase: TRAIN stage: "big" min_level: 2 }', extra)
    assert "only_big" not in caffe.Solver(p, device="cpu").net.layer_dict
    assert "only_big" not in caffe.Solver(p, device="cpu", stages=["big"]).net.layer_dict
    s = caffe.Solver(p, device="cpu", stages=["big"], level=2)
    assert "only_big" in s.net.layer_dict


def test_pycaffe_subclasses_force_their_rule(tmp_path):
    # A file without a type takes the class's (Caffe's CheckType; one naming another type is
    # refused: tests/test_solver_audit3.py).
    p = lsq_param(tmp_path, momentum=0.9)
    assert caffe.AdamSolver(p, device="cpu").type == "Adam"
    assert caffe.NesterovSolver(p, device="cpu").type == "Nesterov"
    assert caffe.get_solver(p, device="cpu").type == "SGD"
    s = caffe.SGDSolver(p, device="cpu")
    assert s.lr == pytest.approx(0.1)
    s.iter = 7
    assert s.iter == 7


def test_add_callback_runs_around_each_iteration(tmp_path):
    s = lsq_solver(tmp_path)
    calls = []
    s.add_callback(lambda: calls.append("start"), lambda: calls.append("grads"))
    s.step(2)
    assert calls == ["start", "grads", "start", "grads"]


# ---------------------------------------------------------------------------------------------
# snapshots


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_and_restore_round_trip(tmp_path, fmt):
    s = lsq_solver(tmp_path, type="Adam", momentum=0.9, base_lr=0.01,
                   snapshot_format=getattr(caffe_pb2.SolverParameter, fmt))
    s.step(2)
    model, state = s.snapshot()
    suffix = ".h5" if fmt == "HDF5" else ""
    assert model == str(tmp_path / "lsq_iter_2.caffemodel") + suffix
    assert state == str(tmp_path / "lsq_iter_2.solverstate") + suffix
    data = read_any_solverstate(state)
    assert data.iter == 2 and data.learned_net == model and len(data.history) == 4
    s.step(2)
    t = lsq_solver(tmp_path, type="Adam", momentum=0.9, base_lr=0.01)
    t.restore(state)
    assert t.iter == 2
    t.step(2)
    np.testing.assert_array_equal(t.net.params["ip"][0].data, s.net.params["ip"][0].data)


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_diff_writes_each_blobs_diff(tmp_path, fmt):
    """snapshot_diff: the caffemodel carries every blob's diff, which after an SGD update is the
    update itself (Caffe copies the history into the diff); off by default."""
    s = lsq_solver(tmp_path, momentum=0.9, snapshot_diff=True,
                   snapshot_format=getattr(caffe_pb2.SolverParameter, fmt))
    s.step(2)
    model, _ = s.snapshot()
    if fmt == "HDF5":
        import h5py

        with h5py.File(model, "r") as f:
            diffs = [f["diff/ip/0"][()], f["diff/ip/1"][()]]
            np.testing.assert_array_equal(f["data/ip/0"][()], s.net.params["ip"][0].data)
    else:
        net = caffe_pb2.NetParameter()
        with open(model, "rb") as f:
            net.ParseFromString(f.read())
        blobs = [l for l in net.layer if l.name == "ip"][0].blobs
        diffs = [np.array(b.diff, np.float32).reshape(b.shape.dim) for b in blobs]
    for diff, history in zip(diffs, s.history):
        assert diff.any()
        np.testing.assert_array_equal(diff, history.numpy())
    (tmp_path / "plain").mkdir()
    plain = lsq_solver(tmp_path / "plain", snapshot_format=getattr(caffe_pb2.SolverParameter, fmt))
    plain.step(1)
    model, _ = plain.snapshot()
    if fmt == "HDF5":
        import h5py

        with h5py.File(model, "r") as f:
            assert "diff" not in f
    else:
        net = caffe_pb2.NetParameter()
        with open(model, "rb") as f:
            net.ParseFromString(f.read())
        assert all(len(b.diff) == 0 for l in net.layer for b in l.blobs)


def test_restore_finds_the_caffemodel_next_to_a_moved_solverstate(tmp_path, monkeypatch):
    s = lsq_solver(tmp_path)
    s.step(1)
    s.snapshot()
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("lsq_iter_1.caffemodel", "lsq_iter_1.solverstate"):
        os.replace(tmp_path / f, moved / f)
    t = lsq_solver(tmp_path)
    t.restore(str(moved / "lsq_iter_1.solverstate"))
    np.testing.assert_array_equal(t.net.params["ip"][0].data, s.net.params["ip"][0].data)
    os.remove(moved / "lsq_iter_1.caffemodel")
    with pytest.raises(SolverError, match="lsq_iter_1.caffemodel"):
        lsq_solver(tmp_path).restore(str(moved / "lsq_iter_1.solverstate"))


def test_restore_rejects_a_state_of_another_rule(tmp_path):
    s = lsq_solver(tmp_path, type="SGD")
    s.step(1)
    _, state = s.snapshot()
    with pytest.raises(SolverError, match="history"):
        lsq_solver(tmp_path, type="Adam").restore(state)


def test_solve_writes_the_final_snapshot(tmp_path):
    s = lsq_solver(tmp_path, snapshot_after_train=True, max_iter=3)
    s.solve()
    assert (tmp_path / "lsq_iter_3.caffemodel").exists()
    assert (tmp_path / "lsq_iter_3.solverstate").exists()


# ---------------------------------------------------------------------------------------------
# bad input fails before training


def test_missing_net_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "solver.prototxt").write_text('net: "nope.prototxt"\nbase_lr: 0.1\n')
    with pytest.raises(NetError, match="nope.prototxt"):
        caffe.get_solver("solver.prototxt")


def test_missing_solver_file(tmp_path):
    with pytest.raises(SolverError, match="absent.prototxt"):
        caffe.get_solver(str(tmp_path / "absent.prototxt"))


def test_weights_that_do_not_fit(tmp_path):
    other = caffe_pb2.NetParameter()
    layer = other.layer.add(name="ip", type="InnerProduct")
    blob = layer.blobs.add()
    blob.shape.dim.extend([2, 2])
    blob.data.extend([0.0] * 4)
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(other.SerializeToString())
    with pytest.raises(CaffeError, match="bad.caffemodel"):
        caffe.Solver(lsq_param(tmp_path), device="cpu", weights=[str(path)])
    with pytest.raises(SolverError, match="missing.caffemodel"):
        caffe.Solver(lsq_param(tmp_path), device="cpu", weights=[str(tmp_path / "missing.caffemodel")])


def test_unwritable_snapshot_folder(tmp_path):
    # A path through a regular file cannot be a folder, whoever runs the test (even root).
    (tmp_path / "a_file").write_text("x")
    p = lsq_param(tmp_path, snapshot=1)
    p.snapshot_prefix = str(tmp_path / "a_file" / "folder" / "snap")
    with pytest.raises(SolverError, match="a_file/folder"):
        caffe.Solver(p, device="cpu")
    # snapshot_after_train alone: solve() checks before the first iteration.
    p = lsq_param(tmp_path, snapshot_after_train=True)
    p.snapshot_prefix = str(tmp_path / "a_file" / "folder" / "snap")
    s = caffe.Solver(p, device="cpu")
    with pytest.raises(SolverError, match="a_file/folder"):
        s.solve()
    assert s.iter == 0


def test_missing_snapshot_folder_is_created(tmp_path):
    p = lsq_param(tmp_path, snapshot=1)
    p.snapshot_prefix = str(tmp_path / "new" / "folder" / "snap")
    caffe.Solver(p, device="cpu")
    assert (tmp_path / "new" / "folder").is_dir()


def test_test_iter_count_must_match_test_nets(tmp_path):
    p = lsq_param(tmp_path)
    p.test_net_param.add().CopyFrom(p.net_param)
    p.ClearField("net_param")
    p.train_net_param.CopyFrom(p.test_net_param[0])
    with pytest.raises(SolverError, match="test_iter"):
        caffe.Solver(p, device="cpu")
    p.test_iter.append(1)
    with pytest.raises(SolverError, match="test_interval"):
        caffe.Solver(p, device="cpu")
    p.test_interval = 1
    assert len(caffe.Solver(p, device="cpu").test_nets) == 1


def test_unknown_type_and_bad_hyper(tmp_path):
    with pytest.raises(SolverError, match="Adamax"):
        caffe.Solver(lsq_param(tmp_path, type="Adamax"), device="cpu")
    with pytest.raises(SolverError, match="momentum"):
        caffe.Solver(lsq_param(tmp_path, type="AdaGrad", momentum=0.9), device="cpu")


def test_nan_loss_stops_with_the_iteration_named(tmp_path):
    s = lsq_solver(tmp_path, type="SGD", base_lr=1e6, snapshot=1)
    s.guard.stop = True  # what tools/train builds (stop_on_nonfinite_loss=True)
    s.step(1)  # iteration 0 is finite; its snapshot is the last good one
    with pytest.raises(caffe.solver.NonFiniteLossError, match=r"at iteration \d+") as e:
        s.step(20)
    assert "lsq_iter_" in str(e.value)
    bad_iter = int(str(e.value).split("at iteration ")[1].split(";")[0])
    # No snapshot of a diverged state: every snapshot on disk is from before the bad loss.
    for f in tmp_path.glob("lsq_iter_*.solverstate"):
        assert read_any_solverstate(str(f)).iter <= bad_iter
        model = f.with_suffix(".caffemodel")
        w = caffe.Net(lsq_param(tmp_path).net_param, caffe.TEST, weights=str(model))
        assert np.isfinite(w.params["ip"][0].data).all()


def test_pycaffe_step_goes_on_after_a_nan_loss_with_one_warning(tmp_path, caplog):
    # Caffe's Solver::Step logs "loss = nan" and carries on; programs check the loss themselves.
    s = lsq_solver(tmp_path, type="SGD", base_lr=1e6)
    with caplog.at_level("WARNING", logger="pycaffe_alt"):
        s.step(20)
        s.step(2)
    assert s.iter == 22
    assert not np.isfinite(float(s.net.blobs["loss"].data))
    warnings = [r for r in caplog.records if "training goes on" in r.getMessage()]
    assert len(warnings) == 1
    model, state = s.snapshot()  # written, as Caffe writes it
    assert os.path.exists(model) and os.path.exists(state)


def test_snapshot_diff_with_repeated_layer_names_writes_each_layers_own(tmp_path):
    # Caffe allows repeated names; ToProto(write_diff) writes every layer's own diff (they were
    # looked up by name: the second layer got the first's, or an IndexError).
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } '
        'shape { dim: 2 dim: 2 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { '
        'num_output: 4 bias_term: false weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "h" top: "y" inner_product_param { '
        'num_output: 2 weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" }\n')
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nsnapshot_diff: true\n'
        f'snapshot_prefix: "{tmp_path}/s"\n')
    s = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    s.net.blobs["x"].data[...] = 1
    s.step(1)
    model, _ = s.snapshot()
    saved = caffe_pb2.NetParameter.FromString(open(model, "rb").read())
    shapes = [(list(b.shape.dim), len(b.data), len(b.diff)) for layer in saved.layer for b in layer.blobs]
    assert shapes == [([4, 3], 12, 12), ([2, 4], 8, 8), ([2], 2, 2)]
    second = [layer for layer in saved.layer if layer.name == "ip"][1]
    np.testing.assert_allclose(np.array(second.blobs[0].diff).reshape(2, 4),
                               s.net.layers[2].blobs[0].diff, rtol=1e-6)


def test_solver_api_refuses_wrong_argument_values(tmp_path):
    from pycaffe_alt.net import Net

    s = lsq_solver(tmp_path, type="SGD")
    with pytest.raises(TypeError, match="whole number, got 1.5"):
        s.step(1.5)
    with pytest.raises(TypeError, match=r"in 0\.\.2147483647, got -5"):
        s.iter = -5
    with pytest.raises(TypeError, match="got 2147483648"):  # a snapshot stores an int32
        s.iter = 2 ** 31
    with pytest.raises(TypeError, match=r"restore\(\) takes a file path"):
        s.restore(None)
    with pytest.raises(TypeError, match="takes a Net"):
        s.share_weights(5)
    with pytest.raises(TypeError, match="on_start must be callable"):
        s.add_callback(5, 6)
    s.step(2.0)  # a whole float is a count
    assert s.iter == 2
    assert isinstance(s.net, Net)


def test_blob_reshape_refuses_fractional_and_infinite_dimensions(tmp_path):
    s = lsq_solver(tmp_path, type="SGD")
    blob = s.net.blobs["x"]
    for dims in ((2.9, 3), (float("inf"), 3), (float("nan"), 3), ("2", 3)):
        with pytest.raises(NetError, match="integer dimensions"):
            blob.reshape(*dims)
    blob.reshape(np.int64(4), 3.0)
    assert blob.data.shape == (4, 3)
    blob.reshape(np.array(5), np.array(3))  # 0-d integer arrays, as boost.python's int takes
    assert blob.data.shape == (5, 3)


def test_a_net_without_learnable_parameters_trains(tmp_path):
    """Caffe's ApplyUpdate loops over no parameters; every update rule used to fail on the
    empty parameter list."""
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "DummyData" top: "x" top: "y" dummy_data_param { data_filler '
        '{ type: "gaussian" std: 1 } shape { dim: 4 dim: 3 } shape { dim: 4 dim: 3 } } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss" }\n')
    for kind in ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"):
        (tmp_path / "solver.prototxt").write_text(
            f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.01 lr_policy: "fixed" max_iter: 2 '
            f'type: "{kind}" snapshot_prefix: "{tmp_path / "s"}"')
        s = caffe.get_solver(str(tmp_path / "solver.prototxt"))
        s.step(2)
        assert s.iter == 2


@pytest.mark.parametrize("field,value", [("base_lr", "nan"), ("base_lr", "inf"),
                                         ("momentum", "nan"), ("weight_decay", "inf"),
                                         ("delta", "nan"), ("clip_gradients", "nan"),
                                         ("gamma", "inf"), ("power", "nan")])
def test_non_finite_hyper_parameters_are_refused(tmp_path, field, value):
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "DummyData" top: "x" top: "y" dummy_data_param { data_filler '
        '{ type: "gaussian" std: 1 } shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
        'inner_product_param { num_output: 2 } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }\n')
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.01 lr_policy: "fixed" max_iter: 2 '
        f'{field}: {value}'.replace("base_lr: 0.01 lr_policy", "lr_policy" if field == "base_lr"
                                    else "base_lr: 0.01 lr_policy"))
    with pytest.raises(SolverError, match=f"{field} must be a finite number"):
        caffe.get_solver(str(tmp_path / "solver.prototxt"))


@pytest.mark.parametrize("block,field,value", [("alternation_param", "warmup_epochs", 2),
                                               ("convex_param", "max_exact_patterns", 8)])
def test_a_block_the_solver_does_not_read_is_named(tmp_path, caplog, block, field, value):
    # An alternation_param (or convex_param) under type "SGD" trained plain SGD without a word.
    param = lsq_param(tmp_path, type="SGD")
    setattr(getattr(param, block), field, value)
    with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
        caffe.Solver(param, device="cpu")
    assert [r for r in caplog.records if f"{block} is ignored" in r.getMessage()], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
        caffe.Solver(lsq_param(tmp_path, type="SGD"), device="cpu")
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()], caplog.text


@pytest.mark.parametrize("field, value", [("momentum", 0.0), ("weight_decay", 0.5)])
def test_rule_fields_set_between_steps_apply(monkeypatch, tmp_path, field, value):
    # solver.param is live (docs/pycaffe.md): like base_lr, momentum and weight_decay written
    # between steps are what the next update uses (they were read once, at construction).
    p = golden_param(monkeypatch, tmp_path)
    p.test_interval, p.test_initialization = 1000, False
    runs = []
    for change in (False, True):
        caffe.set_random_seed(1)
        s = caffe.SGDSolver(p, device="cpu")
        s.step(2)
        if change:
            setattr(s.param, field, value)
        s.step(2)
        runs.append(s.net.params["ip2"][0].data.copy())
    assert not np.array_equal(runs[0], runs[1])


def test_a_momentum_set_on_rmsprop_between_steps_is_refused(monkeypatch, tmp_path):
    p = golden_param(monkeypatch, tmp_path)
    p.test_interval, p.test_initialization = 1000, False
    p.type, p.momentum = "RMSProp", 0.0
    s = caffe.get_solver(p)
    s.step(1)
    s.param.momentum = 0.9
    with pytest.raises(SolverError, match="momentum cannot be used with RMSProp"):
        s.step(1)
