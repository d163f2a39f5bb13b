"""pycaffe's ``caffe.io``: array <-> proto conversion, image loading, and the input ``Transformer``.

Behaves like BVLC Caffe's python/caffe/io.py (same functions, arguments and results) without its
scikit-image dependency: images load with Pillow; resizing uses scikit-image when it is installed
(identical results) and otherwise OpenCV's bilinear resize (scipy's zoom for channel counts other
than 1 and 3, as pycaffe), which can differ from scikit-image by a fraction of a grey level near the
borders and when shrinking (skimage then smooths first).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from google.protobuf.message import DecodeError

from .data import datum as _datum
from .errors import (ArgumentTypeError, ArrayShapeError, BlobShapeError, DataError,
                     ImageNotFoundError, ImageReadError, integer_argument)
from .fileio import check_input_path
from .host_memory import physical_memory
from .proto import caffe_pb2


def _int_sequence(value, what: str) -> Tuple[int, ...]:
    """A sequence of whole numbers as a tuple of ints, or an ArgumentTypeError naming ``what``.

    Anything iterable counts, as pycaffe only indexes and slices these: protobuf's repeated
    fields iterate by the sequence protocol and have no ``__iter__`` (DIGITS' example.py gives
    the Transformer ``net_param.input_shape[0].dim``)."""
    try:
        items = None if isinstance(value, (str, bytes)) else iter(value)
    except TypeError:
        items = None
    if items is None:
        raise ArgumentTypeError(f"{what} must be a sequence of integers, got {value!r}"[:300])
    return tuple(integer_argument(v, what) for v in items)


# --- proto / datum / ndarray conversion ---------------------------------------------------------

def blobproto_to_array(blob: "caffe_pb2.BlobProto", return_diff: bool = False) -> np.ndarray:
    """The data (or diff) of a BlobProto as a float64 array, shaped by its legacy 4-D fields
    if set."""
    _require_message(blob, "BlobProto", "blobproto_to_array()")
    # float64 as in pycaffe, whose np.array(blob.data) held Python floats (BVLC's
    # ilsvrc_2012_mean.npy was made this way); protobuf's upb container hands numpy float32.
    values = np.array(blob.diff if return_diff else blob.data, dtype=np.float64)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    # A truncated or foreign binaryproto parses into a blob whose count does not match.
    if any(d < 0 for d in shape) or math.prod(int(d) for d in shape) != values.size:
        raise BlobShapeError(f"BlobProto of shape {shape} holds {values.size} "
                        f"{'diff' if return_diff else 'data'} values",
                        hint="the blob (or the .binaryproto it came from) is damaged or "
                             "incomplete")
    return values.reshape(shape)


def array_to_blobproto(arr: np.ndarray, diff: Optional[np.ndarray] = None) -> "caffe_pb2.BlobProto":
    """An N-D array (and optional diff of the same shape) as a BlobProto with ``shape`` set."""
    arr = _numeric_array(arr, "array_to_blobproto()")
    if diff is not None:
        diff = _numeric_array(diff, "array_to_blobproto() diff")
        if diff.shape != arr.shape:  # the loaders refuse such a blob later; refuse it now
            raise BlobShapeError(f"array_to_blobproto(): the diff has shape {diff.shape}, the "
                                 f"data {arr.shape}", hint="give a diff of the data's shape")
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(n) for n in arr.shape)
    blob.data.extend(np.asarray(arr, dtype=np.float64).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float64).ravel().tolist())
    return blob


def _require_message(message, name: str, caller: str) -> None:
    """ArgumentTypeError unless ``message`` is a caffe.``name`` protobuf message: ours or one
    of a program's own caffe_pb2 (compared by the message's full name, as pycaffe duck-types)."""
    full_name = getattr(getattr(message, "DESCRIPTOR", None), "full_name", None)
    if full_name != f"caffe.{name}":
        raise ArgumentTypeError(f"{caller} takes a caffe_pb2.{name}, got {type(message).__name__}")


def _numeric_array(value, what: str) -> np.ndarray:
    """``value`` as an array of numbers, or an ArgumentTypeError naming ``what``."""
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"elements of type {arr.dtype}")
        return arr
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"{what} takes an array of numbers, got {type(value).__name__} "
                                f"({e})") from None


def arraylist_to_blobprotovector_str(arraylist: Iterable[np.ndarray]) -> bytes:
    """Serialized BlobProtoVector of the arrays."""
    if isinstance(arraylist, (str, bytes)) or not hasattr(arraylist, "__iter__"):
        # pycaffe fails in its loop with "'NoneType' object is not iterable".
        raise ArgumentTypeError("arraylist_to_blobprotovector_str() takes a list of arrays, "
                                f"got {type(arraylist).__name__}")
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> List[np.ndarray]:
    """Arrays of a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    try:
        vec.ParseFromString(data)
    except (DecodeError, TypeError) as e:
        raise DataError(f"not a serialized BlobProtoVector ({e})", where="blobprotovector_str_to_arraylist",
                        hint="pass the bytes arraylist_to_blobprotovector_str wrote, whole") from None
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr: np.ndarray, label: Optional[int] = None) -> "caffe_pb2.Datum":
    """A C x H x W array as a Datum (uint8 -> ``data`` bytes, otherwise ``float_data``)."""
    return _datum.array_to_datum(arr, label)


def datum_to_array(datum: "caffe_pb2.Datum") -> np.ndarray:
    """C x H x W pixels of a Datum: uint8 for byte data, float64 for float_data (as pycaffe).

    Unlike pycaffe, an encoded Datum is decoded (with its own channel count, as Caffe's layers).
    """
    _require_message(datum, "Datum", "datum_to_array()")
    arr = _datum.datum_to_array(datum)
    return arr if arr.dtype == np.uint8 else arr.astype(np.float64)


# --- image IO -----------------------------------------------------------------------------------

def _rgb_to_gray(img: np.ndarray) -> np.ndarray:
    # scikit-image's rgb2gray weights (ITU-R BT.709 luma), which pycaffe's as_grey load used.
    return img[..., 0] * 0.2125 + img[..., 1] * 0.7154 + img[..., 2] * 0.0721


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1]: H x W x 3 RGB (``color``) or H x W x 1 intensity.

    Grey files are repeated to 3 channels when ``color``; an alpha channel is dropped.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(filename, (str, bytes, os.PathLike)):
        # A missing file is pycaffe's FileNotFoundError; a FIFO, device or folder is refused
        # before Pillow could block on it, as an unreadable image (an OSError, as imread's).
        if not os.path.lexists(filename):
            raise ImageNotFoundError("no such image file", where=os.fspath(filename))
        check_input_path(filename, ImageReadError, "image file")
    elif not callable(getattr(filename, "read", None)):
        raise ArgumentTypeError(f"load_image() takes a file name (or an open binary file), got "
                                f"{type(filename).__name__}")
    try:
        with Image.open(filename) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = np.asarray(im, dtype=np.float64) / 65535.0
            elif im.mode == "F":
                img = np.asarray(im, dtype=np.float64)
            else:
                if im.mode == "1" or im.mode == "LA":
                    im = im.convert("L")
                elif im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode not in ("L", "RGB", "RGBA"):
                    im = im.convert("RGB")
                img = np.asarray(im, dtype=np.float64) / 255.0
    except FileNotFoundError:
        raise ImageNotFoundError("no such image file", where=str(filename)) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageReadError(f"cannot read the image ({e})", where=str(filename)) from None
    if not color and img.ndim == 3:
        img = _rgb_to_gray(img)
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, None]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def _resize_unit(im: np.ndarray, new_dims: Tuple[int, int], interp_order: int) -> np.ndarray:
    """Resize an H x W x K image with values in [0, 1] (pycaffe normalises before resizing)."""
    try:
        from skimage.transform import resize
    except ImportError:
        resize = None
    if resize is not None:
        return resize(im, new_dims, order=interp_order, mode="constant")
    import cv2

    interp = cv2.INTER_NEAREST if interp_order == 0 else \
        cv2.INTER_LINEAR if interp_order == 1 else cv2.INTER_CUBIC
    out = cv2.resize(im.astype(np.float32), (int(new_dims[1]), int(new_dims[0])),
                     interpolation=interp)
    return np.clip(out.reshape(int(new_dims[0]), int(new_dims[1]), im.shape[-1]), 0.0, 1.0)


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an H x W x K image to ``new_dims`` = (height, width); float32, K kept."""
    im = np.asarray(im)
    new_dims = _int_sequence(new_dims, "resize_image() new_dims")
    interp_order = integer_argument(interp_order, "resize_image() interp_order")
    if not 0 <= interp_order <= 5:
        # The spline orders scikit-image and scipy know; checked before the constant-image
        # shortcut, which took any order (skimage's ValueError came only for other images).
        raise DataError(f"interp_order {interp_order} is not a spline order 0..5",
                        where="resize_image", hint="0 nearest, 1 bilinear (the default), 3 cubic")
    if len(new_dims) != 2 or im.ndim != 3 or 0 in im.shape or min(new_dims) < 1:
        raise DataError(f"cannot resize an image of shape {im.shape} to {tuple(new_dims)}",
                        where="resize_image", hint="give a non-empty H x W x K image (a grey "
                        "image as img[:, :, None]) and (height, width), both positive")
    new_dims = (int(new_dims[0]), int(new_dims[1]))
    needed = new_dims[0] * new_dims[1] * im.shape[-1] * 8  # the float64 intermediate
    capacity = physical_memory()
    if capacity is not None and needed > capacity:
        raise DataError(f"resizing to {new_dims} x {im.shape[-1]} needs {needed / 2**30:.1f} GiB, "
                        "more than this machine's memory", where="resize_image",
                        hint="resize to a smaller size")
    if im.shape[-1] in (1, 3):
        im_min, im_max = im.min(), im.max()
        if im_max <= im_min:
            # A constant image stays constant (and avoids dividing by zero below).
            return np.full(new_dims + (im.shape[-1],), im_min, dtype=np.float32)
        unit = (im - im_min) / (im_max - im_min)
        resized = _resize_unit(unit, new_dims, interp_order) * (im_max - im_min) + im_min
    else:
        from scipy.ndimage import zoom

        scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
        resized = zoom(im, scale + (1,), order=interp_order)
    return np.asarray(resized, dtype=np.float32)


def _scale_value(value, what: str, in_: str):
    """A finite number or array of numbers (per-channel scales broadcast, as in pycaffe), or
    None (no scaling: pycaffe's preprocess skips it), for set_raw_scale / set_input_scale.
    pycaffe stores anything and fails in numpy at the first preprocess."""
    if value is None:
        return None
    try:
        arr = None if isinstance(value, (bool, str, bytes)) else np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise DataError(f"{what} must be a finite number (or array of numbers), got {value!r}",
                        where=f"Transformer input '{in_}'", hint="e.g. 255 for [0, 255] pixels")
    return float(arr) if arr.ndim == 0 else value


def oversample(images: Sequence[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """10 crops per H x W x K image: 4 corners and centre, then their mirrors; (10N) x h x w x K."""
    if len(images) == 0 or np.ndim(crop_dims) != 1 or len(crop_dims) != 2:
        raise DataError(f"oversample() takes a non-empty list of images and (height, width) crop "
                        f"dims, got {len(images)} image(s) and {crop_dims!r}",
                        where="oversample")
    im_shape = np.array(np.shape(images[0]))
    crop_h, crop_w = int(crop_dims[0]), int(crop_dims[1])
    if len(im_shape) != 3 or not (0 < crop_h <= im_shape[0] and 0 < crop_w <= im_shape[1]):
        raise DataError(f"cannot take {crop_h} x {crop_w} crops of images of shape "
                        f"{tuple(int(d) for d in im_shape)}", where="oversample",
                        hint="images are H x W x K and the crop fits inside them")
    # Centre crop start, truncated toward zero like pycaffe's float-to-int store.
    cy = int(im_shape[0] / 2.0 - crop_h / 2.0)
    cx = int(im_shape[1] / 2.0 - crop_w / 2.0)
    starts = [(0, 0), (0, im_shape[1] - crop_w), (im_shape[0] - crop_h, 0),
              (im_shape[0] - crop_h, im_shape[1] - crop_w), (cy, cx)]
    crops = np.empty((10 * len(images), crop_h, crop_w, im_shape[-1]), dtype=np.float32)
    ix = 0
    for im in images:
        for y, x in starts:
            crops[ix] = im[y:y + crop_h, x:x + crop_w, :]
            ix += 1
        crops[ix:ix + 5] = crops[ix - 5:ix, :, ::-1, :]
        ix += 5
    return crops


# --- preprocessing ------------------------------------------------------------------------------

class Transformer:
    """Prepares images for a net's inputs (and undoes it), as pycaffe's ``caffe.io.Transformer``.

    ``inputs`` maps input blob names to their shapes (N, K, H, W), e.g.
    ``{name: net.blobs[name].data.shape}``. ``preprocess`` applies, in order: float32, resize to
    H x W, transpose, channel swap, raw scale, mean subtraction, input scale.
    """

    def __init__(self, inputs: Dict[str, Sequence[int]]):
        if not isinstance(inputs, Mapping):
            raise ArgumentTypeError(f"Transformer() takes a dict {{input name: shape}}, got "
                                    f"{type(inputs).__name__}")
        self.inputs = {k: _int_sequence(v, f"Transformer input '{k}' shape")
                       for k, v in inputs.items()}
        self.transpose: Dict[str, Sequence[int]] = {}
        self.channel_swap: Dict[str, Sequence[int]] = {}
        self.raw_scale: Dict[str, float] = {}
        self.mean: Dict[str, np.ndarray] = {}
        self.input_scale: Dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise DataError(f"'{in_}' is not one of the net inputs: {sorted(self.inputs)}",
                            where="Transformer", hint="use a name passed in the inputs dict")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """H' x W' x K image -> K x H x W float32 array for input ``in_``."""
        self._check_input(in_)
        if len(self.inputs[in_]) != 4:
            raise DataError(f"input '{in_}' has shape {self.inputs[in_]}; preprocess makes images "
                            "for an N x K x H x W input", where="Transformer")
        # Our own float32 copy: the in-place steps below keep float32 (as pycaffe's do) without
        # touching the caller's array.
        caffe_in = np.array(_numeric_array(data, "preprocess() data"), dtype=np.float32, copy=True)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        try:
            if in_ in self.transpose:
                caffe_in = caffe_in.transpose(self.transpose[in_])
            if in_ in self.channel_swap:
                caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
            if self.raw_scale.get(in_) is not None:
                caffe_in *= self.raw_scale[in_]
            if self.mean.get(in_) is not None:
                caffe_in -= self.mean[in_]
            if self.input_scale.get(in_) is not None:
                caffe_in *= self.input_scale[in_]
        except (ValueError, IndexError) as e:
            # pycaffe fails in numpy here: name the input, the image and the settings instead,
            # as a ValueError when numpy's was one (a program's except ValueError still holds).
            raise (ArrayShapeError if isinstance(e, ValueError) else DataError)(
                f"cannot preprocess an image of shape {np.shape(data)} for input '{in_}' of "
                f"shape {self.inputs[in_]} ({e})", where="Transformer",
                hint=f"transpose {self.transpose.get(in_)}, channel_swap "
                     f"{self.channel_swap.get(in_)}, mean of shape "
                     f"{np.shape(self.mean[in_]) if self.mean.get(in_) is not None else None}: "
                     "the image must be H x W x K with K matching them") from None
        return caffe_in

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """Undo :meth:`preprocess` (except the resize) for a K x H x W (or 1 x K x H x W) array."""
        self._check_input(in_)
        decaf_in = np.array(data, copy=True).squeeze()
        try:
            if self.input_scale.get(in_) is not None:
                decaf_in /= self.input_scale[in_]
            if self.mean.get(in_) is not None:
                decaf_in += self.mean[in_]
            if self.raw_scale.get(in_) is not None:
                decaf_in /= self.raw_scale[in_]
            if in_ in self.channel_swap:
                decaf_in = decaf_in[np.argsort(self.channel_swap[in_]), :, :]
            if in_ in self.transpose:
                decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        except (ValueError, IndexError, TypeError) as e:
            raise (ArrayShapeError if isinstance(e, ValueError) else DataError)(
                f"cannot deprocess an array of shape {np.shape(data)} for input '{in_}' of shape "
                f"{self.inputs[in_]} ({e})", where="Transformer",
                hint="give one preprocessed K x H x W image (or 1 x K x H x W)") from None
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """Dimension order, e.g. (2, 0, 1) turns H x W x K into K x H x W."""
        self._check_input(in_)
        order = _int_sequence(order, "set_transpose() order")
        if len(order) != len(self.inputs[in_]) - 1:
            raise DataError(f"transpose order {tuple(order)} needs {len(self.inputs[in_]) - 1} "
                            f"axes", where=f"Transformer input '{in_}'",
                            hint="give one entry per axis of a single image, e.g. (2, 0, 1)")
        self.transpose[in_] = order

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """Channel order after transposing, e.g. (2, 1, 0) turns RGB into BGR."""
        self._check_input(in_)
        order = _int_sequence(order, "set_channel_swap() order")
        if len(order) != self.inputs[in_][1]:
            raise DataError(f"channel swap {tuple(order)} needs {self.inputs[in_][1]} entries "
                            f"(the input's channels)", where=f"Transformer input '{in_}'")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Scale applied before the mean, e.g. 255 for models trained on [0, 255] pixels."""
        self._check_input(in_)
        self.raw_scale[in_] = _scale_value(scale, "raw_scale", in_)

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """Mean to subtract: one value per channel (K,) or a K x H x W image (resized if needed)."""
        self._check_input(in_)
        mean = _numeric_array(mean, "set_mean() mean")
        where = f"Transformer input '{in_}'"
        if mean.size == 0:
            raise ArrayShapeError(f"mean of shape {mean.shape} is empty", where=where,
                                  hint="give one value per channel or a K x H x W mean image")
        if mean.ndim == 1:
            if mean.shape[0] != self.inputs[in_][1]:
                raise ArrayShapeError(f"mean has {mean.shape[0]} channels, input has "
                                      f"{self.inputs[in_][1]}", where=where)
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            shape = mean.shape if mean.ndim != 2 else (1,) + mean.shape
            if len(shape) != 3:
                raise ArrayShapeError(f"mean shape {mean.shape} is neither (K,) nor K x H x W",
                                      where=where)
            if shape != self.inputs[in_][1:]:
                # Resize the mean image to the input size, through [0, 1] as pycaffe does.
                m_min, m_max = mean.min(), mean.max()
                if m_max <= m_min:  # constant: nothing to interpolate (pycaffe divides by zero)
                    self.mean[in_] = np.full((shape[0],) + tuple(self.inputs[in_][2:]), m_min,
                                             dtype=np.float32)
                    return
                unit = (mean.reshape(shape) - m_min) / (m_max - m_min)
                mean = resize_image(unit.transpose((1, 2, 0)), self.inputs[in_][2:]) \
                    .transpose((2, 0, 1)) * (m_max - m_min) + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Scale applied after the mean subtraction."""
        self._check_input(in_)
        self.input_scale[in_] = _scale_value(scale, "input_scale", in_)
