"""Binary weight files: ``.caffemodel`` (a NetParameter with blobs), ``.binaryproto`` (one BlobProto).

Weights are matched to layers by name, as Caffe's ``CopyTrainedLayersFrom`` does: layers of the
file that the net lacks are ignored (real caffemodels often hold the whole training net), and a
blob whose shape differs is an error naming the layer and both shapes (but for a layer whose
forks store its blobs in different layouts, which takes the file's). Legacy 4-D shapes
(num, channels, height, width) match any shape with the same dims once padded with 1s on the left.
HDF5 weight files (told by their content, as Caffe's H5Fis_hdf5 test tells them) hold
``data/<layer>/<i>`` datasets.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import DecodeError

from . import file_kind, fileio
from .errors import WeightsError, located_in
from .log import get_logger
from .proto import caffe_pb2
from .proto.text_fields import invalid_text_field

LayerBlobs = "OrderedDict[str, List[np.ndarray]]"
# (blob index, the file's shape) -> whether the layer reshaped that blob to it (a layer's
# ``adopt_stored_shape``).
ShapeAdopter = Callable[[int, Tuple[int, ...]], bool]


def blob_shape(blob) -> Tuple[int, ...]:
    """The shape a BlobProto declares: the legacy 4 dims when any is set, else ``shape.dim``.

    Caffe's Blob::FromProto and ShapeEquals take the legacy num/channels/height/width whenever
    one of them is present, even beside a ``shape``; preferring ``shape`` decoded such a blob
    with other dims than Caffe and named a mismatch as "the file has (24, 216), the net expects
    (24, 216)"."""
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    # Caffe writes a 0-axis blob (one value, e.g. a shared PReLU slope) with no shape at all.
    return ()


def _legacy_dims(blob) -> Tuple[int, ...]:
    return (blob.num, blob.channels, blob.height, blob.width)


def blob_to_array(blob, diff: bool = False) -> np.ndarray:
    """A BlobProto as a float32 numpy array of its declared shape."""
    if diff:
        values = blob.double_diff if len(blob.double_diff) else blob.diff
    else:
        values = blob.double_data if len(blob.double_data) else blob.data
    arr = np.asarray(values, dtype=np.float32)
    shape = blob_shape(blob)
    if arr.size != math.prod(int(d) for d in shape):  # Python ints: no int64 wrap-around
        raise WeightsError(f"blob declares shape {shape} but holds {arr.size} values",
                           hint="the file is truncated or was not written by Caffe")
    return arr.reshape(shape)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def array_to_blob(arr: np.ndarray, diff: np.ndarray = None, legacy_dims: bool = False):
    """A BlobProto holding ``arr`` (float32) with its shape (and an optional diff); with
    ``legacy_dims`` a 4-D ``arr``'s shape goes into num/channels/height/width instead, as
    Caffe's tools write mean files.

    The packed float fields are assembled as wire bytes and parsed once: element-wise ``extend``
    is far too slow for real models (VGG-16 has 138M weights).
    """
    arr = np.asarray(arr, dtype=np.float32)
    if legacy_dims and arr.ndim == 4:
        # num, channels, height, width are BlobProto fields 1-4 (varints).
        wire = b"".join(_varint(field << 3) + _varint(int(n)) for field, n in
                        zip((1, 2, 3, 4), arr.shape))
    else:
        wire = _length_delimited(7, caffe_pb2.BlobShape(dim=arr.shape).SerializeToString())
    wire += _length_delimited(5, arr.astype("<f4").tobytes())
    if diff is not None:
        wire += _length_delimited(6, np.asarray(diff, dtype="<f4").tobytes())
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(wire)
    return blob


def _expected_kind(message) -> "file_kind.Kind":
    return file_kind.MEAN_FILE if isinstance(message, caffe_pb2.BlobProto) else file_kind.WEIGHTS


def _parse(path: str, message):
    if not os.path.exists(path):
        raise WeightsError(f"file not found: {path}", hint="check the path (relative paths are "
                           "taken from the current directory)")
    # Named by what it holds: a mean image (BlobProto) given as a FIFO was "not a weights file".
    kind = "BlobProto file (.binaryproto)" if isinstance(message, caffe_pb2.BlobProto) \
        else "weights file"
    raw = fileio.read_input_bytes(path, WeightsError, kind)
    try:
        message.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        kind = file_kind.other_kind(path, _expected_kind(message))
        if kind is not None:
            raise WeightsError(f"not a {type(message).__name__}: it looks like {kind.what}",
                               where=path, hint=kind.advice) from None
        raise WeightsError(f"not a valid {type(message).__name__} ({e}); the file is truncated "
                           "or corrupt", where=path,
                           hint="download or copy it again; check it is a Caffe binary file") from None
    bad = invalid_text_field(message)
    if bad is not None:  # e.g. a layer name: its weights would silently not load
        raise WeightsError(f"field {bad} is not valid UTF-8 text; the file is corrupt", where=path,
                           hint="download or copy it again")
    return message


def read_net_weights(path: str, hdf5: Optional[bool] = None
                     ) -> "OrderedDict[str, Tuple[str, List]]":
    """``{layer name: (type, [BlobProto, ...])}`` of every layer with blobs in a weights file.

    ``hdf5`` None: the format is told from the file's content, as Caffe's H5Fis_hdf5 test does
    (a ``.caffemodel.h5`` renamed, or a binary proto named ``.h5``, still loads).
    """
    if hdf5 is None:
        hdf5 = is_hdf5_file(path)
    if hdf5:
        return _read_h5(path)
    from .upgrade import net_needs_upgrade, upgrade_net_as_needed

    net = _parse(path, caffe_pb2.NetParameter())
    if net_needs_upgrade(net):  # V0/V1 weights: Caffe upgrades them on load, blobs included
        with located_in(path):
            upgrade_net_as_needed(net, path)
    out: "OrderedDict[str, Tuple[str, List]]" = OrderedDict()
    for layer in net.layer:
        if len(layer.blobs):
            out[layer.name] = (layer.type, list(layer.blobs))
    if not net.layer and net.ByteSize() == 0 and file_kind.other_kind(path, file_kind.WEIGHTS) is None:
        # Zero bytes parse as an empty NetParameter, which Caffe's CopyTrainedLayersFrom copies
        # nothing from: programs write such a file on purpose to build a net from its fillers
        # (caffe2pytorch's CaffeData). copy_weights says so when the net had weights to fill.
        return out
    if not net.layer:
        kind = file_kind.other_kind(path, file_kind.WEIGHTS)
        if kind is not None:
            raise WeightsError(f"holds no layers: it looks like {kind.what}", where=path,
                               hint=kind.advice)
        raise WeightsError("holds no layers", where=path,
                           hint="is this a .caffemodel? solverstates and binaryprotos are different files")
    return out


# An HDF5 file's signature; its superblock sits at offset 0 or, after a user block, at 512,
# 1024, 2048, ... (the HDF5 file format specification, "Format Signature").
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5_file(path: str) -> bool:
    """Whether ``path`` is an HDF5 file (by its signature; a missing or unreadable file is not)."""
    try:
        if not os.path.isfile(path):
            return False
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while offset + len(_HDF5_SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def _read_h5(path: str):
    # HDF5 weights (data/<layer>/<i>); a shared blob Caffe skipped when writing reads as None.
    from .solver.snapshot import read_weights_h5

    return OrderedDict((name, ("", [None if a is None else array_to_blob(a) for a in arrays]))
                       for name, arrays in read_weights_h5(path).items())


def shapes_match(blob, shape: Sequence[int]) -> bool:
    """Caffe's Blob::ShapeEquals: exact shape, or legacy 4-D dims equal after left-padding."""
    if not any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return blob_shape(blob) == tuple(shape)
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    return _legacy_dims(blob) == padded


def shared_flags(layers: Sequence[Tuple[str, Sequence]]) -> List[List[bool]]:
    """For every blob of ``layers`` ((name, blobs) in net order): whether an earlier layer holds
    it, i.e. it is shared from that layer (Caffe's param owner is the first holder)."""
    seen: set = set()
    flags = []
    for _, params in layers:
        flags.append([id(p) in seen for p in params])
        seen.update(id(p) for p in params)
    return flags


def copy_weights(layers: Sequence[Tuple[str, Sequence]], path: str,
                 hdf5: Optional[bool] = None,
                 adopters: Optional[Sequence[Optional[ShapeAdopter]]] = None) -> List[str]:
    """Copy a weights file into ``layers`` ((name, [nn.Parameter]) of every layer, in net
    order); returns the layers copied. ``hdf5`` as in :func:`read_net_weights`; ``adopters``
    (one per layer, in the same order) as ``adopt`` of :func:`copy_layer_blobs`.

    A repeated layer name gets the weights in the layer Caffe picks: the first of the name from
    a binary file (CopyTrainedLayersFrom searches the layers in order), the last from an HDF5
    file (CopyTrainedLayersFromHDF5 looks names up in a map that the last layer of a name
    wins). A layer without parameters whose name has blobs in the file is an error, as in Caffe
    ("Incompatible number of blobs"): the weights would silently be dropped.
    Layers of the file missing from ``layers`` are ignored (Caffe logs "Ignoring source layer").
    A file that shares no layer name with the net at all (the wrong model, or layers renamed)
    copies nothing; that is logged as a warning naming the file (see :func:`unmatched_warning`).
    """
    if hdf5 is None:
        hdf5 = is_hdf5_file(path)
    stored = read_net_weights(path, hdf5)
    targets: Dict[str, Sequence] = {}
    shared: Dict[str, List[bool]] = {}
    adopt: Dict[str, Optional[ShapeAdopter]] = {}
    if adopters is None:
        adopters = [None] * len(layers)
    for (name, params), flags, adopter in zip(layers, shared_flags(layers), adopters):
        if hdf5 or name not in targets:
            targets[name], shared[name], adopt[name] = params, flags, adopter
    copied = []
    log = get_logger()
    for name, (_, blobs) in stored.items():
        target = targets.get(name)
        if target is None:
            # Caffe's CopyTrainedLayersFrom line: fine-tuners read it to spot a renamed layer
            # that kept its initial weights.
            log.info("Ignoring source layer %s", name)
            continue
        if not (blobs or target):
            continue
        if hdf5 and len(blobs) > len(target):
            # CopyTrainedLayersFromHDF5 counts the group's datasets, then opens "0".."n-1": a
            # dataset numbered past the layer's blobs, with fewer datasets than blobs, leaves
            # a blob unread. Say which dataset, not a blob count the file does not hold.
            extra = [i for i in range(len(target), len(blobs)) if blobs[i] is not None]
            stored = sum(b is not None for b in blobs)
            if stored <= len(target):
                raise WeightsError(
                    f"layer '{name}': the file's blob dataset '{extra[0]}' is past the layer's "
                    f"{len(target)} blob(s) (datasets are named 0 to {len(target) - 1})",
                    where=path, hint="the file is damaged or was edited; re-create it from "
                                     "the net that wrote it")
        if hdf5 and len(blobs) < len(target):
            # CopyTrainedLayersFromHDF5: a dataset missing from the group is fine for a shared
            # blob (its owner's copy fills it), "Incompatible number of blobs" otherwise.
            blobs = list(blobs) + [None] * (len(target) - len(blobs))
        copy_layer_blobs(name, blobs, target, path, shared[name], adopt[name])
        copied.append(name)
    message = unmatched_warning(path, list(stored), [n for n, blobs in targets.items() if blobs])
    if message is not None:
        log.warning("%s", message)
    return copied


def copy_layer_blobs(name: str, blobs: Sequence, target: Sequence, where: str,
                     shared: Optional[Sequence[bool]] = None,
                     adopt: Optional[ShapeAdopter] = None) -> None:
    """Copy one layer's stored BlobProtos into its parameters ``target``; the count and every
    shape must fit (a WeightsError naming ``where``), unless ``adopt(i, file_shape)`` (the
    layer's ``adopt_stored_shape``) reshapes parameter ``i`` to the file's and says so. A None
    blob (HDF5: not stored) is left alone where ``shared`` says the parameter is shared from an
    earlier layer, whose copy fills it; for any other parameter it is an error."""
    import torch

    if len(blobs) != len(target):
        raise WeightsError(
            f"layer '{name}': the file has {len(blobs)} blob(s), the net expects {len(target)}",
            where=where, hint="rename the layer in the prototxt to learn it from scratch instead")
    for i, (blob, param) in enumerate(zip(blobs, target)):
        if blob is None:
            if shared is not None and shared[i]:
                continue
            raise WeightsError(f"layer '{name}': blob {i} is not in the file (only a blob shared "
                               "from an earlier layer may be left out)", where=where,
                               hint="the file was written for a net that shares this parameter; "
                                    "load it into that net, or rename the layer to learn it "
                                    "from scratch")
        shape = tuple(param.shape)
        if not shapes_match(blob, shape) and adopt is not None and adopt(i, blob_shape(blob)):
            shape = tuple(param.shape)
        if not shapes_match(blob, shape):
            raise WeightsError(
                f"layer '{name}' blob {i}: shape mismatch; the file has {blob_shape(blob)}, "
                f"the net expects {shape}", where=where,
                hint="the prototxt and the weights belong to different models, or rename the "
                     "layer to learn its parameters from scratch")
        with located_in(f"{where}: layer '{name}' blob {i}"):
            value = torch.from_numpy(blob_to_array(blob).reshape(shape))
        with torch.no_grad():
            param.data.copy_(value.to(param.device, param.dtype))


def unmatched_warning(path: str, file_layers: Sequence[str], net_layers: Sequence[str]
                      ) -> Optional[str]:
    """The warning for a weights file none of whose layers the net has, or that holds no
    weights at all (None when some match, or when the net has nothing to fill).

    Caffe copies by name and silently ignores the rest, so such a file leaves the net at its
    initial (random) weights without a word; we say so.
    """
    if not file_layers and net_layers:
        return (f"{path}: the weights file holds no weights; nothing was copied and the net "
                "keeps its initial weights")
    if not file_layers or not net_layers or set(file_layers) & set(net_layers):
        return None
    def names(items: Sequence[str]) -> str:
        return ", ".join(f"'{n}'" for n in items[:5]) + (", ..." if len(items) > 5 else "")
    return (f"{path}: no layer of this weights file matches a layer of the net by name (file: "
            f"{names(list(file_layers))}; net: {names(list(net_layers))}); nothing was copied "
            "and the net keeps its initial weights")


def uncovered_warning(paths: Sequence[str], copied: Sequence[str],
                      learnable: Sequence[str]) -> Optional[str]:
    """The warning for a scored or converted net some of whose learnable layers no weights file
    filled (None when every one was, or when none was: :func:`unmatched_warning` covers that).

    A caffemodel cut short at a layer boundary still parses (protobuf cannot tell), and the
    layers after the cut keep their random initial values; fine-tuning leaves new layers out on
    purpose, so ``tools/train`` does not warn, but a score or an exported model of such a net is
    not the trained model's.
    """
    copied = set(copied)
    missing = [n for n in learnable if n not in copied]
    if not missing or len(missing) == len(learnable):
        return None
    shown = ", ".join(f"'{n}'" for n in missing[:8]) + (", ..." if len(missing) > 8 else "")
    return (f"{', '.join(paths)}: no weights for {len(missing)} of the net's {len(learnable)} "
            f"layers with parameters ({shown}); they keep their initial values (a truncated "
            "file, or weights of another net?)")


def warn_uncovered(paths: Sequence[str], copied: Sequence[str], params) -> None:
    """Log :func:`uncovered_warning` for a net whose pycaffe ``params`` (layer name -> blobs)
    got ``copied`` from ``paths`` (tools/test, extract_features, convert_model, and a solver
    restoring a snapshot's weights)."""
    message = uncovered_warning(paths, copied, [n for n, blobs in params.items() if len(blobs)])
    if message is not None:
        get_logger().warning("%s", message)


def read_binaryproto(path: str) -> np.ndarray:
    """The array of a ``.binaryproto`` file (e.g. a mean image, shape (1, C, H, W))."""
    blob = _parse(path, caffe_pb2.BlobProto())
    try:
        with located_in(path):
            values = blob_to_array(blob)
    except WeightsError:
        values = None
    if values is None or values.size == 0:
        # Another kind of file "parses" into a blob of made-up dims (a solver state's iter is
        # field 1, num; a caffemodel gives no dims at all): name the kind, not the dims.
        kind = file_kind.other_kind(path, file_kind.MEAN_FILE)
        if kind is not None:
            raise WeightsError(f"not a BlobProto: it looks like {kind.what}", where=path,
                               hint=kind.advice)
    if values is None:
        with located_in(path):
            return blob_to_array(blob)  # raises the count error again
    return values


def write_binaryproto(arr: np.ndarray, path: str) -> None:
    """Write ``arr`` as a BlobProto file atomically (legacy 4-D dims set as Caffe's tools do)."""
    atomic_write(path, array_to_blob(arr, legacy_dims=True).SerializeToString())


def atomic_write(path: str, payload: bytes) -> None:
    """Write a weights file atomically (see :func:`pycaffe_alt.fileio.atomic_write`)."""
    fileio.atomic_write(path, payload, WeightsError)


def net_param_with_weights(net_param, layers: Sequence[Sequence],
                           diffs: Optional[Sequence[Sequence[np.ndarray]]] = None, *,
                           phase: Optional[int] = None,
                           loss_weights: Optional[Sequence[Sequence[float]]] = None
                           ) -> "caffe_pb2.NetParameter":
    """What Caffe's Net::ToProto writes: the net's name and its layers, each with its current
    blobs (no other NetParameter field: not the filtering ``state``, nor ``force_backward``).

    ``layers`` holds each layer's parameters, in the order of ``net_param.layer`` (by position:
    layer names may repeat); ``diffs``, in the same order, one array per blob: each blob also
    carries its diff (``ToProto(param, write_diff=true)``, the solver's ``snapshot_diff``).
    Each layer is written as Caffe holds it after set-up: with ``phase``, the net's, where the
    layer gives none (Net::Init), and with the ``loss_weights`` it was set up with (one list per
    layer) where it gives none and they are not all 0 (LossLayer::LayerSetUp writes a loss
    layer's default ``loss_weight: 1`` into its parameters).
    """
    out = caffe_pb2.NetParameter()
    out.name = net_param.name
    out.layer.extend(net_param.layer)
    for index, (layer, params) in enumerate(zip(out.layer, layers)):
        if phase is not None and not layer.HasField("phase"):
            layer.phase = phase
        if loss_weights is not None and not len(layer.loss_weight) and any(loss_weights[index]):
            layer.loss_weight.extend(loss_weights[index])
        del layer.blobs[:]
        layer_diffs = diffs[index] if diffs is not None else None
        for i, p in enumerate(params):
            diff = layer_diffs[i] if layer_diffs is not None else None
            layer.blobs.append(array_to_blob(p.detach().cpu().numpy(), diff))
    return out
