"""The Net: a Caffe NetParameter as a ``torch.nn.Module``, with pycaffe's ``caffe.Net`` API.

Building follows Caffe's Net::Init as a short sequence of named steps: read and upgrade the
definition, filter layers by NetState, connect bottoms and tops (in-place tops replace the blob's
value; a blob read by several layers just fans out, autograd sums its gradients, so no Split
layers are needed), set each layer up with its bottom shapes and infer top shapes, attach loss
weights, share parameters by ``param { name }``, and run Caffe's need-backward analysis.

Two ways to run it:
- pycaffe: ``net.blobs['data'].data[...] = x; net.forward(); net.backward()``, numpy in and out;
- torch: ``net(data=tensor)`` (tensors as keyword arguments) returns ``{top: tensor}`` and is
  differentiable like any module; ``net.loss(outputs)`` is the weighted sum of its loss tops.
``state_dict()`` keys are ``<layer name>.<blob name>`` (``conv1.weight``, ``bn1.mean``).
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import memory_format as mf
from .blob import (Blob, BlobVec, HostMirror, ParamBlob, check_blob_shape, graph_free,
                   is_memory_of, same_bits)
from .blob_memory import check_blob_fits, zeros
from .compile import CompiledNet
from .errors import (ArgumentTypeError, CaffeError, NetError, NetKeyError, NetValueError,
                     first_line, integer_argument, path_argument)
from .layer_callbacks import BackwardSequence, LayerCallbacks
from .layers import LAYERS, TRAIN, Layer, LayerContext
from .layers.base import check_bottom_count
from .mode import default_device
from .netstate import LayerLinks, layer_included, plan_backward
from .proto import caffe_pb2
from .weights import copy_layer_blobs

Shape = Tuple[int, ...]
ANONYMOUS_TOP = "(automatic)"


def public_blob_name(name: str) -> str:
    """The name pycaffe shows for blob ``name``: Caffe's Net::AppendTop calls every anonymous
    loss top "(automatic)" (here each has a unique key so that the blobs stay apart)."""
    return ANONYMOUS_TOP if name.startswith(ANONYMOUS_TOP) else name


@dataclass
class Step:
    """One layer in execution order, with the names it reads and writes."""

    index: int
    name: str
    layer: Layer
    bottoms: Tuple[str, ...]
    tops: Tuple[str, ...]
    detach: Tuple[bool, ...]  # bottoms that receive no gradient (need-backward analysis)
    runs: bool  # Input layers are fed, not run
    # In place, overwritten later, and Caffe's backward reads the buffer: see _BufferBackward.
    reads_final: bool = False
    # Bottoms whose diff this layer's Caffe Backward writes (layer and bottom need backward).
    diff_bottoms: Tuple[str, ...] = ()
    # Bottoms given to the layer in the net's memory format: net inputs (C-order for pycaffe's
    # arrays and a caller's NCHW tensors) read by a layer whose input layout decides its output's.
    to_net_format: Tuple[bool, ...] = ()
    # Per top: a later in-place layer rewrites it (this layer's output is not the blob's data).
    rewritten_tops: Tuple[bool, ...] = ()
    # Per top: Caffe computes its diff (blob_need_backward_), see Net.run_steps.
    diff_tops: Tuple[bool, ...] = ()
    # Caffe runs this layer's Backward (layer_need_backward_).
    runs_backward: bool = False
    # Per top: filled when the layer is set up and never again (Layer.fixed_tops): a pass
    # leaves the blob's value as it is.
    fixed_tops: Tuple[bool, ...] = ()

    @property
    def replayed(self) -> bool:
        """Whether a backward with no graph for this layer runs it again to record one (see
        Net._replay_graph): a layer with bottoms whose Backward Caffe runs. A data layer would
        read the next batch, and a layer without a Backward (HDF5Output, Accuracy, a layer on
        the labels) takes no part in Caffe's: its tops keep what its last forward wrote."""
        return self.runs and bool(self.bottoms) and self.runs_backward


@dataclass(frozen=True)
class _DiffRange:
    """What a backward over a range of layers touches (see Net._diff_range)."""

    # Per blob of the range: the ``_written`` key of the read value whose gradient becomes its
    # diff (None: the blob's data; see Net._diff_reader and Net._writer_key).
    diff_keys: Tuple[Tuple[str, Optional[Tuple[int, str]]], ...]
    diff_bottoms: Tuple[str, ...]  # the blobs whose diff the range's Backward writes
    # A learnable parameter of the range is also used by a layer below it (shared weights).
    shares_below: bool = False
    # A blob the range reads is also read by a layer below it (not in place): autograd's way
    # from the range to that blob may pass through the lower layer (x read by the range and by
    # a layer below whose output the range reads too), using (and freeing) the pass's graph
    # there.
    reads_below: bool = False
    # What ``backward(start=)`` at the range's top layer starts from: ``(blob, index)`` for each
    # top no layer of the range reads, the value layer ``index`` reads (see Net._read_value).
    start_seeds: Tuple[Tuple[str, int], ...] = ()


class _FinalValue:
    """The value an in-place blob ends a forward pass with (filled in after the pass)."""

    value: Optional[torch.Tensor] = None


def _final_value_of(value: torch.Tensor) -> _FinalValue:
    """A :class:`_FinalValue` already known (a replay's: the data the pass left)."""
    final = _FinalValue()
    final.value = value.detach()
    return final


class _BufferBackward(torch.autograd.Function):
    """An in-place layer whose Caffe backward reads the blob buffer after later in-place layers
    overwrote it (e.g. ReLU then an in-place Scale: Caffe masks by the *scaled* sign)."""

    @staticmethod
    def forward(ctx, x, layer, final):
        ctx.layer, ctx.final = layer, final
        return layer(x)

    @staticmethod
    def backward(ctx, top_diff):
        return ctx.layer.inplace_backward(top_diff, ctx.final.value), None, None


class _BufferValue(torch.autograd.Function):
    """A blob's buffer value whose gradient goes to another tensor of its shape: a pass from a
    middle layer of an in-place chain reads the buffer (the chain's last output), while Caffe's
    Backward hands that layer's bottom diff to the writer below it. (The arithmetic form
    ``v.detach() + (t - t.detach())`` turns an inf in ``t`` into NaN.)"""

    @staticmethod
    def forward(ctx, value, grad_to):
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


@dataclass
class ParamInfo:
    """A learnable parameter and what the solver needs to know of it (Caffe's learnable_params_)."""

    param: nn.Parameter
    layer: str
    index: int
    lr_mult: float
    decay_mult: float
    name: str  # display name: the param's shared name or its index
    has_lr_mult: bool = False
    has_decay_mult: bool = False


def _load_net_param(source) -> Tuple["caffe_pb2.NetParameter", str]:
    if isinstance(source, caffe_pb2.NetParameter):
        return source, "<net_param>"
    from .prototxt import read_net

    path = path_argument(source, "Net() network_file")
    net_param = read_net(path)
    if not net_param.layer:  # an empty or comments-only file would "score" Loss: 0
        raise NetError("the net has no layers", path,
                       "is this the right file? a net prototxt holds layer { ... } blocks")
    return net_param, path


def _blob_name_list(names, caller: str):
    """``blobs=``/``diffs=`` as a list: one str is one name (pycaffe would iterate its
    letters); bytes are refused (their items are numbers)."""
    if isinstance(names, str):
        return [names]
    if isinstance(names, (bytes, bytearray)):
        raise ArgumentTypeError(f"{caller} takes blob names as str, got {names!r}")
    if names is None:
        return names
    try:  # pycaffe adds the names to a list: anything but a list is a TypeError there
        return list(names)
    except TypeError:
        raise ArgumentTypeError(f"{caller} takes a list of blob names, got "
                                f"{type(names).__name__}") from None


def _parse_pycaffe_args(args, phase, weights):
    """pycaffe's two signatures: Net(file, phase, ...) and Net(file, weights, phase)."""
    args = list(args)
    if args and isinstance(args[0], (str, bytes, os.PathLike)):
        if weights is not None:
            raise ArgumentTypeError("Net() weights given twice")
        weights = path_argument(args.pop(0), "Net() weights")
    if args:
        if phase is not None:
            raise ArgumentTypeError("Net() phase given twice")
        phase = args.pop(0)
    if args:
        raise ArgumentTypeError("Net() takes (network_file, [weights,] phase, level=0, "
                                "stages=None, weights=None)")
    if phase is None:
        raise ArgumentTypeError("Net() needs a phase: caffe.TRAIN or caffe.TEST")
    if phase not in (caffe_pb2.TRAIN, caffe_pb2.TEST) or isinstance(phase, bool):
        raise ArgumentTypeError(f"Net() phase must be caffe.TRAIN (0) or caffe.TEST (1), got "
                                f"{phase!r}")
    return int(phase), weights


class _BlobStore:
    """The net's blob values and diffs, by name (what pycaffe Blob views read)."""

    def __init__(self, net: "Net"):
        self._net = net
        self.dirty: Set[HostMirror] = set()
        self.held: Set[HostMirror] = set()  # blob views a user may hold (see blob.py)
        # Blobs whose value is a tensor a caller passed in (net(data=t), run({...})): before
        # pycaffe's arrays (or a pycaffe pass) use it as the blob's memory, the blob gets its
        # own copy, or a later blobs['data'].data[...] = x would write into the caller's tensor.
        self.foreign: Set[str] = set()

    def refresh_held(self) -> None:
        """After a pass: copy new blob values and diffs into the arrays users hold."""
        for mirror in list(self.held):
            if not mirror.refresh():
                self.held.discard(mirror)

    def held_arrays(self, kind: str) -> Dict[str, np.ndarray]:
        """Blob name -> the ``kind`` ("data" or "diff") array a user still holds."""
        out = {}
        for mirror in self.held:
            if mirror.label[:1] == (kind,):
                arr = mirror.held_array()
                if arr is not None:
                    out[mirror.label[1]] = arr
        return out

    def data_tensor(self, name: str) -> torch.Tensor:
        # The value a layer produced wins over the inferred shape (Filter's top depends on data).
        t = self._net._values.get(name)
        if t is None:
            t = self._net._values[name] = self._zeros(name, self._net._shapes[name])
        elif name in self.foreign:
            self.foreign.discard(name)
            t = self._net._values[name] = t.detach().clone()
        elif t.is_inference() and not torch.is_inference_mode_enabled():
            # Made by a pass under torch.inference_mode(): autograd refuses such a tensor in any
            # graph it records, so every later training pass or backward of the net failed.
            t = self._net._values[name] = t.clone()
        return t

    def format_of(self, name: str) -> torch.memory_format:
        """The layout of blob ``name``'s data and diff: the net's, except net inputs, which
        stay C-order as pycaffe's arrays of them are (programs write them through reshaped
        views); their readers get them converted (Net._input_in_format)."""
        if name in self._net._net_input_names:
            return torch.contiguous_format
        return self._net.memory_format

    def _zeros(self, name: str, shape: Shape) -> torch.Tensor:
        """A zero value for blob ``name`` in the net's memory format and float type (NetError
        when too big)."""
        t = zeros(shape, self._net.device, name, self._net.source, self.format_of(name))
        return t if self._net._dtype == torch.float32 else t.to(self._net._dtype)

    def diff_tensor(self, name: str) -> torch.Tensor:
        shape = tuple(self.data_tensor(name).shape)
        d = self._net._diffs.get(name)
        if d is None or tuple(d.shape) != shape:
            # Loss tops start with their loss weight as diff (Caffe's Layer::SetLossWeights).
            # Allocated in the net's format directly (no NCHW tensor to copy from).
            d = mf.zeros(shape, self.format_of(name), self._net.device)
            if self._net._dtype != torch.float32:
                d = d.to(self._net._dtype)
            weight = self._net._loss_weights.get(name, 0.0)
            if weight:
                d.fill_(weight)
            self._net._diffs[name] = d
        return d

    def shape(self, name: str) -> Shape:
        t = self._net._values.get(name)
        return tuple(t.shape) if t is not None else self._net._shapes[name]

    def reshape(self, name: str, shape: Shape) -> None:
        self._net._top_reshaped(name, shape)
        self._net._shapes[name] = shape
        self._net._values[name] = self._zeros(name, shape)
        self._net._diffs.pop(name, None)


def _layer_error(step: "Step", bottoms: Sequence[torch.Tensor], error: Exception) -> NetError:
    """What a layer's failure in a pass or a backward's replay is reported as (the caller re-raises
    user layers' errors and CaffeErrors unchanged): a check the layer makes at setup but not
    again after a reshape (pycaffe's blob.reshape, net.reshape, a parameter blob's reshape) or a
    fault torch finds first becomes a NetError naming the layer and the shapes it got, not a
    torch traceback."""
    return step.layer.error(
        f"failed on bottoms of shapes {[tuple(b.shape) for b in bottoms]}: {first_line(error)}",
        "check the shapes the layers above produce and this layer's parameters; after a "
        "reshape (blob.reshape, net.reshape), build the net with the new shapes to have every "
        "layer check them at setup")


def _run_layer(step: "Step", bottoms: Sequence[torch.Tensor], call=None):
    """``step``'s layer on ``bottoms`` (or ``call()``, which runs it another way) in a pass or
    a backward's replay; a failure is reported as :func:`_layer_error` says."""
    try:
        return step.layer(*bottoms) if call is None else call()
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
        # Raised without binding it to a local: the error's traceback holds the caller's frame,
        # and a cycle through it kept the failed pass's graph (and a reshaped parameter's stale
        # gradient accumulator) alive until a garbage collection.
        if step.layer.runs_user_code or isinstance(e, CaffeError):
            raise
        raise _layer_error(step, bottoms, e) from None


def _run_layer_on_buffer(step: "Step", bottoms: Sequence[torch.Tensor],
                         final: Callable[[], _FinalValue]):
    """:func:`_run_layer`, and for a layer whose Caffe Backward reads the buffer later in-place
    layers overwrite (``Step.reads_final``) with that backward: ``final()`` gives the
    :class:`_FinalValue` the buffer's value is (or after the pass will be) in."""
    if step.reads_final and bottoms[0].requires_grad:
        return _run_layer(step, bottoms, functools.partial(
            _BufferBackward.apply, bottoms[0], step.layer, final()))
    return _run_layer(step, bottoms)


def _graph_was_freed(error: RuntimeError) -> bool:
    """Whether autograd refused a backward because an earlier one freed the graph's buffers."""
    return "backward through the graph a second time" in str(error)


class LayerView:
    """pycaffe's ``net.layers[i]``: ``.type``, ``.blobs`` (numpy views), and the module itself.

    For a Python layer, other attributes are the user's layer object's (pycaffe hands out that
    object: py-faster-rcnn calls ``net.layers[0].set_roidb(...)``).
    """

    def __init__(self, module: Layer, blobs: List[ParamBlob]):
        self.module = module
        self.blobs = BlobVec(blobs)

    def _user(self):
        module = self.__dict__.get("module")  # absent while unpickling
        return getattr(module, "user", None) if module is not None else None

    def __getattr__(self, name: str):
        user = self._user()
        if user is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(user, name)

    def __setattr__(self, name: str, value) -> None:
        # net.layers[1].factor = 3 sets the Python layer's attribute, as on pycaffe's object.
        user = self._user() if name not in ("module", "blobs") else None
        object.__setattr__(user if user is not None else self, name, value)

    @property
    def type(self) -> str:  # noqa: A003 - pycaffe name
        return self.module.type

    @property
    def name(self) -> str:
        return self.module.name

    @property
    def __class__(self):  # noqa: D105
        # pycaffe hands out the user's own object for a Python layer, so programs test
        # isinstance(net.layers[0], MyDataLayer); isinstance consults __class__ after type(),
        # so the view answers for both classes (as unittest.mock's specs do).
        user = self._user()
        return type(user) if user is not None else LayerView

    def __repr__(self) -> str:
        return f"<Layer {self.name!r} type {self.type!r}>"


class Net(nn.Module):
    """A Caffe net (pycaffe's ``caffe.Net``) that is also a ``torch.nn.Module``.

    ``Net(prototxt, phase)``, ``Net(prototxt, weights, phase)`` or
    ``Net(prototxt, phase, weights=..., stages=[...], level=0)``; ``prototxt`` may also be a
    ``caffe_pb2.NetParameter``. ``allow_python=True`` permits Python layers (off by default:
    they execute code named in the file). ``device`` defaults to ``set_mode_cpu/gpu``'s choice.
    ``memory_format``: ``"auto"`` (channels-last for 4-D conv nets where the device gains, see
    :mod:`pycaffe_alt.memory_format`), ``"channels_last"`` or ``"contiguous"``. ``compile``:
    run the layers as one ``torch.compile`` graph (see :mod:`pycaffe_alt.compile`).
    """

    def __init__(self, network_file, *args, phase: Optional[int] = None, weights=None,
                 stages: Optional[Iterable[str]] = None, level: int = 0,
                 allow_python: bool = False, device: Union[str, torch.device, None] = None,
                 memory_format: mf.FormatRequest = "auto", compile: bool = False):  # noqa: A002
        super().__init__()
        phase, weights = _parse_pycaffe_args(args, phase, weights)
        net_param, source = _load_net_param(network_file)
        self.source = source
        self.phase = phase
        self._device = torch.device(device) if device is not None else default_device()
        self._dtype = torch.float32  # follows net.double() / net.half() (see _apply)
        self.net_param = self._filtered(net_param, phase, stages, level, source)
        self._values: Dict[str, torch.Tensor] = {}
        self._diffs: Dict[str, torch.Tensor] = {}
        self._diff_ranges: Dict[Tuple[int, int], _DiffRange] = {}
        # Layers whose autograd graph a pycaffe backward has used up (freed) since their forward.
        self._spent_steps: Set[int] = set()
        # What the last pycaffe forward's layers read from the blobs a backward re-reads (see
        # _backward_reads): a change made before the backward re-records from there.
        self._read_by_forward: Dict[str, torch.Tensor] = {}
        # (layer index, top name) -> what that layer wrote there in the last pass or replay:
        # every value an in-place blob takes on its way through a chain (conv, BatchNorm,
        # Scale, ReLU). Caffe's BackwardFromTo(start, end) seeds with ``start``'s own output and
        # leaves each diff as the gradient of the value the range's lowest reader read (see
        # _writer_key); filled by every pass a pycaffe backward may follow. The autograd graph
        # holds these tensors anyway while it lives.
        self._written: Dict[Tuple[int, str], torch.Tensor] = {}
        # Whether the recorded graph may reach a caller's tensor (see run): _store.foreign
        # forgets a name once pycaffe copies the blob, but the pass's graph still holds it.
        self._foreign_graph = False
        self._shapes: Dict[str, Shape] = OrderedDict()
        self._store = _BlobStore(self)
        self._compiled: Optional[CompiledNet] = None
        self._callbacks = LayerCallbacks()  # pycaffe's before_forward & co.
        # Passes begun (run()): tells a layer callback that ran a pass of its own (see
        # _call_forward_callbacks) from one that did not.
        self._runs = 0
        self.memory_format = torch.contiguous_format
        self._build(LayerContext(phase=phase, allow_python=allow_python, source=source))
        self.train(phase == TRAIN)
        self.to(self._device)
        self.memory_format = mf.choose(memory_format, self._device, (
            (s.layer.type, [self._shapes[b] for b in s.bottoms]) for s in self._steps), source,
            compiled=compile)
        mf.apply_to_parameters(self, self.memory_format)
        for step in self._steps:
            step.layer.set_memory_format(self.memory_format)
            if self.memory_format is torch.channels_last:
                # Every reader: an Eltwise or Concat of the input makes its top in the input's
                # layout, and the convolutions after it would compute NCHW.
                flags = tuple(b in self._net_input_names and len(self._shapes[b]) == 4
                              for b in step.bottoms)
                step.to_net_format = flags if any(flags) else ()
        if compile:
            self.set_compile(True)
        if weights:
            self.copy_from(weights)

    # ------------------------------------------------------------------ building
    @staticmethod
    def _filtered(net_param, phase: int, stages, level: int, where: str = "<net>"):
        """Caffe's FilterNet with the state set as pycaffe's Net constructor sets it."""
        state = caffe_pb2.NetState()
        state.CopyFrom(net_param.state)
        state.phase = phase
        if stages is not None:
            if isinstance(stages, (str, bytes)) or not all(isinstance(s, str) for s in stages):
                raise ArgumentTypeError(f"Net() stages must be a list of strings, got {stages!r}")
            del state.stage[:]
            state.stage.extend(stages)
        if level:
            if not isinstance(level, int) or isinstance(level, bool) or \
                    not -2**31 <= level < 2**31:  # NetState.level is an int32
                raise ArgumentTypeError(f"Net() level must be a 32-bit integer, got {level!r}")
            state.level = level
        out = caffe_pb2.NetParameter()
        out.CopyFrom(net_param)
        del out.layer[:]
        out.state.CopyFrom(state)
        for layer in net_param.layer:
            if layer_included(layer, state, where):
                out.layer.add().CopyFrom(layer)
        return out

    def _build(self, ctx: LayerContext) -> None:
        available: "OrderedDict[str, None]" = OrderedDict()  # produced, not yet consumed
        produced: Set[str] = set()
        self._steps: List[Step] = []
        self._net_input_names: List[str] = []
        self._fixed: Set[str] = set()  # blobs of Layer.fixed_tops (kept across passes)
        self._loss_weights: "OrderedDict[str, float]" = OrderedDict()
        self.top_names: "OrderedDict[str, List[str]]" = OrderedDict()
        self.bottom_names: "OrderedDict[str, List[str]]" = OrderedDict()
        links: List[LayerLinks] = []
        # Each layer's loss weight per top as set up (save writes a loss layer's default).
        self._set_up_loss_weights: List[List[float]] = []
        modules: List[Layer] = []
        shared: Dict[str, Tuple[nn.Parameter, str, int]] = {}
        self._param_infos: List[ParamInfo] = []
        uses: Dict[str, int] = {}  # uses of each blob's current version (InsertSplits' count)

        # Layer names need not be unique: Caffe's Net::Init does not check (BVLC's
        # mnist_autoencoder has two layers named "loss", HED's deploy five named "crop"). Layers
        # are kept by position; name-keyed views follow pycaffe (see the properties below).
        for index, lp in enumerate(self.net_param.layer):
            where = f"{ctx.source}: layer '{lp.name}' (type {lp.type})"
            cls = LAYERS.get(lp.type, where=where)
            if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
                raise NetError(f"has {len(lp.propagate_down)} propagate_down values for "
                               f"{len(lp.bottom)} bottoms", where, "give one per bottom or none")
            bottoms = list(lp.bottom)
            for bi, b in enumerate(bottoms):
                if b not in produced:
                    raise NetError(f"unknown bottom blob '{b}' (bottom {bi})", where,
                                   "no earlier layer in this phase produces it; check the name "
                                   "and the include/exclude rules of the layer that should")
            tops = list(lp.top)
            if cls.auto_top:
                need = max(cls.num_tops[0], 1 if cls.is_loss else 0)
                tops += [ANONYMOUS_TOP + f"{index}_{i}" for i in range(len(tops), need)]
            # Tops a non-zero loss_weight written in the prototxt uses (InsertSplits counts it).
            explicit_loss = [i < len(lp.loss_weight) and lp.loss_weight[i] != 0
                             for i in range(len(tops))]
            check_bottom_count(cls, len(bottoms), len(tops), where)
            for ti, t in enumerate(tops):
                # Caffe's Net::AppendTop: top i may reuse a name only as bottom i (in place).
                in_place = ti < len(bottoms) and bottoms[ti] == t
                if (t in produced and not in_place) or t in tops[:ti]:
                    raise NetError(f"top blob '{t}' (top {ti}) is produced by more than one "
                                   "layer", where, "rename the top; a layer works in place only "
                                   "when its top i has the name of its bottom i")
                if in_place and uses.get(t, 0) + bottoms.count(t) > 1:
                    # Caffe's InsertSplits gives a blob with several uses a Split, and renames
                    # the in-place layer's bottom to a split output: its top then names a
                    # second producer, which Net::AppendTop refuses.
                    raise NetError(f"works in place on '{t}', which another layer (or a "
                                   "loss_weight) also uses; Caffe refuses this net (its Split "
                                   f"makes '{t}' produced by multiple sources)", where,
                                   f"give this layer a new top instead of '{t}'")
            bottom_shapes = [self._shapes[b] for b in bottoms]
            # Caffe's Net::Init gives the net's phase only to layers that set none: a layer's
            # own phase wins (Bayesian SegNet keeps its Dropout in TRAIN in a TEST net).
            layer_ctx = replace(ctx, phase=int(lp.phase)) if lp.HasField("phase") else ctx
            try:
                layer = cls(lp, bottom_shapes, layer_ctx)
            except CaffeError as e:
                # A check below the layer (a filler, a data source) knows neither file nor layer.
                raise e.locate(where)
            except Exception as e:  # a layer's own check failed in torch/numpy
                if cls.runs_user_code:
                    raise
                raise NetError(f"cannot set up with bottom shapes {bottom_shapes}: {e}", where) from None
            top_shapes = self._infer_top_shapes(layer, bottom_shapes, tops, where)
            if len(top_shapes) != len(tops):
                raise NetError(f"produces {len(top_shapes)} tops but {len(tops)} are named", where)
            for b in bottoms:
                available.pop(b, None)
                uses[b] = uses.get(b, 0) + 1
            for t, as_loss in zip(tops, explicit_loss):  # a new version: counted afresh
                uses[t] = int(as_loss)
            for t, s in zip(tops, top_shapes):
                check_blob_fits(s, self._device, t, where)
                self._shapes[t] = tuple(int(d) for d in s)
                produced.add(t)
                if not t.startswith(ANONYMOUS_TOP):
                    available[t] = None
            if lp.type == "Input":
                self._net_input_names.extend(tops)
            weights = self._top_loss_weights(lp, cls, len(tops), where)
            self._set_up_loss_weights.append(weights)
            for t, w in zip(tops, weights):
                if w:
                    self._loss_weights[t] = w
            if len(lp.blobs):
                # Weights written into the prototxt (a NetParameter with blobs, Caffe's ToProto):
                # Caffe's Layer constructor loads them and skips the fillers.
                copy_layer_blobs(lp.name, list(lp.blobs), layer.blobs, ctx.source,
                                 adopt=layer.adopt_stored_shape)
            lr_mults = self._attach_params(layer, lp, shared, where)
            links.append(LayerLinks(bottoms, tops, weights, lr_mults, list(lp.propagate_down),
                                    [layer.allow_force_backward(i) for i in range(len(bottoms))],
                                    explicit_loss))
            modules.append(layer)
            # pycaffe builds these dicts from the layer list: a repeated name keeps its first
            # position and the last layer's blobs.
            # An anonymous loss top shows as Caffe names it (AppendTop's "(automatic)").
            self.top_names[lp.name] = [public_blob_name(t) for t in tops]
            self.bottom_names[lp.name] = bottoms
            # Caffe's DummyData fills its constant tops in LayerSetUp, once: the blobs hold
            # that value before any pass, and passes leave them alone.
            fixed = layer.fixed_tops()
            for i, value in fixed.items():
                self._values[tops[i]] = value
                self._fixed.add(tops[i])
            self._steps.append(Step(index, lp.name, layer, tuple(bottoms), tuple(tops), (),
                                    lp.type != "Input",
                                    fixed_tops=tuple(i in fixed for i in range(len(tops)))
                                    if fixed else ()))

        self._mark_buffer_readers()
        # Blobs a pass recomputes (input blobs written in place keep their storage, and so do
        # fixed tops).
        self._produced = [t for step in self._steps if step.runs for t in step.tops
                          if t not in self._net_input_names and t not in self._fixed]
        # Outputs: blobs nobody consumed, in Caffe's (sorted std::set) order.
        self._net_output_names = sorted(available)
        plan = plan_backward(links, self.net_param.force_backward)
        self._plan = plan
        for step, needs, layer_needs in zip(self._steps, plan.bottom_needs, plan.layer_needs):
            step.detach = tuple(not n for n in needs)
            step.diff_tops = tuple(bool(plan.blob_needs.get(t)) for t in step.tops)
            step.runs_backward = bool(layer_needs)
            if layer_needs:
                step.diff_bottoms = tuple(b for b, n in zip(step.bottoms, needs) if n)
        # Layers a backward would run that have none (see check_backward), top first.
        self._backward_missing = [(i, step) for i, step in reversed(list(enumerate(self._steps)))
                                  if step.runs_backward and not step.layer.has_backward]
        # A parameter gets a gradient when one of its users needs it (Caffe's
        # param_propagate_down: lr_mult != 0, or force_backward).
        param_needs: Dict[int, Tuple[nn.Parameter, bool]] = {}
        for step, pneeds in zip(self._steps, plan.param_needs):
            for p, need in zip(step.layer.blobs, pneeds):
                param_needs[id(p)] = (p, param_needs.get(id(p), (p, False))[1] or need)
        for p, need in param_needs.values():
            p.requires_grad_(need)
        self._backward_possible = any(plan.layer_needs)
        # Caffe's Backward reads the bottoms as they are when it runs; autograd keeps what the
        # forward read, and for bottoms that get no gradient that is often a converted copy (a
        # loss layer's labels as integers). Blobs a program may rewrite between forward and
        # backward (adversarial attacks set the target label after the forward) are watched:
        # the no-gradient bottoms of loss layers and of layers that declare they keep a copy
        # (Layer.backward_reads_bottom_copy: Embed's indices). Other layers' autograd records
        # hold their bottoms' own memory, so a write reaches their backward anyway.
        self._backward_reads: List[Tuple[int, str]] = [
            (step.index, b) for step, needs in zip(self._steps, plan.layer_needs) if needs
            for b, detach in zip(step.bottoms, step.detach)
            if detach and (step.layer.is_loss or step.layer.backward_reads_bottom_copy)]
        # Backward seeds come only from blobs whose (last) producer runs backward.
        self._seedable = {t for step, need in zip(self._steps, plan.layer_needs) if need
                          for t in step.tops}
        # Blob name -> the steps that write it, in order (the producer, then in-place layers):
        # which of a blob's values a partial backward starts from or ends at.
        self._writers: Dict[str, List[int]] = {}
        # Blob name -> the steps that read it, in order (see _diff_reader).
        self._readers: Dict[str, List[int]] = {}
        for step in self._steps:
            for t in step.tops:
                self._writers.setdefault(t, []).append(step.index)
            for b in step.bottoms:
                self._readers.setdefault(b, []).append(step.index)
        for step in self._steps:
            step.rewritten_tops = tuple(self._writers[t][-1] != step.index for t in step.tops)
        self._register_modules(modules)
        self._views = self._make_views(modules)

    def _mark_buffer_readers(self) -> None:
        """Set ``reads_final`` on layers whose Caffe backward reads a buffer that later in-place
        layers overwrite: their own (in place), or their top when the backward reads the top."""
        for i, step in enumerate(self._steps):
            layer = step.layer
            if layer.inplace_backward is None or len(step.tops) != 1 or (
                    step.tops != step.bottoms and not layer.backward_reads_top):
                continue
            blob = step.tops[0]
            step.reads_final = any(s.tops == (blob,) and blob in s.bottoms for s in self._steps[i + 1:])

    def _infer_top_shapes(self, layer: Layer, bottom_shapes, tops: Sequence[str],
                          where) -> List[Shape]:
        try:
            shapes = [tuple(s) for s in layer.top_shapes(bottom_shapes)]
            for i, s in enumerate(shapes):
                check_blob_shape(s, where, tops[i] if i < len(tops) else None)
            return shapes
        except CaffeError:
            raise
        except Exception as e:
            if layer.runs_user_code:
                raise
            msg = first_line(e)
            raise NetError(f"incompatible bottom shapes {bottom_shapes}: {msg}", where,
                           "check the shapes the layers above produce and this layer's "
                           "parameters") from None

    @staticmethod
    def _top_loss_weights(lp, cls, n_tops: int, where: str) -> List[float]:
        """Caffe's SetLossWeights: explicit per-top weights, else 1 on a loss layer's first top."""
        if len(lp.loss_weight):
            if len(lp.loss_weight) != n_tops:
                raise NetError(f"has {len(lp.loss_weight)} loss_weight values for {n_tops} tops",
                               where, "give one loss_weight per top")
            if not all(math.isfinite(w) for w in lp.loss_weight):
                # Training would end in "the loss became nan", blamed on the solver's base_lr.
                raise NetError(f"loss_weight {list(lp.loss_weight)} is not finite", where,
                               "give finite loss weights (0 leaves a top out of the loss)")
            return [float(w) for w in lp.loss_weight]
        if cls.is_loss and n_tops > 1:
            # LossLayer::LayerSetUp adds one loss_weight (1) when none is given, and
            # SetLossWeights then finds one value for several tops: Caffe stops at its CHECK
            # ("loss_weight must be unspecified or specified once per top blob").
            raise NetError(f"is a loss layer with {n_tops} tops and no loss_weight; Caffe gives "
                           "a loss layer one loss_weight (1) by default, which fits one top "
                           "only", where, "give one loss_weight per top, e.g. loss_weight: 1 "
                           "then loss_weight: 0 for a second (probability) top")
        return [1.0 if (cls.is_loss and i == 0) else 0.0 for i in range(n_tops)]

    def _attach_params(self, layer: Layer, lp, shared, where) -> List[float]:
        """Record lr_mult/decay_mult of each blob and share blobs named in ``param { name }``."""
        blobs = layer.blobs
        if len(lp.param) > len(blobs):
            raise NetError(f"has {len(lp.param)} 'param' entries but only {len(blobs)} "
                           "parameter blobs", where, "remove the extra 'param { }' entries")
        lr_mults = []
        for i in range(len(blobs)):
            spec = lp.param[i] if i < len(lp.param) else caffe_pb2.ParamSpec()
            for field in ("lr_mult", "decay_mult"):
                if not math.isfinite(getattr(spec, field)):
                    raise NetError(f"param {i} has {field} {getattr(spec, field)}", where,
                                   f"give a finite {field} (0 freezes the blob)")
            lr_mults.append(spec.lr_mult)
            if spec.name and spec.name in shared:
                owner, owner_layer, owner_index = shared[spec.name]
                mine = blobs[i]
                permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
                ok = (owner.numel() == mine.numel()) if permissive else (owner.shape == mine.shape)
                if not ok:
                    raise NetError(f"cannot share param '{spec.name}' owned by layer "
                                   f"'{owner_layer}': owner shape {tuple(owner.shape)}, this layer "
                                   f"expects {tuple(mine.shape)}", where)
                if owner.shape != mine.shape:
                    # Caffe's PERMISSIVE mode shares the values under each layer's own shape;
                    # here a layer computes with the one tensor it holds, so it is refused now
                    # rather than failing at every forward.
                    raise NetError(f"param '{spec.name}' is shared PERMISSIVE between shapes "
                                   f"{tuple(owner.shape)} (layer '{owner_layer}') and "
                                   f"{tuple(mine.shape)}: sharing one blob under two shapes is not "
                                   "supported", where,
                                   "give both layers the same parameter shape, or stop sharing")
                info = next(pi for pi in self._param_infos if pi.param is owner)
                # Caffe: a sharer may set lr/decay only if the owner left them unset or agrees.
                for attr in ("lr_mult", "decay_mult"):
                    if spec.HasField(attr):
                        if getattr(info, "has_" + attr) and getattr(info, attr) != getattr(spec, attr):
                            raise NetError(f"shared param '{spec.name}' has mismatched {attr}", where)
                        setattr(info, attr, getattr(spec, attr))
                        setattr(info, "has_" + attr, True)
                layer.replace_blob(i, owner)
                continue
            info = ParamInfo(blobs[i], lp.name, i, spec.lr_mult, spec.decay_mult, spec.name or str(i),
                             spec.HasField("lr_mult"), spec.HasField("decay_mult"))
            self._param_infos.append(info)
            if spec.name:
                shared[spec.name] = (blobs[i], lp.name, i)
        return lr_mults

    def _register_modules(self, modules: List[Layer]) -> None:
        """Layers become submodules named after the layer (state_dict keys ``conv1.weight``)."""
        taken: Set[str] = set()
        self._module_keys: Dict[str, str] = {}
        for i, m in enumerate(modules):
            key = (m.name or f"layer{i}").replace(".", "_")
            # A key equal to a plain attribute nn.Module assigns later ("training", set by
            # train()/eval()) would make that assignment fail: such layers get a suffix.
            while key in taken or key in self.__dict__:
                key += "_"
            taken.add(key)
            self._module_keys[m.name] = key
            # Set through _modules so that layer names may equal Net attribute names.
            self._modules[key] = m

    def _make_views(self, modules: List[Layer]) -> List[LayerView]:
        dirty = self._store.dirty
        return [LayerView(m, [ParamBlob(p, dirty) for p in m.blobs]) for m in modules]

    def set_compile(self, enabled: bool = True) -> bool:
        """Run forward passes through ``torch.compile`` (or stop doing so); returns whether
        compiling is on (it stays off, with one log line, where the net cannot be compiled)."""
        self._compiled = CompiledNet.for_net(self) if enabled else None
        return self._compiled is not None

    @property
    def compiled(self) -> bool:
        """Whether forward passes go through ``torch.compile``."""
        return self._compiled is not None and self._compiled.active

    # ------------------------------------------------------------------ pycaffe properties
    @property
    def device(self) -> torch.device:
        return self._device

    def _blob_table(self) -> Tuple[List[str], List[Blob], "OrderedDict[str, Blob]"]:
        """Caffe's blob_names_ and blobs_ (one entry per blob, anonymous loss tops all named
        "(automatic)"; no Split copies) and pycaffe's ``net.blobs`` dict zipped from them."""
        # Blob names are only ever added (at build), so their count tells whether the views
        # are current; comparing the name lists made every ``net.blobs[...]`` O(blobs).
        cached = self.__dict__.get("_blob_views")
        if cached is None or cached[0] != len(self._shapes):
            names = [public_blob_name(n) for n in self._shapes]
            views = [Blob(self._store, n) for n in self._shapes]
            # pycaffe's OrderedDict(zip(_blob_names, _blobs)): a repeated "(automatic)" keeps
            # its first position and the last blob.
            cached = (len(self._shapes), names, views, OrderedDict(zip(names, views)))
            self.__dict__["_blob_views"] = cached
        return cached[1], cached[2], cached[3]

    @property
    def blobs(self) -> "OrderedDict[str, Blob]":
        """Every blob by name, in the order layers produce them (no Split copies); the
        anonymous loss tops share the key "(automatic)", which gives the last of them."""
        return self._blob_table()[2]

    @property
    def params(self) -> "OrderedDict[str, List[ParamBlob]]":
        """Layer name -> its parameter blobs, for layers that have any (a repeated layer name:
        the last such layer's, at the first one's position, as pycaffe's dict gives)."""
        return OrderedDict((v.name, v.blobs) for v in self._views if v.blobs)

    @property
    def layers(self) -> List[LayerView]:
        """Every layer in order (repeated names included)."""
        return list(self._views)

    @property
    def layer_dict(self) -> "OrderedDict[str, LayerView]":
        """Layer name -> view (a repeated name: the last layer, as pycaffe's dict gives)."""
        return OrderedDict((v.name, v) for v in self._views)

    @property
    def _layer_names(self) -> List[str]:
        return [v.name for v in self._views]

    @property
    def _blob_names(self) -> List[str]:
        """Caffe's blob_names(): one name per blob, "(automatic)" as often as there are
        anonymous loss tops."""
        return list(self._blob_table()[0])

    @property
    def inputs(self) -> List[str]:
        return list(self._net_input_names)

    @property
    def outputs(self) -> List[str]:
        return list(self._net_output_names)

    @property
    def loss_tops(self) -> List[str]:
        """The blobs the net loss sums (named and automatic loss tops)."""
        return list(self._loss_weights)

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        return OrderedDict(zip(self._blob_names, self._blob_loss_weights))

    @property
    def layer_modules(self) -> "OrderedDict[str, Layer]":
        """Layer name -> the nn.Module implementing it (a repeated name: the last layer; every
        layer in order is :attr:`layer_sequence`)."""
        return OrderedDict((v.name, v.module) for v in self._views)

    @property
    def layer_sequence(self) -> List[Layer]:
        """Every layer's nn.Module in execution order, repeated layer names included."""
        return [v.module for v in self._views]

    @property
    def learnable_params(self) -> List[ParamInfo]:
        """Owned parameters with their lr_mult/decay_mult (shared ones appear once)."""
        return list(self._param_infos)

    # ------------------------------------------------------------------ running (torch)
    def _layer_index(self, name: Optional[str], default: int) -> int:
        if name is None:
            return default
        for step in self._steps:
            if step.name == name:
                return step.index
        # pycaffe looks the name up with list.index: a ValueError there.
        raise NetValueError(f"no layer named '{name}'", self.source,
                            f"layers: {', '.join(s.name for s in self._steps)}")

    def run(self, inputs: Optional[Dict[str, torch.Tensor]] = None, start: int = 0,
            end: Optional[int] = None,
            written: Optional[Dict[Tuple[int, str], torch.Tensor]] = None,
            trace: Optional[List[Tuple[Step, Sequence[torch.Tensor], Sequence[torch.Tensor]]]] = None,
            eager: bool = False) -> Dict[str, torch.Tensor]:
        """Run layers ``start..end`` (indices) on tensors; returns the dict of every blob's value.

        Missing inputs are taken from the blobs' current values (what pycaffe wrote); tensors
        given here become the input blobs' values. ``written`` collects each layer's tops as
        ``(layer index, top name) -> tensor`` (see ``_written``); a pass from a middle layer
        also records there the values it reads from in-place chains that began below it.
        ``trace`` receives ``(step, bottoms, tops)`` for every layer in order (debug_info).
        With compiling on (:meth:`set_compile`) a pass without ``written``/``trace`` runs
        compiled and brings out only the outputs, loss tops and requested blobs; ``eager`` runs
        it layer by layer all the same (passes that read intermediate blobs, differentiate
        twice, or change layers' Python state between batches: the alternation's support
        passes and exact weight steps).
        """
        self._runs += 1
        values = self._values
        last = len(self._steps) - 1 if end is None else end
        if start == 0:
            # Drop last pass's activations before making new ones: they are overwritten anyway,
            # and freeing them first lets the allocator reuse their memory (~5% of a LeNet step).
            # Only those this pass makes: Caffe's ForwardFromTo(0, end) leaves the blobs above
            # ``end`` holding the last full pass's values (pycaffe's forward(end=...)).
            produced = self._produced if last == len(self._steps) - 1 else \
                [t for step in self._steps[:last + 1] if step.runs for t in step.tops
                 if t not in self._net_input_names and t not in self._fixed]
            for name in produced:
                values.pop(name, None)
        if inputs:
            values.update(inputs)
            # The caller's tensors: pycaffe's views must not write into them (see data_tensor).
            self._store.foreign.update(inputs)
        # A pass from a middle layer keeps the graph the layers below it recorded before.
        self._foreign_graph = bool(self._store.foreign) or (start > 0 and self._foreign_graph)
        for name in self._net_input_names:
            if name not in values:
                values[name] = self._store.data_tensor(name)
        if start > 0:
            # A pass from a middle layer reads whatever its bottoms hold, as Caffe's
            # ForwardFromTo does: zeros when no pass (and no user) has written them yet.
            for step in self._steps[start:last + 1]:
                for b in step.bottoms:
                    if b not in values:
                        self._store.data_tensor(b)
            if written is not None:
                self._record_read_values(written, start)
        if self._compiled is not None and written is None and trace is None and not eager \
                and not self._callbacks.on_forward:  # the callbacks run around each layer
            out = self._compiled.run(values, start, last)
        else:
            self.run_steps(values, start, last, written, trace)
            out = values
        if self._store.held:
            self._store.refresh_held()
        return out

    def run_steps(self, values: Dict[str, torch.Tensor], start: int, last: int,
                  written: Optional[Dict[Tuple[int, str], torch.Tensor]] = None,
                  trace: Optional[List[Tuple[Step, Sequence[torch.Tensor], Sequence[torch.Tensor]]]]
                  = None) -> None:
        """Run layers ``start..last`` (indices) on the blob values in ``values`` (updated in
        place); ``written`` and ``trace`` as in :meth:`run`."""
        finals: Dict[str, _FinalValue] = {}
        converted: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # see _input_in_format
        calls = self._callbacks if self._callbacks.on_forward else None
        for step in self._steps[start:last + 1]:
            if calls is not None:
                self._call_forward_callbacks("before_forward", step.index, written)
            if not step.runs:
                if trace is not None:  # Caffe's Input layers run (as no-ops) and are reported
                    trace.append((step, (), tuple(values[t] for t in step.tops)))
                if written is not None and True in step.rewritten_tops:
                    # An input an in-place layer rewrites (ReLU on the data blob): what that
                    # layer read is the input itself, which a backward differentiates.
                    for t, rewritten in zip(step.tops, step.rewritten_tops):
                        if rewritten and t in values:
                            written[(step.index, t)] = values[t]
                if calls is not None:
                    self._call_forward_callbacks("after_forward", step.index, written)
                continue
            bottoms = [values[b] for b in step.bottoms]
            if True in step.detach:
                # Only values that carry a graph: detaching a plain tensor (the data and labels)
                # changes nothing but costs an op dispatch.
                bottoms = [b.detach() if d and b.requires_grad else b
                           for b, d in zip(bottoms, step.detach)]
            if step.to_net_format:  # a net input read in the net's format (see Step)
                bottoms = [self._input_in_format(name, b, converted) if f and b.dim() == 4 else b
                           for name, b, f in zip(step.bottoms, bottoms, step.to_net_format)]
            out = _run_layer_on_buffer(step, bottoms, lambda: finals.setdefault(step.tops[0],
                                                                                _FinalValue()))
            if isinstance(out, torch.Tensor):
                out = (out,)
            if step.fixed_tops:
                # Caffe's Forward leaves these blobs alone: the value they hold (set-up's fill,
                # a pycaffe write, an in-place layer's last output) is this layer's top.
                out = tuple(values[t].detach() if fixed and t in values else v
                            for t, v, fixed in zip(step.tops, out, step.fixed_tops))
            if trace is not None:
                trace.append((step, bottoms, out))
            for t, v, rewritten, diff in zip(step.tops, out, step.rewritten_tops, step.diff_tops):
                if diff and not v.requires_grad and v.is_floating_point() and \
                        torch.is_grad_enabled():
                    # Caffe's readers compute this blob's diff (blob_need_backward_) even where
                    # no gradient goes below it (its producer's bottoms all have propagate_down:
                    # false): a leaf takes it, as _replay_graph makes one for a bottom.
                    v = v.detach().requires_grad_(True)
                if written is not None and (v.requires_grad or (
                        rewritten and self._backward_possible)):
                    # Values a backward can start from or pass through, and (with or without
                    # gradients) what a later in-place layer overwrites: a backward after a pass
                    # without a graph replays a range from what its first layer read. A last
                    # writer's value is the blob's data already, and a net no layer of which
                    # runs backward (a deploy net) keeps one value per blob, as Caffe's
                    # in-place layers share one buffer.
                    written[(step.index, t)] = v
                values[t] = v
            if calls is not None:
                self._call_forward_callbacks("after_forward", step.index, written)
        for name, final in finals.items():
            final.value = values[name].detach()

    def _call_forward_callbacks(self, kind: str, index: int,
                                written: Optional[Dict[Tuple[int, str], torch.Tensor]]) -> None:
        """Call layer ``index``'s ``kind`` callbacks during a pass that records ``written``.

        A callback may run a pass of its own (``net.forward()``, as Caffe's ForwardFromTo allows
        from inside another): it leaves the blobs holding its values, which this pass's next
        layers then read, as they read Caffe's shared buffers. The layer outputs a backward
        differentiates are then that pass's too, where this one does not make them again (they
        were this pass's own, disconnected from its loss: an in-place blob's diff came out
        wrong)."""
        runs = self._runs
        self._callbacks.call(kind, index)
        if self._runs != runs and written is not None and self._written is not written:
            written.update(self._written)

    def _input_in_format(self, name: str, value: torch.Tensor,
                         converted: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Net input ``name`` (C-order, see _BlobStore._zeros) in the net's format, converted
        once per pass for all its readers (an in-place layer on it gives a new value, converted
        anew); the blob keeps its own C-order memory."""
        cached = converted.get(name)
        if cached is None or cached[0] is not value:
            cached = converted[name] = (value, mf.in_format(value, self.memory_format))
        return cached[1]

    @property
    def steps(self) -> List[Step]:
        """The layers in execution order with the blob names they read and write."""
        return list(self._steps)

    def blob_shape(self, name: str) -> Shape:
        """The shape inferred for blob ``name`` when the net was built or last reshaped."""
        return self._shapes[name]

    def blob_value(self, name: str) -> Optional[torch.Tensor]:
        """The tensor the last pass left in blob ``name`` (None before any pass); unlike
        ``blobs[name].data`` no host copy is made."""
        return self._values.get(name)

    def loss(self, values: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Caffe's net loss: sum over loss tops of loss_weight * sum(top)."""
        values = self._values if values is None else values
        return self._weighted_loss(self._loss_weights.items(), values)

    def _weighted_loss(self, weights, values: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The sum of loss_weight * sum(top) over ``weights``' (top, weight) pairs."""
        total = None
        for name, w in weights:
            v = values[name]
            # A scalar loss top of weight 1 (the usual case) is its own term: no extra ops.
            term = v if (w == 1.0 and v.dim() == 0) else v.sum() * w
            total = term if total is None else total + term
        return total if total is not None else torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ running (pycaffe)
    def forward(self, blobs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                end: Optional[str] = None, **kwargs):
        """pycaffe ``net.forward``; with tensors as keyword arguments, the nn.Module forward.

        pycaffe form: keyword arrays are copied into the input blobs, layers ``start..end`` run,
        and a dict of output blob arrays (the net outputs, or the tops of ``end``, plus ``blobs``)
        comes back. Tensor form: ``net(data=t)`` returns ``{output: tensor}``, differentiable.
        """
        if kwargs and all(isinstance(v, torch.Tensor) for v in kwargs.values()):
            for name, value in kwargs.items():
                self._check_fed_blob(name, start, "forward()")
                if value.layout != torch.strided or value.is_nested:
                    # Layers index, reshape and re-lay out their bottoms, which only dense
                    # tensors allow (torch raised inside the memory-format conversion).
                    kind = "nested" if value.is_nested else str(value.layout).split(".")[-1]
                    raise ArgumentTypeError(
                        f"forward() got a {kind} tensor for '{name}'; blobs are dense tensors",
                        self.source, "stack its items of one shape (torch.stack(t.unbind()))"
                        if value.is_nested else "pass t.to_dense()")
            last = self._layer_index(end, len(self._steps) - 1)
            names = self._output_names(blobs, end)
            keys = [self.blobs[n].name for n in names]  # "(automatic)": its last blob
            if self._compiled is not None:
                self._compiled.want(keys)
            first = self._layer_index(start, 0)
            before, foreign = dict(self._values), set(self._store.foreign)
            # Each layer's outputs too (a pycaffe backward may follow), except in a compiled
            # pass, which keeps its intermediate values inside the graph.
            written = self._written_below(first) if self._compiled is None else None
            try:
                values = self.run(kwargs, first, last, written)
            except BaseException:
                # A refused pass leaves the blobs as they were: neither the tensors it was
                # given (of a wrong shape, say) nor what its first layers made may become the
                # blobs pycaffe reads next.
                self._values.clear()
                self._values.update(before)
                self._store.foreign.clear()
                self._store.foreign.update(foreign)
                raise
            self._written = written if written is not None else {}
            self._mark_recorded(first, last)
            return {n: values[k] for n, k in zip(names, keys)}
        for name, arr in kwargs.items():
            self._check_fed_blob(name, start, "forward()")
            self._write_array(name, arr, "data", "forward()")
        names = self._output_names(blobs, end)
        self._forward_pycaffe(self._layer_index(start, 0),
                              self._layer_index(end, len(self._steps) - 1))
        return {n: self.blobs[n].data for n in names}

    def _check_fed_blob(self, name: str, start: Optional[str], caller: str) -> None:
        """A value given for blob ``name`` must be for a blob of the net that the pass reads:
        an input, or any blob when the pass starts at a later layer."""
        if name not in self._shapes:
            raise NetError(f"{caller} got a value for '{name}', which is not a blob of this net",
                           self.source, f"inputs: {', '.join(self._net_input_names)}")
        if start is None and name not in self._net_input_names:
            # pycaffe refuses it too; a layer would overwrite the value before it is read.
            raise NetError(f"{caller} got a value for '{name}', which is not an input of "
                           "this net (a layer computes it)", self.source,
                           f"inputs: {', '.join(self._net_input_names)}; or start the pass "
                           "above the layer that computes it (start=...)")

    def _write_array(self, name: str, arr, field: str, caller: str) -> None:
        """``blobs[name].<field>[...] = arr`` with a NetError naming the blob when ``arr`` does not
        fit (wrong shape, not numbers)."""
        target = getattr(self.blobs[name], field)
        arr = self._input_array(name, arr, caller)
        if target.shape and arr.shape[0] != target.shape[0]:
            raise NetValueError(f"{caller}: '{name}' has batch size {arr.shape[0]}, the blob "
                                f"has {target.shape[0]}", self.source,
                                f"reshape first: net.blobs['{name}'].reshape(...); net.reshape()")
        try:
            target[...] = arr
        except ValueError:
            # pycaffe's blob.data[...] = array: numpy's broadcast ValueError.
            raise NetValueError(f"{caller}: the array for '{name}' has shape {arr.shape}, the "
                                f"blob {tuple(target.shape)}", self.source,
                                f"reshape first: net.blobs['{name}'].reshape(...); "
                                "net.reshape()") from None

    def _input_array(self, name: str, value, caller: str) -> np.ndarray:
        """``value`` as a float32 array with a batch axis, or a NetError naming the blob: None
        (NaN as float), a single number (broadcast over the batch) and ragged lists are
        refused, as pycaffe's batch-size check refuses them."""
        if value is None:
            raise NetError(f"{caller} got None for '{name}'", self.source,
                           f"give an array of shape {tuple(self.blobs[name].shape)}")
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: a nested tensor
            raise NetError(f"{caller} got a value for '{name}' that is not an array of numbers "
                           f"({first_line(e)})", self.source) from None
        if arr.ndim == 0 and self._shapes[name] != ():  # a 0-axis blob takes one number
            raise NetError(f"{caller} got a single number for '{name}', not a batch", self.source,
                           f"give an array of shape {tuple(self.blobs[name].shape)}")
        return arr

    def _output_names(self, blobs, end) -> List[str]:
        if end is not None:
            self._layer_index(end, 0)  # an unknown layer name is a NetError
        names = list(self.top_names[end]) if end is not None else list(self._net_output_names)
        blobs = _blob_name_list(blobs, "forward(blobs=...)")
        for b in blobs or ():
            self._require_blob(b, "forward(blobs=...)")
            if b not in names:
                names.append(b)
        return names

    def _require_blob(self, name: str, caller: str) -> None:
        if name not in self.blobs:
            listed = list(self.blobs)
            # pycaffe reads self.blobs[name]: a KeyError there.
            raise NetKeyError(f"{caller}: no blob named '{name}' in this net", self.source,
                              f"blobs: {', '.join(listed[:20])}"
                              f"{', ...' if len(listed) > 20 else ''}")

    def _push_host_writes(self) -> None:
        """Copy numpy writes made on GPU nets (host copies) to the device."""
        dirty = self._store.dirty
        while dirty:
            dirty.pop().push()

    def _forward_pycaffe(self, start: int, end: int) -> None:
        self._push_host_writes()
        if start > 0 and self._store.held:
            self._take_held_writes()
        grad = self._backward_possible and torch.is_grad_enabled()
        # Leaves for inputs that receive gradients (force_backward nets).
        for name in self._net_input_names:
            t = self._store.data_tensor(name)
            wants = grad and self._plan.blob_needs.get(name, False)
            if start > 0 and t.grad_fn is None and t.requires_grad == wants:
                # A pass from a middle layer leaves the layers below, and the input leaf their
                # graph starts from, as they are: a backward over both gives the input its diff.
                continue
            writers = self._writers.get(name)
            if start > 0 and writers and writers[-1] < start and t.grad_fn is not None:
                # An in-place chain on the input below ``start`` (a Sigmoid on the data): the
                # blob holds the chain's output, whose graph the pass's layers read on, as
                # Caffe's Backward runs the chain's layers on the diff the pass's ones write.
                continue
            if t.requires_grad or wants:  # a fresh leaf; a plain tensor is one already
                t = t.detach()
                if wants:
                    t.requires_grad_(True)
            self._values[name] = t
        # Replaced before the pass, not after: the last pass's blob values it holds are freed
        # before this pass allocates new ones (as run() drops them from _values), so two
        # passes' activations are never alive at once.
        written = self._written = self._written_below(start)
        with torch.set_grad_enabled(grad):
            self.run(None, start, end, written)
        self._written = written  # a pass a layer callback ran inside this one set its own
        self._mark_recorded(start, end)
        if grad:
            for index, name in self._backward_reads:
                if start <= index <= end and name in self._values:
                    self._read_by_forward[name] = graph_free(self._values[name]).clone()

    def _mark_recorded(self, start: int, end: int) -> None:
        """After a pass over layers ``start..end``: their graph is fresh; the layers above
        ``end`` keep the graph of an older pass, which no longer connects to the blobs below,
        so a backward through them records it again from what they hold."""
        self._spent_steps.difference_update(range(start, end + 1))
        self._spent_steps.update(range(end + 1, len(self._steps)))

    def _written_below(self, start: int) -> Dict[Tuple[int, str], torch.Tensor]:
        """The ``_written`` a pass from layer ``start`` begins with: the outputs of the layers
        below it, which it does not run again (none for a whole pass: two passes' activations
        are never alive at once)."""
        if start == 0:
            return {}
        return {k: v for k, v in self._written.items() if k[0] < start}

    def _record_read_values(self, written: Dict[Tuple[int, str], torch.Tensor], start: int) -> None:
        """For a pass from layer ``start``: an in-place chain that crosses ``start`` is read from
        the blob's data (Caffe's ForwardFromTo reads the buffer: the chain's last output), so
        that data, not what the chain's layer below ``start`` once wrote, is the value the
        pass's layers read (and a backward over them differentiates)."""
        for name in self._writers:
            key = self._writer_key(name, start)
            if key is None or name not in self._values:
                continue
            data, below = self._values[name], written.get(key)
            if below is not None and below.requires_grad and below is not data and \
                    below.shape == data.shape:
                # The value is the buffer's, but Caffe's Backward hands the layer's bottom diff
                # to the writer below ``start`` (its bottom diff is that blob's diff): the
                # gradient goes to what that writer made, not back through the chain's upper
                # layers of the last pass, whose data this is (a Scale would count twice).
                data = self._values[name] = _BufferValue.apply(data, below)
            written[key] = data

    def _writer_key(self, name: str, index: int) -> Optional[Tuple[int, str]]:
        """The ``_written`` key of the value layer ``index`` reads from blob ``name``: the
        output of the blob's last writer below ``index``, when a later in-place layer rewrote
        it; None when the layer reads the blob's data (its final value, or an input)."""
        writers = self._writers.get(name)
        if not writers:
            return None
        k = bisect.bisect_left(writers, index)
        if k == 0 or k == len(writers):
            return None
        return writers[k - 1], name

    def _read_slot(self, name: str, index: int) -> Tuple[Dict[Any, torch.Tensor], Any]:
        """Where the value layer ``index`` read from blob ``name`` in the last pass or replay
        is kept: ``(_written, key)``, or ``(_values, name)`` for the blob's data (also where
        none was recorded: a backward without a forward first)."""
        return self._slot(name, self._writer_key(name, index))

    def _slot(self, name: str, key: Optional[Tuple[int, str]]
              ) -> Tuple[Dict[Any, torch.Tensor], Any]:
        """:meth:`_read_slot` for a ``_writer_key`` already known."""
        if key is not None and self._written.get(key) is not None:
            return self._written, key
        return self._values, name

    def _written_by(self, name: str, key: Any) -> int:
        """The index of the layer whose output a ``_read_slot`` key names (for the blob's data,
        keyed by its name: its last writer; -1 for a net input no layer rewrites)."""
        if isinstance(key, tuple):
            return key[0]
        writers = self._writers.get(name)
        return writers[-1] if writers else -1

    def _read_value(self, name: str, index: int) -> Optional[torch.Tensor]:
        """The value layer ``index`` read from blob ``name`` (see :meth:`_read_slot`)."""
        home, key = self._read_slot(name, index)
        return home.get(key)

    def _take_held_writes(self, names: Optional[Iterable[str]] = None) -> None:
        """Before a pass that starts above the first layer (or a backward that re-reads
        ``names``): a held data array the user wrote into (it is the blob's memory to them, see
        blob.py) becomes that blob's value, so the layers read what was written, as Caffe's
        would."""
        held = self._store.held_arrays("data")
        if names is not None:
            held = {n: held[n] for n in names if n in held}
        for name, arr in held.items():
            t = self._values.get(name)
            if t is None or t.device.type != "cpu" or tuple(t.shape) != arr.shape or \
                    is_memory_of(arr, t):
                continue
            if not np.array_equal(arr, t.detach().numpy()):
                value = torch.from_numpy(arr)
                if self._plan.blob_needs.get(name, False) and torch.is_grad_enabled():
                    value.requires_grad_(True)
                self._values[name] = value

    def backward(self, diffs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                 end: Optional[str] = None, **kwargs) -> Dict[str, np.ndarray]:
        """pycaffe ``net.backward``: top diffs in, blob and parameter diffs filled.

        Seeds are the diffs of the net outputs (or of ``start``'s tops) — loss tops hold their
        loss weight, as Caffe sets them. Parameter diffs accumulate like Caffe's; blob diffs are
        overwritten. Returns, as pycaffe master does, the diffs of ``end``'s bottoms (of the net
        inputs when ``end`` is not given), plus those named in ``diffs``.
        """
        if self._callbacks.calling is not None:
            # Caffe's BackwardFromTo would run on the blobs as the pass around the callback has
            # left them; here that pass's autograd graph is half made (a forward) or being
            # consumed (a backward), and a backward through it failed with a message blaming a
            # torch backward on the module call's outputs.
            kind, index = self._callbacks.calling
            raise NetError(f"backward() called from a {kind} callback (layer "
                           f"'{self._steps[index].name}', #{index}) while a pass of this net "
                           "is running; a backward cannot run inside another pass", self.source,
                           "note what the callback needs and call net.backward() after "
                           "net.forward()/net.backward() returns")
        for name, arr in kwargs.items():
            self._require_blob(name, "backward()")
            self._write_array(name, arr, "diff", "backward()")
        self._push_host_writes()
        lo = self._layer_index(end, 0)
        hi = self._layer_index(start, len(self._steps) - 1)
        self.check_backward(lo, hi)
        ranged = self._diff_range(lo, hi)  # what the range reads and writes (made once)
        seeds: Sequence[Tuple[str, Optional[int]]]
        if lo > hi:  # Caffe's BackwardFromTo runs nothing for a reversed range
            seeds = []
        elif start is not None:
            seeds = ranged.start_seeds
        else:
            # Caffe's BackwardFromTo runs no layer below ``end``: the diff of an output made
            # below it goes nowhere (autograd would carry it into the blobs the range reads).
            seeds = [(n, None) for n in
                     dict.fromkeys(self._net_output_names + list(self._loss_weights))
                     if lo == 0 or self._written_by(n, n) >= lo]
        tensors, grads = self._seed_tensors(seeds)
        # The layers autograd may reach: with a parameter shared below the range, or a blob the
        # range reads that a layer below reads too (its way back may pass through that layer),
        # those below.
        reach = 0 if 0 < lo <= hi and (ranged.shares_below or ranged.reads_below) else lo
        replays_exactly = all(s.layer.replays_exactly for s in self._steps[reach:hi + 1]
                              if s.replayed)
        if reach < lo and replays_exactly:
            # Caffe's BackwardFromTo runs the range's layers only: a parameter shared with a
            # layer below the range gets the range's contributions alone, and so does a blob
            # the range reads beside a lower layer's output made from it (the diff Caffe's Split
            # top of the range's reader gets). Autograd would follow the pass's graph down into
            # that layer (and fail where a backward freed it), so the range's graph is
            # recorded again from what the blobs hold, cut at its bottoms. Only where running
            # the layers again gives the same values: a replay would draw new Dropout masks (in
            # the range, or below it for a later whole backward). Else the parameter or blob
            # also takes the lower layer's part, through the kept graph.
            self._replay_graph(lo, hi, cut=lo)
            # The layers below no longer lead to the values the range reads.
            self._spent_steps.update(range(lo))
            tensors, grads = self._seed_tensors(seeds)
        elif (not tensors and any(name in self._seedable for name, _ in seeds)) or \
                not self._spent_steps.isdisjoint(range(lo, hi + 1)):
            # No graph yet (a backward without a forward), a backward freed it (nets whose
            # layers replay exactly, see below), or layers a forward(end=...) left with an
            # older pass's graph: Caffe's backward runs on what the blobs hold.
            spent = [i for i in self._spent_steps if lo <= i <= hi]
            # Only the spent layers when the range has graph below them (the layers a
            # forward(end=...) left above its end): the layers below keep this pass's graph
            # (and Dropout masks).
            if ranged.reads_below:
                # The graph below the range may be freed too (a whole backward before): it
                # begins at the range's bottoms, as Caffe's BackwardFromTo runs no layer below.
                self._replay_graph(lo, hi, cut=lo)
                self._spent_steps.update(range(lo))
            else:
                self._replay_graph(lo if not tensors or not spent else min(spent), hi)
            tensors, grads = self._seed_tensors(seeds)
        else:
            changed = self._rewritten_bottoms(lo, hi)
            if changed:
                # A watched bottom was written after the forward: the layers that depend on it
                # record their graph again from what the blobs hold now; the others keep the
                # forward's graph (no second BatchNorm average update, the same Dropout masks).
                start = min(i for i, name in self._backward_reads if name in changed)
                self._replay_graph(start, hi, dirty=changed)
                tensors, grads = self._seed_tensors(seeds)
        sequence = self._backward_sequence(lo, hi) if self._callbacks.on_backward else None
        # The callbacks' hooks must not outlive this backward (BackwardSequence.__exit__).
        with sequence if sequence is not None else contextlib.nullcontext():
            if tensors:
                # Caffe's Backward can run again on the same forward, reading the masks and
                # statistics that forward stored: the graph is kept for it where running the
                # layers again would draw new Dropout masks or update BatchNorm's averages.
                # Elsewhere autograd frees it as it goes (the backward reuses that memory: ~3% of
                # a LeNet step) and a second backward records it again, with the same values.
                retain = not replays_exactly
                try:
                    self._accumulate_grads(tensors, grads, self._steps[lo:hi + 1], whole=lo == 0,
                                           retain=retain)
                except RuntimeError as e:
                    if not _graph_was_freed(e):
                        raise
                    # A torch backward the caller ran on the module form's outputs
                    # (net.loss(net(data=t)).backward()) freed the graph this pass recorded.
                    # Running the layers again would update BatchNorm's averages a second time
                    # and draw new Dropout masks, and the parameters above the freed part already
                    # took their gradient: refuse, naming what to do.
                    self._spent_steps.update(range(lo, hi + 1))
                    raise NetError(
                        "backward(): a torch backward on the outputs of the module call freed "
                        "this pass's graph (some parameter diffs may already hold part of this "
                        "backward's gradient)", self.source,
                        "run the pass again (net.forward() or the module call) before "
                        "net.backward(), or give the torch backward retain_graph=True; "
                        "net.clear_param_diffs() clears the parameter diffs") from None
                if not retain:
                    self._spent_steps.update(range(lo, hi + 1))
                    if ranged.reads_below:
                        # Autograd may have gone through (and freed) the graph of layers below.
                        self._spent_steps.update(range(lo))
        if self._store.held:
            self._store.refresh_held()
        names = list(self.bottom_names[end]) if end is not None else list(self._net_input_names)
        diffs = _blob_name_list(diffs, "backward(diffs=...)")
        for d in diffs or ():
            self._require_blob(d, "backward(diffs=...)")
        names += [d for d in diffs or () if d not in names]
        return {n: self.blobs[n].diff for n in names}

    def check_backward(self, lo: int = 0, hi: Optional[int] = None) -> None:
        """Refuse a backward over layers ``lo..hi`` (by index; default all) that would run a
        layer without one. Caffe's BackwardFromTo calls Backward on every layer of the range
        whose layer_need_backward_ is set, and ThresholdLayer's is NOT_IMPLEMENTED: the run
        aborts at the first such layer from the top, whatever gradient it would pass."""
        hi = len(self._steps) - 1 if hi is None else hi
        for i, step in self._backward_missing:
            if lo <= i <= hi:
                why = ("force_backward is set" if self.net_param.force_backward else
                       "a layer below it learns (lr_mult != 0) and a loss is above it")
                raise NetError(
                    f"has no backward (Caffe's Backward_cpu is NOT_IMPLEMENTED and aborts), "
                    f"and this backward runs it: {why}", step.layer.where,
                    "freeze the layers below it (param { lr_mult: 0 }), keep it off the path "
                    "to the loss, or drop force_backward; the forward alone runs")

    def _backward_sequence(self, lo: int, hi: int) -> BackwardSequence:
        """The backward callbacks of layers ``lo..hi`` watching this pass's layer outputs."""
        sequence = BackwardSequence(self._callbacks, lo, hi)
        for step in self._steps[lo:hi + 1]:
            sequence.watch(step.index, [self._read_value(t, step.index + 1) for t in step.tops])
        return sequence

    def _seed_tensors(self, seeds: Sequence[Tuple[str, Optional[int]]]
                      ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The seeds' values that carry a graph, and their diffs as the gradients to push.

        A seed is ``(blob, index)``: the value layer ``index`` reads (see ``_read_value``), or
        with ``index`` None the blob's data. From ``backward(start=)`` a seed of the start
        layer is its own output, what a layer right above it would read: Caffe's
        BackwardFromTo starts at that layer, so in-place layers above it (a ReLU after the
        start Convolution, the Scale and ReLU after a start BatchNorm) take no part and their
        masks and factors are not applied."""
        tensors, grads = [], []
        for name, index in seeds:
            v = self._values.get(name) if index is None else self._read_value(name, index)
            if v is not None and v.requires_grad and name in self._seedable:
                tensors.append(v)
                diff = self._store.diff_tensor(name)
                grads.append(diff if diff.dtype == v.dtype else diff.to(v.dtype))
        return tensors, grads

    def _rewritten_bottoms(self, lo: int, hi: int) -> Set[str]:
        """The watched bottoms (see ``_backward_reads``) of layers ``lo..hi`` that hold other
        values than the last forward read (NaNs compare equal: a NaN label is no rewrite)."""
        read = self._read_by_forward
        if not read:
            return set()
        if self._store.held:
            self._take_held_writes(read)
        changed: Set[str] = set()
        for index, name in self._backward_reads:
            if lo <= index <= hi and name in read and name not in changed:
                now, then = self._values.get(name), read[name]
                if now is None:
                    continue
                if not same_bits(graph_free(now), then):
                    changed.add(name)
        return changed

    def _replay_graph(self, lo: int, hi: int, dirty: Optional[Set[str]] = None,
                      cut: Optional[int] = None) -> None:
        """Record the graph of layers ``lo..hi`` again from the values they read; their outputs
        replace their ``_written`` entries.

        Caffe's Backward reads the data in the blobs and needs no forward in the same session
        (pycaffe's ``net.backward()`` right after building a net works, BVLC's test_python_layer
        does it); the autograd graph a backward uses is made by a forward, so when none was
        recorded (or a backward freed it, or the layers above a forward(end=...) hold an older
        pass's) the layers with bottoms run again. Each reads what it read in the pass
        (``_read_value``): a range that begins in the middle of an in-place
        chain starts from the output of the chain's layer below it, not from the chain's final
        data (a BatchNorm replayed from the ReLU output would normalize twice). Without a
        recorded pass the blobs' data is read (in-place layers then see their own output: the
        same gradient for ReLU-like layers). Layers without bottoms keep their tops (running a
        data layer would read the next batch); Dropout draws a new mask. The blobs' data stays
        what the pass left (Caffe's Backward never changes it): only a blob's last writer sets
        it, to the value it had. With ``dirty`` (blob names), only the layers that read one of
        them, or a top of a layer replayed before, run again. With ``cut`` (a layer index), a
        bottom made below that layer is read detached, so the new graph begins at it.
        """
        self._push_host_writes()
        values, written = self._values, self._written
        dirty = set(dirty) if dirty is not None else None
        with torch.enable_grad():
            for step in self._steps[lo:hi + 1]:
                if not step.replayed:
                    continue
                if dirty is not None:
                    if dirty.isdisjoint(step.bottoms):
                        continue
                    dirty.update(step.tops)
                bottoms = []
                for name, detach in zip(step.bottoms, step.detach):
                    home, key = self._read_slot(name, step.index)
                    v = home.get(key)
                    if v is None or v.is_inference():  # data_tensor makes an inference one usable
                        v = self._store.data_tensor(name)
                    if cut is not None and v.grad_fn is not None and \
                            self._written_by(name, key) < cut:
                        v = v.detach()  # made below ``cut``: the graph starts here
                    if not v.requires_grad and not detach and self._plan.blob_needs.get(name):
                        v = home[key] = v.detach().requires_grad_(True)
                    bottoms.append(v.detach() if detach else v)
                # Caffe's Backward reads the buffer: the data the pass left (a replay rewrites
                # the blob's data with the same values only, at its last writer, above).
                out = _run_layer_on_buffer(step, bottoms, lambda: _final_value_of(
                    self._store.data_tensor(step.tops[0])))
                outs = (out,) if isinstance(out, torch.Tensor) else out
                for t, v, rewritten in zip(step.tops, outs, step.rewritten_tops):
                    written[(step.index, t)] = v
                    if not rewritten:
                        values[t] = v

    def _accumulate_grads(self, tensors, grads, steps: Sequence[Step], whole: bool = False,
                          retain: bool = False) -> None:
        """Gradients of the seeds w.r.t. the blobs and parameters of ``steps``: blob diffs are
        replaced, parameter diffs accumulate in place as Caffe's do (``.diff`` arrays the user
        holds stay live).

        ``whole`` (the range starts at the first layer, so every leaf below the seeds is one of
        the steps' parameters or a forced input): autograd accumulates each parameter gradient
        into ``.grad`` the moment backward produces it (AccumulateGrad adds in place), while it
        is still in cache, and hooks keep the blobs' gradients as they pass; one fewer sweep
        over every gradient than adding afterwards. A partial range asks ``autograd.grad`` for
        its lowest blobs, which are no leaves (``backward(inputs=...)`` would run their
        ``grad_fn`` and free graph a later call still needs).
        """
        blob_ts = []
        diff_range = self._diff_range(steps[0].index, steps[-1].index)
        for n, key in diff_range.diff_keys:
            home, slot = self._slot(n, key)
            t = home.get(slot)
            if t is not None and t.requires_grad:
                blob_ts.append((n, t))
        params = list({id(p): p for s in steps for p in s.layer.blobs if p.requires_grad}.values())
        # Caffe's Backward overwrites these diffs (a blob no gradient reaches gets zeros, as
        # Caffe writes them). Dropping the old ones before the new gradients are made means two
        # sets of blob diffs are never alive at once (with the line above in _forward_pycaffe:
        # peak RSS of All-CNN-C's pycaffe step at batch 64, 770 -> 687 MB); the seeds' diffs
        # are already held in ``grads``.
        # Diffs whose array a user holds keep their memory, as Caffe's do: the new gradient is
        # copied into it (only those: a copy per blob would cost every pass).
        held_diffs = self._store.held_arrays("diff")
        kept: Dict[str, torch.Tensor] = {}
        for n in diff_range.diff_bottoms:
            old = self._diffs.pop(n, None)
            if old is not None and n in held_diffs:
                kept[n] = old
        try:
            if whole and not self._foreign_graph:
                # Every leaf of the graph is a parameter or a blob leaf of this net: only a
                # caller's tensor (net(data=t), run({...})) can bring leaves of its own, which
                # the gradients must not reach (autograd.grad names what it differentiates).
                got = self._backward_whole(tensors, grads, blob_ts, retain)
            else:
                got = self._backward_by_grad(tensors, grads, blob_ts, params, retain)
        except BaseException:
            # A refused backward (the graph a torch backward freed): the diffs whose arrays a
            # user holds stay the blobs' diffs, or a fresh read would disagree with them.
            self._diffs.update(kept)
            raise
        # Each blob's diff is memory of its own, as Caffe's are: autograd hands one gradient to
        # several tensors (an Eltwise SUM passes its top's on to each bottom, a Concat gives
        # views of it, a seed's diff may pass through unchanged), and a write into one blob's
        # diff (or a parameter diff accumulating) would change the others.
        used = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
        used.update(d.untyped_storage().data_ptr() for n, d in self._diffs.items()
                    if n not in got)
        for n, g in got.items():
            old = kept.get(n)
            if old is not None and old.shape == g.shape and old.dtype == g.dtype:
                old.copy_(g)
                self._diffs[n] = old
                continue
            ptr = g.untyped_storage().data_ptr()
            if ptr in used:
                g = g.clone()
                ptr = g.untyped_storage().data_ptr()
            used.add(ptr)
            self._diffs[n] = g

    def _diff_range(self, lo: int, hi: int) -> "_DiffRange":
        """What a backward over layers ``lo..hi`` reads and writes, made once per range (the
        layers never change after build; every pycaffe backward asks for the same range)."""
        cached = self._diff_ranges.get((lo, hi))
        if cached is None:
            steps = self._steps[lo:hi + 1]
            names = dict.fromkeys(n for s in steps for n in s.bottoms + s.tops)
            below = {id(p) for s in self._steps[:lo] for p in s.layer.blobs}
            cached = self._diff_ranges[(lo, hi)] = _DiffRange(
                diff_keys=tuple((n, self._writer_key(n, self._diff_reader(n, lo, hi)))
                                for n in names),
                diff_bottoms=tuple(n for s in steps for n in s.diff_bottoms),
                shares_below=any(p.requires_grad and id(p) in below
                                 for s in steps for p in s.layer.blobs),
                reads_below=any(r < lo and n not in self._steps[r].tops
                                for n in dict.fromkeys(b for s in steps for b in s.bottoms)
                                for r in self._readers.get(n, ())),
                start_seeds=self._unread_tops(lo, hi))
        return cached

    def _unread_tops(self, lo: int, hi: int) -> Tuple[Tuple[str, int], ...]:
        """The tops of layers ``lo..hi`` whose diff no layer of the range writes, each as
        ``(blob, index)`` of the value a layer right above its writer reads.

        Caffe's BackwardFromTo runs every layer of the range on the diffs its tops hold: the
        start layer's, and also a lower layer's whose top only layers above the range read, or
        layers that write it no diff (``propagate_down: false``), or none (a net output's diff,
        a loss top's weight; after a whole backward, what that pass left). A top a layer of the
        range writes the diff of gets it from that reader (autograd). A blob several layers
        above the range read keeps the sum of their last diffs, as Caffe's Split below them
        sums their split tops' stale diffs; where some readers in the range write theirs, the
        net has no per-reader diffs to add to them (no Split layers)."""
        seeds: List[Tuple[str, int]] = []
        for step in self._steps[lo:hi + 1]:
            if step.index < hi and not step.runs_backward:
                continue  # Caffe runs no Backward of it: its tops' diffs go nowhere
            for t in step.tops:
                # No reader above the writer writes the diff (_diff_reader's rule); a loss top
                # starts from its weight, as in a whole backward.
                if self._diff_reader(t, step.index + 1, hi) > hi or t in self._loss_weights:
                    seeds.append((t, step.index + 1))
        return tuple(seeds)

    def _diff_reader(self, name: str, lo: int, hi: int) -> int:
        """The layer whose read value of blob ``name`` a backward over layers ``lo..hi`` takes
        the gradient of, to leave it as the blob's diff (``hi + 1``: the value the range's top
        layer left).

        Caffe's in-place layers share one blob, and each one's Backward rewrites its diff, so
        after BackwardFromTo the diff is the gradient w.r.t. the value the lowest layer of the
        range that reads the blob read: conv then in-place ReLU, the pre-ReLU gradient; a range
        that ends at the Scale of conv, BatchNorm, Scale, ReLU, the gradient of the BatchNorm
        output; a chain that ended below the range (a backward that starts at the conv above
        a conv + ReLU, as layer-by-layer backward loops do), the final value, so no ReLU
        outside the range masks the diff. A blob no layer of the range reads keeps its diff
        (the gradient of the value the range's top layer left: its seed).

        Only readers whose Backward writes the blob's diff count (``Step.diff_bottoms``): an
        in-place layer that writes no bottom diff (a Scale on a net input, learnable but with no
        input gradient; a layer with ``propagate_down: false``) leaves the shared diff buffer
        as the layers above wrote it, the gradient of its output."""
        # From the lists made at build: a scan of every step per blob made a backward
        # quadratic in the depth (ResNet-152's 500 layers).
        readers = self._readers.get(name, ())
        for k in range(bisect.bisect_left(readers, lo), len(readers)):
            if readers[k] > hi:
                break
            if name in self._steps[readers[k]].diff_bottoms:
                return readers[k]
        return hi + 1

    @staticmethod
    def _backward_whole(tensors, grads, blob_ts, retain: bool) -> Dict[str, torch.Tensor]:
        """One backward over the whole graph: parameter gradients accumulate into ``.grad`` as
        the engine makes them (in place, while in cache), hooks keep the blobs' gradients.
        The engine runs unrestricted: naming the parameters as ``inputs`` cost ~0.2 ms of a
        LeNet step. (Passing the blobs as ``inputs`` makes it store a copy in each one's
        ``.grad``: slower still.)"""
        captured: Dict[str, torch.Tensor] = {}
        leaves = [(n, t) for n, t in blob_ts if t.grad_fn is None]  # forced inputs
        handles = [t.register_hook(functools.partial(captured.__setitem__, n))
                   for n, t in blob_ts if t.grad_fn is not None]
        for _, t in leaves:
            t.grad = None  # an input leaf kept from an earlier pass must not accumulate
        try:
            torch.autograd.backward(tensors, grads, retain_graph=retain)  # see Net.backward
        finally:
            for h in handles:
                h.remove()
        for n, t in leaves:
            if t.grad is not None:
                captured[n] = t.grad
                t.grad = None
        # A hook gets None for an output of a node the seeds reach only through its other
        # outputs (Slice's second top when the range's loss reads the first, or when its only
        # reader has propagate_down: false): no gradient reached that blob, and its diff is
        # left as it was (Caffe's reader writes none), as _backward_by_grad's allow_unused does.
        return {n: graph_free(g) for n, g in captured.items() if g is not None}

    @staticmethod
    def _backward_by_grad(tensors, grads, blob_ts, params, retain: bool
                          ) -> Dict[str, torch.Tensor]:
        inputs = [t for _, t in blob_ts] + params
        if not inputs:  # nothing in the range takes a gradient
            return {}
        got = torch.autograd.grad(tensors, inputs, grads, allow_unused=True, retain_graph=retain)
        for p, g in zip(params, got[len(blob_ts):]):
            if g is not None:
                if p.grad is None and g.stride() != p.stride():
                    # autograd.grad may hand a conv weight's gradient in another layout; a
                    # later whole backward accumulates into .grad and torch warns ("gradient
                    # layout contract") when .grad's strides are not the parameter's.
                    p.grad = torch.empty_like(p, requires_grad=False).copy_(g.detach())
                elif p.grad is None:  # a blob diff sharing it is copied by the caller
                    p.grad = g.detach()
                else:  # in place, as Caffe accumulates: diff arrays the user holds stay live
                    p.grad.add_(g.detach())
        return {n: graph_free(g) for (n, _), g in zip(blob_ts, got[:len(blob_ts)])
                if g is not None}

    def forward_all(self, blobs: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, np.ndarray]:
        """pycaffe ``forward_all``: run all items through in batches, outputs concatenated."""
        outs: Dict[str, List[np.ndarray]] = {n: [] for n in self._output_names(blobs, None)}
        if not kwargs:
            return {k: v.copy() for k, v in self.forward(blobs).items()}
        for k in kwargs:
            self._require_blob(k, "forward_all()")
        kwargs = {k: self._input_array(k, v, "forward_all()") for k, v in kwargs.items()}
        lengths = {k: len(v) for k, v in kwargs.items()}
        n_items = next(iter(lengths.values()))
        if len(set(lengths.values())) > 1:
            raise NetError("forward_all() got inputs of different lengths: " +
                           ", ".join(f"{k} {n}" for k, n in lengths.items()), self.source,
                           "give every input the same number of items")
        batch = self._batch_size("forward_all()", self._net_input_names[0]) \
            if self._net_input_names else n_items
        for lo in range(0, n_items, batch):
            chunk = {}
            for k, v in kwargs.items():
                part = np.asarray(v[lo:lo + batch])
                if len(part) < batch:  # pad the last batch like pycaffe does
                    pad = np.zeros((batch - len(part),) + part.shape[1:], dtype=part.dtype)
                    part = np.concatenate([part, pad])
                chunk[k] = part
            result = self.forward(blobs, **chunk)
            for k in outs:
                outs[k].append(result[k].copy())
        trimmed = {}
        for k, parts in outs.items():
            arr = np.concatenate(parts) if parts and parts[0].ndim else np.asarray(parts)
            trimmed[k] = arr[:n_items] if arr.ndim else arr
        return trimmed

    def _top_reshaped(self, name: str, shape: Shape) -> None:
        """pycaffe reshaped blob ``name``: tell the layers that make it (not in place), so
        that one whose Reshape leaves its tops alone (DummyData) makes that shape from now
        on, as Caffe's next Forward fills the blob at the shape it has."""
        for index in self._writers.get(name, ()):  # not every step: data blobs reshape often
            step = self._steps[index]
            for i, top in enumerate(step.tops):
                if top == name and not (i < len(step.bottoms) and step.bottoms[i] == top):
                    step.layer.take_top_shape(i, shape)

    def reshape(self) -> None:
        """Propagate input shapes through every layer (pycaffe ``net.reshape()``)."""
        for step in self._steps:
            if not step.runs:
                continue
            where = f"{self.source}: layer '{step.name}' (type {step.layer.type})"
            bottom_shapes = [self._shapes[b] for b in step.bottoms]
            shapes = self._infer_top_shapes(step.layer, bottom_shapes, step.tops, where)
            for t, s in zip(step.tops, shapes):
                if t in self._fixed:
                    continue  # DummyDataLayer::Reshape does nothing: the blob keeps its shape
                if tuple(s) == tuple(self._store.shape(t)):
                    # Blob::Reshape to the shape it has keeps its memory: Caffe's data and diff
                    # (a loss top's weight, a diff written for a backward) stay as they are.
                    continue
                self._shapes[t] = tuple(s)
                self._values.pop(t, None)
                self._diffs.pop(t, None)

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed a MemoryData layer from numpy arrays (pycaffe ``net.set_input_arrays``).

        Like pycaffe, the net's first layer must be a MemoryData layer.
        """
        first = self._steps[0].layer if self._steps else None
        if first is None or first.type != "MemoryData":
            raise NetError("set_input_arrays needs a MemoryData layer as the first layer",
                           self.source, "use net.blobs[...].data for Input layers")
        first.set_input_arrays(data, labels)

    @property
    def batch_indices(self) -> Optional[torch.Tensor]:
        """Record indices of the samples in the current batch (from the first data layer)."""
        for step in self._steps:
            idx = getattr(step.layer, "last_indices", None)
            if idx is not None:
                return idx
        return None

    # ------------------------------------------------------------------ weights
    def _named_params(self) -> List[Tuple[str, List[nn.Parameter]]]:
        """(name, parameters) of every layer in order, repeated names included."""
        return [(v.name, list(v.module.blobs)) for v in self._views]

    def _shape_adopters(self) -> List[Callable[[int, Tuple[int, ...]], bool]]:
        """Every layer's ``adopt_stored_shape``, in the order of :meth:`_named_params`."""
        return [v.module.adopt_stored_shape for v in self._views]

    def copy_from(self, path: str) -> List[str]:
        """Load weights from a .caffemodel (or .h5) by layer name (pycaffe ``copy_from``);
        returns the names of the layers copied."""
        from .weights import copy_weights

        path = path_argument(path, "copy_from()")
        self._push_host_writes()  # a pending numpy write must not land on the loaded weights
        return copy_weights(self._named_params(), path, adopters=self._shape_adopters())

    def save(self, path: str, diffs: Optional[Sequence[Sequence[np.ndarray]]] = None) -> None:
        """Write the net with its weights as a .caffemodel (atomically); ``diffs`` (one list of
        arrays per layer, in layer order) are written as the blobs' diffs (Caffe's
        ``snapshot_diff``)."""
        from .weights import atomic_write, net_param_with_weights

        path = path_argument(path, "save()")
        self._push_host_writes()  # numpy edits of GPU weights (net surgery) go in too
        proto = net_param_with_weights(self.net_param, [v.module.blobs for v in self._views], diffs,
                                       phase=int(self.phase),
                                       loss_weights=self._set_up_loss_weights)
        atomic_write(path, proto.SerializeToString())

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s parameter blobs for layers of the same name (Caffe's ShareTrainedLayersWith)."""
        if not isinstance(other, Net):
            raise ArgumentTypeError(f"share_with() takes another Net, got {type(other).__name__}")
        self._push_host_writes()
        other._push_host_writes()
        # Caffe walks the other net's layers in order and shares each into the first layer of
        # its name here: of repeated names, the first layer here gets the last one's blobs.
        theirs = {name: params for name, params in other._named_params() if params}
        replaced: Dict[int, nn.Parameter] = {}
        seen = set()
        for view in self._views:
            name = view.name
            if name in seen or name not in theirs or not view.module.blobs:
                seen.add(name)
                continue
            seen.add(name)
            mine = view.module.blobs
            if len(mine) != len(theirs[name]):
                raise NetError(f"layer '{name}': {len(mine)} blobs here, {len(theirs[name])} in the "
                               "other net", self.source)
            if all(p is q for p, q in zip(theirs[name], mine)):
                continue  # shared already (a solver shares again at each test, as Caffe)
            for i, p in enumerate(theirs[name]):
                # A layer whose forks lay its blobs out differently takes the other net's
                # layout (a BN of yjxiong/caffe loaded by copy_from into one net only).
                if tuple(p.shape) != tuple(mine[i].shape) and \
                        not view.module.adopt_stored_shape(i, tuple(p.shape)):
                    raise NetError(f"layer '{name}' blob {i}: shape {tuple(mine[i].shape)} here, "
                                   f"{tuple(p.shape)} in the other net", self.source)
                replaced[id(mine[i])] = p
                view.module.replace_blob(i, p)
            view.blobs = BlobVec(ParamBlob(p, self._store.dirty) for p in view.module.blobs)
        for info in self._param_infos:
            info.param = replaced.get(id(info.param), info.param)

    # ------------------------------------------------------------------ torch plumbing
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Blob values follow the module (net.to('cuda'), net.double()).
        self._values = {k: fn(v) for k, v in self._values.items()}
        self._diffs = {k: fn(v) for k, v in self._diffs.items()}
        # Where (and in which float type) blobs made later live: what ``fn`` makes of a scalar
        # on the current device (net.double() before any input blob exists, or with no
        # parameters to look at, still makes the inputs double).
        try:
            probe = fn(torch.zeros((), device=self._device, dtype=self._dtype))
        except (RuntimeError, TypeError, ValueError):  # e.g. a memory-format-only conversion
            probe = None
        if probe is not None:
            self._device = probe.device
            if probe.is_floating_point():
                self._dtype = probe.dtype
        return self

    def __repr__(self) -> str:
        return f"Net({self.net_param.name or self.source!r}, {len(self._steps)} layers, " \
               f"phase={'TRAIN' if self.phase == TRAIN else 'TEST'})"

    # ---- pycaffe extras ----
    # The rest of pycaffe's Net surface (python/caffe/pycaffe.py, _caffe.cpp), written in terms of
    # the methods above.
    @property
    def _blobs(self) -> List[Blob]:
        return list(self._blob_table()[1])

    @property
    def _blob_loss_weights(self) -> List[float]:
        return [self._loss_weights.get(n, 0.0) for n in self._shapes]

    def _blob_ids(self, names: Sequence[str]) -> List[int]:
        """Positions in ``_blob_names``/``_blobs`` of the blobs this net keys as ``names``."""
        index = {n: i for i, n in enumerate(self._shapes)}
        return [index[n] for n in names]

    @property
    def _inputs(self) -> List[int]:
        """pycaffe's ``net._inputs``: Caffe's input_blob_indices, positions in ``_blob_names``
        (programs that walk a net by index look these up in ``_top_ids`` and ``_blobs``)."""
        return self._blob_ids(self._net_input_names)

    @property
    def _outputs(self) -> List[int]:
        """pycaffe's ``net._outputs``: Caffe's output_blob_indices, positions in ``_blob_names``
        (an anonymous loss top is never an output)."""
        return self._blob_ids(self._net_output_names)

    def _bottom_ids(self, i: int) -> List[int]:
        """Blob indices (into ``net.blobs``) of layer ``i``'s bottoms."""
        return self._blob_ids(self._steps[i].bottoms)

    def _top_ids(self, i: int) -> List[int]:
        """Blob indices (into ``net.blobs``) of layer ``i``'s tops."""
        return self._blob_ids(self._steps[i].tops)

    def _layer_range(self, caller: str, start: object, end: object) -> Tuple[int, int]:
        """``start`` and ``end`` as layer indices, with the checks Caffe's ForwardFromTo
        (CHECK_GE(start, 0), CHECK_LT(end, layers)) and BackwardFromTo (the same on end and
        start: it runs downwards) make: out of range, Caffe aborts; here a NetError rather than
        a Python negative index or a silent clamp."""
        first = integer_argument(start, f"{caller}() start")
        last = integer_argument(end, f"{caller}() end")
        low, high = (last, first) if caller == "_backward" else (first, last)
        if low < 0 or high >= len(self._steps):
            raise NetError(f"{caller}({start!r}, {end!r}): layer indices out of range for a net "
                           f"of {len(self._steps)} layers", self.source,
                           f"give indices in 0..{len(self._steps) - 1}")
        return first, last

    def _forward(self, start: int, end: int) -> float:
        """Caffe's ForwardFromTo(start, end) by layer index; returns the loss of the layers it
        ran: Caffe sums what each of them returns from Forward, so a range without a loss layer
        gives 0 (layer-by-layer timing scripts call ``_forward(j, j)`` for every layer)."""
        start, end = self._layer_range("_forward", start, end)
        if start > end:  # Caffe's loop runs no layer
            return 0.0
        self._forward_pycaffe(start, end)
        ran = {top for step in self._steps[start:end + 1] for top in step.tops}
        weights = [(name, w) for name, w in self._loss_weights.items() if name in ran]
        return float(self._weighted_loss(weights, self._values).detach())

    def _backward(self, start: int, end: int) -> None:
        """Caffe's BackwardFromTo(start, end): layers ``start`` down to ``end``, by index."""
        start, end = self._layer_range("_backward", start, end)
        if start < end:  # Caffe's loop runs no layer
            return
        self.backward(start=self._layer_names[start], end=self._layer_names[end])

    def clear_param_diffs(self) -> None:
        """Zero every parameter diff (Caffe's ClearParamDiffs)."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def _batch_size(self, caller: str, name: str) -> int:
        """The batch size forward_all and forward_backward_all split their inputs by: blob
        ``name``'s first axis. A blob reshaped to batch 0 made pycaffe's ``_batch`` divide by
        zero and our batch loops raise a bare ValueError: a NetValueError naming the blob."""
        shape = self.blobs[name].shape
        size = shape[0] if shape else 1
        if size < 1:
            raise NetValueError(f"{caller}: the input blob '{name}' has batch size 0, so the "
                                "inputs cannot be split into batches", self.source,
                                f"reshape it to a batch of at least 1: net.blobs['{name}']"
                                ".reshape(...); net.reshape()")
        return size

    def _batch(self, blobs: Dict[str, np.ndarray]):
        """Yield ``{name: array}`` batches of the net's batch size; the last one is zero-padded
        (pycaffe ``Net._batch``)."""
        num = len(next(iter(blobs.values())))
        size = self._batch_size("forward_backward_all()", next(iter(self.blobs)))
        for lo in range(0, num - num % size, size):
            yield {name: arr[lo:lo + size] for name, arr in blobs.items()}
        if num % size:
            rest = num % size
            yield {name: np.concatenate([np.asarray(arr[num - rest:]),
                                         np.zeros((size - rest,) + np.shape(arr)[1:])])
                   for name, arr in blobs.items()}

    def forward_backward_all(self, blobs: Optional[Sequence[str]] = None,
                             diffs: Optional[Sequence[str]] = None, **kwargs):
        """pycaffe ``forward_backward_all``: forward and backward in batches; input arrays and
        output diffs as keywords; returns ``(outputs, diffs)`` dicts of concatenated arrays."""
        from itertools import zip_longest

        outs: Dict[str, list] = {n: [] for n in self._output_names(blobs, None)}
        diffs = _blob_name_list(diffs, "forward_backward_all(diffs=...)")
        grads: Dict[str, list] = {n: [] for n in dict.fromkeys(self.inputs + list(diffs or ()))}
        fwd = self._batch({k: kwargs[k] for k in self.inputs if k in kwargs}) \
            if any(k in kwargs for k in self.inputs) else ([{}] if not kwargs else ())
        bwd = self._batch({k: kwargs[k] for k in self.outputs if k in kwargs}) \
            if any(k in kwargs for k in self.outputs) else ()
        per_batch = set()  # scalar blobs (a loss): one value per batch, as forward_all gives
        for fb, bb in zip_longest(fwd, bwd, fillvalue={}):
            for table, result in ((outs, self.forward(blobs=blobs, **fb)),
                                  (grads, self.backward(diffs=diffs, **bb))):
                for k, v in result.items():
                    v = np.array(v, copy=True)
                    if v.ndim:
                        table[k].extend(v)
                    else:
                        table[k].append(v)
                        per_batch.add(k)
        given = len(next(iter(kwargs.values()))) if kwargs else None
        packed = []
        for table in (outs, grads):
            arrays = {k: np.asarray(v) for k, v in table.items()}
            packed.append({k: a if k in per_batch or not given else a[:given]
                           for k, a in arrays.items()})
        return packed[0], packed[1]

    def as_module(self, outputs: Optional[Sequence[str]] = None,
                  inputs: Optional[Sequence[str]] = None, include_loss: bool = False) -> nn.Module:
        """This net as a plain nn.Module, ``forward(*inputs)`` -> the ``outputs`` blobs, sharing
        the layers and parameters (see :func:`pycaffe_alt.export.as_module`)."""
        from .export.module import as_module

        return as_module(self, outputs, inputs, include_loss)

    def save_hdf5(self, path: str) -> None:
        """Write the weights as Caffe's HDF5 layout ``data/<layer>/<i>`` (pycaffe ``save_hdf5``)."""
        from .solver.snapshot import write_weights_h5
        from .weights import shared_flags

        # Net::ToHDF5 makes a group for every layer and stores only the blobs a layer owns (a
        # blob shared from an earlier layer is left out; loading fills it from its owner).
        path = path_argument(path, "save_hdf5()")
        layers = self._named_params()
        write_weights_h5([(name, [None if shared else p.detach().cpu().numpy()
                                  for p, shared in zip(params, flags)])
                          for (name, params), flags in zip(layers, shared_flags(layers))], path)

    def load_hdf5(self, path: str) -> None:
        """Copy weights from a Caffe HDF5 file by layer name, whatever its file name (pycaffe
        ``load_hdf5``, Caffe's CopyTrainedLayersFromHDF5); blobs a snapshot skipped as shared
        are left alone."""
        from .weights import copy_weights

        path = path_argument(path, "load_hdf5()")
        self._push_host_writes()
        copy_weights(self._named_params(), path, hdf5=True, adopters=self._shape_adopters())

    @property
    def layer_callbacks(self) -> LayerCallbacks:
        """The per-layer callbacks registered with :meth:`before_forward` and its siblings (a
        solver's training pass calls the backward ones, see pycaffe_alt/layer_callbacks.py)."""
        return self._callbacks

    def before_forward(self, callback) -> None:
        """pycaffe master: call ``callback(layer_index)`` before each layer's forward."""
        self._callbacks.add("before_forward", callback, self.source)

    def after_forward(self, callback) -> None:
        """pycaffe master: call ``callback(layer_index)`` after each layer's forward."""
        self._callbacks.add("after_forward", callback, self.source)

    def before_backward(self, callback) -> None:
        """pycaffe master: call ``callback(layer_index)`` before each layer's backward."""
        self._callbacks.add("before_backward", callback, self.source)

    def after_backward(self, callback) -> None:
        """pycaffe master: call ``callback(layer_index)`` after each layer's backward."""
        self._callbacks.add("after_backward", callback, self.source)
    # ---- end of pycaffe extras ----
