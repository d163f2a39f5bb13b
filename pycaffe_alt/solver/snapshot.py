"""Snapshot files: solver states (binary proto and HDF5), HDF5 weights, and their names.

Layouts follow Caffe so that each side reads the other's files:

- ``<prefix>_iter_<N>.solverstate``: a ``caffe_pb2.SolverState`` (iter, learned_net, history
  blobs with their shapes, current_step; with ``lr_policy: "plateau"`` also the SSD fork's
  ``minimum_loss`` and ``iter_last_event``, fields 5 and 6). History blobs are in the update rule's order (see
  :mod:`pycaffe_alt.solver.rules`: AdaDelta/Adam store all first-set blobs, then all second-set
  blobs).
- ``<prefix>_iter_<N>.solverstate.h5`` (``snapshot_format: HDF5``): datasets ``iter`` and
  ``current_step`` (int32, shape (1,)), ``learned_net`` (a null-terminated fixed-length string,
  as ``H5LTmake_dataset_string`` writes it) and a group ``history`` with datasets ``0``..``n-1``;
  with ``plateau`` also the fork's ``iter_last_event`` (int32, shape (1,)) and ``minimum_loss``
  (float32, shape (1,), as its ``hdf5_save_float<float>`` writes it).
- ``<prefix>_iter_<N>.caffemodel.h5``: a group ``data`` with one group per layer, holding the
  layer's blobs as datasets ``0``, ``1``, ... (Caffe's ``Net::ToHDF5``).

Our own continuation data (data cursors, RNG states, alternation phase) travels in
``SolverState.resume_state`` (field 5221, which Caffe skips as an unknown field) or in an extra
``resume_state`` dataset of the HDF5 state (Caffe reads only the datasets it knows). Its encoding,
chosen so that loading a snapshot never executes anything (unlike pickle), is::

    b"pycaffe_alt.resume.v1\\n" | uint64 LE length of the JSON header | JSON header | raw bytes

The JSON header holds the dict; every ``bytes`` value in it (e.g. a torch RNG state) is replaced
by ``{"__bytes__": [offset, length]}`` pointing into the raw section. Values may be None, bool,
int, float (NaN/inf allowed), str, bytes, lists (tuples come back as lists) and dicts with str
keys.

Every file is written atomically (temp file in the same folder, fsync, rename), so a run killed
while snapshotting leaves the previous snapshot intact.
"""
from __future__ import annotations

import io
import json
import os
import struct
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import DecodeError

from .. import file_kind
from ..errors import SolverError, WeightsError
from ..fileio import check_input_path, read_input_bytes, refuse_external_data
from ..proto import caffe_pb2
from ..proto.text_fields import invalid_text_field
from .lr_policy import PlateauState
from ..weights import array_to_blob, atomic_write, blob_to_array

RESUME_MAGIC = b"pycaffe_alt.resume.v1\n"
_BYTES_KEY = "__bytes__"


def snapshot_companion(path: str, state_path: str, what: str, hint: str) -> str:
    """A file a solverstate names (its caffemodel, mask store...): as written (Caffe opens it
    relative to the current directory), else next to the solverstate, so that a snapshot folder
    that was moved still resumes; otherwise a SolverError naming both."""
    if os.path.isfile(path):
        return path
    beside = os.path.join(os.path.dirname(state_path), os.path.basename(path))
    if os.path.isfile(beside):
        return beside
    if os.path.lexists(path):  # there, but a folder, FIFO, device or dangling link: say which
        try:
            check_input_path(path, SolverError)
        except SolverError as e:
            raise SolverError(f"{what} it names: {e.what}", where=state_path, hint=hint) from None
    raise SolverError(f"{what} it names, '{path}', not found (nor next to the solver state)",
                      where=state_path, hint=hint)


def snapshot_filename(prefix: str, it: int, ext: str) -> str:
    """Caffe's snapshot name ``<prefix>_iter_<it><ext>``; ``ext`` like ``.caffemodel``,
    ``.solverstate``, ``.caffemodel.h5`` or ``.solverstate.h5``."""
    return f"{prefix}_iter_{int(it)}{ext}"


def is_hdf5(path: str) -> bool:
    """Caffe picks the HDF5 reader for files whose name ends in ``.h5``."""
    return path.endswith(".h5")


# SolverState.minimum_loss's proto default (1e38 as a float): what the fork restores from a
# solverstate written without plateau bookkeeping (BVLC Caffe's, or another policy's of ours).
_UNSET_MINIMUM_LOSS = float(np.float32(1e38))


class _SolverStateTuple(NamedTuple):
    iter: int
    current_step: int
    learned_net: Optional[str]
    history: List[np.ndarray]
    resume_state: Optional[Dict[str, Any]]


class SolverStateData(_SolverStateTuple):
    """What a solverstate holds; unpacks as ``(iter, current_step, learned_net, history, resume_state)``.

    The SSD fork's plateau bookkeeping comes as the attributes ``minimum_loss`` and
    ``iter_last_event``, outside the tuple so that it still unpacks into five. A file without
    them gives the proto defaults (1e38 and 0), as the fork's binaryproto restore does.
    """

    minimum_loss: float = _UNSET_MINIMUM_LOSS  # the defaults, also for _replace/_make copies
    iter_last_event: int = 0

    def __new__(cls, iter: int, current_step: int, learned_net: Optional[str],
                history: List[np.ndarray], resume_state: Optional[Dict[str, Any]],
                minimum_loss: float = _UNSET_MINIMUM_LOSS, iter_last_event: int = 0):
        self = super().__new__(cls, iter, current_step, learned_net, history, resume_state)
        self.minimum_loss = minimum_loss
        self.iter_last_event = iter_last_event
        return self


# ---------------------------------------------------------------------------------------------
# resume_state codec


def _to_tree(value: Any, blobs: List[bytes], offset: List[int]) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        blobs.append(data)
        ref = {_BYTES_KEY: [offset[0], len(data)]}
        offset[0] += len(data)
        return ref
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_tree(v, blobs, offset) for v in value]
    if isinstance(value, dict):
        if _BYTES_KEY in value:
            raise TypeError(f"resume_state dict keys must not be {_BYTES_KEY!r}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"resume_state dict keys must be str, got {type(k).__name__}")
            out[k] = _to_tree(v, blobs, offset)
        return out
    raise TypeError(f"resume_state cannot hold a {type(value).__name__}; convert it to "
                    "bytes, numbers, strings, lists or dicts")


def encode_resume_state(state: Dict[str, Any]) -> bytes:
    """Serialize a resume-state dict (see the module docstring for the format)."""
    blobs: List[bytes] = []
    header = json.dumps(_to_tree(state, blobs, [0]), separators=(",", ":")).encode("utf-8")
    return RESUME_MAGIC + struct.pack("<Q", len(header)) + header + b"".join(blobs)


def _from_tree(value: Any, raw: bytes) -> Any:
    if isinstance(value, list):
        return [_from_tree(v, raw) for v in value]
    if isinstance(value, dict):
        if set(value) == {_BYTES_KEY}:
            start, length = value[_BYTES_KEY]
            if not (isinstance(start, int) and isinstance(length, int)
                    and 0 <= start and start + length <= len(raw)):
                raise ValueError("a bytes reference points outside the data")
            return raw[start:start + length]
        return {k: _from_tree(v, raw) for k, v in value.items()}
    return value


def decode_resume_state(payload: bytes, where: str = "resume_state") -> Dict[str, Any]:
    """Inverse of :func:`encode_resume_state`; a damaged payload raises SolverError at ``where``."""
    try:
        if not payload.startswith(RESUME_MAGIC):
            raise ValueError("it does not start with the pycaffe_alt resume-state marker")
        start = len(RESUME_MAGIC)
        (length,) = struct.unpack_from("<Q", payload, start)
        start += 8
        if start + length > len(payload):
            raise ValueError("it is truncated")
        tree = json.loads(payload[start:start + length].decode("utf-8"))
        state = _from_tree(tree, payload[start + length:])
        if not isinstance(state, dict):
            raise ValueError("it is not a dict")
        return state
    except (ValueError, struct.error, UnicodeDecodeError, TypeError) as e:
        raise SolverError(f"the resume state is damaged ({e})", where=where,
                          hint="resume from an earlier snapshot, or delete the file's resume "
                               "data to restart like Caffe (data cursor at the first record)") from None


# ---------------------------------------------------------------------------------------------
# binary proto solverstate


def _history_arrays(states: Sequence, path: str) -> List[np.ndarray]:
    arrays = []
    for i, blob in enumerate(states):
        try:
            arrays.append(blob_to_array(blob))
        except WeightsError as e:
            raise SolverError(f"history blob {i}: {e.what}", where=path, hint=e.hint) from None
    return arrays


def write_solverstate(path: str, iter: int, current_step: int, learned_net: Optional[str],
                     history: Sequence[np.ndarray],
                     resume_state: Optional[Dict[str, Any]] = None,
                     plateau: Optional[PlateauState] = None) -> None:
    """Write a Caffe ``.solverstate`` atomically (history as float32 blobs with shapes).

    ``learned_net`` is the matching ``.caffemodel`` path as Caffe records it (None leaves the
    field unset: restoring then keeps the net's current weights). ``resume_state`` is our
    continuation data, stored in the field Caffe ignores. ``plateau``: the SSD fork's
    ``minimum_loss`` and ``iter_last_event`` are written from it (its ``current_step`` is the
    argument's); None writes neither, as BVLC Caffe does.
    """
    state = caffe_pb2.SolverState()
    state.iter = int(iter)
    if learned_net is not None:
        state.learned_net = learned_net
    for arr in history:
        state.history.append(array_to_blob(np.asarray(arr)))
    state.current_step = int(current_step)
    if plateau is not None:
        state.iter_last_event = int(plateau.iter_last_event)
        state.minimum_loss = plateau.minimum_loss
    if resume_state is not None:
        state.resume_state = encode_resume_state(resume_state)
    atomic_write(path, state.SerializeToString())


def _require_file(path: str, kind: str, error=SolverError) -> None:
    if not os.path.lexists(path):
        raise error(f"{kind} file not found", where=path,
                    hint="check the path; snapshots are named <prefix>_iter_<N>.solverstate "
                         "(relative paths are taken from the current directory)")
    check_input_path(path, error, f"{kind} file")


def _read_bytes(path: str, kind: str) -> bytes:
    _require_file(path, kind)
    return read_input_bytes(path, SolverError, kind)


def read_solverstate(path: str) -> SolverStateData:
    """Read a Caffe (or our) ``.solverstate``; a missing, truncated or corrupt file is a SolverError."""
    raw = _read_bytes(path, "solver state")
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        kind = file_kind.other_kind(path, file_kind.SOLVER_STATE)
        if kind is not None:
            raise SolverError(f"not a solver state: it looks like {kind.what}", where=path,
                              hint=kind.advice) from None
        raise SolverError(f"not a valid solver state ({e}); the file is truncated or corrupt",
                          where=path, hint="resume from another snapshot") from None
    bad = invalid_text_field(state)
    if bad is not None:  # learned_net: a path that cannot be a str
        raise SolverError(f"field {bad} is not valid UTF-8 text; the file is corrupt",
                          where=path, hint="resume from another snapshot")
    # Caffe always writes iter; an empty or foreign file parses "successfully" without it.
    # Caffe always names the weights (learned_net). A caffemodel parses with no iter; a mean
    # BlobProto's num is field 1 too and was read as the iteration: name such a file's kind
    # before its made-up state is believed.
    suspect = not state.HasField("iter") or not state.HasField("learned_net")
    kind = file_kind.other_kind(path, file_kind.SOLVER_STATE) if suspect else None
    if kind is not None:
        raise SolverError(f"not a solver state: it looks like {kind.what}", where=path,
                          hint=kind.advice)
    if not state.HasField("iter"):
        raise SolverError("not a solver state (no iteration recorded)", where=path,
                          hint="pass a .solverstate file written by Caffe or pycaffe_alt")
    _check_counters(state.iter, state.current_step, state.iter_last_event, path)
    if state.HasField("learned_net") and not state.learned_net:
        # Caffe would try to open "" and fail; resuming with the initial weights is never meant.
        raise SolverError("learned_net is empty: the state names no weights file", where=path,
                          hint="the file is damaged; resume from another snapshot")
    resume = (decode_resume_state(state.resume_state, where=path)
              if state.HasField("resume_state") else None)
    return SolverStateData(
        iter=state.iter, current_step=state.current_step,
        learned_net=state.learned_net if state.HasField("learned_net") else None,
        history=_history_arrays(state.history, path), resume_state=resume,
        minimum_loss=state.minimum_loss, iter_last_event=state.iter_last_event)


def _check_counters(it: int, step: int, last_event: int, path: str) -> None:
    # Caffe would resume at a negative iteration (and train max_iter - iter steps); a
    # solverstate never holds one, so the file is damaged or not a solver state.
    for field, value in (("iter", it), ("current_step", step)):
        if value < 0:
            raise SolverError(f"{field} is {value}; a solver state's {field} is never negative",
                              where=path, hint="the file is damaged; resume from another "
                                               "snapshot")
    if it >= 2**31 - 1:  # int32 in Caffe's proto: no iteration could follow and be recorded
        raise SolverError(f"iter is {it}, the largest int32; no iteration can follow it",
                          where=path, hint="the file is damaged; resume from another snapshot")
    # An HDF5 dataset may hold any integer; Caffe reads these into an int (hdf5_load_int) and
    # the .solverstate fields are int32, so a larger one is no state Caffe wrote. Taken as read,
    # it stopped the next snapshot with a traceback after its .caffemodel was written.
    for field, value in (("current_step", step), ("iter_last_event", last_event)):
        if not -2**31 <= value < 2**31:
            raise SolverError(f"{field} is {value}, outside the int32 range a solver state "
                              "holds", where=path,
                              hint="the file is damaged; resume from another snapshot")


def check_history(history: Sequence[np.ndarray], expected_shapes: Sequence[Tuple[int, ...]],
                  path: str) -> None:
    """Caffe's restore check, with shapes too: the file must hold one blob per expected shape."""
    if len(history) != len(expected_shapes):
        raise SolverError(f"holds {len(history)} history blobs but this solver and net need "
                          f"{len(expected_shapes)}", where=path,
                          hint="resume with the same solver type and net that wrote the snapshot")
    for i, (arr, shape) in enumerate(zip(history, expected_shapes)):
        if int(np.prod(arr.shape)) != int(np.prod(shape)):
            raise SolverError(f"history blob {i} has shape {tuple(arr.shape)}, the parameter "
                              f"needs {tuple(shape)}", where=path,
                              hint="resume with the same net that wrote the snapshot")


# ---------------------------------------------------------------------------------------------
# HDF5


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise SolverError("HDF5 snapshots need h5py", hint="pip install h5py") from None
    return h5py


def _save_int(group, name: str, value: int) -> None:
    # hdf5_save_int: a one-element native int dataset.
    group.create_dataset(name, data=np.array([value], dtype=np.int32))


def _save_string(group, name: str, text: str) -> None:
    # H5LTmake_dataset_string: scalar, fixed length strlen + 1, null-terminated; Caffe's reader
    # relies on the terminating null.
    h5py = _h5py()
    raw = text.encode("utf-8") + b"\0"
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dset = h5py.h5d.create(group.id, name.encode("utf-8"), tid, space)
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"))


def _h5_bytes(fill) -> bytes:
    """Build an HDF5 file in memory (so it can then be written atomically)."""
    h5py = _h5py()
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        fill(f)
    return buffer.getvalue()


def write_solverstate_h5(path: str, iter: int, current_step: int, learned_net: Optional[str],
                         history: Sequence[np.ndarray],
                         resume_state: Optional[Dict[str, Any]] = None,
                         plateau: Optional[PlateauState] = None) -> None:
    """Write ``.solverstate.h5`` as Caffe's ``SnapshotSolverStateToHDF5`` lays it out, atomically
    (``plateau`` as in :func:`write_solverstate`, in the fork's datasets)."""

    def fill(f) -> None:
        _save_int(f, "iter", int(iter))
        if learned_net is not None:
            _save_string(f, "learned_net", learned_net)
        _save_int(f, "current_step", int(current_step))
        if plateau is not None:
            _save_int(f, "iter_last_event", int(plateau.iter_last_event))
            f.create_dataset("minimum_loss", data=np.array([plateau.minimum_loss], np.float32))
        group = f.create_group("history")
        for i, arr in enumerate(history):
            group.create_dataset(str(i), data=np.asarray(arr, dtype=np.float32))
        if resume_state is not None:
            f.create_dataset("resume_state",
                             data=np.frombuffer(encode_resume_state(resume_state), dtype=np.uint8))

    atomic_write(path, _h5_bytes(fill))


def _numbered(group, what: str) -> List[Optional[np.ndarray]]:
    """Datasets named 0..n-1 of a group as a list (None where an index is missing).

    Caffe opens each blob by the decimal name of its index (``oss << j``), so only those names
    are blobs; any other name ("01", "-1", "w") is no blob Caffe reads, yet it counts in its
    ``hdf5_get_num_links`` check. Read as a number it was put in the wrong slot or silently
    dropped. The blobs are datasets of integers or floats (hdf5_load_nd_dataset refuses any other
    class: strings, compounds, enums such as h5py's booleans)."""
    h5py = _h5py()
    if not isinstance(group, h5py.Group):
        raise ValueError(f"{what} is a dataset, not a group of numbered blob datasets")
    indices = []
    for name in group:
        if not (name.isascii() and name.isdigit() and str(int(name)) == name):
            raise ValueError(f"{what} holds an entry named {name!r}; blobs are datasets named "
                             "0, 1, 2, ...")
        indices.append(int(name))
    indices.sort()
    out: List[Optional[np.ndarray]] = [None] * (indices[-1] + 1 if indices else 0)
    for i in indices:
        item = group[str(i)]
        if not isinstance(item, h5py.Dataset):
            raise ValueError(f"{what} blob {i} is a group, not a dataset")
        if item.dtype.kind not in "iuf":
            raise ValueError(f"{what} blob {i} holds values of type {item.dtype}; a blob holds "
                             "integers or floating-point numbers")
        out[i] = np.asarray(item, dtype=np.float32)
    return out


def _one_value(f, name: str, what: str) -> np.ndarray:
    """The one value of dataset ``name``, which Caffe writes with ``hdf5_save_int`` or the
    fork's ``hdf5_save_float`` (``what``: "integer" or "number").

    Its ``hdf5_load_int``/``hdf5_load_float`` read one value through HDF5's conversion: an
    integer or float is converted, a string fails ("Failed to load int dataset"), and a dataset
    of several values is none Caffe wrote (it would read past its one value). Taking the first
    of them, or the digits of a string, resumed a damaged file at a made-up state."""
    item = f[name]
    if not isinstance(item, _h5py().Dataset):
        raise ValueError(f"'{name}' is a group; Caffe stores one {what} there")
    if item.dtype.kind not in "iuf" or item.size != 1:
        raise ValueError(f"dataset '{name}' holds {item.size} value(s) of type {item.dtype}; "
                         f"Caffe stores one {what} there")
    return np.asarray(item).reshape(-1)[0]


def _counter(f, name: str, default: Optional[int] = None) -> int:
    """The integer dataset ``name`` (see :func:`_one_value`), or ``default`` when absent and a
    default is given."""
    if name not in f and default is not None:
        return default
    return int(_one_value(f, name, "integer"))


def read_solverstate_h5(path: str) -> SolverStateData:
    """Read a ``.solverstate.h5`` (Caffe's or ours); a damaged file is a SolverError (h5py
    reports some damage as OSError, some, in group tables, as RuntimeError)."""
    h5py = _h5py()
    _require_file(path, "solver state")
    try:
        with h5py.File(path, "r") as f:
            refuse_external_data(f, path, SolverError)
            it = _counter(f, "iter")
            step = _counter(f, "current_step")
            # The fork requires both datasets; without them (BVLC Caffe's file, another policy's)
            # we take the values its binaryproto restore would, so a run may switch to plateau.
            last_event = _counter(f, "iter_last_event", default=0)
            minimum = (float(np.float32(_one_value(f, "minimum_loss", "number")))
                       if "minimum_loss" in f else _UNSET_MINIMUM_LOSS)
            learned = None
            if "learned_net" in f:
                value = f["learned_net"][()]
                learned = (value.decode("utf-8") if isinstance(value, bytes) else str(value)).rstrip("\0")
            history = _numbered(f["history"], "history")
            resume = (bytes(np.asarray(f["resume_state"], dtype=np.uint8).tobytes())
                      if "resume_state" in f else None)
    except (OSError, KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
        kind = file_kind.other_kind(path, file_kind.HDF5_SOLVER_STATE)
        if kind is not None:
            raise SolverError(f"not a solver state: it looks like {kind.what}", where=path,
                              hint=kind.advice) from None
        raise SolverError(f"not a valid HDF5 solver state ({e})", where=path,
                          hint="resume from another snapshot") from None
    _check_counters(it, step, last_event, path)
    if any(h is None for h in history):
        raise SolverError("history datasets are not numbered 0..n-1", where=path,
                          hint="the file is damaged; resume from another snapshot")
    return SolverStateData(iter=it, current_step=step, learned_net=learned, history=history,
                           resume_state=None if resume is None else decode_resume_state(resume, path),
                           minimum_loss=minimum, iter_last_event=last_event)


def read_any_solverstate(path: str) -> SolverStateData:
    """Pick the reader by file name, as Caffe's ``Solver::Restore`` does (``.h5`` -> HDF5)."""
    return read_solverstate_h5(path) if is_hdf5(path) else read_solverstate(path)


HDF5_NAME_HINT = "rename the layer, or save as .caffemodel (snapshot_format: BINARYPROTO)"


def hdf5_name_problem(name: str) -> Optional[str]:
    """Why layer ``name`` cannot be one group of an HDF5 weights file, or None.

    HDF5 reads a group name as a path: "a/b" became group b inside group a (which the reader
    then refused, so the snapshot could not be resumed), "/a" a group outside ``data``, and
    "" cannot be created (Caffe's ToHDF5 fails on all of them too)."""
    if not name:
        return "the name is empty"
    if "/" in name:
        return "'/' separates group names in HDF5"
    if name in (".", ".."):
        return f"'{name}' is a relative path in HDF5"
    return None


def write_weights_h5(layers: Sequence[Tuple[str, Sequence[Optional[np.ndarray]]]], path: str,
                     diffs: Optional[Sequence[Tuple[str, Sequence[Optional[np.ndarray]]]]] = None
                     ) -> None:
    """Write ``.caffemodel.h5`` (Caffe's ``Net::ToHDF5``), atomically.

    ``layers`` lists every layer in net order with its blobs; a None blob is skipped, as Caffe
    skips parameters a layer shares from another (only owners are saved). ``diffs``, in the same
    layout, go to a ``diff`` group next to ``data`` (``snapshot_diff``).
    """

    def fill(f) -> None:
        for group_name, table in (("data", layers), ("diff", diffs)):
            if table is None:
                continue
            top = f.create_group(group_name)
            for name, blobs in table:
                if name in top:
                    # A repeated layer name (Caffe allows them): HDF5 has one group per name.
                    if any(a is not None for a in blobs):
                        raise WeightsError(f"two layers named '{name}' have parameters; the HDF5 "
                                           "layout has one group per layer name", where=path,
                                           hint="rename one of them, or save as .caffemodel")
                    continue
                problem = hdf5_name_problem(name)
                if problem is not None:
                    raise WeightsError(f"layer {name!r} cannot be a group of an HDF5 weights file "
                                       f"({problem})", where=path, hint=HDF5_NAME_HINT)
                group = top.create_group(name)
                for i, arr in enumerate(blobs):
                    if arr is not None:
                        group.create_dataset(str(i), data=np.asarray(arr, dtype=np.float32))

    atomic_write(path, _h5_bytes(fill))


def read_weights_h5(path: str) -> Dict[str, List[Optional[np.ndarray]]]:
    """``{layer name: [blob arrays]}`` of a ``.caffemodel.h5`` (None where a shared blob was skipped)."""
    h5py = _h5py()
    _require_file(path, "HDF5 weights", WeightsError)
    try:
        with h5py.File(path, "r") as f:
            refuse_external_data(f, path, WeightsError)
            data = f["data"]
            return {name: _numbered(data[name], f"layer {name!r}") for name in data}
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        kind = file_kind.other_kind(path, file_kind.HDF5_WEIGHTS)
        if kind is not None:
            raise WeightsError(f"not weights: it looks like {kind.what}", where=path,
                               hint=kind.advice) from None
        raise WeightsError(f"not a Caffe HDF5 weights file ({e})", where=path,
                          hint="HDF5 weights hold a group data/<layer>/<i>") from None
