"""Bad-input round 19: blob sizes beyond Caffe's ``int`` (Blob::Reshape's INT_MAX checks) and
pycaffe API misuse, where pycaffe raises a Python exception type a program may catch (ours must
be catchable as that type too) or Caffe aborts (ours raises a CaffeError naming the net)."""
import os

import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt import layers as L
from pycaffe_alt.errors import (ArgumentTypeError, BlobSizeError, CaffeError, NetError,
                                SolverError)
from pycaffe_alt.io import Transformer
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.prototxt import parse_text

HERE = os.path.dirname(os.path.abspath(__file__))
LENET = os.path.join(HERE, "fixtures", "golden", "nets", "lenet_loss")


@pytest.fixture(autouse=True)
def small_machine(monkeypatch):
    """A 1 GiB machine: a regressed size check is refused by the memory check (another
    message, the test fails) instead of allocating gigabytes."""
    monkeypatch.setattr("pycaffe_alt.blob_memory.physical_memory", lambda: 2 ** 30)


def lenet():
    return caffe.Net(os.path.join(LENET, "net.prototxt"),
                     os.path.join(LENET, "weights.caffemodel"), caffe.TEST)


def net_from(text):
    return caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)


def input_of(dims):
    return net_from('layer { name: "in" type: "Input" top: "x" input_param { shape { '
                    + " ".join(f"dim: {d}" for d in dims) + " } } }")


@pytest.mark.parametrize("dims, said", [
    ((4294967297,), "dimension over INT_MAX"),  # Caffe's int cut it to 1
    ((2147483648,), "dimension over INT_MAX"),  # ... and this to a negative dimension
    ((65536, 32768), "blob size exceeds INT_MAX"),
    ((65536, 65536, 0), "blob size exceeds INT_MAX"),  # Caffe's running check, in order
])
def test_a_blob_shape_caffes_int_cannot_hold_is_refused_naming_layer_and_blob(dims, said):
    # Built before (the 16 GiB blob allocated at the first forward).
    with pytest.raises(BlobSizeError, match=rf"layer 'in' \(type Input\): blob 'x' .*{said}"):
        input_of(dims)


def test_big_but_legal_blob_shapes_still_build(monkeypatch):
    monkeypatch.setattr("pycaffe_alt.blob_memory.physical_memory", lambda: 2 ** 40)
    assert input_of((0, 65536, 65536)).blobs["x"].shape == (0, 65536, 65536)
    assert input_of((65536, 32767)).blobs["x"].shape == (65536, 32767)  # not allocated here


def test_a_parameter_blob_over_int_max_is_refused_before_memory():
    net = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 64 } } } '
           'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
           'inner_product_param { num_output: 2000000000 } }')
    with pytest.raises(BlobSizeError, match=r"layer 'ip'.*blob 'ip\.weight'.*INT_MAX"):
        net_from(net)


def test_a_reshape_that_makes_a_top_over_int_max_is_refused_at_net_reshape():
    net = net_from('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 '
                   'dim: 1 } } } layer { name: "tile" type: "Tile" bottom: "x" top: "t" '
                   'tile_param { axis: 1 tiles: 65536 } }')
    net.blobs["x"].reshape(32768, 1)
    with pytest.raises(BlobSizeError, match=r"layer 'tile'.*blob 't'.*exceeds INT_MAX"):
        net.reshape()


def test_blob_reshape_raises_pycaffes_exception_types():
    net = lenet()
    # boost.python's int conversion: OverflowError over INT_MAX, TypeError for 2.5.
    with pytest.raises(OverflowError, match="blob 'data'.*INT_MAX"):
        net.blobs["data"].reshape(2 ** 31, 1, 28, 28)
    with pytest.raises(BlobSizeError, match="blob 'data'.*exceeds INT_MAX"):
        net.blobs["data"].reshape(65536, 32768, 1, 1)
    with pytest.raises(TypeError, match="integer dimensions"):
        net.blobs["data"].reshape(2.5, 1, 28, 28)
    assert net.blobs["data"].shape == (2, 1, 28, 28)


@pytest.mark.parametrize("call, kind", [
    (lambda n: n.forward(start="nope"), ValueError),  # pycaffe: list.index
    (lambda n: n.backward(end="nope"), ValueError),
    (lambda n: n.forward(blobs=["nope"]), KeyError),  # pycaffe: self.blobs[name]
    (lambda n: n.forward_all(blobs=["nope"]), KeyError),
    (lambda n: n.forward(data=np.zeros((2, 3, 28, 28))), ValueError),  # numpy's broadcast
    (lambda n: n.forward_all(data=np.zeros((3, 28, 28))), ValueError),
    (lambda n: n.forward(blobs=5), TypeError),  # was a bare TypeError from list()
    (lambda n: n.backward(diffs=5), TypeError),
    (lambda n: n.forward_backward_all(diffs=5, data=np.zeros((2, 1, 28, 28))), TypeError),
    (lambda n: n._forward(1.5, 2), TypeError),
])
def test_net_calls_raise_what_pycaffe_raises_as_caffe_errors(call, kind):
    with pytest.raises(kind) as info:
        call(lenet())
    assert isinstance(info.value, CaffeError), info.value


@pytest.mark.parametrize("args", [(), (os.path.join(LENET, "weights.caffemodel"),),
                                  (caffe.TEST, caffe.TEST)])
def test_net_without_a_phase_or_with_extra_arguments_is_a_caffe_error(args):
    with pytest.raises(ArgumentTypeError, match=r"Net\(\)"):
        caffe.Net(os.path.join(LENET, "net.prototxt"), *args)


@pytest.mark.parametrize("call", [lambda n: n._forward(-1, 2), lambda n: n._forward(0, 99),
                                  lambda n: n._backward(2, -1), lambda n: n._backward(99, 0)])
def test_layer_indices_caffe_checks_are_refused(call):
    # ForwardFromTo / BackwardFromTo CHECK these; _forward(0, 99) ran the whole net before.
    with pytest.raises(NetError, match="layer indices out of range for a net of 10 layers"):
        call(lenet())


def test_a_backward_range_caffe_runs_no_layer_of_leaves_the_diffs():
    net = lenet()
    net.forward(data=np.random.RandomState(0).rand(2, 1, 28, 28))
    net.clear_param_diffs()
    net._backward(-1, 0)  # start -1: Caffe's loop from -1 down to 0 runs nothing
    assert not net.params["ip2"][1].diff.any()  # the Python index -1 ran every layer
    net._backward(len(net.layers) - 1, 0)
    assert net.params["ip2"][1].diff.any()


def test_transformer_shape_mismatch_is_a_value_error():
    t = Transformer({"data": (2, 3, 8, 8)})
    t.set_mean("data", np.zeros(3))  # no transpose: the H x W x K image meets a K x 1 x 1 mean
    with pytest.raises(ValueError, match="cannot preprocess an image of shape"):
        t.preprocess("data", np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="cannot deprocess"):
        t.deprocess("data", np.zeros((2, 8, 8)))


@pytest.mark.parametrize("kwargs, kind", [
    ({"nope": 3}, AttributeError), ({"num_output": "x"}, TypeError),
    ({"num_output": -3}, ValueError), ({"convolution_param": {"nope": 3}}, AttributeError),
])
def test_netspec_bad_parameters_raise_pycaffes_types_naming_the_layer(kwargs, kind):
    with pytest.raises(kind, match="layer 'Convolution1'") as info:
        caffe.to_proto(L.Convolution(L.Input(), **kwargs))
    assert isinstance(info.value, NetError)


@pytest.mark.parametrize("call", [lambda n: n.forward_all(data=np.zeros((3, 1, 28, 28))),
                                  lambda n: n.forward_backward_all(data=np.zeros((3, 1, 28, 28)))])
def test_batches_of_a_net_reshaped_to_batch_0_are_refused_by_blob(call):
    # pycaffe's _batch divides by zero; ours raised range()'s bare ValueError.
    net = lenet()
    net.blobs["data"].reshape(0, 1, 28, 28)
    net.blobs["label"].reshape(0)
    net.reshape()
    with pytest.raises(NetError, match="'data' has batch size 0") as info:
        call(net)
    assert isinstance(info.value, ValueError)


def test_assigning_none_to_a_blob_is_refused_not_nan():
    net = lenet()
    with pytest.raises(NetError, match=r"cannot assign None to Blob\('data'"):
        net.blobs["data"].data = None  # numpy's [...] = None filled the blob with NaN
    assert not np.isnan(net.blobs["data"].data).any()


@pytest.mark.parametrize("field, value", [("base_lr", float("nan")),
                                          ("weight_decay", float("inf"))])
def test_a_non_finite_value_written_into_solver_param_is_refused_at_the_next_update(
        tmp_path, field, value):
    # The file's values are checked at load; one written into the live solver.param trained
    # every weight into NaN without a word.
    from lenet_case import lenet_solver

    solver = lenet_solver(tmp_path)
    solver.step(1)
    before = solver.net.params["ip2"][1].data.copy()
    setattr(solver.param, field, value)
    with pytest.raises(SolverError, match=rf"{field} must be a finite number \(got {value}, set after"):
        solver.step(1)
    assert solver.iter == 1 and np.array_equal(solver.net.params["ip2"][1].data, before)


@pytest.fixture
def detector_image(tmp_path):
    import cv2

    path = str(tmp_path / "a.png")
    cv2.imwrite(path, (np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8))
    cifar = os.path.join(HERE, "fixtures", "golden", "nets", "cifar10_full_deploy")
    return caffe.Detector(os.path.join(cifar, "net.prototxt"),
                          os.path.join(cifar, "weights.caffemodel")), path


@pytest.mark.parametrize("window, said", [
    ((-5, 0, 38, 10), "has a negative coordinate"),  # pycaffe cropped rows 35..38 instead
    ((10, 10, 5, 5), "holds no pixel of the 40 x 50 image"),  # was resize_image's (0, 0, 3)
])
def test_detector_windows_pycaffe_would_crop_wrongly_are_refused(detector_image, window, said):
    detector, image = detector_image
    with pytest.raises(CaffeError, match=rf"Detector.crop: window \({', '.join(map(str, window))}"
                                         rf"\) {said}"):
        detector.detect_windows([(image, [window])])
    assert len(detector.detect_windows([(image, [(0, 0, 100, 100)])])) == 1  # clipped, as pycaffe


def test_detect_windows_entries_that_are_not_pairs_are_named(detector_image):
    detector, image = detector_image
    with pytest.raises(ValueError, match="entry 1 is not a \\(filename, windows\\) pair") as info:
        detector.detect_windows([(image, [(0, 0, 5, 5)]), image])
    assert isinstance(info.value, CaffeError)
