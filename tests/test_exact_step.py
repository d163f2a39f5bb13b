"""Exact weight steps of the alternation solver (issue 9, docs/exact_steps.md)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from exact_case import hidden_weights, relative_error, teacher_files
from pycaffe_alt.alternation.exact_step import (FixedSupports, design_rows,
                                                ridge_solve)
from pycaffe_alt.alternation.pool_switches import decode_switches, encode_switches
from pycaffe_alt.layers.vision import PoolGeometry, max_pool
from pycaffe_alt.errors import SolverError
from pycaffe_alt.net import Net
from pycaffe_alt.solver import get_solver

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train(solver, weights=None, snapshot=None, cwd=None):
    cmd = [sys.executable, os.path.join(TOOLS, "train"), "--solver", str(solver)]
    if weights:
        cmd += ["--weights", str(weights)]
    if snapshot:
        cmd += ["--snapshot", str(snapshot)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


# ------------------------------------------------------------------ seed 004: Jagatap & Hegde
# Compute of one LEAST_SQUARES alternation on this net, in forward passes over the training set:
# the support pass (1), the solve's forward (1) and its one backward per output coordinate (2,
# a backward counted as two forwards). An SGD iteration: forward + backward = 3 forwards of its
# batch.
ALTERNATION_FORWARDS = 4.0
SGD_FORWARDS_PER_RECORD = 3.0


def test_teacher_recovered_by_least_squares_alternation(tmp_path):
    case = teacher_files(tmp_path, d=20, k=4, n=2000, noise=0.3, max_iter=10)
    assert relative_error(case["w0"], case["w"]) == pytest.approx(0.3)
    proc = train(case["solver"], case["weights"])
    assert proc.returncode == 0, proc.stderr
    assert "exact weight step (LEAST_SQUARES)" in proc.stderr
    err = relative_error(hidden_weights(tmp_path / "snap_iter_10.caffemodel"), case["w"])
    assert err < 1e-4


def run_in_process(case, iters: int):
    solver = get_solver(str(case["solver"]))
    solver.net.copy_from(str(case["weights"]))
    solver.step(iters)
    return solver


def test_teacher_with_skip_connection_recovered(tmp_path):
    case = teacher_files(tmp_path, d=20, k=4, n=2000, noise=0.3, skip=True, max_iter=10)
    solver = run_in_process(case, 10)
    w = solver.net.params["hidden"][0].data.astype(np.float64)
    assert relative_error(w, case["w"]) < 1e-4


def test_sgd_with_the_same_compute_does_not_recover_the_teacher(tmp_path):
    n, batch, alternations = 2000, 500, 10
    budget = alternations * ALTERNATION_FORWARDS  # forward passes over the training set
    iters = int(budget * n / (SGD_FORWARDS_PER_RECORD * batch)) + 1
    errors = []
    for lr in (0.03, 0.1):  # 0.1 is the best of 0.003/0.01/0.03/0.1 (docs/exact_steps.md)
        folder = tmp_path / f"lr{lr}"
        case = teacher_files(folder, n=n, batch=batch, solver_type="SGD", lr=lr,
                             momentum=0.9, max_iter=iters, display=0)
        solver = run_in_process(case, iters)
        errors.append(relative_error(solver.net.params["hidden"][0].data.astype(np.float64),
                                     case["w"]))
    assert min(errors) < 0.3  # SGD does make progress...
    assert min(errors) > 1e-3  # ...but stays far from 1e-4


# ------------------------------------------------------------------ one exact solve
def test_one_layer_solve_is_the_closed_form_ridge_solution(tmp_path):
    lam = 0.05
    case = teacher_files(tmp_path, n=400, batch=128, max_iter=1, weight_decay=lam, bias=True,
                         extra="alternation_param { weight_step: LEAST_SQUARES }")
    solver = run_in_process(case, 1)
    w_solved = solver.net.params["hidden"][0].data.astype(np.float64)
    b_solved = solver.net.params["hidden"][1].data.astype(np.float64)
    # Closed form: supports from the start weights (bias 0), f(x) = sum_j m_j (w_j.x + b_j).
    x = case["x"].astype(np.float64)
    y = case["y"].astype(np.float64)[:, 0]
    n, d = x.shape
    k = case["w0"].shape[0]
    m = (x.astype(np.float32) @ case["w0"].astype(np.float32).T > 0).astype(np.float64)
    a = np.concatenate([(m[:, j:j + 1] * np.concatenate([x, np.ones((n, 1))], 1))
                        for j in range(k)], 1)  # unknowns per unit: d weights then the bias
    ridge = np.tile(np.r_[np.full(d, lam), 0.0], k)  # bias decay_mult 0
    w = np.linalg.solve(a.T @ a / n + np.diag(ridge), a.T @ y / n).reshape(k, d + 1)
    np.testing.assert_allclose(w_solved, w[:, :d], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b_solved, w[:, d], rtol=1e-4, atol=1e-5)


def test_ridge_solve_keeps_unconstrained_directions():
    g = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    rhs = torch.tensor([[4.0], [0.0]], dtype=torch.float64)
    cur = torch.tensor([[1.0], [7.0]], dtype=torch.float64)
    sol = ridge_solve(g, rhs, torch.zeros(2, dtype=torch.float64), cur)
    assert sol[:, 0].tolist() == pytest.approx([2.0, 7.0])  # a dead unit keeps its weights
    jac = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    feats = torch.randn(3, 6, 5, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    z = torch.einsum("ok,bkl->bol", w, feats)
    expect = torch.einsum("bjol,bol->bj", jac, z).reshape(-1)
    torch.testing.assert_close(design_rows(jac, feats) @ w.reshape(-1), expect)


# ------------------------------------------------------------------ max-pool switches
CONV_NET = """name: "ConvPool"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 2 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool" top: "ip1"
  inner_product_param { num_output: 5 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip" type: "InnerProduct" bottom: "ip1" top: "ip"
  inner_product_param { num_output: 2 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
"""


def test_switch_bits_round_trip_overlapping_windows():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8)
    geom = PoolGeometry((3, 3), (2, 2), (1, 1), True)
    _, idx = max_pool(x, geom, with_mask=True)
    planes = encode_switches(idx.long(), (9, 8), (3, 3), (2, 2), (1, 1))
    assert planes.dtype == torch.bool and planes.shape[1] == 4  # 9 offsets -> 4 bits
    assert torch.equal(decode_switches(planes, (9, 8), (3, 3), (2, 2), (1, 1)), idx.long())


@pytest.mark.parametrize("layer", ["conv", "ip1"])
def test_stored_switches_make_the_masked_net_linear_in_each_layer(tmp_path, layer):
    (tmp_path / "net.prototxt").write_text(CONV_NET)
    net = Net(str(tmp_path / "net.prototxt"), 1)
    torch.manual_seed(1)
    x = torch.randn(4, 2, 9, 9)
    fixed = FixedSupports(net)
    sink = {}
    fixed.record(sink)
    with torch.no_grad():
        net.run({"data": x})
    masks = dict(sink)
    blob = net.layer_modules[layer].weight
    w1, w2 = torch.randn_like(blob), torch.randn_like(blob)
    a, b = 0.7, -1.9

    def f(w, fixed_on: bool, switches: bool = True):
        fixed.remove()
        if fixed_on:
            fixed.install(masks)
            if not switches:
                net.layer_modules["pool"].fixed_switches = None
        with torch.no_grad():
            blob.copy_(w)
            return net.run({"data": x})["ip"].clone()

    lhs = f(a * w1 + b * w2, True)
    torch.testing.assert_close(lhs, a * f(w1, True) + b * f(w2, True), rtol=1e-4, atol=1e-4)
    # Without the stored supports and switches the net is not linear (the test can fail).
    dyn = f(a * w1 + b * w2, False)
    assert (dyn - (a * f(w1, False) + b * f(w2, False))).abs().max() > 1e-2
    if layer == "conv":  # fixed supports alone are not enough: the switches must be fixed too
        dyn = f(a * w1 + b * w2, True, switches=False)
        assert (dyn - (a * f(w1, True, False) + b * f(w2, True, False))).abs().max() > 1e-2


LENET_LS = """name: "SmallConvLS"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "%(list)s" batch_size: 100 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _conv_problem(tmp_path, extra: str):
    import h5py

    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 1, 8, 8)).astype(np.float32)
    y = rng.standard_normal((100, 2)).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data"], f["label"] = x, y
    (tmp_path / "list.txt").write_text(str(tmp_path / "d.h5") + "\n")
    (tmp_path / "net.prototxt").write_text(LENET_LS % {"list": tmp_path / "list.txt"})
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}" type: "Alternation" base_lr: 0.01 '
        f'lr_policy: "fixed" weight_decay: 0.01 max_iter: 1 display: 0 '
        f'alternation_param {{ weight_step: LEAST_SQUARES solve_order: TOP_DOWN {extra} }}')
    return get_solver(str(tmp_path / "solver.prototxt"))


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_conv_layer_solve_zeroes_the_masked_gradient(tmp_path, method):
    """After a solve, the gradient of (masked loss + weight decay) w.r.t. the solved layer
    vanishes: the conv layer (patch form, through ReLU supports and pool switches), solved last
    in TOP_DOWN order, densely or by CG."""
    extra = "max_dense_unknowns: 10 cg_iter: 30" if method == "cg" else ""
    solver = _conv_problem(tmp_path, extra)
    ex = solver.exact
    ex.support_pass()
    conv = next(b for b in ex.blocks if b.name == "conv")
    for block in ex.blocks:  # ip (separable), then conv
        ex.solve_separable(block) if ex._separable(block) else \
            (ex.solve_dense(block) if method == "dense" else ex.solve_cg(block))
    net = solver.net
    net.eval()
    for p in conv.params():
        p.grad = None
    for inputs, idx in ex.batches():
        ex._fix(idx)
        values = net.run(inputs, start=ex.first)
        (net.loss(values) * len(idx) / ex.records).backward()
    ex.fixed.remove()
    g = conv.weight.grad + 0.01 * conv.weight.detach()
    g0 = torch.cat([g.reshape(-1), conv.bias.grad.reshape(-1)])
    assert float(g0.abs().max()) < 1e-4


# ------------------------------------------------------------------ resume, CONVEX, errors
def test_snapshot_resume_in_an_exact_run_is_exact(tmp_path):
    case = teacher_files(tmp_path, noise=0.8, max_iter=4, n=600, batch=128)
    full = run_in_process(case, 4)
    part = run_in_process(case, 2)
    _, state = part.snapshot()
    mid = part.net.params["hidden"][0].data.copy()
    resumed = get_solver(str(case["solver"]))
    resumed.restore(state)
    resumed.step(2)
    a = full.net.params["hidden"][0].data
    assert resumed.iter == 4
    assert np.array_equal(resumed.net.params["hidden"][0].data, a)
    assert not np.array_equal(mid, a)  # the run was not over at the snapshot


def test_convex_step_lowers_the_softmax_loss_on_an_lmdb(tmp_path):
    from alternation_case import solver_param

    param = solver_param(tmp_path, 'weight_step: CONVEX lbfgs_iter: 2 exact_layer: "conv1" '
                         'exact_layer: "ip2"', extra="max_iter: 1")
    solver = get_solver(param)
    solver.step(1)
    first = solver.last_exact_stats["loss"]
    after = solver.exact.support_pass()["loss"]
    assert after < first
    assert [n for n, *_ in solver.last_exact_stats["layers"]] == ["conv1", "ip2"]


def test_a_sharded_hdf5_layer_streams_the_ranks_records_from_any_cursor(tmp_path):
    # A data-parallel HDF5Data layer whose shard starts at an odd cursor (a resume on another
    # number of ranks) served only the other rank's records: the stream starts it afresh.
    import h5py

    from pycaffe_alt.alternation.record_stream import ordered_batches
    from pycaffe_alt.distributed.sharding import RecordSplit

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.arange(24, dtype=np.float32).reshape(12, 2)
        f["label"] = np.arange(12, dtype=np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n")
    (tmp_path / "net.prototxt").write_text(
        f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
        f'source: "{tmp_path / "list.txt"}" batch_size: 4 }} }}\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 1 } }\n')
    net = Net(str(tmp_path / "net.prototxt"), 0)
    layer = net.steps[0].layer
    layer.set_shard(1, 2)
    layer.load_state({**layer.state(), "shard_start": 5})
    before = layer.state()
    got = [i for _, idx in ordered_batches(net, 12, split=RecordSplit(1, 2, None, None))
           for i in idx.tolist()]
    assert sorted(got) == [1, 3, 5, 7, 9, 11]
    assert layer.state() == before  # the training cursor is left where it was


def test_a_rank_streams_and_stores_only_its_records(tmp_path):
    # Rank 1 of 2 (the other rank's sums stand in as zeros): half of the 512 records streamed,
    # a store of their 256 rows, every one filled.
    from alternation_case import solver_param
    from pycaffe_alt.distributed.sharding import RecordSplit

    param = solver_param(tmp_path, 'weight_step: CONVEX lbfgs_iter: 1 exact_layer: "ip2"')
    exact = get_solver(param).exact
    assert exact.store is None  # nothing allocated before the first pass
    exact.split = RecordSplit(1, 2, gather=None, reduce=lambda t: t)
    stats = exact.support_pass()
    assert stats["records_computed"] == 256
    assert exact.store.num_records == 256 and exact.store.filled.all()


def test_least_squares_with_softmax_loss_is_reported_by_train(tmp_path):
    case = teacher_files(tmp_path, n=100, batch=50, max_iter=1)
    text = case["net"].read_text().replace('"EuclideanLoss"', '"SoftmaxWithLoss"')
    case["net"].write_text(text)
    proc = train(case["solver"], case["weights"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "loss layer 'loss' is SoftmaxWithLoss" in proc.stderr
    assert f"{case['solver']}: alternation_param.weight_step" in proc.stderr


@pytest.mark.parametrize("extra, message", [
    ("mode: BATCH", "mode BATCH has none"),
    ("lbfgs_iter: 0", "lbfgs_iter must be > 0"),
    ('exact_layer: "nope"', "exact_layer names nope"),
])
def test_bad_exact_step_configuration_names_the_field(tmp_path, extra, message):
    from pycaffe_alt.errors import SolverError

    case = teacher_files(tmp_path, n=100, batch=50, max_iter=1,
                         extra=f"alternation_param {{ weight_step: LEAST_SQUARES {extra} }}")
    with pytest.raises(SolverError) as e:
        get_solver(str(case["solver"]))
    assert message in str(e.value)
    assert str(case["solver"]) in str(e.value)


def test_record_stream_covers_each_record_once_and_keeps_the_cursor(tmp_path):
    from pycaffe_alt.alternation.record_stream import ordered_batches

    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "MemoryData" top: "data" top: "label" '
        'memory_data_param { batch_size: 4 channels: 1 height: 2 width: 2 } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 1 } }\n')
    net = Net(str(tmp_path / "net.prototxt"), 0)
    x = np.arange(12 * 4, dtype=np.float32).reshape(12, 1, 2, 2)
    net.set_input_arrays(x, np.arange(12, dtype=np.float32))
    net.forward()  # the training cursor is now at record 4
    seen = []
    for inputs, idx in ordered_batches(net, 12):
        np.testing.assert_array_equal(inputs["data"].numpy(), x[idx.numpy()])
        seen += idx.tolist()
    assert sorted(seen) == list(range(12))
    net.forward()
    assert net.batch_indices.tolist() == [4, 5, 6, 7]
    # A data-parallel rank's share (rank 1 of 2: records 1, 3, 5, ...), and a rank that
    # cannot get all of its records is told so instead of waiting forever.
    from pycaffe_alt.distributed.sharding import RecordSplit

    split = RecordSplit(1, 2, gather=None, reduce=None)
    got = [i for inputs, idx in ordered_batches(net, 12, split=split) for i in idx.tolist()]
    assert sorted(got) == list(range(1, 12, 2))
    net.set_input_arrays(x[:8], np.arange(8, dtype=np.float32))
    with pytest.raises(SolverError, match="served"):
        list(ordered_batches(net, 12, split=split))
