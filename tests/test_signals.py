"""Stop and snapshot requests (Caffe's SolverAction, sent by the CLI's SIGINT/SIGHUP handlers) and
snapshots interrupted while being written."""
from __future__ import annotations

import logging
import os
import signal

import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.solver.snapshot import read_any_solverstate

from test_solver import lsq_param, lsq_solver


class At:
    """Calls ``action(solver)`` in before_step of iteration ``it``."""

    def __init__(self, it, action):
        self.it, self.action = it, action

    def before_step(self, solver):
        if solver.iter == self.it:
            self.action(solver)


def test_snapshot_request_snapshots_and_goes_on(tmp_path):
    s = lsq_solver(tmp_path, max_iter=5)
    s.add_hook(At(2, lambda sv: sv.request_snapshot()))
    s.step(5)
    assert s.iter == 5 and not s.stopped_early
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lsq_iter_3.caffemodel",
                                                          "lsq_iter_3.solverstate"]
    assert read_any_solverstate(str(tmp_path / "lsq_iter_3.solverstate")).iter == 3


def test_stop_request_ends_solve_with_a_final_snapshot(tmp_path, caplog):
    s = lsq_solver(tmp_path, max_iter=10, snapshot_after_train=True)
    s.add_hook(At(3, lambda sv: sv.request_stop()))
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        s.solve()  # returns normally: the CLI exits 0
    assert s.iter == 4 and s.stopped_early
    assert (tmp_path / "lsq_iter_4.solverstate").exists()
    assert "Optimization stopped early." in [r.getMessage() for r in caplog.records]


def test_stop_request_during_testing(tmp_path, caplog):
    p = lsq_param(tmp_path, max_iter=10)
    p.test_net_param.add().CopyFrom(p.net_param)
    p.test_iter.append(3)
    p.test_interval = 2

    s = caffe.Solver(p, device="cpu")
    s.step(2)
    s.request_stop()  # arrives while the next step() tests at iteration 2: Test() polls it
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        s.step(3)
    assert s.iter == 2 and s.stopped_early
    assert "Test interrupted." in [r.getMessage() for r in caplog.records]


def test_real_signals_through_handlers(tmp_path):
    """What tools/train installs: SIGHUP -> snapshot, SIGINT -> stop."""
    s = lsq_solver(tmp_path, max_iter=20, snapshot_after_train=True)
    old_hup = signal.signal(signal.SIGHUP, lambda *a: s.request_snapshot())
    old_int = signal.signal(signal.SIGINT, lambda *a: s.request_stop())
    try:
        s.add_hook(At(2, lambda sv: os.kill(os.getpid(), signal.SIGHUP)))
        s.add_hook(At(5, lambda sv: os.kill(os.getpid(), signal.SIGINT)))
        s.solve()
    finally:
        signal.signal(signal.SIGHUP, old_hup)
        signal.signal(signal.SIGINT, old_int)
    assert s.iter == 6 and s.stopped_early
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["lsq_iter_3.caffemodel", "lsq_iter_3.solverstate",
                     "lsq_iter_6.caffemodel", "lsq_iter_6.solverstate"]


def test_interrupted_snapshot_write_keeps_the_previous_files(tmp_path, monkeypatch):
    s = lsq_solver(tmp_path)
    s.step(1)
    model, state = s.snapshot()
    good_model = open(model, "rb").read()
    good_state = open(state, "rb").read()
    s.iter = 1  # write again under the same names, and be killed half way

    def killed(fd):
        raise KeyboardInterrupt  # e.g. a second Ctrl-C while the temp file is being flushed

    s.net.params["ip"][0].data[...] = 123.0
    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        s.snapshot()
    monkeypatch.undo()
    assert open(model, "rb").read() == good_model
    assert open(state, "rb").read() == good_state
    t = lsq_solver(tmp_path)
    t.restore(state)
    assert t.iter == 1 and not np.any(t.net.params["ip"][0].data == 123.0)
