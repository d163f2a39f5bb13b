"""Bad-input round 19: blob sizes beyond Caffe's ``int`` (Blob::Reshape's INT_MAX checks)."""
import os

import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import BlobSizeError
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
