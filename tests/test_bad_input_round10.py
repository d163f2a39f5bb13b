"""Fuzz round 10: structured mutations of real files, the newest code, leaks and signals."""

import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import SolverError
from pycaffe_alt.solver.snapshot import read_solverstate, write_solverstate
from train_case import make_case

def test_a_resume_state_with_an_absurd_world_size_is_refused(tmp_path, monkeypatch):
    # world_size 2^63 passed the resume checks (>= 1) and the global cursor it implies overflowed
    # the int64 sample numbers at the first batch (OverflowError traceback from the pipeline).
    folder = make_case(tmp_path, snapshot_prefix=str(tmp_path / "snap"))
    monkeypatch.chdir(folder)
    first = caffe.get_solver("solver.prototxt")
    first.step(2)
    _, path = first.snapshot()
    data = read_solverstate(path)
    data.resume_state["data"]["train"]["mnist"]["world_size"] = 2 ** 63
    bad = str(tmp_path / "bad.solverstate")
    write_solverstate(bad, data.iter, data.current_step, data.learned_net, data.history,
                      data.resume_state)
    fresh = caffe.get_solver("solver.prototxt")
    with pytest.raises(SolverError, match="bad.solverstate.*resume data.*global cursor"):
        fresh.restore(bad)
