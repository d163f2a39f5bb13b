"""Snapshot files: Caffe's solverstates, our round trips, atomic writes, HDF5 layouts, errors."""
from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from pycaffe_alt.errors import CaffeError, SolverError, WeightsError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.solver.rules import update_rule
from pycaffe_alt.solver.snapshot import (RESUME_MAGIC, check_history, decode_resume_state,
                                         encode_resume_state, read_any_solverstate,
                                         read_solverstate, read_solverstate_h5, read_weights_h5,
                                         snapshot_filename, write_solverstate,
                                         write_solverstate_h5, write_weights_h5)

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "solvers"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "snap_iter_15.solverstate").exists())
REPO = Path(__file__).resolve().parent.parent
# The golden net's learnable blobs: conv1, ip1, ip2 (weights, bias).
GOLDEN_SHAPES = [(6, 1, 5, 5), (6,), (24, 216), (24,), (10, 24), (10,)]


def sample_history():
    rng = np.random.default_rng(3)
    return [rng.standard_normal(s).astype(np.float32) for s in [(4, 3, 2, 2), (4,), (5, 7), ()]]


def sample_resume_state():
    return {
        "torch_rng": torch.get_rng_state().numpy().tobytes(),
        "numpy_rng": np.random.default_rng(11).bit_generator.state,   # dict with big ints
        "python_rng": list(random.Random(5).getstate()[1][:8]),
        "cursors": {"train": [12, 3], "test": [0]},
        "phase": "weights", "epoch": 2.5, "loss": float("nan"), "best": float("inf"),
        "nothing": None, "flag": True, "empty": b"",
    }


def assert_same_resume(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and np.isnan(a[k]):
            assert np.isnan(b[k])
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------
# Caffe's own files

@pytest.mark.parametrize("case", CASES)
def test_read_caffe_solverstate(case):
    param = text_format.Parse((GOLDEN / case / "solver.prototxt").read_text(), caffe_pb2.SolverParameter())
    state = read_solverstate(str(GOLDEN / case / "snap_iter_15.solverstate"))
    it, current_step, learned_net, history, resume = state      # unpacks like a tuple
    assert it == 15 and learned_net == "snap_iter_15.caffemodel" and resume is None
    expected = update_rule(param.type).history_shapes(GOLDEN_SHAPES)
    assert [h.shape for h in history] == expected
    assert all(h.dtype == np.float32 and np.isfinite(h).all() for h in history)
    assert any(np.abs(h).max() > 0 for h in history)
    check_history(history, expected, "x.solverstate")
    assert current_step == {"sgd_step": 2, "sgd_multistep_l1": 2}.get(case, 0)


def test_our_solverstate_is_a_plain_caffe_solverstate(tmp_path):
    path = str(tmp_path / "s.solverstate")
    hist = sample_history()
    write_solverstate(path, 7, 1, "s_iter_7.caffemodel", hist, {"cursor": 3})
    state = caffe_pb2.SolverState.FromString(Path(path).read_bytes())
    assert (state.iter, state.current_step, state.learned_net) == (7, 1, "s_iter_7.caffemodel")
    assert [tuple(b.shape.dim) for b in state.history] == [h.shape for h in hist]
    assert state.HasField("current_step")          # written even when 0 in Caffe's files
    # Caffe's schema has no field 5221: an unknown field it skips when parsing.
    assert state.resume_state.startswith(RESUME_MAGIC)


def test_history_count_and_shape_checks():
    hist = [np.zeros((2, 3), np.float32)]
    with pytest.raises(SolverError, match="1 history blobs but .* need 2"):
        check_history(hist, [(2, 3), (3,)], "a.solverstate")
    with pytest.raises(SolverError, match="shape"):
        check_history(hist, [(3, 3)], "a.solverstate")


# ---------------------------------------------------------------------------------------------
# Round trips

def test_solverstate_round_trip(tmp_path):
    path = str(tmp_path / snapshot_filename(str(tmp_path / "snap"), 42, ".solverstate"))
    hist, resume = sample_history(), sample_resume_state()
    write_solverstate(path, 42, 3, "snap_iter_42.caffemodel", hist, resume)
    got = read_solverstate(path)
    assert (got.iter, got.current_step, got.learned_net) == (42, 3, "snap_iter_42.caffemodel")
    assert len(got.history) == len(hist)
    for a, b in zip(got.history, hist):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert_same_resume(got.resume_state, resume)
    # the torch RNG state really restores
    torch.set_rng_state(torch.from_numpy(np.frombuffer(got.resume_state["torch_rng"], np.uint8).copy()))
    # no temp file left next to the snapshot
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


def test_solverstate_without_optional_parts(tmp_path):
    path = str(tmp_path / "a.solverstate")
    write_solverstate(path, 0, 0, None, [torch.ones(2, 2)])
    got = read_solverstate(path)
    assert got.learned_net is None and got.resume_state is None and got.current_step == 0
    assert np.array_equal(got.history[0], np.ones((2, 2), np.float32))


def test_resume_state_codec_rejects_unsafe_or_damaged_data():
    with pytest.raises(TypeError):
        encode_resume_state({"f": lambda: 0})
    with pytest.raises(TypeError):
        encode_resume_state({1: "int key"})
    payload = encode_resume_state({"a": b"\x00\x01\x02", "b": [1, 2]})
    assert decode_resume_state(payload) == {"a": b"\x00\x01\x02", "b": [1, 2]}
    for bad in (payload[:-2], payload[:len(RESUME_MAGIC) + 3], b"\x80\x03pickle", b""):
        with pytest.raises(SolverError) as e:
            decode_resume_state(bad, where="snap.solverstate")
        assert "snap.solverstate" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Errors name the file

def test_missing_solverstate(tmp_path):
    for reader in (read_solverstate, read_solverstate_h5):
        with pytest.raises(SolverError) as e:
            reader(str(tmp_path / "nope.solverstate"))
        assert "nope.solverstate" in str(e.value) and "not found" in str(e.value)


@pytest.mark.parametrize("cut", ["half", "empty", "garbage"])
def test_truncated_or_corrupt_solverstate(tmp_path, cut):
    raw = (GOLDEN / "adam_fixed" / "snap_iter_15.solverstate").read_bytes()
    content = {"half": raw[: len(raw) // 2], "empty": b"", "garbage": b"\xff" * 64}[cut]
    path = tmp_path / "broken.solverstate"
    path.write_bytes(content)
    with pytest.raises(SolverError) as e:
        read_solverstate(str(path))
    assert "broken.solverstate" in str(e.value)


def test_corrupt_hdf5_files(tmp_path):
    path = tmp_path / "broken.solverstate.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(SolverError) as e:
        read_solverstate_h5(str(path))
    assert "broken.solverstate.h5" in str(e.value)
    with pytest.raises(WeightsError) as e:
        read_weights_h5(str(path))
    assert "broken.solverstate.h5" in str(e.value)


def test_unwritable_folder_is_a_clear_error(tmp_path):
    path = tmp_path / "no_such_folder" / "s.solverstate"
    with pytest.raises(CaffeError) as e:
        write_solverstate(str(path), 1, 0, None, [np.zeros(2)])
    assert "no_such_folder" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Atomic writes

def test_failed_write_keeps_the_previous_snapshot(tmp_path):
    path = str(tmp_path / "s.solverstate")
    write_solverstate(path, 5, 0, "m.caffemodel", sample_history())
    before = Path(path).read_bytes()
    with pytest.raises(TypeError):   # the new content cannot be built (a value pickle would take)
        write_solverstate(path, 6, 0, "m.caffemodel", sample_history(), {"bad": object()})
    with pytest.raises(Exception):   # a history entry that is not numeric
        write_solverstate(path, 6, 0, "m.caffemodel", [np.zeros(2), "not an array"])
    assert Path(path).read_bytes() == before
    assert read_solverstate(path).iter == 5
    assert os.listdir(tmp_path) == ["s.solverstate"]


_WRITER = """
import sys, numpy as np
from pycaffe_alt.solver.snapshot import write_solverstate
path = sys.argv[1]
k = 0
while True:
    k += 1
    write_solverstate(path, k, k, "m.caffemodel", [np.full((2_000_000,), k, np.float32)], {"k": k})
"""


def test_killed_during_snapshot_write_leaves_a_complete_file(tmp_path):
    """A process SIGKILLed while its temp file is being written leaves the last complete snapshot."""
    path = tmp_path / "s.solverstate"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env)
    try:
        deadline = time.time() + 60
        seen_temp = False
        while time.time() < deadline and not seen_temp:
            # kill as soon as a write is in flight: a temp file sits next to a complete snapshot
            seen_temp = path.exists() and bool(glob.glob(str(tmp_path / ".s.solverstate*")))
            if not seen_temp:
                time.sleep(0.0005)
        assert seen_temp, "the writer never wrote through a temp file in the snapshot folder"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    state = read_solverstate(str(path))
    assert state.iter >= 1
    assert state.current_step == state.iter and state.resume_state == {"k": state.iter}
    assert state.history[0].shape == (2_000_000,) and (state.history[0] == state.iter).all()


# ---------------------------------------------------------------------------------------------
# HDF5 snapshots

def test_solverstate_h5_layout_and_round_trip(tmp_path):
    import h5py

    path = str(tmp_path / snapshot_filename("snap", 15, ".solverstate.h5"))
    hist, resume = sample_history(), sample_resume_state()
    write_solverstate_h5(path, 15, 2, "snap_iter_15.caffemodel.h5", hist, resume)
    with h5py.File(path, "r") as f:
        assert f["iter"].dtype == np.int32 and f["iter"].shape == (1,) and f["iter"][0] == 15
        assert f["current_step"][0] == 2
        tid = f["learned_net"].id.get_type()    # H5LTmake_dataset_string: null-terminated, len + 1
        assert tid.get_strpad() == h5py.h5t.STR_NULLTERM
        assert tid.get_size() == len("snap_iter_15.caffemodel.h5") + 1
        assert sorted(f["history"], key=int) == [str(i) for i in range(len(hist))]
        assert f["history/0"].dtype == np.float32 and f["history/0"].shape == hist[0].shape
    got = read_any_solverstate(path)
    assert (got.iter, got.current_step, got.learned_net) == (15, 2, "snap_iter_15.caffemodel.h5")
    for a, b in zip(got.history, hist):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert_same_resume(got.resume_state, resume)
    assert sorted(os.listdir(tmp_path)) == ["snap_iter_15.solverstate.h5"]


def test_read_any_solverstate_picks_by_name(tmp_path):
    path = str(tmp_path / "a.solverstate")
    write_solverstate(path, 3, 0, None, [np.ones(3)])
    assert read_any_solverstate(path).iter == 3


def test_weights_h5_layout_and_round_trip(tmp_path):
    import h5py

    path = str(tmp_path / "snap_iter_3.caffemodel.h5")
    conv = [np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), np.ones(2, np.float32)]
    write_weights_h5([("data", []), ("conv1", conv), ("conv2_shared", [None, np.zeros(2)])], path)
    with h5py.File(path, "r") as f:
        assert list(f) == ["data"]
        assert set(f["data"]) == {"data", "conv1", "conv2_shared"}
        assert f["data/conv1/0"].shape == (2, 3, 2, 2) and f["data/conv1/0"].dtype == np.float32
        assert "0" not in f["data/conv2_shared"]          # shared blob not owned: skipped
    got = read_weights_h5(path)
    assert got["data"] == []
    assert all(np.array_equal(a, b) for a, b in zip(got["conv1"], conv))
    assert got["conv2_shared"][0] is None and np.array_equal(got["conv2_shared"][1], np.zeros(2))


def test_snapshot_filename():
    assert snapshot_filename("models/lenet", 1000, ".caffemodel") == "models/lenet_iter_1000.caffemodel"
    assert snapshot_filename("snap", 15, ".solverstate") == "snap_iter_15.solverstate"
    assert snapshot_filename("snap", 15, ".solverstate.h5") == "snap_iter_15.solverstate.h5"
