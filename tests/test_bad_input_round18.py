"""Bad-input round 18: files of the wrong kind or damaged in new ways (HDF5 snapshots whose
datasets are misnamed or not numbers, BlobProtos with legacy dims beside a shape), string
escapes Caffe's parser refuses, and tool flags with empty entries."""
import os

import h5py
import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError, PrototxtError, SolverError, WeightsError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.solver.snapshot import read_solverstate_h5, write_solverstate_h5
from pycaffe_alt.tools.test import gpu_ids

from bad_input_case import MNIST_LMDB, input_net

IP = ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
      'inner_product_param { num_output: 2 bias_term: BIAS } }')


def ip_net(tmp_path, bias: bool = True) -> str:
    """Input 1x3x2x2 -> InnerProduct 'ip' (2 outputs; weights 2x12, bias 2 when ``bias``)."""
    return input_net(tmp_path, IP.replace("BIAS", "true" if bias else "false"), shape=(1, 3, 2, 2))


def h5_weights(tmp_path, datasets: dict, name: str = "w.caffemodel.h5") -> str:
    path = str(tmp_path / name)
    with h5py.File(path, "w") as f:
        group = f.create_group("data").create_group("ip")
        for key, value in datasets.items():
            group[key] = value
    return path


W = np.arange(24, dtype=np.float32).reshape(2, 12)


def test_hdf5_weights_datasets_caffe_would_not_read_as_blobs_are_refused(tmp_path):
    # "-1" beside "0" in a one-blob layer: Caffe counts two datasets for one blob and refuses;
    # read as index -1 it landed in slot 0 and the file loaded without a word.
    one_blob = ip_net(tmp_path, bias=False)
    path = h5_weights(tmp_path, {"0": W, "-1": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=r"entry named '-1'; blobs are datasets named 0, 1"):
        caffe.Net(one_blob, caffe.TEST, weights=path)
    # "0" and "7" in a two-blob layer: Caffe finds no "1"; we said the file had 8 blobs.
    two_blobs = ip_net(tmp_path)
    path = h5_weights(tmp_path, {"0": W, "7": np.zeros(2, np.float32)}, "seven.caffemodel.h5")
    with pytest.raises(WeightsError, match=r"blob dataset '7' is past the layer's 2 blob\(s\)"):
        caffe.Net(two_blobs, caffe.TEST, weights=path)
    # Strings are no blob (hdf5_load_nd_dataset: "Unsupported datatype class: H5T_STRING").
    path = h5_weights(tmp_path, {"0": W, "1": np.array([b"ab", b"cd"])}, "str.caffemodel.h5")
    with pytest.raises(WeightsError, match=r"layer 'ip' blob 1 holds values of type \|S2"):
        caffe.Net(two_blobs, caffe.TEST, weights=path)
    # Integers are converted, as Caffe's H5T_INTEGER branch does.
    path = h5_weights(tmp_path, {"0": W.astype(np.int32), "1": np.array([5, 6], np.int64)},
                      "int.caffemodel.h5")
    net = caffe.Net(two_blobs, caffe.TEST, weights=path)
    assert net.params["ip"][1].data.tolist() == [5.0, 6.0]


def test_hdf5_solver_state_counters_must_be_one_number(tmp_path):
    path = str(tmp_path / "s.solverstate.h5")
    write_solverstate_h5(path, 4, 0, None, [np.zeros(2, np.float32)])
    assert read_solverstate_h5(path).iter == 4
    # A float is converted, as HDF5 converts it for hdf5_load_int.
    with h5py.File(path, "r+") as f:
        del f["iter"]
        f["iter"] = np.array([6.0])
    assert read_solverstate_h5(path).iter == 6
    for bad, shown in ((np.bytes_(b"7"), r"1 value\(s\) of type \|S1"),
                       (np.array([[3, 3], [3, 3]], np.int32), r"4 value\(s\) of type int32")):
        with h5py.File(path, "r+") as f:
            del f["iter"]
            f["iter"] = bad
        # The string read as iteration 7 and the 2x2 array as its first value: a made-up resume.
        with pytest.raises(SolverError, match=f"dataset 'iter' holds {shown}; Caffe stores one"):
            read_solverstate_h5(path)
    with h5py.File(path, "r+") as f:
        del f["iter"]
        f["iter"] = np.array([2], np.int32)
        del f["history/0"]
        f.create_group("history/0")
    with pytest.raises(SolverError, match="history blob 0 is a group, not a dataset"):
        read_solverstate_h5(path)


def legacy_weights(tmp_path, legacy, shape, name: str) -> str:
    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name="ip", type="InnerProduct")
    for values, dims in ((W, (2, 12)), (np.array([1, 2], np.float32), (2,))):
        blob = layer.blobs.add()
        blob.data.extend(values.ravel().tolist())
        blob.shape.dim.extend(dims)
    blob = layer.blobs[0]
    blob.shape.ClearField("dim")
    blob.shape.dim.extend(shape)
    blob.num, blob.channels, blob.height, blob.width = legacy
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(net.SerializeToString())
    return path


def test_legacy_dims_beside_a_shape_decide_as_in_caffe(tmp_path):
    model = ip_net(tmp_path)
    # Blob::FromProto and ShapeEquals read num/channels/height/width whenever one is set:
    # (2, 12, 0, 0) is not the net's (1, 1, 2, 12). The message named the shape field instead
    # and read "the file has (2, 12), the net expects (2, 12)".
    path = legacy_weights(tmp_path, (2, 12, 0, 0), (2, 12), "both.caffemodel")
    with pytest.raises(WeightsError, match=r"the file has \(2, 12, 0, 0\), the net expects "
                                           r"\(2, 12\)"):
        caffe.Net(model, caffe.TEST, weights=path)
    # Legacy dims that fit win over a shape that does not, as in Caffe: the file loads.
    path = legacy_weights(tmp_path, (1, 1, 2, 12), (12, 2), "legacy_fits.caffemodel")
    net = caffe.Net(model, caffe.TEST, weights=path)
    np.testing.assert_array_equal(net.params["ip"][0].data, W)


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@pytest.mark.parametrize("written", [r"r\q", r"r\8", r"r\e"])
def test_a_string_escape_caffes_parser_refuses_is_located(tmp_path, written):
    path = input_net(tmp_path, f'layer {{ name: "{written}" type: "ReLU" bottom: "data" '
                               'top: "r" }')
    with pytest.raises(PrototxtError, match=r"input_net\.prototxt:2:17: layer .* \(type ReLU\): "
                                            r"invalid escape sequence '\\.' in a string"):
        caffe.Net(path, caffe.TEST)


def test_escapes_caffes_parser_knows_still_read(tmp_path):
    # Octal, hex, letter and quote escapes; a backslash inside a comment is no escape.
    path = input_net(tmp_path, '# a comment with \\q in it\n'
                               'layer { name: "r\\101\\x42\\t\\"\\\\" type: "ReLU" '
                               "bottom: 'data' top: 'r' }")
    net = caffe.Net(path, caffe.TEST)
    assert list(net._layer_names)[-1] == 'rAB\t"\\'


def test_a_gpu_list_with_an_empty_entry_is_refused():
    # caffe.cpp casts every entry of -gpu: "0,,1" is a typo Caffe stops at, not the list 0,1.
    with pytest.raises(CaffeError, match="expected a device id"):
        gpu_ids("0,,1")
    with pytest.raises(CaffeError, match="expected a device id"):
        gpu_ids("0,")
    assert gpu_ids("0,1") == [0, 1]


GOLDEN_SGD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden",
                          "solvers", "sgd_fixed")
GOLDEN_MEAN = os.path.join(os.path.dirname(GOLDEN_SGD), "..", "data", "mnist_mean.binaryproto")


def test_a_file_of_another_kind_is_named_with_where_it_belongs(tmp_path):
    from pycaffe_alt.solver.snapshot import read_any_solverstate

    model = ip_net(tmp_path)
    state = os.path.join(GOLDEN_SGD, "snap_iter_15.solverstate")
    weights = os.path.join(GOLDEN_SGD, "init.caffemodel")
    # A solver state given as weights was "not a valid NetParameter ... truncated or corrupt".
    with pytest.raises(WeightsError, match=r"not a NetParameter: it looks like a solver state "
                                           r"\(\.solverstate\)\n  hint: resume training from it "
                                           "with --snapshot"):
        caffe.Net(model, caffe.TEST, weights=state)
    # A mean image given as weights "held no layers"; as a snapshot its num (field 1, as iter
    # is) was read as iteration 1 of a state with no history.
    with pytest.raises(WeightsError, match=r"it looks like a BlobProto such as a mean image"):
        caffe.Net(model, caffe.TEST, weights=GOLDEN_MEAN)
    with pytest.raises(SolverError, match=r"not a solver state: it looks like a BlobProto"):
        read_any_solverstate(GOLDEN_MEAN)
    with pytest.raises(SolverError, match=r"it looks like a net's weights \(\.caffemodel\)\n"
                                          "  hint: load it with --weights"):
        read_any_solverstate(weights)
    # HDF5: the state as weights, the weights as a state.
    h5_state = str(tmp_path / "s.solverstate.h5")
    write_solverstate_h5(h5_state, 4, 0, "w.caffemodel.h5", [np.zeros(2, np.float32)])
    with pytest.raises(WeightsError, match=r"it looks like an HDF5 solver state"):
        caffe.Net(model, caffe.TEST, weights=h5_state)
    h5_weights_path = h5_weights(tmp_path, {"0": W, "1": np.zeros(2, np.float32)})
    with pytest.raises(SolverError, match=r"it looks like HDF5 weights \(\.caffemodel\.h5\)"):
        read_any_solverstate(h5_weights_path)
    # A caffemodel named as a mean file: "blob declares shape () but holds 0 values".
    mean_net = tmp_path / "mean_net.prototxt"
    mean_net.write_text(
        'layer { name: "d" type: "Data" top: "data" top: "label" transform_param { '
        f'mean_file: "{weights}" }} data_param {{ source: "{MNIST_LMDB}" batch_size: 1 '
        'backend: LMDB } }\n')
    with pytest.raises(CaffeError, match=r"not a BlobProto: it looks like a net's weights"):
        caffe.Net(str(mean_net), caffe.TEST)


def test_convert_model_shapes_with_an_empty_size_or_given_twice_are_refused():
    from pycaffe_alt.tools.convert_model import parse_shapes

    assert parse_shapes(["data=1, 3,8,8"]) == {"data": (1, 3, 8, 8)}
    # "1,,8,8" was read as the 3-axis shape (1, 8, 8).
    with pytest.raises(CaffeError, match="expected BLOB=D0,D1"):
        parse_shapes(["data=1,,8,8"])
    # The second --shape for a blob silently replaced the first.
    with pytest.raises(CaffeError, match=r"gives blob 'data' twice \(\(1, 3\) and \(2, 3\)\)"):
        parse_shapes(["data=1,3", "data=2,3"])


def test_a_mean_file_of_several_images_works_as_its_first_as_in_caffe(tmp_path, caplog):
    import logging

    from pycaffe_alt.data.transformer import load_mean_file
    from pycaffe_alt.weights import write_binaryproto

    # DataTransformer checks channels/height/width only and reads from the blob's start; we
    # refused "a blob of shape [2, 1, 4, 4] ...; a 1xCxHxW mean is needed".
    means = np.stack([np.full((1, 4, 4), 5, np.float32), np.full((1, 4, 4), 9, np.float32)])
    path = str(tmp_path / "two.binaryproto")
    write_binaryproto(means, path)
    with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
        mean = load_mean_file(path, "layer 'd'")
    np.testing.assert_array_equal(mean, np.full((1, 4, 4), 5, np.float32))
    assert "holds 2 images (shape (2, 1, 4, 4)); Caffe uses the first one" in caplog.text
