"""Fuzz round 10: structured mutations of real files, the newest code, leaks and signals."""

import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import NetError, SolverError
from pycaffe_alt.solver.snapshot import read_solverstate, write_solverstate
from bad_input_case import no_hang
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


def test_an_spp_pyramid_taller_than_its_input_is_refused_at_once(tmp_path):
    # pyramid_height 2^32-1 built every level's geometry (2^level with level in the billions)
    # before checking any: the net never finished building.
    net = tmp_path / "spp.prototxt"
    net.write_text('layer { name: "data" type: "Input" top: "data" '
                   'input_param { shape { dim: 2 dim: 2 dim: 9 dim: 9 } } }\n'
                   'layer { name: "spp" type: "SPP" bottom: "data" top: "out" '
                   'spp_param { pyramid_height: 4294967295 pool: MAX } }\n')
    with no_hang(20), pytest.raises(NetError, match="'spp'.*pyramid_height 4294967295: level 3 "
                                                    r"(?s:.*)hint: lower pyramid_height to 3"):
        caffe.Net(str(net), caffe.TEST)
