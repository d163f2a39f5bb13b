"""Solver trajectories against reference Caffe (fixtures/golden/solvers, see its README).

Every case trains the same small net on the golden MNIST LMDB for 30 iterations with one solver
configuration. We compare, from Caffe's logs and snapshots (ref.npz): the loss logged at every
iteration, the learning rate logged at every iteration, the test outputs at 0/10/20/30, the
weights after 30 iterations, and the same for a run resumed from Caffe's own iteration-15
solverstate (Caffe restarts the data cursor on resume, and so do we for a Caffe solverstate).

About the starting weights: the fixture's ``init.caffemodel`` is NOT what Caffe started from.
Caffe's ``train.log`` shows neither ``weights:`` in the solver dump nor a "Finetuning from" line:
the reference runs began from Caffe's own fillers (xavier, zero biases) under ``random_seed: 1``.
We reproduce that start two independent ways, and check they agree:

- forwards, as Caffe made it: ``random_seed`` seeds our copy of Caffe's stream (boost::mt19937
  with boost's uniform_real, pycaffe_alt/caffe_rng.py); the Data layer takes Caffe's set-up draws,
  then conv1, ip1 and ip2 take their xavier values. The trajectories below start this way, with
  no weights file, which is exactly the command Caffe's logs show;
- backwards, from Caffe's own files: SGD with momentum is invertible. From Caffe's ``sgd_fixed``
  iteration-15 weights and history, ``w_t = w_{t+1} + h_{t+1}`` and ``h_t = (h_{t+1} - lr *
  (g(w_t) + decay)) / momentum`` with ``g(w_t)`` evaluated on batch ``t`` (records
  ``16t..16t+15``), in float64. The recovered biases are ~1e-7, i.e. Caffe's constant-0 filler;
  they are set to exactly 0.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt.log import get_logger
from pycaffe_alt.prototxt import read_solver
from pycaffe_alt.solver.snapshot import read_solverstate

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "solvers"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "ref.npz").exists())
TOL = 1e-3


def rel(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)) / max(1e-6, np.max(np.abs(b))))


class LogCapture(logging.Handler):
    """Collects the package's log messages (what tools/train prints)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def series(self, pattern: str):
        out = {}
        for line in self.lines:
            m = re.fullmatch(pattern, line)
            if m:
                out[int(m.group(1))] = float(m.group(2))
        return out


@pytest.fixture
def log():
    logger = get_logger()
    handler = LogCapture()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def recover_sgd_init(case_dir: Path, out: Path) -> Path:
    """Caffe's starting weights of the golden runs, by running ``sgd_fixed`` backwards from its
    iteration-15 snapshot (see the module docstring)."""
    solver = read_solver(str(case_dir / "solver.prototxt"))
    assert solver.type == "SGD" and solver.lr_policy == "fixed"
    lr, momentum, decay = solver.base_lr, solver.momentum, solver.weight_decay
    net = caffe.Net(str(case_dir / "net.prototxt"), caffe.TRAIN,
                    weights=str(case_dir / "snap_iter_15.caffemodel"))
    state = read_solverstate(str(case_dir / "snap_iter_15.solverstate"))
    assert state.iter == 15
    batches = []
    for _ in range(15):  # the data layer alone: batch t holds records 16t .. 16t+15
        values = net.run({}, 0, 0)
        batches.append((values["data"].double(), values["label"].double()))
    net.double()
    infos = net.learnable_params
    history = [torch.tensor(h, dtype=torch.float64).reshape(i.param.shape)
               for h, i in zip(state.history, infos)]
    for t in range(14, -1, -1):
        with torch.no_grad():
            for info, h in zip(infos, history):
                info.param.add_(h)
        for info in infos:
            info.param.grad = None
        values = net.run({"data": batches[t][0], "label": batches[t][1]}, start=1)
        net.loss(values).backward()
        with torch.no_grad():
            for k, info in enumerate(infos):
                g = info.param.grad + decay * info.decay_mult * info.param
                history[k] = (history[k] - lr * info.lr_mult * g) / momentum
    with torch.no_grad():
        for info in infos:
            if info.index == 1:  # biases: Caffe's constant-0 filler
                assert float(info.param.abs().max()) < 1e-5
                info.param.zero_()
    net.float()
    net.save(str(out))
    return out


@pytest.fixture(scope="module")
def caffe_init(tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "caffe_init.caffemodel"
    with contextlib.chdir(GOLDEN / "sgd_fixed"):  # the net reads ../../data/...
        return recover_sgd_init(GOLDEN / "sgd_fixed", out)


def solver_for(case: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(GOLDEN / case)  # the nets read ../../data/... relative to the case folder
    param = read_solver("solver.prototxt")
    param.snapshot_prefix = str(tmp_path / "snap")  # never overwrite Caffe's snapshots
    return param


def final_weights(solver):
    return {(l, i): b.data.copy() for l, blobs in solver.net.params.items() for i, b in enumerate(blobs)}


def compare_weights(solver, ref, prefix: str):
    weights = final_weights(solver)
    worst = 0.0
    for key in ref.files:
        if key.startswith(prefix):
            _, layer, i = key.split("/")
            worst = max(worst, rel(weights[(layer, int(i))], ref[key]))
    return worst


def test_random_seed_gives_caffes_initial_weights(caffe_init, monkeypatch, tmp_path):
    """random_seed: 1 through our Caffe stream == Caffe's start recovered from its snapshot."""
    param = solver_for("sgd_fixed", tmp_path, monkeypatch)
    seeded = caffe.get_solver(param, device="cpu").net
    recovered = caffe.Net("net.prototxt", caffe.TRAIN, weights=str(caffe_init))
    for layer in ("conv1", "ip1", "ip2"):
        w, ref = seeded.params[layer][0].data, recovered.params[layer][0].data
        assert np.abs(w - ref).max() <= 1e-6 * np.abs(ref).max(), layer  # a few float32 ulps
        assert not seeded.params[layer][1].data.any()
    # The fixture's init.caffemodel is another set of weights altogether.
    fixture = caffe.Net("net.prototxt", caffe.TRAIN, weights="init.caffemodel")
    assert np.abs(fixture.params["conv1"][0].data - seeded.params["conv1"][0].data).max() > 0.1


@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_caffe(case, tmp_path, monkeypatch, log):
    """Caffe's command as its log shows it (no --weights): random_seed 1 makes the start."""
    param = solver_for(case, tmp_path, monkeypatch)
    ref = np.load("ref.npz")
    tests = []

    class TestRecorder:
        def on_test(self, solver, net_id, results):
            tests.append((solver.iter, results["accuracy"], results["loss"]))

    solver = caffe.get_solver(param, device="cpu")
    solver.add_hook(TestRecorder())
    solver.solve()

    losses = log.series(r"Iteration (\d+), loss = (\S+)")
    assert sorted(losses) == ref["loss_iter"].tolist()
    assert rel([losses[i] for i in ref["loss_iter"]], ref["loss"]) <= TOL
    rates = log.series(r"Iteration (\d+), lr = (\S+)")
    assert sorted(rates) == ref["lr_iter"].tolist()
    assert rel([rates[i] for i in ref["lr_iter"]], ref["lr"]) <= 1e-5
    assert [t[0] for t in tests] == ref["test_iter"].tolist()
    assert rel([t[1] for t in tests], ref["test_accuracy"]) <= TOL
    assert rel([t[2] for t in tests], ref["test_loss"]) <= TOL
    assert compare_weights(solver, ref, "final/") <= TOL
    assert (tmp_path / "snap_iter_15.caffemodel").exists()
    assert (tmp_path / "snap_iter_30.solverstate").exists()


@pytest.mark.parametrize("case", CASES)
def test_resume_from_caffe_solverstate(case, tmp_path, monkeypatch, log):
    param = solver_for(case, tmp_path, monkeypatch)
    ref = np.load("ref.npz")
    solver = caffe.get_solver(param, device="cpu")
    solver.solve(resume="snap_iter_15.solverstate")
    assert solver.iter == 30
    losses = log.series(r"Iteration (\d+), loss = (\S+)")
    assert sorted(losses) == ref["resume_loss_iter"].tolist()
    assert rel([losses[i] for i in ref["resume_loss_iter"]], ref["resume_loss"]) <= TOL
    assert compare_weights(solver, ref, "resume_final/") <= TOL


def test_log_lines_are_caffes(tmp_path, monkeypatch, log):
    """The lines log parsers read, in Caffe's order and format (compare train.log)."""
    param = solver_for("sgd_fixed", tmp_path, monkeypatch)
    param.max_iter = 1
    param.snapshot = 0
    solver = caffe.get_solver(param, device="cpu")
    solver.solve()
    lines = [l for l in log.lines if l.startswith(("Iteration", "    Train", "    Test"))]
    assert lines[:6] == [
        "Iteration 0, Testing net (#0)",
        "    Test net output #0: accuracy = 0.09375",
        "    Test net output #1: loss = 2.30141 (* 1 = 2.30141 loss)",
        "Iteration 0, loss = 2.21566",
        "    Train net output #0: loss = 2.21566 (* 1 = 2.21566 loss)",
        "Iteration 0, lr = 0.05",
    ]
    assert lines[6].startswith("Iteration 1, loss = ")
