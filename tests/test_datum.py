"""Datum codec: raw uint8 / float round trips, encoded PNG/JPEG decoded as Caffe, corrupt records."""
import os

import cv2
import numpy as np
import pytest

from pycaffe_alt.data.datum import array_to_datum, datum_to_array, decode_datum, parse_datum
from pycaffe_alt.data.image import image_to_datum, read_image
from pycaffe_alt.errors import DataError
from pycaffe_alt.proto import caffe_pb2

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data")


def test_uint8_round_trip_uses_data_bytes():
    arr = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    datum = parse_datum(array_to_datum(arr, 7).SerializeToString(), "test")
    assert datum.data == arr.tobytes() and len(datum.float_data) == 0
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 7)
    out = datum_to_array(datum)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_float_round_trip_uses_float_data():
    arr = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    datum = parse_datum(array_to_datum(arr).SerializeToString(), "test")
    assert datum.data == b"" and len(datum.float_data) == arr.size and not datum.HasField("label")
    out = datum_to_array(datum)
    assert out.dtype == np.float32 and np.array_equal(out, arr)


def test_array_to_datum_rejects_2d():
    with pytest.raises(DataError, match="3-D"):
        array_to_datum(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_encoded_colour_decodes_to_bgr_chw(ext):
    img = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, img)
    datum = caffe_pb2.Datum(data=buf.tobytes(), encoded=True, label=1)
    want = cv2.imdecode(buf, cv2.IMREAD_COLOR).transpose(2, 0, 1)
    assert np.array_equal(decode_datum(datum), want)
    assert np.array_equal(datum_to_array(datum), want)
    grey = decode_datum(datum, force_gray=True)
    assert grey.shape == (1, 6, 7)
    assert np.array_equal(grey[0], cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE))


def test_encoded_grey_png_keeps_one_channel_unless_forced_colour():
    img = np.arange(20, dtype=np.uint8).reshape(4, 5)
    datum = caffe_pb2.Datum(data=cv2.imencode(".png", img)[1].tobytes(), encoded=True)
    assert np.array_equal(decode_datum(datum), img[None])  # Caffe's DecodeDatumToCVMatNative
    colour = decode_datum(datum, force_color=True)
    assert colour.shape == (3, 4, 5) and all(np.array_equal(c, img) for c in colour)
    with pytest.raises(DataError, match="force"):
        decode_datum(datum, force_color=True, force_gray=True)


def test_caffe_encoded_records_decode_to_caffe_raw_pixels():
    # Caffe wrote the same digits raw (--gray) and as PNG (--gray --encoded): decoding must agree.
    from pycaffe_alt.data.db import LMDBReader

    raw = LMDBReader(os.path.join(GOLDEN, "mnist_test_lmdb"))
    enc = LMDBReader(os.path.join(GOLDEN, "mnist_test_encoded_lmdb"))
    for i in range(0, len(raw), 17):
        a, b = raw.datum(i), enc.datum(i)
        assert b.encoded and not a.encoded and a.label == b.label
        assert np.array_equal(datum_to_array(a), datum_to_array(b))


def test_caffe_encoded_jpeg_equals_opencv_read_of_file():
    from pycaffe_alt.data.db import LMDBReader

    reader = LMDBReader(os.path.join(GOLDEN, "photos_encoded_lmdb"))
    for i in range(len(reader)):
        name = reader.key(i).decode().split("_", 1)[1]
        want = read_image(os.path.join(GOLDEN, "photos", name)).transpose(2, 0, 1)
        assert np.array_equal(decode_datum(reader.datum(i), force_color=True), want), name


def test_image_to_datum_raw_matches_caffe_bytes():
    # Caffe's CVMatToDatum sets encoded=false explicitly; the serialized records must be identical.
    from pycaffe_alt.data.db import LMDBReader

    reader = LMDBReader(os.path.join(GOLDEN, "mnist_test_lmdb"))
    name = reader.key(0).decode().split("_", 1)[1]
    datum = image_to_datum(os.path.join(GOLDEN, "digits", name), reader.datum(0).label,
                           is_color=False)
    assert datum.SerializeToString() == reader.value(0)


def test_corrupt_and_undecodable_records_name_where():
    with pytest.raises(DataError, match="mydb key '0007'"):
        parse_datum(b"\xff\xff\xff", "mydb key '0007'")
    bad = caffe_pb2.Datum(data=b"not an image", encoded=True)
    with pytest.raises(DataError, match="rec 3.*cannot be decoded"):
        decode_datum(bad, where="rec 3")
    short = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")
    with pytest.raises(DataError, match="3 bytes"):
        datum_to_array(short)
