"""Bad input to the command-line tools: one clear paragraph (file, line, what to do), exit 1, no
traceback, and for tools/train a failure before the first iteration."""
import os
import subprocess
import sys

import numpy as np
import pytest

from pycaffe_alt.errors import CaffeError, DataError, WeightsError
from pycaffe_alt.log import setup_logging
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.tools import train
from pycaffe_alt.weights import array_to_blob
from train_case import TOOLS, make_case


@pytest.fixture
def case(tmp_path, monkeypatch):
    folder = make_case(tmp_path, max_iter=2, test_interval=100, snapshot=1)
    monkeypatch.chdir(folder)
    yield folder
    setup_logging()


def _fails(capsys, argv, error=CaffeError, match=None):
    with pytest.raises(error, match=match) as info:
        train.main(argv)
    log = capsys.readouterr().err
    assert "Iteration 0" not in log and "Starting Optimization" not in log  # nothing trained
    return info.value.message()


def _edit(path, old, new, out):
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(out, "w") as f:
        f.write(text.replace(old, new))


def test_weights_and_snapshot_exclude_each_other(case, capsys):
    msg = _fails(capsys, ["--solver", "solver.prototxt", "--weights", "init.caffemodel",
                          "--snapshot", "x.solverstate"], match="not both")
    assert "--snapshot" in msg and "--weights" in msg


def test_solver_syntax_error_names_file_and_line(case, capsys):
    with open("bad.prototxt", "w") as f:
        f.write('net: "net.prototxt"\nbase_lr: 0.01\nmomentum 0.9\n')
    msg = _fails(capsys, ["--solver", "bad.prototxt"])
    assert msg.startswith("bad.prototxt:3:")


def test_missing_net_file(case, capsys):
    _edit("solver.prototxt", '"net.prototxt"', '"no_such_net.prototxt"', "solver2.prototxt")
    msg = _fails(capsys, ["--solver", "solver2.prototxt"])
    assert "no_such_net.prototxt" in msg and "not found" in msg


def test_weights_that_do_not_fit(case, capsys, tmp_path):
    wrong = caffe_pb2.NetParameter(name="other")
    layer = wrong.layer.add(name="conv1", type="Convolution")
    layer.blobs.add().CopyFrom(array_to_blob(np.zeros((2, 3), np.float32)))
    layer.blobs.add().CopyFrom(array_to_blob(np.zeros((2,), np.float32)))
    with open("wrong.caffemodel", "wb") as f:
        f.write(wrong.SerializeToString())
    msg = _fails(capsys, ["--solver", "solver.prototxt", "--weights", "wrong.caffemodel"],
                 WeightsError)
    assert "wrong.caffemodel" in msg and "conv1" in msg and "(6, 1, 5, 5)" in msg


def test_missing_weights_or_snapshot_file(case, capsys):
    assert "nope.caffemodel" in _fails(capsys, ["--solver", "solver.prototxt", "--weights",
                                                "init.caffemodel,nope.caffemodel"], WeightsError)
    assert "gone.solverstate" in _fails(capsys, ["--solver", "solver.prototxt", "--snapshot",
                                                 "gone.solverstate"])


def test_unwritable_snapshot_folder(case, capsys):
    with open("a_file", "w") as f:
        f.write("not a folder")
    _edit("solver.prototxt", 'snapshot_prefix: "snap"', 'snapshot_prefix: "a_file/snap"',
          "solver2.prototxt")
    msg = _fails(capsys, ["--solver", "solver2.prototxt"])
    assert "a_file/snap" in msg


def test_missing_dataset_names_path_and_the_command_that_makes_it(case, capsys):
    _edit("net.prototxt", "mnist_train_lmdb", "no_such_lmdb", "net.prototxt")
    msg = _fails(capsys, ["--solver", "solver.prototxt"], DataError)
    assert "no_such_lmdb" in msg and "convert_" in msg


def _run(tool, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(TOOLS, tool), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))


def test_executables_print_one_paragraph_and_exit_1(tmp_path):
    (tmp_path / "bad.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.01 }\n')
    p = _run("train", "--solver", "bad.prototxt", cwd=tmp_path)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("train: error: bad.prototxt:2:")
    assert len(p.stderr.strip().splitlines()) <= 2  # the message and its hint
    p = _run("time", "--model", "missing.prototxt", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "missing.prototxt" in p.stderr


@pytest.mark.parametrize("flag", [",", "init.caffemodel,", ",init.caffemodel"])
def test_an_empty_weights_entry_is_refused(case, capsys, flag):
    # It trained from scratch without a word (Caffe would try to open the empty name).
    assert "empty entry" in _fails(capsys, ["--solver", "solver.prototxt", "--weights", flag],
                                   WeightsError)
