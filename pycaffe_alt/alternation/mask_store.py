"""Bit-packed store of per-instance multi-layer supports (I-alternation's masks).

One bit per unit. Row ``r`` holds record ``r``'s supports of every layer, contiguous, each layer's
units padded to whole bytes (so a layer is a byte slice of the row). Keys are record indices —
positions in the dataset's key order, which data layers expose as ``layer.last_indices``.

Packing and unpacking run on the masks' device with torch bit operations (torch has no packbits):
a batch costs one device->host copy of packed bytes in ``put`` and one host->device copy in ``get``,
i.e. 1/8 of a byte per unit instead of a bool's byte. The rows live in RAM (a numpy uint8 array)
when they fit in ``max_ram_bytes``, else in a memory-mapped working file.

File format (``save``/``load``; the working file of a memory-mapped store has the same layout, but
its ``filled`` bits are only brought up to date by ``save``)::

    b"PCAMASK1"                      magic, 8 bytes
    uint32 version, uint32 meta_len  little endian
    meta                             JSON: num_records, row_bytes, layers [{name, shape, offset}]
    filled                           ceil(num_records / 8) bytes: which records have a support
    zero padding                     to a multiple of 64 bytes
    rows                             num_records * row_bytes bytes
"""
from __future__ import annotations

import json
import math
import itertools
import os
import shutil
import struct
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import SolverError
from ..fileio import atomic_write_chunks
from ..weights import atomic_write
from .rules import count_changed_bits

MAGIC = b"PCAMASK1"
VERSION = 1
_ALIGN = 64
# Saves above this size are streamed to the temporary file instead of built in memory first.
_STREAM_SAVE_BYTES = 64 << 20
# Records copied per chunk when streaming a big store to a file.
_CHUNK_ROWS = 4096

Layout = Sequence[Tuple[str, Sequence[int]]]


# Packing 8 bools at once: the 8 bytes (each 0 or 1) of a little-endian int64 times this
# constant put byte k's bit at bit 63 - k and nothing else in the top byte (the partial products
# land on distinct bits, so no carries), i.e. the top byte is the MSB-first packed byte
# (numpy.packbits' order). The product wraps modulo 2^64, which is all we need.
_PACK_MUL = 0x8040201008040201 - (1 << 64)
# Unpacking: each byte value -> its 8 bits as 8 bool bytes, stored as one int64 (little endian).
_UNPACK_TABLE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).view(np.int64)[:, 0]
_unpack_tables: Dict[torch.device, torch.Tensor] = {}


def _unpack_table(device: torch.device) -> torch.Tensor:
    table = _unpack_tables.get(device)
    if table is None:
        table = _unpack_tables[device] = torch.from_numpy(_UNPACK_TABLE.copy()).to(device)
    return table


def pack_bits(mask: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, ...)`` bool -> ``(B, ceil(units / 8))`` uint8, MSB first, on the mask's device.

    Same bytes as ``numpy.packbits(mask.reshape(B, -1), axis=1)``. ``out`` receives the result
    when given (a column slice of a row buffer). Assumes a little-endian device (x86, ARM, CUDA).
    """
    b = mask.shape[0]
    flat = mask.reshape(b, -1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    packed = ((words * _PACK_MUL) >> 56).to(torch.uint8)
    if out is None:
        return packed
    out.copy_(packed)
    return out


def unpack_bits(packed: torch.Tensor, units: int) -> torch.Tensor:
    """``(B, nbytes)`` uint8 -> ``(B, units)`` bool (inverse of :func:`pack_bits`)."""
    spread = _unpack_table(packed.device)[packed.long()]
    return spread.view(torch.uint8).view(torch.bool).reshape(packed.shape[0], -1)[:, :units]


class MaskStore:
    """Supports of ``num_records`` examples for the layers of ``layout`` (``[(name, unit_shape)]``).

    ``path`` names where the working file goes when the rows exceed ``max_ram_bytes`` (put it
    next to the snapshots); a store that fits in RAM never touches it. The working file itself
    is private to the process (see :func:`_private_mapping`). ``save``/``load`` write and read
    snapshot files atomically.
    """

    def __init__(self, layout: Layout, num_records: int, path: Optional[str] = None,
                 max_ram_bytes: int = 1 << 30, *, _rows: Optional[np.ndarray] = None,
                 _filled: Optional[np.ndarray] = None):
        self.layout: List[Tuple[str, Tuple[int, ...]]] = [(str(n), tuple(int(d) for d in s))
                                                          for n, s in layout]
        names = [n for n, _ in self.layout]
        if len(set(names)) != len(names):
            raise SolverError(f"mask store layout names a layer twice: {names}")
        if not self.layout:
            raise SolverError("mask store needs at least one layer",
                              hint="the net has no HardThreshold/SupportMask layer to store")
        if num_records <= 0:
            raise SolverError(f"mask store needs at least one record, got {num_records}")
        self.num_records = int(num_records)
        self.units: Dict[str, int] = {n: int(math.prod(s)) for n, s in self.layout}
        self.offsets: Dict[str, int] = {}
        row = 0
        for n, _ in self.layout:
            self.offsets[n] = row
            row += (self.units[n] + 7) // 8
        self.row_bytes = row
        self.path = path
        self.max_ram_bytes = int(max_ram_bytes)
        self.header = self._header_bytes(np.zeros(self._filled_bytes(), np.uint8))
        self.filled = np.zeros(self.num_records, dtype=bool) if _filled is None else _filled
        if _rows is not None:
            self.rows = _rows
        elif self.num_records * self.row_bytes <= self.max_ram_bytes:
            self.rows = np.zeros((self.num_records, self.row_bytes), dtype=np.uint8)
        else:
            if path is None:
                raise SolverError(
                    f"mask store of {_human(self.num_records * self.row_bytes)} exceeds the RAM "
                    f"limit of {_human(self.max_ram_bytes)} and has no file to map",
                    hint="give a path next to the snapshots (or raise max_ram_bytes)")
            self.rows = self._create_mapped(path)

    # ------------------------------------------------------------------ layout and size
    @property
    def in_ram(self) -> bool:
        """True when the rows are an in-memory array, False when memory-mapped."""
        return not isinstance(self.rows, np.memmap)

    @property
    def nbytes(self) -> int:
        """Size of the store as saved: header plus packed rows."""
        return len(self.header) + self.num_records * self.row_bytes

    @property
    def total_units(self) -> int:
        return sum(self.units.values())

    @property
    def bits_per_unit(self) -> float:
        """Stored bits per support unit, header and byte padding included (1.0 is the floor)."""
        return self.nbytes * 8 / (self.num_records * self.total_units)

    def layer_names(self) -> List[str]:
        return [n for n, _ in self.layout]

    def __repr__(self) -> str:
        where = "RAM" if self.in_ram else f"a working file next to {self.path}"
        return (f"MaskStore({len(self.layout)} layers, {self.num_records} records, "
                f"{self.total_units} units/record, {_human(self.nbytes)} in {where}, "
                f"{self.bits_per_unit:.4f} bits/unit, {int(self.filled.sum())} filled)")

    # ------------------------------------------------------------------ put / get
    def _indices(self, indices: Union[torch.Tensor, Sequence[int]]) -> np.ndarray:
        idx = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) \
            else np.asarray(indices)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_records):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise SolverError(f"record index {bad} is outside the mask store's "
                              f"{self.num_records} records",
                              hint="the store was made for a dataset of another size; start the "
                                   "alternation again or use the matching dataset")
        return idx

    def _layer_slice(self, name: str) -> slice:
        if name not in self.offsets:
            raise SolverError(f"mask store has no layer '{name}'",
                              hint=f"its layers: {', '.join(self.layer_names())}")
        lo = self.offsets[name]
        return slice(lo, lo + (self.units[name] + 7) // 8)

    def put(self, layer_or_all: Optional[str], indices: Union[torch.Tensor, Sequence[int]],
            masks: Dict[str, torch.Tensor]) -> int:
        """Store the supports of records ``indices``; returns how many bits changed.

        ``layer_or_all``: one layer name (only that layer's bytes are written) or ``None``/``"all"``
        (``masks`` must then hold every layer). ``masks[name]`` is bool ``(B, *unit_shape)``.
        Changed bits are counted against the records' previous supports; a record stored for the
        first time counts 0 (use :meth:`is_filled` before ``put`` for the denominator).
        """
        idx = self._indices(indices)
        names = self.layer_names() if layer_or_all in (None, "all") else [layer_or_all]
        missing = [n for n in names if n not in masks]
        if missing:
            raise SolverError(f"mask store put() lacks the support of {', '.join(missing)}")
        for n in names:
            self._layer_slice(n)  # names an unknown layer clearly
            want = (len(idx),) + dict(self.layout)[n]
            if tuple(masks[n].shape) != want:
                raise SolverError(f"support of '{n}' has shape {tuple(masks[n].shape)}, the store "
                                  f"expects {want}")
        whole = len(names) == len(self.layout)
        cols = slice(0, self.row_bytes) if whole else self._layer_slice(names[0])
        # Pack every layer into one buffer on the masks' device, then one device->host copy.
        device = masks[names[0]].device
        buf = torch.empty((len(idx), cols.stop - cols.start), dtype=torch.uint8, device=device)
        for n in names:
            sl = self._layer_slice(n)
            pack_bits(masks[n], out=buf[:, sl.start - cols.start:sl.stop - cols.start])
        new = buf.cpu().numpy()
        was = self.filled[idx]
        changed = 0
        if was.any():
            old = self.rows[idx[was]] if whole else self.rows[idx[was], cols]
            changed = count_changed_bits(old, new[was])
        if whole:
            self.rows[idx] = new  # whole rows: much faster than a (fancy, slice) assignment
        else:
            self.rows[idx, cols] = new
        self.filled[idx] = True
        return changed

    def read_rows(self, indices: Union[torch.Tensor, Sequence[int]]) -> np.ndarray:
        """The packed rows of records ``indices``: a ``(len, row_bytes)`` uint8 copy (a layer's
        bytes are the columns ``offsets[name] .. + ceil(units / 8)``). Unfilled rows are zeros."""
        return np.ascontiguousarray(self.rows[self._indices(indices)])

    def write_rows(self, indices: Union[torch.Tensor, Sequence[int]], rows: np.ndarray) -> None:
        """Store packed rows (as :meth:`read_rows` gives them, e.g. from another process) for
        records ``indices``; they count as filled."""
        idx = self._indices(indices)
        rows = np.asarray(rows, dtype=np.uint8)
        if rows.shape != (len(idx), self.row_bytes):
            raise SolverError(f"packed rows of shape {rows.shape} do not fit the store's "
                              f"{(len(idx), self.row_bytes)}")
        self.rows[idx] = rows
        self.filled[idx] = True

    def layer_columns(self, name: str) -> slice:
        """The byte columns of layer ``name`` in a packed row."""
        return self._layer_slice(name)

    def is_filled(self, indices: Union[torch.Tensor, Sequence[int]]) -> np.ndarray:
        """Bool array: which of ``indices`` already have a stored support."""
        return self.filled[self._indices(indices)]

    def get(self, indices: Union[torch.Tensor, Sequence[int]],
            device: Union[str, torch.device, None] = None) -> Dict[str, torch.Tensor]:
        """Supports of records ``indices`` as ``{layer: bool (B, *unit_shape)}`` on ``device``."""
        idx = self._indices(indices)
        if not self.filled[idx].all():
            first = int(idx[~self.filled[idx]][0])
            raise SolverError(f"record {first} has no stored support yet",
                              hint="run a support step over the whole training set first")
        rows = torch.from_numpy(np.ascontiguousarray(self.rows[idx]))
        if device is not None and torch.device(device).type != "cpu":
            rows = rows.pin_memory().to(device, non_blocking=True)
        out = {}
        for n, shape in self.layout:
            sl = self._layer_slice(n)
            out[n] = unpack_bits(rows[:, sl], self.units[n]).reshape((len(idx),) + shape)
        return out

    # ------------------------------------------------------------------ files
    def _filled_bytes(self) -> int:
        return (self.num_records + 7) // 8

    def _meta(self) -> bytes:
        return json.dumps({"num_records": self.num_records, "row_bytes": self.row_bytes,
                           "layers": [{"name": n, "shape": list(s), "offset": self.offsets[n]}
                                      for n, s in self.layout]}, sort_keys=True).encode()

    def _header_bytes(self, filled_packed: np.ndarray) -> bytes:
        meta = self._meta()
        head = MAGIC + struct.pack("<II", VERSION, len(meta)) + meta + filled_packed.tobytes()
        return head + b"\0" * ((-len(head)) % _ALIGN)

    def _create_mapped(self, path: str) -> np.memmap:
        """A fresh working file (header + zero rows) mapped read/write."""
        def fill(f) -> None:
            f.write(self.header)
            f.truncate(len(self.header) + self.num_records * self.row_bytes)

        return _private_mapping(path, fill, len(self.header), (self.num_records, self.row_bytes))

    def save(self, path: str) -> None:
        """Write the store to ``path`` atomically (temporary file, then ``os.replace``)."""
        header = self._header_bytes(np.packbits(self.filled))
        if self.num_records * self.row_bytes <= _STREAM_SAVE_BYTES and self.in_ram:
            atomic_write(path, header + self.rows.tobytes())
            return
        # Big (or memory-mapped) stores are streamed chunk by chunk, never held twice in memory.
        if isinstance(self.rows, np.memmap):
            self.rows.flush()
        rows = (np.ascontiguousarray(self.rows[lo:lo + _CHUNK_ROWS]).tobytes()
                for lo in range(0, self.num_records, _CHUNK_ROWS))
        atomic_write_chunks(path, itertools.chain((header,), rows), SolverError)

    @classmethod
    def load(cls, path: str, expect_layout: Optional[Layout] = None,
             expect_records: Optional[int] = None, work_path: Optional[str] = None,
             max_ram_bytes: int = 1 << 30) -> "MaskStore":
        """Read a store saved by :meth:`save`, checked against the net and the dataset.

        Raises SolverError when the file is not a mask store, or its layers/unit shapes differ
        from ``expect_layout`` or its record count from ``expect_records``. A store larger than
        ``max_ram_bytes`` is copied to a working file next to ``work_path`` (default ``path``)
        and mapped, so the snapshot file itself is never modified.
        """
        try:
            with open(path, "rb") as f:
                head = f.read(16)
                if len(head) < 16 or head[:8] != MAGIC:
                    raise SolverError(f"{path} is not a pycaffe_alt mask store (bad magic)",
                                      hint="give the .masks file written with the snapshot")
                version, meta_len = struct.unpack("<II", head[8:16])
                if version != VERSION:
                    raise SolverError(f"{path}: mask store version {version}, this pycaffe_alt "
                                      f"reads version {VERSION}")
                meta = json.loads(f.read(meta_len).decode())
                n = int(meta["num_records"])
                filled = np.unpackbits(np.frombuffer(f.read((n + 7) // 8), np.uint8),
                                       count=n).astype(bool)
        except OSError as e:
            raise SolverError(f"cannot read the mask store {path}: {e.strerror}") from None
        except (ValueError, KeyError) as e:
            raise SolverError(f"{path}: corrupt mask store header ({e})") from None
        layout = [(d["name"], tuple(d["shape"])) for d in meta["layers"]]
        if expect_records is not None and n != int(expect_records):
            raise SolverError(f"{path}: the mask store holds {n} records but the training set has "
                              f"{int(expect_records)}",
                              hint="the masks belong to another dataset; restart the alternation "
                                   "(without this snapshot's masks) or use the matching data")
        if expect_layout is not None:
            want = [(str(a), tuple(int(d) for d in s)) for a, s in expect_layout]
            if want != layout:
                raise SolverError(f"{path}: the mask store's supports {_fmt(layout)} do not match "
                                  f"the net's {_fmt(want)}",
                                  hint="the masks were made for another net definition")
        store = cls(layout, n, max_ram_bytes=max_ram_bytes, _rows=np.zeros((0, 0), np.uint8),
                    _filled=filled)
        if store.row_bytes != int(meta["row_bytes"]):
            raise SolverError(f"{path}: row size {meta['row_bytes']} does not match the layout's "
                              f"{store.row_bytes}")
        offset = len(store.header)
        size = offset + n * store.row_bytes
        if os.path.getsize(path) != size:
            raise SolverError(f"{path}: file is {os.path.getsize(path)} bytes, expected {size} "
                              "(truncated?)")
        if n * store.row_bytes <= max_ram_bytes:
            rows = np.fromfile(path, dtype=np.uint8, offset=offset)
            store.rows = rows.reshape(n, store.row_bytes)
        else:
            work = work_path or path
            store.path = work
            store.rows = _private_mapping(work, lambda f: _copy_from(path, f), offset,
                                          (n, store.row_bytes))
        return store


def _private_mapping(near: str, fill, offset: int, shape: Tuple[int, int]) -> np.memmap:
    """Rows of a new working file next to ``near``, filled by ``fill(file)``, mapped read/write.

    The file gets a unique name and is unlinked as soon as it is mapped: every process has its
    own (the ranks of a data-parallel job on one machine derive the same ``near`` from the same
    solver file; a shared name would let one rank truncate the file another has mapped, and the
    other die of SIGBUS), and nothing is left behind however the process ends. The mapping
    keeps the space until the store is dropped."""
    folder = os.path.dirname(os.path.abspath(near))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(near) + ".", suffix=".work",
                                   dir=folder)
    except OSError as e:
        raise SolverError(f"cannot create the mask store's working file in {folder}: "
                          f"{e.strerror}", hint="set alternation_param.mask_store to a writable "
                          "folder (or raise mask_store_max_ram)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        return np.memmap(tmp, dtype=np.uint8, mode="r+", offset=offset, shape=shape)
    except OSError as e:
        raise SolverError(f"cannot write the mask store's working file in {folder}: "
                          f"{e.strerror}", hint="free disk space there, or set "
                          "alternation_param.mask_store to another folder") from None
    finally:
        os.unlink(tmp)


def _copy_from(src: str, fo) -> None:
    with open(src, "rb") as fi:
        shutil.copyfileobj(fi, fo, 64 << 20)


def _fmt(layout: Iterable[Tuple[str, Tuple[int, ...]]]) -> str:
    return "[" + ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in layout) + "]"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
