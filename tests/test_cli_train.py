"""tools/train end to end (Caffe's log lines, snapshots, resume, signals) and its helpers:
the progress bar, the signal effects, the --gpu flag and the pycaffe-alt subcommands."""
import io
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from pycaffe_alt.errors import CaffeError
from pycaffe_alt.log import setup_logging
from pycaffe_alt.tools import caffe as caffe_cmd
from pycaffe_alt.tools import parse_log, progress, train
from pycaffe_alt.tools.test import gpu_ids, select_device
from train_case import TOOLS, make_case

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")


def _train(folder, *args, **kw):
    return subprocess.run([sys.executable, os.path.join(TOOLS, "train"), "--solver", "solver.prototxt",
                           *args], cwd=folder, capture_output=True, text=True, env=ENV, timeout=120, **kw)


def test_train_writes_caffe_lines_and_snapshots(tmp_path):
    folder = make_case(tmp_path, max_iter=4, test_interval=2, snapshot=2)
    p = _train(folder, "--weights", "init.caffemodel")
    assert p.returncode == 0, p.stderr
    log = p.stderr
    for line in ("] Use CPU.", "] Starting Optimization", "] Iteration 0, Testing net (#0)",
                 "] Iteration 3, loss = ", "] Iteration 3, lr = 0.05", "] Iteration 4, Testing net (#0)",
                 "Test net output #0: accuracy = ", "] Optimization Done."):
        assert line in log, line
    assert "\r" not in log and "it/s" not in log  # not a terminal: no progress bar
    for it in (2, 4):
        assert os.path.isfile(os.path.join(folder, f"snap_iter_{it}.caffemodel"))
        assert os.path.isfile(os.path.join(folder, f"snap_iter_{it}.solverstate"))
    # our log is what Caffe's log parsers expect
    rows, tests = parse_log.parse_log_lines(log.splitlines(True), 2026)
    assert [r["NumIters"] for r in rows if "loss" in r] == [0, 1, 2, 3]
    assert [r["NumIters"] for r in tests] == [0, 2, 4]



def test_resume_from_snapshot(tmp_path, monkeypatch, capsys):
    folder = make_case(tmp_path, max_iter=2, test_interval=100, snapshot=2)
    monkeypatch.chdir(folder)
    try:
        assert train.main(["--solver", "solver.prototxt"]) == 0
        make_case(tmp_path, max_iter=4, test_interval=100, snapshot=2)
        capsys.readouterr()
        assert train.main(["--solver", "solver.prototxt", "--snapshot", "snap_iter_2.solverstate"]) == 0
    finally:
        setup_logging()
    log = capsys.readouterr().err
    assert "Resuming from snap_iter_2.solverstate" in log
    losses = [line for line in log.splitlines() if ", loss = " in line]
    assert "Iteration 2, loss" in losses[0] and "Iteration 4, loss" in losses[-1]
    assert os.path.isfile("snap_iter_4.caffemodel")


def test_sigint_stops_and_exits_zero(tmp_path):
    folder = make_case(tmp_path, max_iter=100000, test_interval=100000, snapshot=0, display=1)
    folder_log = os.path.join(folder, "train.log")
    with open(folder_log, "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "train"), "--solver",
                                 "solver.prototxt"], cwd=folder, stderr=err, env=ENV)
        try:
            deadline = time.time() + 60
            while "Iteration 2, loss" not in open(folder_log).read():
                assert proc.poll() is None and time.time() < deadline, open(folder_log).read()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = open(folder_log).read()
    assert "SIGINT received: stopping" in text and "Optimization stopped early." in text
    assert "Traceback" not in text


class _SignalAt:
    """A hook sending signals to this process at given iterations."""

    def __init__(self, plan):
        self.plan = plan

    def after_step(self, solver, loss):
        sig = self.plan.pop(solver.iter, None)
        if sig is not None:
            os.kill(os.getpid(), sig)


def test_sigint_snapshot_effect_then_sighup_stop(tmp_path, monkeypatch):
    folder = make_case(tmp_path, max_iter=1000, test_interval=100000, snapshot=0)
    monkeypatch.chdir(folder)
    hook = _SignalAt({3: signal.SIGINT, 5: signal.SIGHUP})
    real_progress = train.training_progress

    def with_signals(solver, stream=None):  # the CLI builds the solver; attach our hook to it
        solver.add_hook(hook)
        return real_progress(solver, stream)

    monkeypatch.setattr(train, "training_progress", with_signals)
    before = signal.getsignal(signal.SIGINT)
    try:
        assert train.main(["--solver", "solver.prototxt", "--sigint_effect", "snapshot",
                           "--sighup_effect", "stop"]) == 0
    finally:
        setup_logging()
    assert os.path.isfile("snap_iter_3.caffemodel") and os.path.isfile("snap_iter_3.solverstate")
    assert os.path.isfile("snap_iter_5.caffemodel")  # snapshot_after_train on the early stop
    assert not hook.plan
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def _fake_solver(max_iter=10, it=0):
    s = types.SimpleNamespace(param=types.SimpleNamespace(max_iter=max_iter), iter=it, hooks=[],
                              stops=0, snaps=0)
    s.add_hook = s.hooks.append
    s.request_stop = lambda: setattr(s, "stops", s.stops + 1)
    s.request_snapshot = lambda: setattr(s, "snaps", s.snaps + 1)
    return s


def test_signal_effects():
    s = _fake_solver()
    fx = train.SignalEffects(s, "stop", "snapshot")
    fx.handle(signal.SIGHUP)
    assert (s.snaps, s.stops) == (1, 0)
    fx.handle(signal.SIGINT)
    assert s.stops == 1
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts a stuck run
        fx.handle(signal.SIGINT)
    quiet = train.SignalEffects(s, "none", "none")
    quiet.handle(signal.SIGINT)
    quiet.handle(signal.SIGHUP)
    assert (s.snaps, s.stops) == (1, 1)
    with pytest.raises(CaffeError, match="invalid signal effect"):
        train.SignalEffects(s, "explode")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    s = _fake_solver(max_iter=10, it=2)
    with progress.training_progress(s, io.StringIO()) as hook:
        assert hook is None
    assert s.hooks == []
    tty = _Tty()
    with progress.training_progress(s, tty) as hook:
        assert s.hooks == [hook]
        for it in range(3, 11):
            s.iter = it
            hook.after_step(s, 0.5)
    out = tty.getvalue()
    assert "10/10" in out and "it/s" in out and "loss=0.5" in out


def test_gpu_flag():
    assert gpu_ids("") == [] and gpu_ids(None) == [] and gpu_ids("1,3") == [1, 3]
    with pytest.raises(CaffeError, match="expected a device id"):
        gpu_ids("first")
    stream = io.StringIO()
    setup_logging(stream)
    try:
        if torch.cuda.is_available():
            assert select_device("0,0").type == "cuda"
        else:
            with pytest.raises(CaffeError, match="no CUDA device"):
                select_device("0,1")
    finally:
        setup_logging()
    assert "data-parallel execution is not implemented" in stream.getvalue()
    assert stream.getvalue().startswith("W")


def test_solver_gpu_mode_without_cuda_falls_back_to_cpu(monkeypatch):
    from pycaffe_alt.proto import caffe_pb2

    param = caffe_pb2.SolverParameter(solver_mode=caffe_pb2.SolverParameter.GPU, device_id=1)
    assert train.gpu_flag_for("2", param) == "2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.gpu_flag_for("", param) == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.gpu_flag_for("", param) == "1"
    assert train.gpu_flag_for("", caffe_pb2.SolverParameter()) == ""


def test_pycaffe_alt_subcommands(capsys):
    assert caffe_cmd.split_command(["--gpu=0", "train", "--solver", "s"]) == \
        ("train", ["--gpu=0", "--solver", "s"])
    with pytest.raises(CaffeError, match="unknown command 'trian'"):
        caffe_cmd.split_command(["trian"])
    assert caffe_cmd.main([]) == 0
    assert "device_query" in capsys.readouterr().out
    assert caffe_cmd.command_main("time").__module__ == "pycaffe_alt.tools.time_net"
    try:
        assert caffe_cmd.main(["device_query"]) == 0
    finally:
        setup_logging()
