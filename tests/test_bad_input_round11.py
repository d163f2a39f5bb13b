"""Fuzz round 11: plateau solver states, partial backward, layer phases, net.save round trips."""
import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.errors import SolverError
from pycaffe_alt.proto import caffe_pb2
from test_resume import PLATEAU_NET  # the plateau resume tests' net


def plateau_solver(tmp_path, fmt: str, prefix: str):
    p = caffe_pb2.SolverParameter()
    text_format.Parse(PLATEAU_NET, p.net_param)
    text_format.Parse('type: "SGD" base_lr: 0.1 lr_policy: "plateau" gamma: 0.5 '
                      "plateau_winsize: 1000 max_iter: 4 random_seed: 3", p)
    p.snapshot_format = getattr(caffe_pb2.SolverParameter, fmt)
    p.snapshot_prefix = str(tmp_path / prefix)
    path = tmp_path / f"{prefix}.prototxt"
    path.write_text(text_format.MessageToString(p))
    return caffe.get_solver(str(path))


@pytest.mark.parametrize("field", ["iter_last_event", "current_step"])
@pytest.mark.parametrize("value", [2 ** 31, -2 ** 40])
def test_an_hdf5_state_counter_outside_int32_is_refused_at_restore(tmp_path, field, value):
    # An HDF5 dataset holds any integer; taken as read, iter_last_event 2^31 stopped the next
    # snapshot with protobuf's ValueError / numpy's OverflowError traceback, after the
    # .caffemodel of that snapshot was written.
    import h5py

    first = plateau_solver(tmp_path, "HDF5", "a")
    first.step(2)
    _, state = first.snapshot()
    with h5py.File(state, "r+") as f:
        del f[field]
        f[field] = np.array([value], np.int64)
    second = plateau_solver(tmp_path, "BINARYPROTO", "b")
    if field == "current_step" and value < 0:
        match = "current_step is .* never negative"
    else:
        match = f"{field} is {value}, outside the int32 range"
    with pytest.raises(SolverError, match=match):
        second.restore(state)
    assert not list(tmp_path.glob("b_iter_*"))
