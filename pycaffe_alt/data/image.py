"""Image files read and stored as Caffe's OpenCV code does (``ReadImageToCVMat``, ``ReadImageToDatum``).

Images are H x W x C uint8 in OpenCV's BGR order (H x W x 1 for grey). Resizing, when both sizes are
given, is OpenCV's bilinear ``cv::resize``, exactly as Caffe calls it.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import DataError
from ..fileio import check_input_path, read_input_bytes
from ..proto import caffe_pb2
from .datum import array_to_datum, hwc_to_chw


def read_file_bytes(path: str) -> bytes:
    """The whole file (Caffe's ``ReadFileToDatum`` stores these bytes unchanged)."""
    return read_input_bytes(path, DataError, "image file")


def read_image(path: str, height: int = 0, width: int = 0, is_color: bool = True,
               nearest: bool = False) -> np.ndarray:
    """Read an image as H x W x C uint8 BGR (C=3) or grey (C=1), as Caffe's ``ReadImageToCVMat``.

    ``is_color`` picks OpenCV's IMREAD_COLOR (grey files become 3 equal channels) or
    IMREAD_GRAYSCALE; the image is resized to height x width only when both are positive, with
    nearest-neighbour interpolation when ``nearest`` (caffe-segnet's overload for label images).
    Raises DataError naming the file when OpenCV cannot open or decode it.
    """
    import cv2

    # cv2.imread returns None both for a missing and an undecodable file; tell the user which.
    if not os.path.lexists(path):
        raise DataError("no such image file", where=path,
                        hint="check the list file's paths and the root folder argument")
    check_input_path(path, DataError, "image file")
    img = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError("could not decode the image (not an image format OpenCV reads, or "
                        "truncated)", where=path)
    if height > 0 and width > 0:
        # cv::resize's default interpolation is INTER_LINEAR, as in Caffe's call.
        img = cv2.resize(img, (width, height),
                         interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[:, :, None]
    return img


def extension_matches(filename: str, encoding: str) -> bool:
    """Caffe's ``matchExt``: the file's extension (lower-cased) is the encoding, or jpeg for jpg."""
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else filename.lower()
    encoding = encoding.lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def guess_encoding(filename: str) -> str:
    """The encoding convert_imageset --encoded assumes when --encode_type is empty: the extension."""
    return filename.rsplit(".", 1)[-1].lower() if "." in filename else ""


def image_to_datum(path: str, label: int, height: int = 0, width: int = 0, is_color: bool = True,
                   encoding: str = "") -> "caffe_pb2.Datum":
    """One list entry as the Datum Caffe's ``ReadImageToDatum`` writes.

    With an ``encoding`` ("png", "jpg"...): the original file bytes when the decoded image already
    has the requested colour mode, no resize is asked and the extension matches; otherwise the
    (possibly resized / grey) image re-encoded with OpenCV. The encoded Datum has no shape fields.
    Without: raw BGR pixels, C x H x W, with ``encoded: false`` written explicitly as Caffe does
    (so our records are byte-identical to Caffe's).
    """
    import cv2

    img = read_image(path, height, width, is_color)
    if encoding:
        datum = caffe_pb2.Datum()
        if (img.shape[2] == 3) == is_color and not height and not width \
                and extension_matches(path, encoding):
            datum.data = read_file_bytes(path)
        else:
            try:
                ok, buf = cv2.imencode("." + encoding, img)
            except cv2.error:
                ok = False
            if not ok:
                raise DataError(f"OpenCV cannot encode images as '{encoding}'", where=path,
                                hint="use --encode_type png or jpg")
            datum.data = buf.tobytes()
        datum.label = int(label)
        datum.encoded = True
        return datum
    datum = array_to_datum(hwc_to_chw(img), label)
    datum.encoded = False
    return datum

