"""Third audit of the solvers and tools against the reference Caffe (the SSD fork's solver.cpp,
sgd_solver.cpp and tools/caffe.cpp; BVLC Caffe where the fork has nothing different).

Each test names the Caffe statement it checks; the nets are tiny and built in tmp_path.
"""
from __future__ import annotations

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
