"""caffe.io-style API (pycaffe parity), the embedded MNIST subset, and the offline download check."""
import os
import shutil
import time

import cv2
import numpy as np
import pytest

import pycaffe_alt.io as cio
from pycaffe_alt.errors import ArgumentTypeError, DataError
from pycaffe_alt.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden", "data")


def test_blobproto_round_trips_and_legacy_shape():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    blob = cio.array_to_blobproto(arr, diff=-arr)
    assert list(blob.shape.dim) == [2, 3, 4]
    assert np.array_equal(cio.blobproto_to_array(blob), arr)
    assert np.array_equal(cio.blobproto_to_array(blob, return_diff=True), -arr)
    mean = caffe_pb2.BlobProto()
    mean.ParseFromString(open(os.path.join(GOLDEN, "mnist_mean.binaryproto"), "rb").read())
    assert cio.blobproto_to_array(mean).shape == (1, 1, 28, 28)  # Caffe's legacy num/channels/...
    arrays = [arr, np.ones((5,), np.float32)]
    back = cio.blobprotovector_str_to_arraylist(cio.arraylist_to_blobprotovector_str(arrays))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back))
    # No shape at all: pycaffe fails in numpy's reshape, and BVLC's test_io expects ValueError.
    shapeless = caffe_pb2.BlobProto()
    shapeless.data.extend([0.0] * 100)
    with pytest.raises(ValueError):
        cio.blobproto_to_array(shapeless)
    with pytest.raises(DataError, match="holds 100 data values"):
        cio.blobproto_to_array(shapeless)


def test_datum_conversion_like_pycaffe():
    u8 = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    assert np.array_equal(cio.datum_to_array(cio.array_to_datum(u8, 2)), u8)
    f = np.linspace(0, 1, 12).reshape(3, 2, 2)
    out = cio.datum_to_array(cio.array_to_datum(f))
    assert out.dtype == np.float64 and np.allclose(out, f)


def test_load_image_rgb_float_and_grey():
    path = os.path.join(GOLDEN, "photos", "HappyFish.jpg")
    img = cio.load_image(path)
    bgr = cv2.imread(path)
    assert img.dtype == np.float32 and img.shape == bgr.shape
    # Pillow and OpenCV may use different JPEG IDCTs: allow a couple of grey levels.
    assert np.abs(img * 255 - bgr[:, :, ::-1]).max() <= 3
    digit = os.path.join(GOLDEN, "digits", "d00512.png")
    grey = cio.load_image(digit, color=False)
    assert grey.shape == (28, 28, 1)
    assert np.array_equal(np.round(grey[:, :, 0] * 255), cv2.imread(digit, cv2.IMREAD_GRAYSCALE))
    colour = cio.load_image(digit)
    assert colour.shape == (28, 28, 3) and np.array_equal(colour[..., 0], colour[..., 2])
    with pytest.raises(DataError, match="nope.png"):
        cio.load_image("nope.png")


def test_resize_and_oversample():
    img = np.random.default_rng(0).random((8, 10, 3)).astype(np.float32)
    out = cio.resize_image(img, (16, 20))
    assert out.shape == (16, 20, 3) and out.dtype == np.float32
    assert img.min() - 1e-6 <= out.min() and out.max() <= img.max() + 1e-6
    assert np.all(cio.resize_image(np.full((4, 4, 1), 0.3), (2, 3)) == np.float32(0.3))
    assert cio.resize_image(np.zeros((4, 4, 5)), (8, 8)).shape == (8, 8, 5)
    crops = cio.oversample([img], (4, 6))
    assert crops.shape == (10, 4, 6, 3)
    assert np.array_equal(crops[0], img[:4, :6]) and np.array_equal(crops[3], img[4:, 4:])
    assert np.array_equal(crops[4], img[2:6, 2:8]) and np.array_equal(crops[5], img[:4, :6][:, ::-1])


def test_transformer_takes_a_protobuf_repeated_field_as_shape():
    # DIGITS' example.py: Transformer(inputs={'data': net_param.input_shape[0].dim}). Protobuf's
    # repeated fields iterate by __getitem__ (no __iter__); pycaffe only indexes and slices them.
    net = caffe_pb2.NetParameter()
    net.input_shape.add().dim.extend([1, 3, 6, 8])
    t = cio.Transformer({"data": net.input_shape[0].dim})
    t.set_transpose("data", (2, 0, 1))
    _, channels, height, width = t.inputs["data"]
    assert (channels, height, width) == (3, 6, 8) and tuple(t.inputs["data"][1:]) == (3, 6, 8)
    assert t.preprocess("data", np.zeros((6, 8, 3), np.float32)).shape == (3, 6, 8)
    with pytest.raises(ArgumentTypeError, match="sequence of integers"):
        cio.Transformer({"data": 5})


def test_transformer_preprocess_deprocess():
    t = cio.Transformer({"data": (1, 3, 6, 8)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    t.set_input_scale("data", 0.5)
    rgb = np.random.default_rng(1).random((6, 8, 3)).astype(np.float32)
    before = rgb.copy()
    x = t.preprocess("data", rgb)
    assert x.dtype == np.float32 and x.shape == (3, 6, 8)
    want = (rgb.transpose(2, 0, 1)[::-1] * 255 - np.array([104, 117, 123])[:, None, None]) * 0.5
    assert np.allclose(x, want, atol=1e-4)
    assert np.array_equal(rgb, before)  # the caller's array is not modified
    assert np.allclose(t.deprocess("data", x[None]), rgb, atol=1e-5)
    with pytest.raises(DataError, match="not one of the net inputs"):
        t.preprocess("label", rgb)
    with pytest.raises(DataError, match="channels"):
        t.set_mean("data", np.zeros(4))
    t.set_mean("data", np.ones((3, 3, 4)) * 7)  # elementwise mean of another size is resized
    assert t.mean["data"].shape == (3, 6, 8) and np.allclose(t.mean["data"], 7)
    ramp = np.random.default_rng(2).random((3, 3, 4)) * 100 + 50
    t.set_mean("data", ramp)
    assert t.mean["data"].shape == (3, 6, 8)
    assert ramp.min() - 1e-3 <= t.mean["data"].min() and t.mean["data"].max() <= ramp.max() + 1e-3


def test_mnist5k_split_is_stratified_and_idempotent(tmp_path):
    from pycaffe_alt.data.db import LMDBReader
    from pycaffe_alt.data.mnist5k import ensure_mnist5k_lmdb

    shutil.copy(os.path.join(ROOT, "data", "mnist5k", "mnist_5k.csv.gz"), tmp_path)
    train, test = ensure_mnist5k_lmdb(str(tmp_path))
    tr, te = LMDBReader(train), LMDBReader(test)
    assert (len(tr), len(te)) == (4000, 1000)
    test_labels = [te.datum(i).label for i in range(len(te))]
    assert np.bincount(test_labels).tolist() == [100] * 10
    assert len(set(test_labels[:20])) > 3  # mixed order, not sorted by digit
    d = tr.datum(0)
    assert (d.channels, d.height, d.width, len(d.data)) == (1, 28, 28, 784)
    mtime = os.path.getmtime(os.path.join(train, "data.mdb"))
    assert ensure_mnist5k_lmdb(str(tmp_path)) == (train, test)
    assert os.path.getmtime(os.path.join(train, "data.mdb")) == mtime


def test_offline_download_fails_fast():
    from pycaffe_alt.data.download import require_network

    start = time.time()
    with pytest.raises(DataError, match="no network.*\n.*mnist5k"):
        require_network("https://host.invalid/x.tar.gz", "use data/mnist5k")
    assert time.time() - start < 10


def test_caffe_io_refuses_corrupt_and_mistyped_values_by_name():
    # Each raised a bare numpy/protobuf/OpenCV exception (or stored a value that failed later).
    with pytest.raises(DataError, match="not a serialized BlobProtoVector"):
        cio.blobprotovector_str_to_arraylist(b"\xff\xff\xff")
    with pytest.raises(DataError, match="32-bit label"):
        cio.array_to_datum(np.zeros((1, 2, 2), np.uint8), label=2**40)
    for bad in (1.5, "3"):  # 1.5 was cut to 1 (pycaffe's protobuf refuses both)
        with pytest.raises(TypeError, match="label must be a whole number"):
            cio.array_to_datum(np.zeros((1, 2, 2), np.uint8), label=bad)
    t = cio.Transformer({"data": (1, 3, 4, 4)})
    for bad in ("x", float("nan"), True):
        with pytest.raises(DataError, match="raw_scale must be a finite number"):
            t.set_raw_scale("data", bad)
    t.set_input_scale("data", None)  # pycaffe: None means no scaling
    t.set_input_scale("data", np.array([0.5, 1.0, 2.0])[:, None, None])  # per channel, broadcast
    t.set_raw_scale("data", [255.0])
    t.set_transpose("data", (2, 0, 1))
    with pytest.raises(DataError, match="cannot deprocess"):
        t.deprocess("data", np.ones((5, 5)))
    with pytest.raises(DataError, match="N x K x H x W"):
        cio.Transformer({"data": (1, 3)}).preprocess("data", np.ones((4, 4, 3)))
    with pytest.raises(DataError, match="cannot resize"):
        cio.resize_image(np.ones((4, 4, 3)), (5,))
    with pytest.raises(DataError, match="more than this machine's memory"):
        cio.resize_image(np.random.rand(4, 4, 3), (10**6, 10**6))


def test_caffe_io_refuses_wrong_argument_types_with_type_errors():
    # Internal AttributeError/IndexError before; now TypeErrors (ArgumentTypeError) or DataErrors
    # that name the call.
    cases = [
        (lambda: cio.blobproto_to_array(b"garbage"), TypeError, "takes a caffe_pb2.BlobProto"),
        (lambda: cio.datum_to_array("x"), TypeError, "takes a caffe_pb2.Datum"),
        (lambda: cio.arraylist_to_blobprotovector_str([np.ones(2), "x"]), TypeError,
         "array of numbers"),
        (lambda: cio.load_image(5), TypeError, "takes a file name"),
        (lambda: cio.Transformer([1, 2]), TypeError, "takes a dict"),
        (lambda: cio.oversample([], (5, 5)), DataError, "non-empty list of images"),
        (lambda: cio.oversample([np.ones((10, 12, 3))], (5,)), DataError, "crop dims"),
        (lambda: cio.array_to_blobproto(np.ones(3), np.ones(4)), ValueError, "diff has shape"),
    ]
    for call, error, says in cases:
        with pytest.raises(error, match=says):
            call()
    blob = cio.array_to_blobproto(np.ones((2, 3)), np.zeros((2, 3)))
    assert cio.blobproto_to_array(blob, return_diff=True).shape == (2, 3)


def test_caffe_io_takes_messages_of_a_programs_own_caffe_pb2_and_path_forms(tmp_path):
    # A program's own protoc output of caffe.proto: other classes, the same message names.
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="their_caffe.proto", package="caffe")
    msg = fdp.message_type.add(name="Datum")
    for number, (name, kind) in enumerate([("channels", "TYPE_INT32"), ("height", "TYPE_INT32"),
                                           ("width", "TYPE_INT32"), ("data", "TYPE_BYTES"),
                                           ("label", "TYPE_INT32")], 1):
        msg.field.add(name=name, number=number, type=getattr(descriptor_pb2.FieldDescriptorProto, kind),
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    msg.field.add(name="float_data", number=6, type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    msg.field.add(name="encoded", number=7, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    TheirDatum = message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.Datum"))
    theirs = TheirDatum(channels=1, height=1, width=2, data=bytes([3, 4]))
    assert cio.datum_to_array(theirs).tolist() == [[[3, 4]]]
    # Paths as bytes, crop dims as a bare number: a path that loads / one DataError.
    image = tmp_path / "im.png"
    cv2.imwrite(str(image), np.zeros((4, 5, 3), np.uint8))
    assert cio.load_image(str(image).encode()).shape == (4, 5, 3)
    with pytest.raises(DataError, match="crop dims"):
        cio.oversample([np.ones((10, 12, 3))], 5)


@pytest.mark.parametrize("call", [
    lambda: cio.array_to_datum(np.zeros((3, 4))),
    lambda: cio.Transformer({"data": (1, 3, 8, 8)}).set_mean("data", np.zeros(2)),
    lambda: cio.Transformer({"data": (1, 3, 8, 8)}).set_mean("data", np.zeros((1, 3, 8, 8))),
    lambda: cio.Transformer({"data": (1, 3, 8, 8)}).set_mean("data", np.zeros(0)),
], ids=["datum of 2 axes", "mean channels", "mean of 4 axes", "empty mean"])
def test_shape_errors_are_value_errors_as_pycaffes(call):
    # pycaffe raises ValueError there ("Incorrect array shape.", "Mean channels incompatible
    # with input.", "Mean shape invalid"): a program's `except ValueError` must catch ours.
    with pytest.raises(ValueError) as got:
        call()
    assert isinstance(got.value, DataError)
