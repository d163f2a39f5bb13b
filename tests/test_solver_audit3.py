"""Third audit of the solvers and tools against the reference Caffe (the SSD fork's solver.cpp,
sgd_solver.cpp and tools/caffe.cpp; BVLC Caffe where the fork has nothing different).

Each test names the Caffe statement it checks; the nets are tiny and built in tmp_path.
"""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.errors import SolverError
from pycaffe_alt.proto import caffe_pb2

LSQ_NET = """
name: "lsq"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
"""


def lsq_file(tmp_path, extra: str = "") -> str:
    (tmp_path / "net.prototxt").write_text(LSQ_NET)
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                    f'max_iter: 2\nsnapshot_prefix: "{tmp_path / "s"}"\n{extra}')
    return str(path)


# ---------------------------------------------------------------------------------------------
# Solver::CheckType: a pycaffe rule class given a file that names another type


@pytest.mark.parametrize("extra,cls", [('type: "SGD"', caffe.AdamSolver),
                                       ('type: "Adam"', caffe.SGDSolver),
                                       ("solver_type: NESTEROV", caffe.SGDSolver)])
def test_rule_class_refuses_a_file_of_another_type(tmp_path, extra, cls):
    """Caffe's Solver constructor CHECKs that a type the file gives (also the one the old
    solver_type enum was upgraded to) is the class's: caffe.AdamSolver on an SGD file aborts
    ("Solver type must agree with instantiated solver class") instead of training Adam."""
    with pytest.raises(SolverError) as e:
        cls(lsq_file(tmp_path, extra), device="cpu")
    assert "solver.prototxt" in str(e.value) and "get_solver" in str(e.value)


def test_rule_class_sets_the_type_a_file_leaves_out(tmp_path):
    """...and a file without a type gets the class's (CheckType's set_type)."""
    s = caffe.AdamSolver(lsq_file(tmp_path, "momentum: 0.9"), device="cpu")
    assert s.type == s.param.type == "Adam"
    assert caffe.SGDSolver(lsq_file(tmp_path, 'type: "SGD"'), device="cpu").type == "SGD"


# ---------------------------------------------------------------------------------------------
# The SSD fork's eval_type: "detection" (Solver::TestDetection and ComputeAP)

# DetectionEvaluate rows [item_id, label, score, tp, fp]; item_id -1: [-1, label, num_pos, ..].
# Label 1 has 2 + 1 = 3 boxes and four scored detections (the 0.6 one matched a difficult box:
# tp = fp = 0, not evaluated); label 2 has a box and no detection (a warning, an AP of 0 that
# still counts in the mean); label 3 has detections but no num_pos row (not averaged).
DET_ROWS = [[-1, 1, 2, 0, 0], [0, 1, 0.7, 1, 0], [0, 1, 0.9, 1, 0], [1, 1, 0.5, 0, 1],
            [1, 1, 0.6, 0, 0], [-1, 1, 1, 0, 0], [1, 1, 0.8, 0, 1], [-1, 2, 1, 0, 0],
            [2, 3, 0.4, 0, 1]]
# Label 1 by score: tp 1 0 1 0 -> precision 1, 1/2, 2/3, 1/2; recall 1/3, 1/3, 2/3, 2/3.
LABEL1_AP = {"Integral": 1 / 3 + (2 / 3) * (1 / 3), "MaxIntegral": 1 / 3 + (2 / 3) * (1 / 3),
             "11point": (4 * 1 + 3 * (2 / 3)) / 11}


def detection_solver(tmp_path, caplog, extra: str):
    test_net = ('test_net_param { name: "det" layer { name: "det" type: "Input" top: "det" '
                f'input_param {{ shape {{ dim: 1 dim: 1 dim: {len(DET_ROWS)} dim: 5 }} }} }} }}\n'
                "test_iter: 1\ntest_interval: 100\n")
    s = caffe.get_solver(lsq_file(tmp_path, test_net + extra), device="cpu")
    s.test_nets[0].blobs["det"].data[...] = [[DET_ROWS]]
    caplog.clear()
    return s


@pytest.mark.parametrize("ap_version", ["Integral", "MaxIntegral", "11point"])
def test_detection_eval_type_reports_the_mean_average_precision(tmp_path, caplog, ap_version):
    """eval_type "detection" tests by TestDetection: the output line is the mAP over the labels
    with positives, each label's AP computed by ComputeAP in the ap_version's style (the
    classification means of the raw rows were printed instead)."""
    s = detection_solver(tmp_path, caplog, f'eval_type: "detection" ap_version: "{ap_version}"')
    with caplog.at_level("INFO", logger="pycaffe_alt"):
        results = s.test(0)
    assert list(results) == ["det"]
    assert results["det"] == pytest.approx(LABEL1_AP[ap_version] / 2, rel=1e-6)
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if "Test net output" in m] == \
        ["    Test net output #0: det = %g" % np.float32(results["det"])]
    assert "Missing true_pos for label: 2" in lines
    assert not any(m.startswith("class") for m in lines)


def test_detection_per_class_lines(tmp_path, caplog):
    """show_per_class_result logs "class<label>: <AP>" for each label averaged (not label 2,
    skipped with its warning)."""
    s = detection_solver(tmp_path, caplog, 'eval_type: "detection" show_per_class_result: true')
    with caplog.at_level("INFO", logger="pycaffe_alt"):
        s.test(0)
    classes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("class")]
    assert classes == ["class1: %g" % np.float32(LABEL1_AP["Integral"])]


@pytest.mark.parametrize("extra,field", [('eval_type: "detections"', "eval_type"),
                                         ('eval_type: "detection" ap_version: "VOC"',
                                          "ap_version")])
def test_unknown_eval_type_or_ap_version_is_refused(tmp_path, caplog, extra, field):
    """The fork aborts on them at the first test ("Unknown evaluation type"); a solver with test
    nets refuses them when it is built."""
    with pytest.raises(SolverError) as e:
        detection_solver(tmp_path, caplog, extra)
    assert f"solver.prototxt: {field}" in str(e.value)


def test_detection_outputs_that_are_not_rows_of_five_are_named(tmp_path):
    """The fork CHECKs width 5 on every output; one SolverError names the solver file, the test
    net and the blob's shape."""
    test_net = ('test_net_param { name: "det" layer { name: "det" type: "Input" top: "det" '
                'input_param { shape { dim: 1 dim: 2 dim: 4 } } } }\ntest_iter: 1\n'
                'test_interval: 100\neval_type: "detection"\n')
    s = caffe.get_solver(lsq_file(tmp_path, test_net), device="cpu")
    with pytest.raises(SolverError) as e:
        s.test(0)
    assert "solver.prototxt: eval_type (test net #0)" in str(e.value)
    assert "[1, 2, 4]" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Test outputs whose size changes between batches (DetectionOutput's detections, a Python layer)

GROW_LAYER = """import caffe
class Grow(caffe.Layer):
    '''An output one value longer at every reshape, as DetectionOutput's row count varies.'''
    def setup(self, bottom, top): self.n = 0
    def reshape(self, bottom, top):
        self.n += 1
        top[0].reshape(1, self.n)
    def forward(self, bottom, top): top[0].data[...] = 1.0
    def backward(self, top, propagate_down, bottom): pass
"""
GROW_NET = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 } } } '
            'layer { name: "g" type: "Python" bottom: "x" top: "g" '
            'python_param { module: "grow_audit3" layer: "Grow" } }')


def test_solver_test_refuses_an_output_whose_size_changes(tmp_path, monkeypatch):
    """Caffe's TestClassification adds batch i's values into the slots batch 0 made (writing
    past them, or shifting another output's values in): such an output has no mean. It was a
    torch RuntimeError traceback; now one SolverError naming the test net and the output."""
    (tmp_path / "grow_audit3.py").write_text(GROW_LAYER)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = f'test_net_param {{ name: "v" {GROW_NET} }}\ntest_iter: 3\ntest_interval: 100\n'
    s = caffe.get_solver(lsq_file(tmp_path, extra), device="cpu", allow_python=True)
    with pytest.raises(SolverError) as e:
        s.test(0)
    assert "test net #0" in str(e.value) and "output g" in str(e.value)


def test_tools_test_refuses_an_output_whose_size_changes(tmp_path, monkeypatch):
    """caffe.cpp's test() accumulates the same way; numpy raised a broadcasting ValueError (or,
    from one value to several, broadcast it silently)."""
    from pycaffe_alt.errors import CaffeError
    from pycaffe_alt.log import setup_logging
    from pycaffe_alt.tools import test as test_tool

    (tmp_path / "grow_audit3.py").write_text(GROW_LAYER)
    (tmp_path / "net.prototxt").write_text(GROW_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(CaffeError) as e:
            test_tool.main(["--model", str(tmp_path / "net.prototxt"), "--iterations", "3",
                            "--allow-python"])
    finally:
        setup_logging()
    assert "output g" in str(e.value) and "net.prototxt" in str(e.value)


def test_detection_rows_with_nan_counts_are_named(tmp_path, caplog):
    """A NaN where the fork casts to int (item_id, label, num_pos, tp, fp) has no meaning (C++
    makes some integer of it); one SolverError instead of Python's int(nan) ValueError."""
    s = detection_solver(tmp_path, caplog, 'eval_type: "detection"')
    s.test_nets[0].blobs["det"].data[0, 0, 1, 3] = float("nan")
    with pytest.raises(SolverError) as e:
        s.test(0)
    assert "solver.prototxt: eval_type (test net #0)" in str(e.value) and "row 1" in str(e.value)


def test_detection_counts_add_up_over_the_test_batches(tmp_path, caplog):
    """TestDetection sums num_pos and collects the detections of every batch before the AP: two
    batches of the same rows are label 1's detections twice against 6 boxes (ties keep their
    order): precision 1 1 2/3 1/2 3/5 2/3 4/7 1/2 at recall 1/6 2/6 2/6 2/6 3/6 4/6 4/6 4/6."""
    s = detection_solver(tmp_path, caplog, 'eval_type: "detection"')
    s.param.test_iter[0] = 2
    ap = (1 + 1 + 3 / 5 + 2 / 3) / 6
    assert s.test(0)["det"] == pytest.approx(ap / 2, rel=1e-6)


def test_get_solver_logs_a_file_without_type_as_written(tmp_path, caplog):
    """caffe.cpp's train() and pycaffe's get_solver build through the registry
    (CreateSolver(param)), whose constructor does not run CheckType: "Initializing solver from
    parameters" shows no type line for a file without one. Only the rule classes' file
    constructor (caffe.SGDSolver(path)) sets it."""
    with caplog.at_level("INFO", logger="pycaffe_alt"):
        s = caffe.get_solver(lsq_file(tmp_path), device="cpu")
    block = next(r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("Initializing solver"))
    assert "type:" not in block and s.type == "SGD" and isinstance(s, caffe.SGDSolver)
    caplog.clear()
    with caplog.at_level("INFO", logger="pycaffe_alt"):
        caffe.SGDSolver(lsq_file(tmp_path), device="cpu")
    block = next(r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("Initializing solver"))
    assert 'type: "SGD"' in block


# ---------------------------------------------------------------------------------------------
# upgrade_proto.cpp's log lines


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_solver_type_upgrade_logs_caffes_three_lines(tmp_path, caplog):
    """UpgradeSolverAsNeeded: "Attempting to upgrade ...", then on success "Successfully
    upgraded ... to 'type' field (string).", then the warning (the middle line was missing)."""
    from pycaffe_alt.prototxt import read_solver

    with caplog.at_level("INFO", logger="pycaffe_alt"):
        read_solver(lsq_file(tmp_path, "solver_type: ADAM"))
    lines = [m for m in _messages(caplog) if "solver_type" in m or "'type' field" in m]
    assert lines[0].startswith("Attempting to upgrade input file specified using deprecated "
                               "'solver_type' field (enum)': ")
    assert lines[1:] == ["Successfully upgraded file specified using deprecated 'solver_type' "
                         "field (enum) to 'type' field (string).",
                         "Note that future Caffe releases will only support 'type' field "
                         "(string) for a solver's type."]


def test_net_upgrades_log_their_success_lines(tmp_path, caplog):
    """UpgradeNetAsNeeded logs a "Successfully upgraded ..." line after each step that worked
    (input fields and V1 layers here; the fork's texts)."""
    from pycaffe_alt.prototxt import read_net

    path = tmp_path / "old.prototxt"
    path.write_text('input: "x" input_dim: 1 input_dim: 2 input_dim: 1 input_dim: 1\n'
                    'layers { name: "r" type: RELU bottom: "x" top: "y" }\n')
    with caplog.at_level("INFO", logger="pycaffe_alt"):
        read_net(str(path))
    lines = _messages(caplog)
    for done in ("Successfully upgraded file specified using deprecated V1LayerParameter",
                 "Successfully upgraded file specified using deprecated input fields."):
        assert done in lines
    v1 = lines.index("Successfully upgraded file specified using deprecated V1LayerParameter")
    assert lines[v1 - 1].startswith("Attempting to upgrade input file specified using "
                                    "deprecated V1LayerParameter: ")
