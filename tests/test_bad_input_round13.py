"""Fuzz round 13: mutants of the fixture nets, weights, solvers, states and LMDBs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUT_SHORT = [
    # (file text, parsed as, the field the file ends after)
    ('net: "net.prototxt"\ntest_iter: ', "SolverParameter", "test_iter"),
    ('net: "net.prototxt"\nbase_lr: # the rate\n\n', "SolverParameter", "base_lr"),
    ('type: ', "SolverParameter", "type"),
    ('solver_mode: ', "SolverParameter", "solver_mode"),
    ('debug_info: ', "SolverParameter", "debug_info"),
    ('layer { name: "d" type: "Input" top: "data" input_param { shape { dim: ',
     "NetParameter", "dim"),
]


@pytest.mark.parametrize("text, kind, field", CUT_SHORT)
def test_a_prototxt_cut_short_after_a_field_name_says_so(text, kind, field):
    # A file ending at "field:" gave upb's raw "'': Couldn't parse integer: " (an empty quoted
    # line, no token, no hint), "has no value '.'" for an enum, "found " for a string.
    from pycaffe_alt import prototxt
    from pycaffe_alt.errors import PrototxtError
    from pycaffe_alt.proto import caffe_pb2

    with pytest.raises(PrototxtError) as info:
        prototxt.parse_text(text, getattr(caffe_pb2, kind)(), "cut.prototxt")
    message = info.value.message()
    assert f"the file ends after '{field}', before its value" in message, message
    assert "''" not in message and "cut short" in message, message


def test_train_on_a_solver_cut_short_is_one_paragraph(tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "net.prototxt"\ntest_iter: ')
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train"), "--solver",
                        str(solver)], capture_output=True, text=True, env=env, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "solver.prototxt:2:12: the file ends after 'test_iter', before its value" in r.stderr
