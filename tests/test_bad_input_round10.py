"""Fuzz round 10: structured mutations of real files, the newest code, leaks and signals."""
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import NetError, SolverError
from pycaffe_alt.solver.snapshot import read_solverstate, write_solverstate
from bad_input_case import no_hang
from train_case import GOLDEN, make_case


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


HELD_LMDB_NET = """
layer { name: "mnist" type: "Data" top: "data" top: "label" transform_param { scale: 0.00390625 }
  data_param { source: "%s" batch_size: 16 backend: LMDB } }
"""


def test_a_held_lmdb_is_read_by_one_child_process_for_all_batches(tmp_path, monkeypatch):
    # pycaffe's forward() releases the database after each batch; for a database the program
    # holds open that stopped the child reader, and every batch started a Python process
    # (0.13 s a batch instead of 0.3 ms).
    import gc

    import lmdb

    from pycaffe_alt.data import lmdb_child

    source = str(tmp_path / "mnist_lmdb")  # a copy: the child's reader table is a lock file
    shutil.copytree(os.path.join(GOLDEN, "data", "mnist_train_lmdb"), source)
    started = []
    real_init = lmdb_child.ChildLMDB.__init__

    def counting_init(self, path):
        started.append(path)
        real_init(self, path)

    monkeypatch.setattr(lmdb_child.ChildLMDB, "__init__", counting_init)
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(HELD_LMDB_NET % source)
    env = lmdb.open(source, readonly=True, lock=False)
    try:
        net = caffe.Net(str(net_file), caffe.TRAIN)
        for _ in range(4):
            net.forward()
        del net
        gc.collect()
    finally:
        env.close()
    assert len(started) == 1


HELD_LMDB_PROGRAM = """
import lmdb, sys
import pycaffe_alt as caffe
env = lmdb.open(sys.argv[1], readonly=True, lock=False)
net = caffe.Net(sys.argv[2], caffe.TRAIN)
net.forward()
print("READY", flush=True)
while True:
    net.forward()
"""


def test_ctrl_c_reaches_only_the_program_not_its_lmdb_reader_process(tmp_path):
    # Ctrl-C goes to the terminal's whole foreground process group: the child reading a held
    # LMDB printed its own KeyboardInterrupt traceback under "run.py: interrupted".
    source = str(tmp_path / "mnist_lmdb")
    shutil.copytree(os.path.join(GOLDEN, "data", "mnist_train_lmdb"), source)
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(HELD_LMDB_NET % source)
    program = tmp_path / "held.py"
    program.write_text(HELD_LMDB_PROGRAM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pycaffe_alt.run", str(program), source, str(net_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # a group of its own, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "READY" in proc.stdout.readline()
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "run.py: interrupted" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.parametrize("count, message", [
    ("99999999999999999999", "does not fit in a 32-bit signed integer"),
    ("1_0", "is not a positive integer"),  # int() read 10; Caffe's atoi reads 1
    ("\uff13", "is not a positive integer"),  # a full-width 3: int() took it; atoi reads 0
])
def test_extract_features_batch_counts_are_caffes_int32_decimals(tmp_path, count, message, capsys):
    # A count of 10^20 passed (ints are unbounded) and extracted for ever; the others were read
    # differently from Caffe.
    from pycaffe_alt.tools import extract_features

    with no_hang(60), pytest.raises(SystemExit) as e:
        extract_features.main(["w.caffemodel", "net.prototxt", "ip", str(tmp_path / "out"), count,
                               "lmdb"])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


LENET = os.path.join(GOLDEN, "nets", "lenet_loss")


def test_a_pass_under_inference_mode_leaves_the_net_trainable():
    # The input blobs a pass makes under torch.inference_mode() are inference tensors, which
    # autograd refuses in any graph: every later forward of a force_backward net raised
    # RuntimeError, and other nets failed at their first layer ("failed on bottoms...").
    import numpy as np
    import torch

    proto, weights = os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel")
    x, y = np.random.RandomState(0).rand(2, 1, 28, 28), np.array([1.0, 3.0])
    ref = caffe.Net(proto, weights, caffe.TRAIN)
    ref.forward(data=x, label=y)
    ref.backward()
    net = caffe.Net(proto, weights, caffe.TRAIN)
    with torch.inference_mode():
        net.forward(data=x, label=y)
    net.forward(data=x, label=y)
    net.backward()
    assert np.allclose(net.params["conv1"][0].diff, ref.params["conv1"][0].diff)
    assert np.allclose(net.blobs["data"].diff, ref.blobs["data"].diff)
    with torch.inference_mode():  # backward replays the inference pass's layers
        net(data=torch.from_numpy(x).float(), label=torch.from_numpy(y).float())
    net.backward()
    assert np.allclose(net.blobs["data"].diff, ref.blobs["data"].diff, atol=1e-6)


def test_sparse_and_nested_tensors_are_refused_by_blob_name():
    # They failed inside torch (the memory-format conversion of a bottom, numpy's conversion of
    # a nested tensor) with a RuntimeError traceback.
    import numpy as np
    import torch

    from pycaffe_alt.errors import ArgumentTypeError

    net = caffe.Net(os.path.join(LENET, "net.prototxt"), caffe.TRAIN)
    sparse = torch.rand(2, 1, 28, 28).to_sparse()
    with warnings.catch_warnings():  # torch: nested tensors are "in prototype stage"
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor([torch.rand(1, 28, 28), torch.rand(1, 28, 28)])
    for value, kind in ((sparse, "sparse_coo"), (nested, "nested")):
        with pytest.raises(ArgumentTypeError, match=f"got a {kind} tensor for 'data'"):
            net(data=value, label=torch.ones(2))
        with pytest.raises(NetError, match="'data' that is not an array of numbers"):
            net.forward(data=value, label=np.ones(2))  # the pycaffe form (numpy and tensors)
        with pytest.raises(NetError, match="'data' that is not an array of numbers"):
            net.forward_all(data=value)


def test_paths_with_a_nul_character_are_refused_by_name(tmp_path, monkeypatch):
    # os functions raise ValueError("embedded null byte") for them, which escaped as a
    # traceback: from Net(), net.save() and the solver's snapshot folder probe (a '\000' escape
    # in snapshot_prefix); a solver path that is a folder was "not found".
    from pycaffe_alt.errors import PrototxtError, WeightsError

    with pytest.raises(PrototxtError, match="contains a NUL character"):
        caffe.Net(str(tmp_path / "x\0y.prototxt"), caffe.TEST)
    net = caffe.Net(os.path.join(LENET, "net.prototxt"), caffe.TEST)
    with pytest.raises(WeightsError, match="contains a NUL character"):
        net.save(str(tmp_path / "x\0y.caffemodel"))
    with pytest.raises(SolverError, match="is a directory, not a solver file"):
        caffe.get_solver(str(tmp_path))
    folder = make_case(tmp_path, snapshot_prefix="snap\0shot", max_iter=1)
    monkeypatch.chdir(folder)
    with pytest.raises(SolverError, match="snapshot_prefix 'snap\\\\x00shot' contains a NUL"):
        caffe.get_solver("solver.prototxt").solve()


@pytest.mark.parametrize("fields, message", [
    (dict(type="Adam", momentum=0.9, delta=0.0), "Adam needs delta > 0"),
    (dict(type="AdaGrad", momentum=0.0, delta=-1.0), "AdaGrad needs delta > 0"),
    (dict(type="RMSProp", momentum=0.0, delta=0.0), "RMSProp needs delta > 0"),
    (dict(type="AdaDelta", momentum=2.0), "AdaDelta needs 0 <= momentum <= 1"),
    (dict(type="AdaDelta", momentum=-0.5), "AdaDelta needs 0 <= momentum <= 1"),
])
def test_update_rule_values_that_train_on_nan_are_refused(tmp_path, monkeypatch, fields, message):
    # delta 0 divides 0 by 0 where a gradient entry is still 0; AdaDelta's momentum outside
    # [0, 1] makes its squared-gradient average negative. Both trained to "the loss became nan
    # at iteration 1", blamed on base_lr.
    monkeypatch.chdir(make_case(tmp_path, **fields))
    with pytest.raises(SolverError, match=message):
        caffe.get_solver("solver.prototxt")


def test_layer_names_hdf5_cannot_hold_are_refused_before_writing(tmp_path, monkeypatch):
    # "conv1/5x5" (GoogLeNet's style) was written as group 5x5 inside a group conv1, which the
    # reader refused: an HDF5 snapshot that could not be resumed. An empty name raised h5py's
    # ValueError. A solver for HDF5 snapshots is refused when built, not at its first snapshot.
    from pycaffe_alt.errors import WeightsError

    folder = make_case(tmp_path, snapshot_format=0, snapshot_prefix=str(tmp_path / "snap"))
    net_file = os.path.join(folder, "net.prototxt")
    with open(net_file) as f:
        text = f.read()
    with open(net_file, "w") as f:
        f.write(text.replace('name: "conv1"', 'name: "conv1/5x5"'))
    monkeypatch.chdir(folder)
    with pytest.raises(SolverError, match="snapshot_format HDF5 cannot hold layer 'conv1/5x5'"):
        caffe.get_solver("solver.prototxt")
    net = caffe.Net("net.prototxt", caffe.TEST)
    with pytest.raises(WeightsError, match="'conv1/5x5' cannot be a group of an HDF5"):
        net.save_hdf5(str(tmp_path / "w.caffemodel.h5"))
    assert not (tmp_path / "w.caffemodel.h5").exists()
