"""HDF5Output: Caffe's dump layer (file made at setup, legacy 4-axis datasets, rows appended)."""
import h5py
import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import NetError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.prototxt import parse_text


def output_net(path, data_shape=(4, 3), label_shape=(4,)):
    dims = lambda s: " ".join(f"dim: {d}" for d in s)  # noqa: E731
    text = f"""
    layer {{ name: "in" type: "Input" top: "data" top: "label"
      input_param {{ shape {{ {dims(data_shape)} }} shape {{ {dims(label_shape)} }} }} }}
    layer {{ name: "dump" type: "HDF5Output" bottom: "data" bottom: "label"
      hdf5_output_param {{ file_name: "{path}" }} }}
    """
    return caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)


def test_every_forward_appends_its_rows_in_caffes_legacy_shape(tmp_path):
    path = tmp_path / "out.h5"
    net = output_net(path)
    with h5py.File(path, "r") as h5:
        assert list(h5.keys()) == []  # created empty at setup
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        data, label = rng.standard_normal((4, 3)), rng.integers(0, 5, 4)
        net.blobs["data"].data[...] = data
        net.blobs["label"].data[...] = label
        net.forward()
        batches.append((data, label))
    with h5py.File(path, "r") as h5:
        assert h5["data"].shape == (12, 3, 1, 1) and h5["data"].dtype == np.float32
        assert h5["label"].shape == (12, 1, 1, 1)
        np.testing.assert_allclose(h5["data"][:, :, 0, 0],
                                   np.concatenate([d for d, _ in batches]), rtol=1e-6)
        np.testing.assert_array_equal(h5["label"][:, 0, 0, 0],
                                      np.concatenate([lab for _, lab in batches]))
    assert net.layer_dict["dump"].module.rows_written == 12


def test_a_rebuilt_net_truncates_the_file(tmp_path):
    path = tmp_path / "out.h5"
    net = output_net(path)
    net.forward()
    output_net(path)
    with h5py.File(path, "r") as h5:
        assert "data" not in h5


def test_hdf5data_reads_the_dump_back(tmp_path):
    path = tmp_path / "out.h5"
    net = output_net(path, data_shape=(2, 3, 4, 5), label_shape=(2,))
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = [3, 7]
    net.forward()
    (tmp_path / "list.txt").write_text(f"{path}\n")
    reader = caffe.Net(parse_text(f"""
    layer {{ name: "h5" type: "HDF5Data" top: "data" top: "label"
      hdf5_data_param {{ source: "{tmp_path / 'list.txt'}" batch_size: 2 }} }}
    """, caffe_pb2.NetParameter()), caffe.TEST)
    out = reader.forward()
    np.testing.assert_allclose(out["data"], x, rtol=1e-6)
    np.testing.assert_array_equal(out["label"].reshape(-1), [3, 7])


@pytest.mark.parametrize("case, message", [
    ("no_name", "has no file name"),
    ("folder", "is a directory"),
    ("missing_folder", "does not exist"),
    ("rows", "same batch size"),
    ("axes", "at most 4 axes"),
])
def test_bad_hdf5output_layers_name_the_layer(tmp_path, case, message):
    path, data, label = tmp_path / "out.h5", (4, 3), (4,)
    if case == "no_name":
        path = ""
    elif case == "folder":
        path = tmp_path
    elif case == "missing_folder":
        path = tmp_path / "nope" / "out.h5"
    elif case == "rows":
        label = (5,)
    elif case == "axes":
        data = (4, 1, 1, 1, 2)
    with pytest.raises(NetError, match=message) as e:
        output_net(path, data, label)
    assert "'dump'" in str(e.value)


@pytest.mark.parametrize("forward_first", [True, False], ids=["second backward", "no forward"])
def test_a_backward_writes_no_rows(tmp_path, forward_first):
    # Caffe's HDF5Output Backward does nothing: a backward that ran the layers again to record
    # their graph (the first backward freed it, or no forward made one) appended a batch.
    path = tmp_path / "out.h5"
    text = f"""
    layer {{ name: "in" type: "Input" top: "x" top: "label"
      input_param {{ shape {{ dim: 2 dim: 3 }} shape {{ dim: 2 dim: 1 }} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "y"
      inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: 1 }} }} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "label" top: "loss" }}
    layer {{ name: "dump" type: "HDF5Output" bottom: "y" bottom: "label"
      hdf5_output_param {{ file_name: "{path}" }} }}
    """
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN)
    rows = 0
    if forward_first:
        net.forward(x=np.ones((2, 3), np.float32), label=np.zeros((2, 1), np.float32))
        net.backward()
        rows = 2
    net.backward()
    with h5py.File(path, "r") as h5:
        assert (h5["data"].shape[0] if "data" in h5 else 0) == rows
    assert net.layer_dict["dump"].module.rows_written == rows
