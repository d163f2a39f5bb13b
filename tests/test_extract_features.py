"""tools/extract_features: Caffe's feature extraction into databases of Datums, and its bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.data.db import LMDBReader
from pycaffe_alt.errors import CaffeError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.tools import extract_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "tests", "fixtures", "golden", "data", "mnist_test_lmdb")

NET = f"""
name: "features"
layer {{ name: "mnist" type: "Data" top: "data" top: "label"
        data_param {{ source: "{MNIST}" batch_size: 3 backend: LMDB }}
        transform_param {{ scale: 0.00390625 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 2 kernel_size: 5 stride: 3
                            weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.1 }}
                              bias_filler {{ type: "constant" value: -0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip" top: "ip" }}
layer {{ name: "pool" type: "Reduction" bottom: "ip" top: "total" reduction_param {{ axis: 1 }} }}
"""


@pytest.fixture
def model(tmp_path):
    proto = tmp_path / "features.prototxt"
    proto.write_text(NET)
    caffe.set_random_seed(3)
    net = caffe.Net(str(proto), caffe.TEST)
    weights = tmp_path / "features.caffemodel"
    net.save(str(weights))
    return str(proto), str(weights)


def _records(path):
    r = LMDBReader(path)
    try:
        return [(r.key(i), r.datum(i)) for i in range(len(r))]
    finally:
        r.close()


def test_features_are_the_blobs_of_each_batch(tmp_path, model):
    proto, weights = model
    out_ip, out_conv, out_total = (str(tmp_path / n) for n in ("ip_db", "conv_db", "total_db"))
    assert extract_features.main([weights, proto, "ip,conv,total", f"{out_ip},{out_conv},{out_total}",
                                  "2", "lmdb", "CPU"]) == 0
    # The same net, the same two batches: the features are its blobs after every layer (ip
    # after the in-place ReLU, as Caffe's blob_by_name sees it).
    net = caffe.Net(proto, weights, caffe.TEST)
    expected = {"ip": [], "conv": [], "total": []}
    for _ in range(2):
        net.forward()
        for name in expected:
            expected[name].append(net.blobs[name].data.copy())
    for path, name, dims in ((out_ip, "ip", (5, 1, 1)), (out_conv, "conv", (2, 8, 8)),
                             (out_total, "total", (1, 1, 1))):
        records = _records(path)
        assert [k for k, _ in records] == [b"%010d" % i for i in range(6)]
        values = np.concatenate(expected[name]).reshape(6, -1)
        for (_, datum), row in zip(records, values):
            assert (datum.channels, datum.height, datum.width) == dims
            assert not datum.HasField("label") and not datum.data and not datum.encoded
            np.testing.assert_array_equal(np.asarray(datum.float_data, dtype=np.float32), row)
    assert (np.concatenate(expected["ip"]) >= 0).all() and np.concatenate(expected["ip"]).any()


def test_python_api_and_its_argument_checks(tmp_path, model):
    proto, weights = model
    net = caffe.Net(proto, weights, caffe.TEST)
    assert extract_features.extract_features(net, ["ip"], [str(tmp_path / "a")], 1) == [3]
    for blobs, dbs, n, what in ((["ip", "conv"], [str(tmp_path / "b")], 1, "numbers must be equal"),
                                (["nope"], [str(tmp_path / "c")], 1, "unknown feature blob name 'nope'"),
                                (["ip", "conv"], [str(tmp_path / "d")] * 2, 1, "repeat"),
                                (["ip"], [str(tmp_path / "e")], 0, "positive integer"),
                                (["ip"], [str(tmp_path / "a")], 1, "already exists")):
        with pytest.raises(CaffeError, match=what):
            extract_features.extract_features(net, blobs, dbs, n)
    assert sorted(os.listdir(tmp_path)) == ["a", "features.caffemodel", "features.prototxt"]
    with pytest.raises(CaffeError, match="at most 4"):
        extract_features.legacy_dims((1, 2, 3, 4, 5), "five")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features"),
                           *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_bad_input_is_one_paragraph_and_leaves_no_database(tmp_path, model):
    proto, weights = model
    (tmp_path / "taken").mkdir()
    other = tmp_path / "other.prototxt"
    other.write_text(NET.replace('name: "conv"', 'name: "conv_x"').replace('name: "ip"', 'name: "ip_x"'))
    cases = [
        ((weights, proto, "ip", "out1", "ten", "lmdb"), "'ten' is not a positive integer"),
        ((weights, proto, "ip", "out1", "2", "rocksdb"), "unknown database backend"),
        ((weights, proto, "ip", "out1", "2", "lmdb", "TPU"), "expected CPU or GPU"),
        ((weights, proto, "ip,conv", "out1,taken", "1", "lmdb"), "already exists"),
        ((weights, str(other), "ip", "out1", "1", "lmdb"), "random initial weights"),
        ((weights, proto, "fc7", "out1", "1", "lmdb"), "unknown feature blob name 'fc7'"),
        ((str(tmp_path), proto, "ip", "out1", "1", "lmdb"), str(tmp_path)),
    ]
    for args, message in cases:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode in (1, 2), (args, r.stdout, r.stderr)  # 2: argparse usage errors
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "out1").exists(), args


def test_round9_arguments(tmp_path, model, caplog):
    # Partial weights warn (as tools/test), a net with Input blobs is refused (its features
    # would be the response to zeros), one database spelled two ways is a repeat.
    import logging

    proto, weights = model
    full = caffe_pb2.NetParameter.FromString(open(weights, "rb").read())
    partial = caffe_pb2.NetParameter()
    partial.layer.extend([lp for lp in full.layer if lp.name != "ip"])
    (tmp_path / "partial.caffemodel").write_bytes(partial.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
        assert extract_features.main([str(tmp_path / "partial.caffemodel"), proto, "ip",
                                      str(tmp_path / "o"), "1", "lmdb"]) == 0
    assert any("'ip'" in r.getMessage() and "no weights" in r.getMessage() for r in caplog.records)
    net = caffe.Net(proto, weights, caffe.TEST)
    with pytest.raises(CaffeError, match="repeat"):
        extract_features.extract_features(net, ["ip", "conv"], [str(tmp_path / "p"),
                                                                 str(tmp_path / "." / "p")], 1)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 '
                      'dim: 3 } } }\nlayer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
                      'inner_product_param { num_output: 2 } }\n')
    with pytest.raises(CaffeError, match="nothing fills"):
        extract_features.extract_features(caffe.Net(str(deploy), caffe.TEST), ["ip"],
                                          [str(tmp_path / "q")], 1)
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()
