"""Adversarial review of the two research features (docs/exact_steps.md, docs/global_optimum.md):
the Convex solver's certificate checked without cvxpy (tests/test_convex.py needs it and is
skipped where it is not installed), and the bad training sets both solvers must report in one
paragraph instead of a traceback."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from convex_case import CNN, Case, cnn_data, cnn_patches, fc_data, fc_features
from exact_case import teacher_files
from pycaffe_alt.convex.certificate import dual_max
from pycaffe_alt.convex.patterns import enumerate_patterns
from pycaffe_alt.convex.program import ConvexProgram
from pycaffe_alt.errors import SolverError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(solver) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train"), "--solver",
                           str(solver)], capture_output=True, text=True, env=ENV, timeout=300)


# ------------------------------------------------------------------ the certificate, cvxpy-free
def unit_sup(lam: np.ndarray, Z: np.ndarray, draws: int = 100000) -> float:
    """``max_w |lam^T sum_k relu(Z_k w)|`` over unit vectors w, by dense sampling of the sphere:
    a lower estimate of what the dual constraint must bound (independent of the solver's
    patterns and NNLS projections)."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((draws, Z.shape[-1]))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    vals = np.maximum(np.einsum("nkd,wd->wnk", Z, W), 0).sum(2) @ lam
    return float(np.abs(vals).max())


def _features(kind: str) -> np.ndarray:
    X, _ = fc_data()
    if kind == "fc_bias":
        return fc_features(X, True)[:, None, :]
    if kind == "duplicates_and_opposites":
        Z = fc_features(X, False)[:4]
        return np.vstack([Z, Z, -Z[:2], np.zeros((1, 2))])[:, None, :]
    return cnn_patches(cnn_data()[0])


@pytest.mark.parametrize("kind", ["fc_bias", "duplicates_and_opposites", "cnn"])
def test_dual_constraint_bounds_every_relu_unit(kind):
    """The certificate is valid only if ``M(lambda)`` is at least ``|lambda^T relu(Z w)|`` for
    every unit ``||w|| = 1``: checked against sampled units, and tight (the sampled maximum
    comes within 1% of it)."""
    Z = _features(kind)
    D, _ = enumerate_patterns(torch.from_numpy(Z), 100000)
    prog = ConvexProgram(torch.from_numpy(Z), D, torch.zeros(len(Z), 1, dtype=torch.float64),
                         1.0)
    rng = np.random.default_rng(1)
    for _ in range(3):
        lam = rng.standard_normal(len(Z))
        M = dual_max(prog, torch.from_numpy(lam))
        sup = unit_sup(lam, Z)
        assert sup <= M * (1 + 1e-9)
        assert sup >= 0.99 * M


def _train_objective(case: Case, seed: int, hidden_scale: float = 0.5) -> float:
    """Full-batch gradient descent from a random start: any net's objective is an upper bound
    the certificate must stay below."""
    import pycaffe_alt
    from pycaffe_alt.layers import TRAIN

    torch.manual_seed(seed)
    net = pycaffe_alt.Net(case.net_path, TRAIN).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * hidden_scale)
    params = list(net.parameters())
    opt = torch.optim.LBFGS(params, max_iter=300, line_search_fn="strong_wolfe")
    inputs = {"data": torch.from_numpy(case.X).double(),
              "label": torch.from_numpy(case.y).double()}

    def closure():
        opt.zero_grad()
        loss = net.loss(net.run(inputs, start=1)) + \
            case.wd / 2 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    return case.objective(net=net)


@pytest.mark.parametrize("variant", ["duplicates", "one_example", "no_biases", "cnn"])
def test_certificate_brackets_the_written_net_and_local_searches(tmp_path, variant):
    """Edge-case training sets: the objective the solver reports is the written caffemodel's
    (float64 forward), the certified bound is below it, and no local search goes below the
    bound."""
    X, y = fc_data()
    kw = dict(batch=4, convex="method: ADMM rho: 0.03", max_iter=400)
    if variant == "duplicates":  # the same inputs twice, with different targets
        X, y = np.vstack([X[:4], X[:4]]), np.vstack([y[:4], y[:4] + 0.3])
    elif variant == "one_example":
        X, y, kw["batch"] = X[:1], y[:1], 1
    elif variant == "no_biases":
        kw.update(bias1="false", bias2="false")
    else:
        X, y = cnn_data()
        kw.update(template=CNN, batch=3)
    case = Case(tmp_path, X, y, **kw)
    solver = case.run()
    result = solver.result
    written = case.objective(weights=case.model(solver))
    assert written == pytest.approx(result.objective, rel=1e-5)
    assert result.lower_bound <= result.objective
    best = min(_train_objective(case, seed) for seed in range(2))
    assert best >= result.lower_bound * (1 - 1e-9)


# ------------------------------------------------------------------ non-finite training sets
def _poison(path, dataset: str, value: float) -> None:
    with h5py.File(path, "a") as f:
        a = f[dataset][...]
        a[3].flat[0] = value
        del f[dataset]
        f[dataset] = a


@pytest.mark.parametrize("dataset, value", [("data", np.nan), ("label", np.inf)])
def test_convex_solver_names_a_non_finite_record(tmp_path, dataset, value):
    """A NaN input made ADMM's Cholesky raise LinAlgError, an infinite target made scipy's NNLS
    raise ValueError (tracebacks); now one paragraph naming the data layer and the record."""
    X, y = fc_data()
    case = Case(tmp_path, X, y, batch=4, max_iter=50)
    _poison(os.path.join(case.folder, "train.h5"), dataset, value)
    with pytest.raises(SolverError) as e:
        case.run()
    text = str(e.value)
    assert "layer 'data'" in text and "record 3" in text and "not finite" in text, text
    if dataset == "label":
        return  # tools/train once is enough (its start-up is most of this file's time)
    proc = train(case.solver_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "record 3" in proc.stderr
    assert not os.path.isdir(os.path.dirname(case.prefix)) or \
        not os.listdir(os.path.dirname(case.prefix))


def test_least_squares_step_on_nan_data_stops_with_the_nan_loss_paragraph(tmp_path):
    """A NaN input made the LEAST_SQUARES solve crash inside torch.linalg.lstsq (an internal
    assert, with a traceback); the sweep is now skipped when the loss before it is not finite,
    and training stops with the loop's paragraph, as an SGD iteration with a NaN loss does."""
    case = teacher_files(tmp_path, n=100, batch=50, max_iter=2)
    _poison(tmp_path / "train.h5", "data", np.nan)
    proc = train(case["solver"])
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "loss became nan" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ hidden units the optimum needs
def test_more_blocks_than_hidden_units_are_reduced_to_independent_ones(tmp_path):
    """8 examples, 20 hidden units, 300 ADMM iterations: the point found had 21 nonzero blocks
    and the solver refused with "the optimum found needs 21 hidden units", although an optimum
    needs at most n per output (Carathéodory; Pilanci & Ergen's pruning). Linearly dependent
    unit outputs are now removed without raising the objective, and the net is written."""
    X, y = fc_data()
    # rho fixed: that run's point (21 blocks); residual balancing ends at 13 blocks, no reduction.
    case = Case(tmp_path, X, y, hidden=20, batch=4,
                convex="method: ADMM rho: 0.03 adapt_interval: 0", max_iter=300)
    solver = case.run()
    result = solver.result
    assert result.units <= len(X)
    written = case.objective(weights=case.model(solver))
    assert written == pytest.approx(result.objective, rel=1e-5)
    assert result.lower_bound <= result.objective
    # The reduced net is no worse than the best point the iterations gave before it.
    assert result.objective <= min(h["objective"] for h in result.history[:-1]) * (1 + 1e-9)


def test_fewest_units_keeps_the_output_and_lowers_the_penalty():
    from pycaffe_alt.convex.recover import fewest_units

    Z = fc_features(fc_data()[0], True)[:, None, :]
    D, H = enumerate_patterns(torch.from_numpy(Z), 100000)
    y = torch.from_numpy(fc_data()[1]).double()
    prog = ConvexProgram(torch.from_numpy(Z), D, y, 0.08, ridge=0.08)
    gen = torch.Generator().manual_seed(0)
    # Every block inside its pattern's cone: a positive multiple of the cell's direction.
    scale = torch.rand(2, len(D), 1, 1, generator=gen, dtype=torch.float64)
    V = scale * H[None, :, :, None]
    assert int((V.norm(dim=2) > 0).sum()) > len(Z)
    R = fewest_units(prog, V)
    assert int((R.norm(dim=2) > 0).sum()) <= len(Z)
    torch.testing.assert_close(prog.relu_output(R), prog.relu_output(V), rtol=1e-9, atol=1e-9)
    assert prog.penalty(R) <= prog.penalty(V) * (1 + 1e-12)


# ------------------------------------------------------------------ CONVEX exact step with L1
def test_convex_exact_step_minimises_caffes_l1_objective(tmp_path):
    """regularization_type "L1" (Caffe: diff += decay x sign(w), i.e. decay x ||w||_1) was
    minimised by weight_step CONVEX as if it were L2 (1/2 decay ||w||^2): a silently different
    objective. The hidden layer's block (supports fixed at the start weights) is compared with
    the L1 optimum found here by proximal gradient in float64."""
    from pycaffe_alt.solver import get_solver

    lam = 0.05
    case = teacher_files(tmp_path, d=6, k=2, n=200, batch=200, max_iter=1, weight_decay=lam,
                         extra='regularization_type: "L1"\n'
                               "alternation_param { weight_step: CONVEX lbfgs_iter: 300 }")
    solver = get_solver(str(case["solver"]))
    solver.net.copy_from(str(case["weights"]))
    solver.step(1)
    w = solver.net.params["hidden"][0].data.astype(np.float64)
    x, y = case["x"].astype(np.float64), case["y"].astype(np.float64)[:, 0]
    n, d = x.shape
    m = (case["x"] @ case["w0"].astype(np.float32).T > 0).astype(np.float64)    # (n, k)
    A = np.concatenate([m[:, j:j + 1] * x for j in range(m.shape[1])], axis=1)  # (n, k d)

    def objective(v):
        r = A @ v - y
        return r @ r / (2 * n) + lam * np.abs(v).sum()

    v = np.zeros(A.shape[1])
    step = n / np.linalg.norm(A, 2) ** 2
    for _ in range(20000):  # ISTA: gradient step, then soft threshold
        g = v - step * A.T @ (A @ v - y) / n
        v = np.sign(g) * np.maximum(np.abs(g) - step * lam, 0)
    best = objective(v)
    assert objective(w.reshape(-1)) <= best * (1 + 5e-3) + 1e-6
