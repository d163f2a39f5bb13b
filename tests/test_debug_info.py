"""debug_info: true prints Caffe's per-layer forward/backward lines (net.cpp's DebugInfo)."""
import logging
import re

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.log import get_logger
from pycaffe_alt.proto import caffe_pb2

NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
  param { name: "w1" } inner_product_param { num_output: 5 weight_filler { type: "xavier" }
  bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "out" param { lr_mult: 0 } param { lr_mult: 0 }
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def records():
    logger = get_logger()
    handler, old = Records(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old)


def make_solver(debug: bool, display: int = 1):
    p = caffe_pb2.SolverParameter()
    text_format.Parse(NET, p.net_param)
    text_format.Parse(f'base_lr: 0.1 lr_policy: "fixed" display: {display} max_iter: 10 '
                      f'random_seed: 2 snapshot_after_train: false', p)
    p.debug_info = debug
    s = caffe.get_solver(p, device="cpu")
    rng = np.random.default_rng(0)
    s.net.blobs["x"].data[...] = rng.standard_normal((4, 3))
    s.net.blobs["y"].data[...] = rng.standard_normal((4, 2))
    return s


def debug_lines(records):
    return [(r.levelname, r.getMessage().strip()) for r in records if "[" in r.getMessage()]


def test_lines_in_caffes_order_and_values(records):
    s = make_solver(True)
    s.step(1)
    lines = debug_lines(records)
    blob_lines = [m for _, m in lines[:-1]]
    names = [re.sub(r" (data|diff): \S+$", "", m) for m in blob_lines]
    assert names == [
        "[Forward] Layer x, top blob x", "[Forward] Layer y, top blob y",
        "[Forward] Layer ip1, top blob h", "[Forward] Layer ip1, param blob w1",
        "[Forward] Layer ip1, param blob 1", "[Forward] Layer relu, top blob h",
        "[Forward] Layer ip2, top blob out", "[Forward] Layer ip2, param blob 0",
        "[Forward] Layer ip2, param blob 1", "[Forward] Layer loss, top blob loss",
        # backward in reverse order; ip2's frozen params and the inputs get no line
        "[Backward] Layer loss, bottom blob out", "[Backward] Layer ip2, bottom blob h",
        "[Backward] Layer relu, bottom blob h", "[Backward] Layer ip1, param blob 0",
        "[Backward] Layer ip1, param blob 1"]
    level, last = lines[-1]
    assert level == "ERROR" and re.fullmatch(
        r"\[Backward\] All net params \(data, diff\): L1 norm = \(\S+, \S+\); "
        r"L2 norm = \(\S+, \S+\)", last)
    assert all(level == "INFO" for level, _ in lines[:-1])
    assert not any("[Update]" in m for _, m in lines)  # Caffe never calls UpdateDebugInfo
    # Values: mean |x| of what each layer produced (the in-place ReLU's own output), mean
    # |diff| of each bottom's gradient. The update already ran: SGD without momentum moved each
    # weight by its history, so the pass saw weights + history.
    value = {n: float(m.rsplit(" ", 1)[1]) for n, m in zip(names, blob_lines)}
    x, y, out = (s.net.blobs[b].data for b in ("x", "y", "out"))
    w1, b1 = (s.net.params["ip1"][i].data + s.history[i].numpy() for i in range(2))
    h = x @ w1.T + b1
    assert value["[Forward] Layer ip1, top blob h"] == pytest.approx(np.abs(h).mean(), rel=1e-5)
    assert value["[Forward] Layer relu, top blob h"] == pytest.approx(
        np.maximum(h, 0).mean(), rel=1e-5)
    assert value["[Backward] Layer loss, bottom blob out"] == pytest.approx(
        np.abs((out - y) / 4).mean(), rel=1e-5)


def test_only_at_display_iterations_and_off_by_default(records):
    s = make_solver(True, display=2)
    s.step(2)
    forward = [m for _, m in debug_lines(records) if m.startswith("[Forward] Layer ip1, top")]
    assert len(forward) == 1
    records.clear()
    make_solver(False).step(1)
    assert debug_lines(records) == []


@pytest.mark.parametrize("max_iter, shown", [(4, True), (4, False)])
def test_final_forward_traces_when_the_last_iteration_did(records, max_iter, shown):
    # Caffe's Solve runs one more forward after the last Step (only when max_iter is a display
    # iteration), with the net's debug flag as the last iteration left it: with display 1 the
    # last iteration (3) traced, so the final pass does; with display 2 it did not.
    s = make_solver(True, display=1 if shown else 2)
    s.param.max_iter = max_iter
    from pycaffe_alt.train.loop import solve
    solve(s)
    finals = [i for i, r in enumerate(records) if r.getMessage().startswith(f"Iteration {max_iter}, loss")]
    assert len(finals) == 1
    before = [r.getMessage() for r in records[:finals[0]]]
    # After the last iteration's own lines (its rate, or with display 2 the one before it).
    last = max(i for i, m in enumerate(before) if ", lr = " in m)
    assert any(m.strip().startswith("[Forward] Layer loss, top blob loss")
               for m in before[last:]) == shown
