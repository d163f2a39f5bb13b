"""User-facing errors: each names where the problem is (file:line:col, layer, blob) and what to do.

Command-line tools catch :class:`CaffeError` and print its message without a traceback; anything
else escaping is a bug in pycaffe_alt.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional


def first_line(error: BaseException, default: Optional[str] = None) -> str:
    """The first line of ``error``'s message (the summary a one-paragraph report quotes), or
    ``default`` (the exception's type name when not given) for an empty message."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if default is None else default


class CaffeError(Exception):
    """Base of every error pycaffe_alt reports to a user.

    ``where`` is the place (``file:line:col``, ``layer 'conv1'``...), ``what`` says what is wrong,
    ``hint`` what to do about it.
    """

    def __init__(self, what: str, where: Optional[str] = None, hint: Optional[str] = None):
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self.message())

    def message(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def __str__(self) -> str:
        return self.message()

    def locate(self, place: str) -> "CaffeError":
        """Put ``place`` (a file, or a file and a layer) in front of where this error is, unless
        it already starts there; returns the error, to be raised again."""
        if not self.where:
            self.where = place
        elif not self.where.startswith(place):
            self.where = f"{place}: {self.where}"
        self.args = (self.message(),)
        return self


@contextmanager
def located_in(place: str) -> Iterator[None]:
    """Errors raised inside the block name ``place`` first (see :meth:`CaffeError.locate`).

    The one way file-less checks (a solver field, a blob's size, an upgrade rule) get the file
    they are about: the check names the field or blob, the reader that knows the file wraps it.
    """
    try:
        yield
    except CaffeError as e:
        raise e.locate(place)


class PrototxtError(CaffeError):
    """A text or binary protobuf file that cannot be read or does not follow the schema."""


class UnknownTypeError(CaffeError):
    """A layer (or solver, filler, ...) type name that is not registered."""


class NetError(CaffeError):
    """A net that cannot be built: missing blob, wrong number of bottoms, shape mismatch."""


class BlobSizeError(NetError, OverflowError):
    """A blob shape Caffe's ``int`` cannot hold: a dimension, or the count of values, over
    INT_MAX. An ``OverflowError`` as well, as pycaffe's ``blob.reshape`` raises for such a
    dimension (boost.python's conversion to ``int``)."""


class NetTypeError(NetError, TypeError):
    """A pycaffe call on a net given a value of the wrong type (a reshape dimension of 2.5, a
    NetSpec field given a string for a number). A ``TypeError`` as well, as pycaffe raises
    there (boost.python's conversion, protobuf's field check)."""


class NetValueError(NetError, ValueError):
    """A pycaffe call on a net given a value it cannot use: a layer name the net lacks
    (pycaffe's ``list.index`` raises ValueError), an array that does not fit its blob (numpy's
    broadcast raises ValueError), a NetSpec field value out of its range."""


class NetKeyError(NetError, KeyError):
    """A blob name the net lacks; a ``KeyError`` as well, as pycaffe's ``net.blobs[name]``."""


class NetAttributeError(NetError, AttributeError):
    """A NetSpec keyword that is no field of the layer's parameters; an ``AttributeError`` as
    well, as pycaffe's ``assign_proto`` raises there."""


class WeightsError(CaffeError):
    """A caffemodel/binaryproto/solverstate that cannot be read or does not fit the net."""


class LayerMethodError(NetError, NotImplementedError):
    """A Python layer class that does not define a method Caffe calls (``reshape``,
    ``forward``); a ``NotImplementedError`` as well, as the base class raised before."""


class DataError(CaffeError):
    """A dataset (LMDB, image list, HDF5...) that is missing, empty or corrupt."""


class ArrayShapeError(DataError, ValueError):
    """An array of the wrong shape for what it was given to. A ``ValueError`` as well, as
    pycaffe's ``caffe.io`` raises there (``array_to_datum``'s "Incorrect array shape.",
    ``Transformer.set_mean``'s "Mean shape invalid"), so a program's ``except ValueError`` holds."""


class BlobShapeError(ArrayShapeError):
    """A BlobProto whose values do not fill its shape. A ``ValueError`` as well: pycaffe's
    ``blobproto_to_array`` fails in numpy's reshape there, and BVLC's own test expects it."""


class SolverError(CaffeError):
    """A solver configuration or training state that cannot be used."""


class DistributedError(CaffeError):
    """Data-parallel training that cannot start or cannot go on (a rank missing, failed or lost).

    ``rank`` is the rank that reports it; the other ranks of the job stop without repeating it.
    """

    def __init__(self, what: str, where: Optional[str] = None, hint: Optional[str] = None,
                 rank: Optional[int] = None):
        self.rank = rank
        super().__init__(what, where, hint)


class NonFiniteLossError(SolverError):
    """Training stopped because the loss became NaN or infinite (no snapshot of it is written)."""


class ArgumentTypeError(CaffeError, TypeError):
    """A pycaffe API called with an argument of the wrong type. It is a ``TypeError`` as well,
    with pycaffe's own message, because pycaffe raises TypeError there and programs catch it."""


class ImageNotFoundError(DataError, FileNotFoundError):
    """An image file that does not exist; a ``FileNotFoundError`` too, as pycaffe's ``load_image``
    (scikit-image's imread) raises one and programs catch ``IOError``/``OSError``."""


class ImageReadError(DataError, OSError):
    """An image file that cannot be decoded; an ``OSError`` too (what pycaffe's imread raises)."""


def integer_argument(value: object, what: str) -> int:
    """``value`` as an int when it is a whole number (an int, a numpy integer, or a float such
    as 2.0); otherwise an ArgumentTypeError naming ``what`` (2.9, inf, NaN, True, "2")."""
    import numbers
    import operator

    if isinstance(value, bool):
        raise ArgumentTypeError(f"{what} must be a whole number, got {value!r}")
    try:  # ints, numpy integers and 0-d integer arrays (what boost.python's int accepts)
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        pass
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    raise ArgumentTypeError(f"{what} must be a whole number, got {value!r}")


def path_argument(value: object, what: str) -> str:
    """A file path given as ``str``, ``bytes`` or ``os.PathLike``, as a ``str`` (bytes decoded
    as the file system does); otherwise an ArgumentTypeError naming ``what``. One rule for
    every pycaffe call that takes a path."""
    import os

    if isinstance(value, (str, bytes, os.PathLike)):
        path = os.fsdecode(os.fspath(value))
        if path:
            return path
    raise ArgumentTypeError(f"{what} takes a file path (str, bytes or os.PathLike), got "
                            f"{value!r}"[:300])
