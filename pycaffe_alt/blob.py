"""pycaffe-style blob views: ``.data`` and ``.diff`` as numpy arrays that read and write through.

On the CPU the arrays share memory with the torch tensors, so ``blob.data[...] = x`` writes the
tensor directly. On CUDA a host copy stands in, like Caffe's SyncedMemory: reading ``.data`` brings
the device values down and marks the host copy as the newer one; the net pushes such copies back
to the device before it next computes (``HostMirror.push``).

Caffe's blobs keep their memory from pass to pass (``Blob::Reshape`` reallocates only to grow),
and pycaffe's arrays are views of it, so an array taken once shows every later pass:
``feat = net.blobs['fc7'].data`` before a loop of ``net.forward()`` calls, or the arrays of a
``forward()`` result. A pass here makes new tensors instead (autograd needs them), so the array
handed out last stays the blob's memory for the user: after each pass the net copies the new
value into it while it is alive (``HostMirror.refresh``), and later reads return it again.
"""
from __future__ import annotations

import abc
import weakref
from typing import Callable, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from .errors import (ArgumentTypeError, BlobSizeError, NetError, NetTypeError, first_line,
                     integer_argument)


def is_memory_of(arr: np.ndarray, t: torch.Tensor) -> bool:
    """Whether ``arr`` starts at ``t``'s memory (a view made by ``t.numpy()``)."""
    return arr.__array_interface__["data"][0] == t.data_ptr()


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold bit-identical values of one shape and dtype: a NaN equals
    the same NaN (a NaN label written again is no change), 0.0 and -0.0 differ. One comparison
    of integer views; ``torch.allclose(..., equal_nan=True)`` takes several ops (~50 us a call
    on a 64-label blob, a pycaffe backward's largest fixed cost)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = _SAME_SIZE_INT.get(a.element_size()) if a.is_floating_point() else None
    if as_int is not None:
        a, b = a.view(as_int), b.view(as_int)
    elif a.is_floating_point() or a.is_complex():
        return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return torch.equal(a, b)


def graph_free(t: torch.Tensor) -> torch.Tensor:
    """``t`` without autograd history: ``t`` itself when it has none. ``detach()`` makes a new
    tensor through an op dispatch, and in a pass each dispatch costs a small net several us more
    than alone (the large ops before it evict the dispatcher's code from the caches)."""
    return t.detach() if t.requires_grad else t


class HostMirror:
    """Numpy access to a tensor that may live on a GPU, with Caffe's head-state rule."""

    def __init__(self, get: Callable[[], torch.Tensor], dirty: Optional[Set["HostMirror"]],
                 held: Optional[Set["HostMirror"]] = None, label: Tuple[str, ...] = ()):
        self._get = get
        self.label = label  # what the owner calls it, e.g. ("diff", blob name)
        self._dirty = dirty  # the owner's set of mirrors whose host copy is newer
        self._held = held  # the owner's set of mirrors whose CPU array a user may still hold
        self._host: Optional[np.ndarray] = None
        self._synced: Optional[Tuple[int, int]] = None  # (id, _version) of the tensor at last sync
        self._view: Optional["weakref.ref[np.ndarray]"] = None  # CPU: the array handed out last
        # CPU: the tensor (weakly) and its version whose values the view last received.
        self._source: Optional[Tuple["weakref.ref[torch.Tensor]", int]] = None

    def array(self) -> np.ndarray:
        t = self._get()
        if t.device.type == "cpu":
            return self._cpu_array(t)
        key = (id(t), t._version)
        if self._host is None or self._host.shape != tuple(t.shape):
            self._host = t.detach().cpu().numpy()
            self._synced = key
        elif self._synced != key:
            # Into the same host memory, as Caffe's to_cpu() does: arrays held before see it.
            self._host[...] = t.detach().cpu().numpy()
            self._synced = key
        if self._dirty is not None:
            self._dirty.add(self)
        return self._host

    def held_array(self) -> Optional[np.ndarray]:
        """The CPU array handed out last, if a user still holds it (None otherwise)."""
        return self._view() if self._view is not None else None

    def _cpu_array(self, t: torch.Tensor) -> np.ndarray:
        arr = self.held_array()
        if arr is not None and arr.shape == tuple(t.shape):
            self._copy_into(arr, t)
            return arr
        arr = graph_free(t).numpy()
        self._view = weakref.ref(arr)
        self._source = None
        if self._held is not None:
            self._held.add(self)
        return arr

    def _copy_into(self, arr: np.ndarray, t: torch.Tensor) -> None:
        if is_memory_of(arr, t):
            return  # the array is the tensor's own memory
        source = self._source
        if source is not None and source[0]() is t and source[1] == t._version:
            return  # already holds these values
        with torch.no_grad():
            torch.from_numpy(arr).copy_(t.detach())
        self._source = (weakref.ref(t), t._version)

    def refresh(self) -> bool:
        """After a pass: bring the blob's new value into the CPU array a user holds. Returns
        False once there is nothing left to keep live (the array is gone or no longer fits)."""
        arr = self.held_array()
        if arr is None:
            return False
        t = self._get()
        if t.device.type != "cpu" or arr.shape != tuple(t.shape):
            self._view = None
            return False
        self._copy_into(arr, t)
        return True

    def push(self) -> None:
        """Copy a host copy that may have been written back to the device tensor."""
        t = self._get()
        if self._host is not None and t.device.type != "cpu" and self._host.shape == tuple(t.shape):
            # Through ``.data``: the same memory without the tensor's version counter. A copy
            # into a weight the last forward saved for its backward (a program that reads
            # net.params[...].data between forward and backward) would otherwise make that
            # backward fail ("modified by an inplace operation"); Caffe's backward reads the
            # memory as it is, and so does this one.
            t.data.copy_(torch.from_numpy(self._host), non_blocking=False)
            self._synced = (id(t), t._version)


def _assign(view: "_BlobView", target: np.ndarray, value, field: str) -> None:
    """``view.<field> = value``: numpy's broadcasting assignment into the blob's memory, with a
    NetError naming the blob and both shapes when ``value`` does not fit (pycaffe's ``data`` has no
    setter at all; the usual spelling is ``blob.data[...] = value``)."""
    if value is None:  # numpy would fill the blob with NaN: never what ``= None`` means
        raise NetError(f"cannot assign None to {view!r}.{field}", None,
                       f"give an array of shape {target.shape} (or a number)")
    try:
        target[...] = value
    except (ValueError, TypeError) as e:
        shape = getattr(value, "shape", None)
        got = f"a value of shape {tuple(shape)}" if shape is not None else f"{type(value).__name__}"
        raise NetError(f"cannot assign {got} to {view!r}.{field} ({first_line(e)})",
                       None, f"give an array of shape {target.shape} (or one that broadcasts to "
                            "it); to change the blob's shape, call reshape(...) first") from None


def legacy_shape(shape: Sequence[int], axis: int, what: str) -> int:
    """Caffe's Blob::LegacyShape, behind pycaffe's ``num``, ``channels``, ``height`` and
    ``width``: axis ``axis`` of ``shape``, and 1 for the axes past its last one (the shape is
    padded with 1s on the right: an InnerProduct top (N, K) has num N, channels K, height and
    width 1). Caffe CHECK-fails on a blob of more than four axes; here that is a NetError."""
    if len(shape) > 4:
        raise NetError(f"{what} has {len(shape)} axes {tuple(shape)}; num, channels, height and "
                       "width are for blobs of at most 4 axes (Caffe's LegacyShape)", None,
                       "read its shape instead (blob.shape, blob.data.shape)")
    return int(shape[axis]) if axis < len(shape) else 1


class _BlobView(metaclass=abc.ABCMeta):
    """What blobs and parameter blobs share: numpy ``data``/``diff`` and Caffe's legacy dims.

    pycaffe has one ``caffe.Blob`` type for net blobs, parameter blobs and a Python layer's
    blobs; here they are three views, and :class:`Blob` counts the others as its own
    (``isinstance(net.params['conv1'][0], caffe.Blob)``, which BN-merging scripts test).
    """

    _data: HostMirror
    _diff: HostMirror

    @property
    def data(self) -> np.ndarray:
        return self._data.array()

    @data.setter
    def data(self, value) -> None:
        _assign(self, self.data, value, "data")

    @property
    def diff(self) -> np.ndarray:
        return self._diff.array()

    @diff.setter
    def diff(self, value) -> None:
        _assign(self, self.diff, value, "diff")

    @property
    def shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    num = property(lambda self: legacy_shape(self.shape, 0, repr(self)))
    channels = property(lambda self: legacy_shape(self.shape, 1, repr(self)))
    height = property(lambda self: legacy_shape(self.shape, 2, repr(self)))
    width = property(lambda self: legacy_shape(self.shape, 3, repr(self)))


MAX_BLOB_AXES = 32  # Caffe's kMaxBlobAxes
INT_MAX = 2**31 - 1  # Caffe's blob dimensions and count are C ints


def check_blob_shape(shape: Sequence[int], where: str = "<blob>",
                     blob: Optional[str] = None) -> None:
    """Caffe's Blob::Reshape checks (NetError at ``where``, naming ``blob`` when given): at most
    32 axes, no negative dimension, and (BlobSizeError) no dimension or count over INT_MAX."""
    named = f"blob '{blob}' of shape" if blob else "blob shape"
    if len(shape) > MAX_BLOB_AXES:
        raise NetError(f"{f'blob {blob!r}' if blob else 'blob shape'} has {len(shape)} axes; "
                       f"Caffe allows at most {MAX_BLOB_AXES}", where)
    if any(d < 0 for d in shape):
        raise NetError(f"{named} {tuple(shape)} has a negative dimension", where,
                       "every dimension must be >= 0")
    hint = ("lower the batch size, the input dimensions (input_param shape, crop, resize) or "
            "the layer's num_output; Caffe cannot hold this blob either")
    if any(d > INT_MAX for d in shape):
        # Caffe reads a BlobShape dim (int64) into an int: 2^32 + 1 became 1, 2^31 a negative
        # dimension; pycaffe's reshape raises OverflowError. Either way not the shape asked for.
        raise BlobSizeError(f"{named} {tuple(shape)} has a dimension over INT_MAX "
                            f"({INT_MAX}), which Caffe's int dimensions cannot hold", where, hint)
    # Blob::Reshape's running check: each dimension must keep the count within INT_MAX while
    # the count so far is not 0 (a 0 before a huge dimension passes, as in Caffe).
    count = 1
    for d in shape:
        if count != 0 and d > INT_MAX // count:
            raise BlobSizeError(f"{named} {tuple(shape)}: the product of its dimensions passes "
                                f"INT_MAX ({INT_MAX}), which Caffe refuses (\"blob size exceeds "
                                "INT_MAX\")", where, hint)
        count *= d


def shape_args(shape, where: str = "<blob>") -> Tuple[int, ...]:
    """The dimensions of a ``reshape(*shape)`` or ``reshape(shape)`` call as ints, with Caffe's
    Blob::Reshape checks (NetError at ``where``); fractional or non-numeric ones are refused."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    try:
        dims = tuple(integer_argument(d, "a reshape() dimension") for d in shape)
    except ArgumentTypeError:  # 2.9 was cut to 2 and inf overflowed before
        raise NetTypeError(f"reshape() takes integer dimensions, got {shape!r}"[:300],
                           where) from None
    check_blob_shape(dims, where)
    return dims


class Blob(_BlobView):
    """One named blob of a Net (pycaffe's ``net.blobs[name]``): data, diff and shape."""

    def __init__(self, store, name: str):
        self._store = store
        self.name = name
        self._data = HostMirror(lambda: store.data_tensor(name), store.dirty, store.held,
                                ("data", name))
        self._diff = HostMirror(lambda: store.diff_tensor(name), store.dirty, store.held,
                                ("diff", name))

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._store.shape(self.name))

    def reshape(self, *shape: int) -> None:
        """Change the blob's shape (contents become zeros); call ``net.reshape()`` after inputs."""
        self._store.reshape(self.name, shape_args(shape, f"blob '{self.name}'"))

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, shape={self.shape})"


class ParamBlob(_BlobView):
    """A parameter blob (``net.params[layer][i]``): ``.data`` is the weights, ``.diff`` the gradient."""

    def __init__(self, param: torch.nn.Parameter, dirty: Optional[Set[HostMirror]] = None):
        self.param = param
        self._data = HostMirror(lambda: self.param, dirty)
        self._diff = HostMirror(self._grad, dirty)

    def _grad(self) -> torch.Tensor:
        p = self.param
        if p.grad is None or p.grad.shape != p.shape:
            p.grad = torch.zeros_like(p)
        return p.grad

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.param.shape)

    def reshape(self, *shape: int) -> None:
        """Give the parameter a new shape (net surgery). As Caffe's Blob::Reshape, which keeps
        its memory while the new count fits the old one, the leading values stay (a reshape to
        the same shape changes nothing); a larger blob is new zeroed memory (SyncedMemory's
        first to_cpu memsets it)."""
        new_shape = shape_args(shape)
        with torch.no_grad():
            old = self.param.data
            fresh = torch.zeros(new_shape, dtype=old.dtype, device=old.device)
            if fresh.numel() <= old.numel():
                fresh.view(-1).copy_(old.reshape(-1)[:fresh.numel()])
            self.param.data = fresh
        self.param.grad = None

    def __repr__(self) -> str:
        return f"ParamBlob(shape={self.shape})"


Blob.register(ParamBlob)


class BlobVec(list):
    """pycaffe's ``BlobVec``: a layer's blobs, ``net.params[name]`` (``type(...) is
    caffe._caffe.BlobVec`` holds, as scripts test). A net layer's list is ``fixed``: an array
    stored in it would hide the blob and change no weight. A Python layer's ``self.blobs`` is
    the growable subclass with ``add_blob``."""

    fixed = True

    def __reduce_ex__(self, protocol):
        # Copies of a fixed list are plain lists of the same blobs (rebuilding one would append).
        return (list, (list(self),)) if self.fixed else super().__reduce_ex__(protocol)


def _guarded(name: str):
    method = getattr(list, name)

    def guarded(self, *args, **kwargs):
        if self.fixed:
            raise ArgumentTypeError("a layer's list of blobs cannot be changed", hint="write the "
                                    "values into the blob instead: net.params[name][i].data[...] = "
                                    "array")
        return method(self, *args, **kwargs)
    guarded.__name__ = name
    return guarded


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert",
              "pop", "remove", "clear", "sort", "reverse"):
    setattr(BlobVec, _name, _guarded(_name))
