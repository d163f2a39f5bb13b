"""Shared set-up of the Convex solver tests: small nets and data written to a folder, the solver
run on them, and the convex program solved independently with cvxpy."""
import math
import os

import h5py
import numpy as np
import torch

import pycaffe_alt
from pycaffe_alt.layers import TRAIN
from pycaffe_alt.solver.solver import get_solver

DATA = ('layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" '
        'hdf5_data_param {{ source: "{src}" batch_size: {batch} }} }}\n')
FC = DATA + """
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: {hidden} bias_term: {bias1}
    weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "out"
  inner_product_param {{ num_output: {outputs} bias_term: {bias2}
    weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "label" top: "loss" }}
"""
CNN = DATA + """
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: {hidden} kernel_size: 2 bias_term: {bias1}
    weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "pool1" top: "out"
  inner_product_param {{ num_output: {outputs} bias_term: {bias2}
    weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "label" top: "loss" }}
"""
SOLVER = """net: "{net}" type: "Convex" max_iter: {max_iter} display: {display}
weight_decay: {wd} snapshot_prefix: "{prefix}" solver_mode: CPU random_seed: {seed}
convex_param {{ {convex} }}
"""


def fc_data(n=8, d=2, outputs=1, seed=0):
    """Teacher-student data: y from a random 3-unit ReLU net, plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.maximum(X @ rng.standard_normal((d, 3)), 0) @ rng.standard_normal((3, outputs))
    y += 0.1 * rng.standard_normal(y.shape)
    return X.astype(np.float32), y.astype(np.float32)


def cnn_data(n=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 1, 3, 3)).astype(np.float32)
    y = (X.reshape(n, -1).sum(1, keepdims=True) > 0).astype(np.float32) * 2 - 1
    return X, y


class Case:
    """A net + solver in ``folder``; ``run()`` solves it and returns the solver."""

    def __init__(self, folder, X, y, template=FC, hidden=20, bias1="true", bias2="true",
                 wd=0.01, batch=3, convex="method: ADMM", max_iter=3000, display=0, seed=1,
                 net_text=None):
        self.folder, self.X, self.y, self.wd = str(folder), X, y, wd
        h5 = os.path.join(self.folder, "train.h5")
        with h5py.File(h5, "w") as f:
            f["data"] = X
            f["label"] = y
        src = os.path.join(self.folder, "train.txt")
        with open(src, "w") as f:
            f.write(h5 + "\n")
        self.net_path = os.path.join(self.folder, "net.prototxt")
        text = net_text if net_text is not None else template.format(
            src=src, batch=batch, hidden=hidden, bias1=bias1, bias2=bias2, outputs=y.shape[1])
        with open(self.net_path, "w") as f:
            f.write(text.replace("{src}", src))
        self.prefix = os.path.join(self.folder, "snap", "cvx")
        self.solver_path = os.path.join(self.folder, "solver.prototxt")
        with open(self.solver_path, "w") as f:
            f.write(SOLVER.format(net=self.net_path, max_iter=max_iter, display=display, wd=wd,
                                  prefix=self.prefix, seed=seed, convex=convex))

    def run(self):
        solver = get_solver(self.solver_path)
        solver.solve()
        return solver

    def model(self, solver) -> str:
        return f"{self.prefix}_iter_{solver.iter}.caffemodel"

    def objective(self, weights=None, net=None) -> float:
        """Caffe's objective of the net (float64): EuclideanLoss on the whole set plus
        weight_decay/2 x ||W||^2 over every blob (decay_mult 1), computed here by hand."""
        if net is None:
            net = pycaffe_alt.Net(self.net_path, TRAIN, weights=weights).double()
        with torch.no_grad():
            values = net.run({"data": torch.from_numpy(self.X).double(),
                              "label": torch.from_numpy(self.y).double()}, start=1)
            loss = float(net.loss(values))
            decay = sum(float((p.double() ** 2).sum()) for p in net.parameters())
        return loss + self.wd / 2 * decay


def arrangement_count(m: int, d: int) -> int:
    return 2 * sum(math.comb(m - 1, k) for k in range(min(d, m)))


def sampled_patterns(rows: np.ndarray, draws: int = 200000, seed: int = 7) -> np.ndarray:
    """Patterns found by dense random sampling of directions (independent of the solver)."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((draws, rows.shape[1]))
    return np.unique((h @ rows.T) >= 0, axis=0)


def fc_features(X: np.ndarray, bias: bool) -> np.ndarray:
    X = X.astype(np.float64).reshape(len(X), -1)
    return np.hstack([X, np.ones((len(X), 1))]) if bias else X


def cnn_patches(X: np.ndarray) -> np.ndarray:
    """(n, K, 4): the 2x2 patches of 3x3 images, 1/K folded in (global average pooling)."""
    n = len(X)
    out = np.zeros((n, 4, 4))
    for i in range(2):
        for j in range(2):
            out[:, 2 * i + j] = X[:, 0, i:i + 2, j:j + 2].reshape(n, 4)
    return out / 4


def cvx_optimum(Z: np.ndarray, D: np.ndarray, y: np.ndarray, beta: float,
                ridge) -> float:
    """min 1/2||sum_i D_i Z (v_i - u_i) + b - y||^2 + beta sum (||v_i|| + ||u_i||)
    (+ ridge/2 b^2 with an output bias b), s.t. (2D_i - I) Z v_i >= 0 and the same for u_i,
    per output column; Z (n, K, d), D (P, n*K). Solved with cvxpy (Clarabel)."""
    import cvxpy as cp
    import scipy.sparse as sp

    n, K, d = Z.shape
    rows = Z.reshape(n * K, d)
    P = D.shape[0]
    mask = D.reshape(P, n, K).astype(np.float64)
    # Output map: out = Phi @ vec(v), Phi[n, (p, j)] = sum_k D_p[n, k] Z[n, k, j].
    Phi = np.einsum("pnk,nkd->npd", mask, Z).reshape(n, P * d)
    A = sp.block_diag([(2 * D[p].astype(np.float64) - 1)[:, None] * rows for p in range(P)],
                      format="csr")
    total = 0.0
    for c in range(y.shape[1]):
        v = cp.Variable(P * d)
        u = cp.Variable(P * d)
        out = Phi @ (v - u)
        obj = beta * (cp.sum(cp.norm(cp.reshape(v, (P, d), order="C"), 2, axis=1)) +
                      cp.sum(cp.norm(cp.reshape(u, (P, d), order="C"), 2, axis=1)))
        if ridge is not None:
            b = cp.Variable()
            obj = obj + 0.5 * cp.sum_squares(out + b - y[:, c]) + ridge / 2 * cp.square(b)
        else:
            obj = obj + 0.5 * cp.sum_squares(out - y[:, c])
        problem = cp.Problem(cp.Minimize(obj), [A @ v >= 0, A @ u >= 0])
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        total += float(problem.value)
    return total


def gradient_descent(case: Case, seed: int, iters: int = 2000, lr: float = 0.05) -> float:
    """Full-batch gradient descent (momentum 0.9) on Caffe's objective from a random start."""
    torch.manual_seed(seed)
    net = pycaffe_alt.Net(case.net_path, TRAIN).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    params = [p for p in net.parameters() if p.requires_grad]
    hist = [torch.zeros_like(p) for p in params]
    inputs = {"data": torch.from_numpy(case.X).double(), "label": torch.from_numpy(case.y).double()}
    for _ in range(iters):
        loss = net.loss(net.run(inputs, start=1))
        loss = loss + case.wd / 2 * sum((p ** 2).sum() for p in params)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, h in zip(params, grads, hist):
                h.mul_(0.9).add_(g, alpha=lr)
                p.sub_(h)
    return case.objective(net=net)
