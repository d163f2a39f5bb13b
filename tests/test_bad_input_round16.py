"""Fuzz round 16: tools/train's flag combinations that Caffe accepts (--weights and --snapshot
against the solver file's own weights), the tools' outputs and their log lines."""
import os

import numpy as np
import pytest

from pycaffe_alt.log import setup_logging
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.tools import train
from train_case import make_case


@pytest.fixture
def case(tmp_path, monkeypatch):
    folder = make_case(tmp_path, max_iter=1, test_interval=100, snapshot=0)
    monkeypatch.chdir(folder)
    yield folder
    setup_logging()


def _solver_with(name, extra, source="solver.prototxt"):
    with open(source) as f:
        text = f.read()
    with open(name, "w") as f:
        f.write(extra + text)
    return name


def _model(path):
    return caffe_pb2.NetParameter.FromString(open(path, "rb").read())


def _ip2_weights(path):
    layer = next(l for l in _model(path).layer if l.name == "ip2")
    return np.array(layer.blobs[0].data)


def test_weights_and_snapshot_flags_replace_the_solver_files_weights(case, capsys):
    # caffe.cpp train(): --snapshot clears the file's `weights`, --weights replaces them. They
    # were loaded as well: a missing one stopped the run, and a file's weights were kept for the
    # layers the flag's caffemodels lack (a silently different start).
    init = _model("init.caffemodel")
    sevens = caffe_pb2.NetParameter(name=init.name)
    sevens.layer.add().CopyFrom(next(l for l in init.layer if l.name == "ip2"))
    for blob in sevens.layer[0].blobs:
        blob.data[:] = [7.0] * len(blob.data)
    open("sevens.caffemodel", "wb").write(sevens.SerializeToString())
    no_ip2 = caffe_pb2.NetParameter(name=init.name)
    no_ip2.layer.extend(l for l in init.layer if l.name != "ip2")
    open("no_ip2.caffemodel", "wb").write(no_ip2.SerializeToString())

    _solver_with("missing.prototxt", 'weights: "missing.caffemodel"\n')
    assert train.main(["--solver", "missing.prototxt", "--weights", "init.caffemodel"]) == 0
    log = capsys.readouterr().err
    assert 'weights: "init.caffemodel"' in log and "missing.caffemodel" not in log
    assert train.main(["--solver", "missing.prototxt", "--snapshot", "snap_iter_1.solverstate"]) == 0
    assert "Resuming from snap_iter_1.solverstate" in capsys.readouterr().err

    _solver_with("sevens.prototxt", 'weights: "sevens.caffemodel"\n')
    assert train.main(["--solver", "sevens.prototxt"]) == 0
    assert np.abs(_ip2_weights("snap_iter_1.caffemodel") - 7).max() < 0.5  # the file's weights
    capsys.readouterr()
    assert train.main(["--solver", "sevens.prototxt", "--weights", "no_ip2.caffemodel"]) == 0
    assert "Finetuning from sevens.caffemodel" not in capsys.readouterr().err
    assert np.abs(_ip2_weights("snap_iter_1.caffemodel")).max() < 2  # ip2 from its filler


def test_train_reads_and_upgrades_the_solver_file_once(case, capsys):
    # caffe.cpp reads the file once: the upgrade note was logged twice.
    with open("solver.prototxt") as f:
        text = "".join(line for line in f if not line.startswith("snapshot_prefix"))
    with open("noprefix.prototxt", "w") as f:
        f.write(text)
    assert train.main(["--solver", "noprefix.prototxt"]) == 0
    log = capsys.readouterr().err
    assert log.count("snapshot_prefix was not specified and is set to noprefix") == 1
    assert os.path.isfile("noprefix_iter_1.caffemodel")


def _datum_db(path, sizes):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (c, h, w) in enumerate(sizes):
            datum = caffe_pb2.Datum(channels=c, height=h, width=w, data=bytes(c * h * w), label=0)
            txn.put(b"%08d" % i, datum.SerializeToString())
    env.close()
    return str(path)


@pytest.mark.parametrize("kind", ["folder", "fifo", "missing folder"])
def test_compute_image_mean_refuses_its_output_before_reading_the_records(tmp_path, capfd, kind):
    # A large database takes minutes: the output was refused only after the mean was computed.
    from pycaffe_alt.errors import DataError
    from pycaffe_alt.tools import compute_image_mean

    db = _datum_db(tmp_path / "db", [(1, 4, 4), (1, 5, 5)])  # its 2nd record would fail the run
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        out = tmp_path / "no" / "mean.binaryproto"
    try:
        with pytest.raises(DataError) as info:
            compute_image_mean.main([db, str(out)])
    finally:
        setup_logging()
    assert info.value.message().startswith(f"cannot write '{out}'")
    assert "Starting iteration" not in capfd.readouterr().err


def test_test_and_time_name_the_gpu_as_caffes_line(caplog):
    # caffe.cpp test() and time(): "Use GPU with device ID 1", without the full stop of "Use CPU."
    import logging

    import torch

    from pycaffe_alt.tools.test import log_device

    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        log_device(torch.device("cuda", 1))
        log_device(torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records] == ["Use GPU with device ID 1", "Use CPU."]


@pytest.mark.parametrize("blocker", ["file", "fifo"])
def test_a_snapshot_prefix_under_a_file_names_the_file(case, capsys, blocker):
    # The reason given was makedirs' "File exists".
    from pycaffe_alt.errors import SolverError

    if blocker == "file":
        open("taken", "w").close()
    else:
        os.mkfifo("taken")
    with open("solver.prototxt") as f:
        text = f.read().replace('snapshot_prefix: "snap"', 'snapshot_prefix: "taken/sub/snap"')
    with open("s.prototxt", "w") as f:
        f.write(text)
    with pytest.raises(SolverError) as info:
        train.main(["--solver", "s.prototxt"])
    message = info.value.message()
    assert message.startswith("s.prototxt: snapshot_prefix: cannot write snapshots with prefix "
                              "'taken/sub/snap' ('taken' is not a folder)"), message
