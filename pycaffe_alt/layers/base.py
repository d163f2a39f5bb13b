"""The layer contract every Caffe layer type implements.

A layer is an ``nn.Module`` built from its ``LayerParameter`` and the shapes of its bottoms (Caffe's
``LayerSetUp``). ``forward(*bottoms)`` maps bottom tensors to top tensors with torch ops, so autograd
gives the backward; where Caffe's backward is not the exact gradient of its forward, the layer uses
a custom ``torch.autograd.Function`` and says so. Parameter blobs are ``nn.Parameter``s registered
in Caffe's order (``self.blobs``) under the names in ``blob_names`` (state_dict keys).

Declaring arity (Caffe's ``ExactNumBottomBlobs``/``MinTopBlobs``...) is done with class attributes;
the net checks it before construction and names the layer when it does not hold.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..blob import check_blob_shape
from ..blob_memory import check_blob_fits, zeros
from ..errors import NetError
from ..fillers import fill
from ..phase import TEST, TRAIN  # noqa: F401 - re-exported by the layers package

Shape = Tuple[int, ...]


def legacy_shape(shape: Sequence[int]) -> Shape:
    """Caffe's (num, channels, height, width) view of a blob of at most 4 axes (missing ones 1)."""
    shape = tuple(int(d) for d in shape)
    return shape + (1,) * (4 - len(shape))
Tops = Union[torch.Tensor, Sequence[torch.Tensor]]


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Mute torch's fake-tensor logger while shapes are inferred.

    When a layer's forward fails on fake tensors (a kernel larger than its input...), torch logs
    the exception with its traceback before re-raising it; the net turns the exception into one
    NetError naming the layer, so the traceback would only precede that message as noise.
    """
    log = logging.getLogger("torch._subclasses.fake_tensor")
    muted = _DropRecords()
    log.addFilter(muted)
    try:
        yield
    finally:
        log.removeFilter(muted)


@dataclass(frozen=True)
class LayerContext:
    """What a layer may need to know at construction besides its parameter and bottom shapes."""

    phase: int = TEST
    # Python layers execute code named in a prototxt: only when the user explicitly allowed it.
    allow_python: bool = False
    # Where the net definition came from (for messages).
    source: str = "<net>"


class Layer(nn.Module):
    """Base class of all layers. Subclasses set ``type_name`` via the registry and arity attributes.

    Subclass constructors take ``(param, bottom_shapes, ctx)`` and must call
    ``super().__init__(param, bottom_shapes, ctx)`` first.
    """

    # (min, max) number of bottoms/tops; max None = unbounded. Caffe's Exact/Min/MaxNum*Blobs.
    num_bottoms: ClassVar[Tuple[int, Optional[int]]] = (0, None)
    num_tops: ClassVar[Tuple[int, Optional[int]]] = (0, None)
    # Caffe's EqualNumBottomTopBlobs.
    equal_bottom_top: ClassVar[bool] = False
    # Caffe's AutoTopBlobs: missing tops are created anonymously (loss layers).
    auto_top: ClassVar[bool] = False
    # Loss layers: top 0 gets loss_weight 1 unless the prototxt says otherwise.
    is_loss: ClassVar[bool] = False
    # state_dict names of the parameter blobs, in Caffe's blob order.
    blob_names: ClassVar[Tuple[str, ...]] = ("weight", "bias")
    # Layers whose tops cannot be derived from shapes alone (data-dependent) set this False and
    # override ``top_shapes``.
    shape_by_fake_run: ClassVar[bool] = True
    # In Caffe an in-place layer's backward reads the blob's buffer, which later in-place layers
    # have overwritten: it sees the blob's *final* value. Parameter-free layers whose Caffe
    # backward reads that buffer define ``inplace_backward(top_diff, buffer) -> bottom_diff``
    # with Caffe's formula; the net uses it only in such chains (see net.py).
    inplace_backward = None
    # Whether that formula reads the layer's *top* (Caffe's SigmoidLayer, TanHLayer, ExpLayer and
    # SoftmaxLayer::Backward_cpu read top[0]->cpu_data()): then a layer with a top of its own
    # sees what later in-place layers wrote there too (Sigmoid, then an in-place Scale), and
    # the net uses ``inplace_backward`` for it as well. ReLU's reads its bottom: not set.
    backward_reads_top: ClassVar[bool] = False
    # Layers that run a user's code (Python layers): the user's exceptions reach the caller
    # unchanged, as in pycaffe, instead of being reworded into a NetError.
    runs_user_code: ClassVar[bool] = False
    # Whether this layer's backward reads a converted copy of a bottom that gets no gradient
    # (indices cast to integers): a program's write into that bottom between forward and
    # backward then reaches the backward only if the net records the layer again (net.py,
    # _backward_reads). Loss layers count as such (their labels) without setting it.
    backward_reads_bottom_copy: ClassVar[bool] = False
    # False where Caffe's Backward_cpu is NOT_IMPLEMENTED (ThresholdLayer): a backward that
    # runs this layer (Caffe's layer_need_backward_) aborts, so the net refuses it there
    # (Net.check_backward) instead of passing a zero gradient.
    has_backward: ClassVar[bool] = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx: LayerContext):
        super().__init__()
        self.param = param
        self.name: str = param.name
        self.ctx = ctx
        self._type_name: str = param.type
        self._blob_list: List[nn.Parameter] = []
        self.train(ctx.phase == TRAIN)

    def train(self, mode: bool = True) -> "Layer":
        """``nn.Module.train``, except that a layer whose prototxt sets ``phase`` keeps that
        phase when the net switches (``net.train()``/``net.eval()``), as Caffe's Net::Init sets
        only unset phases from the net's."""
        has_field = getattr(self.param, "HasField", None)
        if has_field is not None and has_field("phase"):
            mode = self.param.phase == TRAIN
        return super().train(mode)

    # -- pycaffe surface -------------------------------------------------------------------
    @property
    def type(self) -> str:  # noqa: A003 - pycaffe's Layer.type is a string
        """The Caffe type name, e.g. ``"Convolution"`` (pycaffe's ``layer.type``)."""
        return self._type_name

    @property
    def blobs(self) -> List[nn.Parameter]:
        """Parameter blobs in Caffe's order (weights, bias, ...)."""
        return self._blob_list

    # -- parameters ---------------------------------------------------------------------------
    def add_blob(self, shape: Sequence[int], filler=None, name: Optional[str] = None) -> nn.Parameter:
        """Create the next parameter blob, filled by ``filler`` (a FillerParameter or None = zeros)."""
        index = len(self._blob_list)
        if name is None:
            name = self.blob_names[index] if index < len(self.blob_names) else f"blob{index}"
        # Caffe's parameter blobs go through Blob::Reshape as well: its int limits hold first.
        check_blob_shape(tuple(int(d) for d in shape), self.where, f"{self.name}.{name}")
        check_blob_fits(shape, None, f"{self.name}.{name}", self.where)  # parameters start on the CPU
        tensor = zeros(tuple(int(d) for d in shape), None, f"{self.name}.{name}", self.where)
        if filler is not None:
            fill(tensor, filler)
        p = nn.Parameter(tensor)
        self.register_parameter(name, p)
        self._blob_list.append(p)
        return p

    def adopt_stored_shape(self, index: int, shape: Tuple[int, ...]) -> bool:
        """Whether blob ``index`` takes ``shape``, which a weights file stores and which differs
        from the blob's own; a layer that does reshapes the blob (a view of the same memory) first.

        Caffe refuses such a file ("Cannot copy param ... shape mismatch"), and so does every
        layer here but one whose type two Caffe forks implement alike except for the layout of
        its blobs: the file then says which fork wrote it."""
        return False

    def replace_blob(self, index: int, p: nn.Parameter) -> None:
        """Make blob ``index`` the given Parameter (parameter sharing by ``param { name }``)."""
        for attr, value in list(self._parameters.items()):
            if value is self._blob_list[index]:
                self._parameters[attr] = p
        self._blob_list[index] = p

    # -- shapes -------------------------------------------------------------------------------
    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        """Shapes of the tops for bottoms of the given shapes (Caffe's ``Reshape``).

        The default runs ``forward`` on fake tensors (no data, no compute); layers whose output
        shape depends on data override this.
        """
        from torch._subclasses.fake_tensor import FakeTensorMode

        with _quiet_fake_tensor_log(), FakeTensorMode(allow_non_fake_inputs=True):
            fake = [torch.empty(s, dtype=torch.float32) for s in bottom_shapes]
            with torch.no_grad():
                tops = self.forward(*fake)
        if isinstance(tops, torch.Tensor):
            tops = (tops,)
        return [tuple(t.shape) for t in tops]

    def fixed_tops(self) -> Dict[int, torch.Tensor]:
        """Tops this layer fills once, when it is set up, and never again: top index -> that
        first value. The net puts it in the blob at build time and a pass leaves the blob as
        it is (what pycaffe writes there, or an in-place layer made of it, is what the next
        pass reads), and ``net.reshape()`` leaves its shape: Caffe's DummyData with a
        "constant" filler. Most layers have none."""
        return {}

    def take_top_shape(self, index: int, shape: Shape) -> bool:
        """pycaffe reshaped this layer's top ``index`` (``net.blobs[top].reshape``): whether
        the layer makes that top in ``shape`` from now on. Caffe runs each layer's Reshape
        before its Forward; most set their tops' shapes there (False: the blob's new shape
        lasts until the next pass or ``net.reshape()``). DummyData's Reshape does nothing, so
        its Forward fills the blob at the shape pycaffe gave it (True)."""
        return False

    def canonical_axis(self, axis: int, ndim: int, what: str = "axis") -> int:
        """Caffe's ``Blob::CanonicalAxisIndex``: negative axes count from the end; an axis
        outside ``[-ndim, ndim)`` is an error naming this layer."""
        axis = int(axis)
        if not -ndim <= axis < max(ndim, 1):
            raise self.error(f"{what} {axis} is out of range for a {ndim}-axis bottom",
                             f"use an axis in [{-ndim}, {ndim - 1}]")
        return axis + ndim if axis < 0 else axis

    def per_top(self, items: Sequence, n_tops: int, what: str, field: str) -> list:
        """Caffe's "one for all tops, or one per top" rule: ``items`` expanded to ``n_tops``
        entries, or an error naming this layer (``what``: e.g. "input shapes")."""
        items = list(items)
        if len(items) == 1:
            return items * n_tops
        if len(items) != n_tops:
            raise self.error(f"gives {len(items)} {what} for {n_tops} tops",
                             f"give '{field}' once for all tops, or once per top")
        return items

    def set_memory_format(self, fmt: torch.memory_format) -> None:
        """Told by the Net which memory format its 4-D tensors use (pycaffe_alt.memory_format);
        layers that produce batches (data layers) lay them out that way. Others ignore it."""

    @property
    def replays_exactly(self) -> bool:
        """Whether running this layer's forward again on the same bottoms gives the same tops and
        changes nothing (no random draws, no running statistics, no user code). A pycaffe
        backward then lets autograd free the pass's graph and records it again if a second
        backward of the same pass comes; otherwise it keeps the graph, as Caffe's Backward
        reads the masks and statistics its Forward stored."""
        return not self.runs_user_code

    def prepare_pass(self) -> None:
        """Host work this layer needs before a compiled pass reaches it, which the graph itself
        cannot contain (e.g. looking the batch's stored supports up by record index). The
        compiled runner (pycaffe_alt.compile) calls it after the data layers have produced the
        batch; an eager pass does that work inside ``forward``. Most layers need none."""

    def allow_force_backward(self, bottom_index: int) -> bool:
        """Caffe's ``AllowForceBackward``: loss layers never push gradients into labels."""
        return not self.is_loss or bottom_index != 1

    @property
    def where(self) -> str:
        """``file: layer 'name' (type T)``, the place messages about this layer name."""
        return f"{self.ctx.source}: layer '{self.name}' (type {self.type})"

    def error(self, what: str, hint: Optional[str] = None) -> NetError:
        """An error naming this layer and its type (raise it)."""
        return NetError(what, self.where, hint)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, type={self.type!r}"


def check_bottom_count(cls: type, n_bottoms: int, n_tops: int, where: str) -> None:
    """Raise a NetError when a layer is given a number of bottoms/tops its type does not take."""
    for what, n, (lo, hi) in (("bottom", n_bottoms, cls.num_bottoms), ("top", n_tops, cls.num_tops)):
        if n < lo or (hi is not None and n > hi):
            want = str(lo) if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise NetError(f"takes {want} {what} blob(s), got {n}", where,
                           f"check the '{what}:' lines of this layer")
    if cls.equal_bottom_top and n_bottoms != n_tops:
        raise NetError(f"needs as many tops as bottoms, got {n_bottoms} bottoms and {n_tops} tops",
                       where, "add one 'top:' per 'bottom:'")
