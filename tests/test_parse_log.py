"""tools/parse_log against real Caffe training logs (golden solvers) and synthetic glog lines."""
import csv
import math
import os

import numpy as np
import pytest

from pycaffe_alt.errors import CaffeError
from pycaffe_alt.tools import parse_log as pl

HERE = os.path.dirname(os.path.abspath(__file__))
SOLVERS = os.path.join(HERE, "fixtures", "golden", "solvers")
CASES = ["sgd_step", "adam_fixed"]


def _ref(case):
    return np.load(os.path.join(SOLVERS, case, "ref.npz"))


@pytest.mark.parametrize("case", CASES)
def test_golden_log_lists_every_iteration_and_test(case):
    train, test = pl.parse_log(os.path.join(SOLVERS, case, "train.log"))
    ref = _ref(case)
    by_iter = {r["NumIters"]: r for r in train}
    # Caffe's display loss of every iteration, plus the one it logs after the last step
    assert sorted(by_iter) == ref["loss_iter"].tolist() == list(range(31))
    np.testing.assert_allclose([by_iter[i]["SmoothedLoss"] for i in ref["loss_iter"]], ref["loss"],
                               rtol=1e-5)
    # the net's own loss output (average_loss 1: the same values) for each training step
    assert [r["NumIters"] for r in train if "loss" in r] == list(range(30))
    np.testing.assert_allclose([by_iter[i]["loss"] for i in range(30)], ref["loss"][:30], rtol=1e-5)
    # the rate of each row is the one logged for that very iteration
    np.testing.assert_allclose([by_iter[i]["LearningRate"] for i in ref["lr_iter"]], ref["lr"], rtol=1e-5)
    assert [r["NumIters"] for r in test] == [0, 10, 20, 30] == ref["test_iter"].tolist()
    np.testing.assert_allclose([r["accuracy"] for r in test], ref["test_accuracy"], rtol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in test], ref["test_loss"], rtol=1e-5)
    seconds = [r["Seconds"] for r in train]
    assert seconds[0] >= 0 and seconds == sorted(seconds) and seconds[-1] > 0


def test_cli_writes_caffe_style_csv_tables(tmp_path):
    log = os.path.join(SOLVERS, "sgd_step", "train.log")
    assert pl.main([log, str(tmp_path)]) == 0
    with open(tmp_path / "train.log.train") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "train.log.test") as f:
        test_rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert [int(r["NumIters"]) for r in rows if r["loss"]] == list(range(30))
    assert [int(r["NumIters"]) for r in test_rows] == [0, 10, 20, 30]
    assert set(test_rows[0]) == {"NumIters", "Seconds", "LearningRate", "accuracy", "loss"}
    assert float(test_rows[1]["LearningRate"]) == pytest.approx(_ref("sgd_step")["lr"][10])


def test_resumed_log_starts_at_its_iteration():
    train, test = pl.parse_log(os.path.join(SOLVERS, "sgd_step", "train_resume.log"))
    iters = [r["NumIters"] for r in train if "loss" in r]
    assert iters[0] == 15 and iters[-1] == 29
    assert [r["NumIters"] for r in test] == [20, 30]


def _line(stamp, msg):
    return f"I{stamp} 12345 solver.cpp:231] {msg}\n"


def test_year_rollover_and_newer_caffe_format():
    lines = [
        _line("1231 23:59:58.000000", "Solving Net"),
        _line("1231 23:59:59.500000", "Iteration 0 (0 iter/s, 0.0s/1 iters), loss = 1.5"),
        _line("1231 23:59:59.600000", "    Train net output #0: loss = 1.5 (* 1 = 1.5 loss)"),
        _line("1231 23:59:59.700000", "Iteration 0, lr = 0.01"),
        _line("0101 00:00:01.000000", "Iteration 1 (2 iter/s, 0.5s/1 iters), loss = nan"),
        _line("0101 00:00:01.100000", "    Train net output #0: loss = nan (* 1 = nan loss)"),
        _line("0101 00:00:01.200000", "Iteration 1, lr = 1e-03"),
        _line("0101 00:00:02.000000", "Iteration 2, Testing net (#0)"),
        _line("0101 00:00:02.100000", "    Test net output #0: accuracy = 0.5"),
        _line("0101 00:00:02.200000", "Iteration 2, Testing net (#1)"),
        _line("0101 00:00:02.300000", "    Test net output #0: accuracy = 0.25"),
    ]
    train, test = pl.parse_log_lines(lines, 2025)
    assert [r["NumIters"] for r in train] == [0, 1]
    assert train[0]["Seconds"] == pytest.approx(1.5)
    assert train[1]["Seconds"] == pytest.approx(3.0)  # across New Year, not minus 364 days
    assert train[0]["LearningRate"] == 0.01 and train[1]["LearningRate"] == 1e-3
    assert math.isnan(train[1]["loss"]) and math.isnan(train[1]["SmoothedLoss"])
    assert test[0]["accuracy"] == 0.5 and test[1]["accuracy#1"] == 0.25
    assert test[0]["LearningRate"] == 1e-3  # the rate in force at iteration 2
    assert pl.columns(train)[-1] == "SmoothedLoss"


def test_year_in_stamp_needs_no_guess():
    t = pl.line_datetime("I20261123 05:20:04.578788 17777 solver.cpp:231] x", 1999)
    assert (t.year, t.month, t.day, t.microsecond) == (2026, 11, 23, 578788)
    assert pl.line_datetime("train_state {", 2026) is None


def test_missing_log_and_empty_log_are_user_errors(tmp_path):
    with pytest.raises(CaffeError, match="does not exist"):
        pl.main([str(tmp_path / "nope.log"), str(tmp_path)])
    empty = tmp_path / "empty.log"
    empty.write_text("hello\n")
    with pytest.raises(CaffeError, match="no training or test lines"):
        pl.main([str(empty), str(tmp_path)])
    with pytest.raises(CaffeError, match="does not exist"):
        pl.main([os.path.join(SOLVERS, "sgd_step", "train.log"), str(tmp_path / "nodir")])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_where_a_table_goes_is_refused_not_waited_on(tmp_path):
    import subprocess
    import sys

    log = os.path.join(SOLVERS, "sgd_step", "train.log")
    os.mkfifo(tmp_path / "train.log.train")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The tool as users run it, in a child with a timeout: the old open() blocked until someone
    # read the FIFO.
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "parse_log"), log,
                           str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=root)
    assert proc.returncode != 0
    assert "train.log.train" in proc.stderr and "FIFO" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.path.exists(tmp_path / "train.log.train")  # left as it was
