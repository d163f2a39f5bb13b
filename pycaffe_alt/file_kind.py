"""Tell which of Caffe's file kinds a file is, to name it when it was given in the wrong place.

Caffe's files carry no type marker: a ``.solverstate`` read as weights, a ``.caffemodel`` read as
a mean file or a solver state given as weights fail (or "parse" into nonsense: protobuf keeps a
field of the wrong wire type as an unknown field) with a message about the format, such as
"blob declares shape () but holds 0 values". Called only once a read has failed, this looks at
the file as each kind in turn and, when one fits, says what the file is and where it belongs.
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, NamedTuple, Optional, Tuple


class Kind(NamedTuple):
    """A kind of file: what it is, in an error message's words, and where such a file goes."""
    what: str
    advice: str


SOLVER_STATE = Kind("a solver state (.solverstate)",
                    "resume training from it with --snapshot (solver.restore() in Python)")
HDF5_SOLVER_STATE = Kind("an HDF5 solver state (.solverstate.h5)",
                         "resume training from it with --snapshot (solver.restore() in Python)")
WEIGHTS = Kind("a net's weights (.caffemodel)",
               "load it with --weights (Net(..., weights=...) in Python)")
HDF5_WEIGHTS = Kind("HDF5 weights (.caffemodel.h5)",
                    "load it with --weights (Net(..., weights=...) in Python)")
MEAN_FILE = Kind("a BlobProto such as a mean image (.binaryproto)",
                 "name it in transform_param { mean_file: ... }")
NET_TEXT = Kind("a net prototxt", "give it as --model, or as the net of a solver file")
SOLVER_TEXT = Kind("a solver prototxt", "give it as --solver")
HDF5_DATA = Kind("an HDF5 data file", "list it in the source file of an HDF5Data layer")

_LIMIT = 256 << 20  # a larger file is left unnamed: this runs on an error path only


def other_kind(path: str, expected: Kind) -> Optional[Kind]:
    """The kind of ``path`` when it is one of the kinds above other than ``expected``; None when
    it looks like none of them, or like the expected kind (a damaged one)."""
    kind = guess(path)
    return None if kind == expected else kind


def guess(path: str) -> Optional[Kind]:
    """The kind of file ``path`` is (a constant above), or None when it fits none of them."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > _LIMIT:
            return None
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if raw.startswith(b"\x89HDF\r\n\x1a\n"):
        return _guess_hdf5(path)
    for test, kind in _BINARY_TESTS:
        if test(raw):
            return kind
    return _guess_text(raw)


def _guess_hdf5(path: str) -> Optional[Kind]:
    try:
        import h5py

        with h5py.File(path, "r") as f:
            if "iter" in f and "history" in f:
                return HDF5_SOLVER_STATE
            if isinstance(f.get("data"), h5py.Group):
                return HDF5_WEIGHTS
            if isinstance(f.get("data"), h5py.Dataset):
                return HDF5_DATA
    except (OSError, ValueError, RuntimeError, ImportError):
        pass
    return None


def _parsed(raw: bytes, message_type):
    from google.protobuf.message import DecodeError

    message = message_type()
    try:
        message.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return None
    return message


def _is_solver_state(raw: bytes) -> bool:
    # iter is field 1: a BlobProto's num fits it too, hence the weights or history it must name.
    from .proto import caffe_pb2

    state = _parsed(raw, caffe_pb2.SolverState)
    return state is not None and state.HasField("iter") and (
        state.HasField("learned_net") or len(state.history) > 0)


def _is_weights(raw: bytes) -> bool:
    from .proto import caffe_pb2

    net = _parsed(raw, caffe_pb2.NetParameter)
    if net is None:
        return False
    return any(len(layer.blobs) for layer in net.layer) or \
        any(len(layer.blobs) or len(layer.layer.blobs) for layer in net.layers)


def _is_blob(raw: bytes) -> bool:
    from .proto import caffe_pb2

    blob = _parsed(raw, caffe_pb2.BlobProto)
    if blob is None:
        return False
    values = len(blob.double_data) or len(blob.data)
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    dims = (blob.num, blob.channels, blob.height, blob.width) if legacy else tuple(blob.shape.dim)
    return values > 0 and math.prod(dims) == values


_BINARY_TESTS: List[Tuple[Callable[[bytes], bool], Kind]] = [
    (_is_solver_state, SOLVER_STATE), (_is_weights, WEIGHTS), (_is_blob, MEAN_FILE)]


def _guess_text(raw: bytes) -> Optional[Kind]:
    from google.protobuf import text_format

    from .proto import caffe_pb2

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for message_type, kind in ((caffe_pb2.NetParameter, NET_TEXT),
                               (caffe_pb2.SolverParameter, SOLVER_TEXT)):
        message = message_type()
        try:
            text_format.Parse(text, message)
        except (text_format.ParseError, ValueError, RuntimeError):
            continue
        if message.ListFields():
            return kind
    return None
