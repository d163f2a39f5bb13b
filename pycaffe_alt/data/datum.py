"""Caffe's ``Datum`` record: conversion to and from numpy arrays, and decoding of encoded images.

A Datum holds one C x H x W example: raw uint8 pixels in ``data``, or floats in ``float_data``, or
(``encoded: true``) a whole JPEG/PNG file in ``data`` with no shape fields. Pixels of colour
images are in OpenCV's BGR order, as Caffe's tools write them.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..errors import ArgumentTypeError, ArrayShapeError, DataError, integer_argument
from ..proto import caffe_pb2

# protobuf serializes no message over 2 GiB - 1 bytes: the most a Datum's pixels or a mean
# BlobProto's floats can take (Caffe's own tools cannot write more either).
MESSAGE_BYTES_LIMIT = 2 ** 31 - 1


_DECIMAL = re.compile(r"[+-]?[0-9]+", re.ASCII)


def decimal_label(text: str) -> Optional[int]:
    """A list file's label as Caffe reads it: ASCII decimal digits with an optional sign, or
    None. (Python's ``int`` also takes "1_0" as 10 and other scripts' digits, which Caffe's
    ``atoi`` reads as 1 and 0.)"""
    text = text.strip()
    return int(text) if _DECIMAL.fullmatch(text) else None


def too_large(nbytes: int, message: Optional[str]) -> Optional[str]:
    """Why ``nbytes`` cannot be made: "more than a <message> (at most 2 GiB) can hold" (a
    protobuf message kind such as "Datum"; None: no message holds them), or "more than this
    machine's memory"; None when they fit."""
    from ..host_memory import physical_memory

    if message is not None and nbytes > MESSAGE_BYTES_LIMIT:
        return f"more than a {message} (at most 2 GiB) can hold"
    memory = physical_memory()
    if memory is not None and nbytes > memory:
        return "more than this machine's memory"
    return None


def array_to_datum(arr: np.ndarray, label: Optional[int] = None) -> "caffe_pb2.Datum":
    """A C x H x W array as a Datum: uint8 goes to ``data`` as bytes, anything else to ``float_data``.

    Same layout as pycaffe's ``caffe.io.array_to_datum``.
    """
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ArrayShapeError(f"a Datum holds a 3-D (channels, height, width) array, got shape "
                              f"{arr.shape}",
                              hint="add the channel axis, e.g. arr[None] for a grey H x W image")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(n) for n in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        # Whatever pycaffe's arr.astype(float) takes (object arrays of numbers, digit strings);
        # other values are one error instead of numpy's "could not convert string to float".
        try:
            values = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ArgumentTypeError(f"array_to_datum() takes an array of numbers, got elements "
                                    f"of type {arr.dtype} ({e})") from None
        datum.float_data.extend(values.ravel().tolist())
    if label is not None:
        # A whole number (pycaffe's protobuf refuses 1.5 and "3" with a TypeError).
        label = integer_argument(label, "array_to_datum() label")
        if not -2**31 <= label < 2**31:  # Datum.label is an int32
            raise DataError(f"label {label} does not fit a Datum's 32-bit label",
                            hint="labels are class indices")
        datum.label = int(label)
    return datum


def decode_datum(datum: "caffe_pb2.Datum", force_color: bool = False, force_gray: bool = False,
                 where: str = "Datum") -> np.ndarray:
    """Decode an ``encoded`` Datum to a C x H x W uint8 array (BGR for colour), as Caffe does.

    Without force flags Caffe decodes with the image's own channels (``DecodeDatumToCVMatNative``,
    OpenCV's IMREAD_UNCHANGED: a grey PNG stays 1 channel); ``force_color`` / ``force_gray``
    decode to 3 / 1 channels (``DecodeDatumToCVMat``), as transform_param's flags do.
    """
    import cv2

    if force_color and force_gray:
        raise DataError("cannot force both colour and grey decoding", where=where,
                        hint="set at most one of force_color / force_gray")
    if force_color:
        flag = cv2.IMREAD_COLOR
    elif force_gray:
        flag = cv2.IMREAD_GRAYSCALE
    else:
        flag = cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(np.frombuffer(datum.data, dtype=np.uint8), flag)
    except cv2.error:  # e.g. an empty buffer: OpenCV asserts instead of returning None
        img = None
    if img is None:
        raise DataError("the encoded image in this record cannot be decoded (not a JPEG/PNG "
                        "OpenCV can read, or truncated)", where=where,
                        hint="re-create the database with convert_imageset --encoded")
    if img.dtype != np.uint8:
        # Caffe's CVMatToDatum CHECKs for 8-bit images; 16-bit PNGs are refused the same way.
        raise DataError(f"the encoded image is {img.dtype}, Caffe only reads 8-bit images",
                        where=where, hint="convert the image to 8 bits per channel")
    return hwc_to_chw(img)


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    """OpenCV's H x W (x C) image as a contiguous C x H x W array (Caffe's CVMatToDatum layout)."""
    if img.ndim == 2:
        return np.ascontiguousarray(img[None])
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def datum_to_array(datum: "caffe_pb2.Datum", where: str = "Datum") -> np.ndarray:
    """The C x H x W pixels of a Datum: uint8 for ``data``, float32 for ``float_data``.

    An encoded Datum is decoded with its own channel count, as Caffe's ``DecodeDatumNative``.
    """
    if datum.encoded:
        return decode_datum(datum, where=where)
    shape = (datum.channels, datum.height, datum.width)
    if min(shape) < 0:  # -1 x -4 x 4 matches 16 bytes yet is no shape
        raise DataError(f"the record's shape {shape[0]}x{shape[1]}x{shape[2]} has a negative "
                        "dimension", where=where,
                        hint="the database is corrupt or was written by another tool; re-create it")
    size = shape[0] * shape[1] * shape[2]
    if len(datum.data):
        if len(datum.data) != size:
            raise DataError(f"the record holds {len(datum.data)} bytes but its shape "
                            f"{shape[0]}x{shape[1]}x{shape[2]} needs {size}", where=where,
                            hint="the database is corrupt or was written by another tool; re-create it")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    if len(datum.float_data) != size:
        raise DataError(f"the record holds {len(datum.float_data)} floats but its shape "
                        f"{shape[0]}x{shape[1]}x{shape[2]} needs {size}", where=where,
                        hint="the database is corrupt or was written by another tool; re-create it")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def parse_datum(value: bytes, where: str) -> "caffe_pb2.Datum":
    """Parse serialized Datum bytes; ``where`` (e.g. "train_lmdb key '00000007'") names the record."""
    from google.protobuf.message import DecodeError

    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(bytes(value))
    except (DecodeError, ValueError, TypeError) as e:
        raise DataError(f"record is not a Caffe Datum ({e})", where=where,
                        hint="the database is corrupt or holds something else; re-create it with "
                             "convert_imageset / convert_mnist") from None
    return datum
