"""A Net lowered to a small, runtime-neutral operator graph: what every export format is written from.

Lowering takes a built :class:`~pycaffe_alt.net.Net` (its TEST-phase layers, their current
parameter values and the blob shapes of its current batch) and produces :class:`Graph`:

* the net inputs (``Input`` layers and the tops of data layers, which become inputs of the data's
  shape: the exported model takes the *transformed* data the data layer would produce);
* one :class:`Op` per computing layer, in Caffe's order, reading and writing Caffe blob names
  (in-place layers read and write the same name, exactly as Caffe runs them);
* the outputs (by default the blobs nobody reads once loss and accuracy layers are gone).

Layers that only move blobs around (``Split``, ``Dropout`` in TEST, ``Silence``) become
``identity`` ops or disappear; loss layers (and ``Accuracy``) are dropped unless asked; a
``BatchNorm`` directly followed by a per-channel ``Scale`` becomes one ``batch_norm`` op with an
affine part (exact: the same two affine maps, composed); layers no format here can express raise
one :class:`~pycaffe_alt.errors.NetError` naming all of them.

Each ``Op.kind`` has a fixed attribute set (see :data:`KINDS`); parameters are float32 numpy
arrays already in the form the op needs (BatchNorm statistics divided by their scale factor, an
InnerProduct weight as ``(num_output, K)``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..errors import NetError
from ..net import ANONYMOUS_TOP
from ..layers.forks import SegNetBN
from ..layers.vision import (AVE, MAX, PoolGeometry, pooled_shape, torch_pool_is_exact,
                             window_counts)

Shape = Tuple[int, ...]

# Layer types that produce data from outside the net: their tops become graph inputs.
DATA_TYPES = {"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData",
              "Python"}
# Layers that compute a metric or a loss from labels; dropped unless loss layers are asked for.
METRIC_TYPES = {"Accuracy"}
# Op kinds and what each carries (attrs; params in brackets).
KINDS = {
    "conv": "nd, stride, pad, dilation, group, transposed [weight, bias?]",
    "linear": "axis [weight (num_output, K), bias?]",
    "max_pool": "kernel, stride, pad, ceil, torch_exact, end_pad, global",
    "ave_pool": "kernel, stride, pad, ceil, torch_exact, end_pad, global [window_scale?]",
    "relu": "negative_slope",
    "prelu": "[slope (C,) or () when shared]",
    "elu": "alpha",
    "hard_threshold": "mode (RELU_BIAS | KEEP | SHIFT), shared [beta]",
    "sigmoid": "", "tanh": "", "abs": "",
    "power": "power, scale, shift",
    "lrn": "size, alpha, beta, k, across",
    "batch_norm": "eps [mean, var, weight?, bias?]",
    "affine": "shape (broadcast shape of the parameters) [weight?, bias?]",
    "eltwise": "op (SUM | PROD | MAX), coeffs",
    "concat": "axis",
    "softmax": "axis",
    "flatten": "axis, end_axis",
    "reshape": "shape (without the batch axis)",
    "identity": "",
    "exp": "inner_scale, outer_scale (outer * exp(inner * x))",
    "log": "scale, shift, base_scale (base_scale * log(shift + scale * x))",
    "softplus": "", "clip": "min, max", "swish": "beta", "threshold": "threshold",
    "crop": "starts, sizes (from axis 1 on)",
    "slice": "axis, sizes (one per output)",
    "scale_by": "shape (the second input's broadcast shape, batch axis first when axis 0) [bias?]",
    "axpy": "",
    "permute": "order",
    "normalize": "across_spatial, eps [scale (C,) or ()]",
    "constant": "[value] (PriorBox: depends on shapes only)",
    "shuffle_channel": "group",
    "interp": "offset, crop (h, w), size (h, w)",
    "upsample_nearest": "scale (h, w)",
    "argmax": "axis",
    "softmax_loss": "axis, normalize (count of valid outputs)",
    "euclidean_loss": "",
}


@dataclass
class Op:
    """One operation: a Caffe layer (or a fused pair) reading and writing Caffe blob names."""

    kind: str
    name: str                                   # the Caffe layer name (the first, when fused)
    inputs: List[str]
    outputs: List[str]
    attrs: Dict[str, object] = field(default_factory=dict)
    params: "OrderedDict[str, np.ndarray]" = field(default_factory=OrderedDict)
    layer_type: str = ""                        # Caffe type(s), for messages and comments


@dataclass
class Graph:
    """A lowered net: named inputs with their shapes, ops in order, named outputs."""

    name: str
    inputs: "OrderedDict[str, Shape]"
    ops: List[Op]
    outputs: List[str]
    shapes: Dict[str, Shape]                    # every blob's shape at the export batch size

    def param_count(self) -> int:
        """Number of stored parameter values (after folding)."""
        return sum(int(a.size) for op in self.ops for a in op.params.values())


def _arr(p) -> np.ndarray:
    return p.detach().cpu().numpy().astype(np.float32, copy=True)


def _is_loss_layer(module) -> bool:
    return bool(getattr(module, "is_loss", False)) or module.type in METRIC_TYPES


class _Lowering:
    """Turns one layer at a time into ops; collects the layers it cannot express."""

    def __init__(self, net, inputs: Sequence[str] = (), read: Optional[Set[str]] = None):
        self.shapes = {n: tuple(b.shape) for n, b in net.blobs.items()}
        self.inputs = set(inputs)  # blobs fed from outside: axis 0 is their batch axis
        # Blobs the exported model reads or returns (None: all): a top nobody reads need not
        # be computed.
        self.read = read
        self.unsupported: List[str] = []

    def lower(self, name: str, module, bottoms: List[str], tops: List[str]) -> List[Op]:
        handler = getattr(self, "_" + module.type.lower(), None)
        if handler is None:
            self.unsupported.append(f"'{name}' ({module.type})")
            return []
        out = handler(name, module, bottoms, tops)
        if out is None:
            return []
        for op in out:
            op.layer_type = op.layer_type or module.type
        return out

    def _reject(self, name: str, module, why: str) -> None:
        self.unsupported.append(f"'{name}' ({module.type}: {why})")

    # -- vision --------------------------------------------------------------------------------
    def _convolution(self, name, m, bottoms, tops, transposed=False):
        if m.axis != 1:
            return self._reject(name, m, f"channel axis {m.axis}")
        ops = []
        for b, t in zip(bottoms, tops):
            params = OrderedDict(weight=_arr(m.weight))
            if m.bias_term:
                params["bias"] = _arr(m.bias)
            g = m.geom
            ops.append(Op("conv", name, [b], [t], dict(
                nd=m.n_spatial, stride=g.stride, pad=g.pad, dilation=g.dilation, group=m.group,
                transposed=transposed, kernel=g.kernel), params))
        return ops

    # The depthwise forks' layers are Convolutions with a group per channel (layers/forks.py).
    _convolutiondepthwise = _depthwiseconvolution = _convolution

    def _deconvolution(self, name, m, bottoms, tops):
        return self._convolution(name, m, bottoms, tops, transposed=True)

    def _innerproduct(self, name, m, bottoms, tops):
        w = _arr(m.weight)
        params = OrderedDict(weight=w.T.copy() if m.transpose else w)
        if m.bias_term:
            params["bias"] = _arr(m.bias)
        return [Op("linear", name, bottoms, tops, dict(axis=m.axis), params)]

    def _pooling(self, name, m, bottoms, tops):
        if len(tops) > 1:
            if self.read is not None and tops[1] not in self.read:
                tops = tops[:1]  # the mask feeds no kept layer (an encoder cut before unpooling)
            else:
                return self._reject(name, m, "the argmax mask top")
        if m.method not in (MAX, AVE):
            return self._reject(name, m, "STOCHASTIC pooling")
        h, w = self.shapes[bottoms[0]][2:]
        if m.global_pooling:
            kind = "max_pool" if m.method == MAX else "ave_pool"
            return [Op(kind, name, bottoms, tops, dict(global_=True))]
        geom = PoolGeometry(m.kernel, m.stride, m.pad, m.ceil)
        oh, ow = pooled_shape(geom, h, w)
        # Extra bottom/right padding that makes a floor-mode pooling with no implicit padding
        # produce exactly Caffe's windows (negative: trailing rows no window reaches).
        end_pad = tuple(max(0, (o - 1) * s + k - p - size)
                        for size, o, k, s, p in zip((h, w), (oh, ow), m.kernel, m.stride, m.pad))
        attrs = dict(global_=False, kernel=tuple(m.kernel), stride=tuple(m.stride),
                     pad=tuple(m.pad), ceil=m.ceil, end_pad=end_pad, out=(oh, ow),
                     torch_exact=torch_pool_is_exact(geom, h, w))
        if m.method == MAX:
            # Caffe gives -FLT_MAX for a window lying wholly past the input; not worth an op.
            if any((o - 1) * s - p >= size for size, o, s, p in zip((h, w), (oh, ow), m.stride, m.pad)):
                return self._reject(name, m, "a pooling window lies wholly outside the input")
            return [Op("max_pool", name, bottoms, tops, attrs)]
        params = OrderedDict()
        # Caffe's AVE divisor is the window clipped to the padded input; after explicit padding
        # every window has kernel_h*kernel_w cells, so one constant map rescales the plain mean.
        rows = np.array(window_counts(h, oh, m.kernel[0], m.stride[0], m.pad[0]), np.float32)
        cols = np.array(window_counts(w, ow, m.kernel[1], m.stride[1], m.pad[1]), np.float32)
        params["window_scale"] = (m.kernel[0] * m.kernel[1] / (rows[:, None] * cols[None, :])
                                  ).astype(np.float32)
        return [Op("ave_pool", name, bottoms, tops, attrs, params)]

    # -- neurons -------------------------------------------------------------------------------
    def _relu(self, name, m, bottoms, tops):
        return [Op("relu", name, bottoms, tops, dict(negative_slope=m.negative_slope))]

    def _prelu(self, name, m, bottoms, tops):
        return [Op("prelu", name, bottoms, tops, dict(shared=m.channel_shared),
                   OrderedDict(slope=_arr(m.slope)))]

    def _elu(self, name, m, bottoms, tops):
        return [Op("elu", name, bottoms, tops, dict(alpha=m.alpha))]

    def _hardthreshold(self, name, m, bottoms, tops):
        mode = "RELU_BIAS" if m.mode == "RELU_BIAS" else m.output  # KEEP or SHIFT
        return [Op("hard_threshold", name, bottoms, tops,
                   dict(mode=mode, shared=m.channel_shared), OrderedDict(beta=_arr(m.beta)))]

    def _sigmoid(self, name, m, bottoms, tops):
        return [Op("sigmoid", name, bottoms, tops)]

    def _tanh(self, name, m, bottoms, tops):
        return [Op("tanh", name, bottoms, tops)]

    def _absval(self, name, m, bottoms, tops):
        return [Op("abs", name, bottoms, tops)]

    def _power(self, name, m, bottoms, tops):
        return [Op("power", name, bottoms, tops, dict(power=m.power, scale=m.scale, shift=m.shift))]

    def _dropout(self, name, m, bottoms, tops):
        # TEST-phase Caffe dropout is the identity (it scales at TRAIN time), except for
        # py-faster-rcnn's scale_train: false, which scales at TEST time instead.
        if m.sample_test:
            return self._reject(name, m, "sample_weights_test: true drops units at test time")
        if m.scale_train:
            return [Op("identity", name, bottoms, tops)]
        return [Op("power", name, bottoms, tops, dict(power=1.0, scale=m.test_scale, shift=0.0))]

    def _exp(self, name, m, bottoms, tops):
        return [Op("exp", name, bottoms, tops, dict(inner_scale=m.inner_scale,
                                                    outer_scale=m.outer_scale))]

    def _log(self, name, m, bottoms, tops):
        return [Op("log", name, bottoms, tops, dict(scale=m.scale, shift=m.shift,
                                                    base_scale=m.base_scale))]

    def _bnll(self, name, m, bottoms, tops):
        return [Op("softplus", name, bottoms, tops)]

    def _clip(self, name, m, bottoms, tops):
        return [Op("clip", name, bottoms, tops, dict(min=m.min, max=m.max))]

    def _swish(self, name, m, bottoms, tops):
        return [Op("swish", name, bottoms, tops, dict(beta=m.beta))]

    def _threshold(self, name, m, bottoms, tops):
        return [Op("threshold", name, bottoms, tops, dict(threshold=m.threshold))]

    def _split(self, name, m, bottoms, tops):
        return [Op("identity", name, bottoms, [t]) for t in tops]

    def _silence(self, name, m, bottoms, tops):
        return None

    # -- normalisation ---------------------------------------------------------------------------
    def _lrn(self, name, m, bottoms, tops):
        return [Op("lrn", name, bottoms, tops, dict(size=m.size, alpha=m.alpha, beta=m.beta,
                                                    k=m.k if m.region == 0 else 1.0,
                                                    across=m.region == 0))]

    def _batchnorm(self, name, m, bottoms, tops):
        if m.use_global_stats is False:
            return self._reject(name, m, "use_global_stats: false normalises with batch statistics")
        factor = float(m.scale_factor.detach()[0])
        inv = 0.0 if factor == 0 else 1.0 / factor
        params = OrderedDict(mean=_arr(m.mean) * inv, var=_arr(m.variance) * inv)
        return [Op("batch_norm", name, bottoms, tops, dict(eps=m.eps), params)]

    def _bn(self, name, m, bottoms, tops):
        if isinstance(m, SegNetBN):
            # SegNet's INFERENCE mode is a per-channel affine map; LEARN normalises every batch
            # with its own statistics, which an exported model would not do.
            if not m.inference or len(tops) > 1:
                return self._reject(name, m, "SegNet's bn_mode LEARN (batch statistics) or its "
                                             "statistics tops; export after setting bn_mode: "
                                             "INFERENCE")
            return [Op("affine", name, bottoms, tops, dict(shape=(m.channels, 1, 1), axis=1),
                       OrderedDict(weight=_arr(m.scale).reshape(-1),
                                   bias=_arr(m.shift).reshape(-1)))]
        # PSPNet's BN at TEST (or frozen): running statistics as stored, slope/bias as affine.
        flat = lambda t: _arr(t).reshape(-1)  # noqa: E731 - (1, C, 1, 1) blobs
        params = OrderedDict(mean=flat(m.mean), var=flat(m.variance), weight=flat(m.slope),
                             bias=flat(m.bias))
        return [Op("batch_norm", name, bottoms, tops, dict(eps=m.eps), params)]

    def _normalize(self, name, m, bottoms, tops):
        return [Op("normalize", name, bottoms, tops,
                   dict(across_spatial=m.across_spatial, eps=m.eps), OrderedDict(scale=_arr(m.scale)))]

    def _scale(self, name, m, bottoms, tops):
        if len(bottoms) == 2:
            return self._scale_by(name, m, bottoms, tops)
        return self._affine(name, m, bottoms, tops, m.weight, m.bias if m.bias_term else None)

    def _scale_by(self, name, m, bottoms, tops):
        """Scale by a second bottom (SENet's excitation): the operand is laid over the first
        bottom's axes from ``axis`` on (at axis 0 it carries the batch axis itself)."""
        x_shape, s_shape = self.shapes[bottoms[0]], self.shapes[bottoms[1]]
        axis = 0 if not s_shape else (m.axis + len(x_shape) if m.axis < 0 else m.axis)
        if axis > 0 and bottoms[1] in self.inputs:
            # An exported input's axis 0 is its batch axis; this one lies over later axes.
            return self._reject(name, m, f"the scale input '{bottoms[1]}' has no batch axis")
        params = OrderedDict()
        if m.bias_term:
            if axis == 0:
                return self._reject(name, m, "a learned bias over the batch axis")
            params["bias"] = _arr(m.bias)
        # A 0-axis operand (one number) multiplies everything: no reshape.
        shape = tuple(s_shape) + (1,) * (len(x_shape) - axis - len(s_shape)) if s_shape else ()
        bias_shape = tuple(params["bias"].shape) + (1,) * (len(x_shape) - axis - params["bias"].ndim) \
            if m.bias_term else ()
        return [Op("scale_by", name, bottoms, tops, dict(shape=shape, axis=axis,
                                                         bias_shape=bias_shape), params)]

    def _bias(self, name, m, bottoms, tops):
        if len(bottoms) != 1:
            return self._reject(name, m, "a second bottom as the bias")
        return self._affine(name, m, bottoms, tops, None, m.bias)

    def _affine(self, name, m, bottoms, tops, weight, bias):
        ndim = len(self.shapes[bottoms[0]])
        axis = m.axis + ndim if m.axis < 0 else m.axis
        ref = weight if weight is not None else bias
        if axis == 0 and ref.dim() > 0:
            return self._reject(name, m, "parameters over the batch axis")
        # Broadcast shape without the batch axis: (C, 1, 1) for a per-channel scale.
        bshape = tuple(ref.shape) + (1,) * (ndim - axis - ref.dim())
        bshape = bshape[-(ndim - 1):] if ref.dim() else ()
        params = OrderedDict()
        if weight is not None:
            params["weight"] = _arr(weight)
        if bias is not None:
            params["bias"] = _arr(bias)
        return [Op("affine", name, bottoms, tops, dict(shape=bshape, axis=axis), params)]

    def _softmax(self, name, m, bottoms, tops):
        return [Op("softmax", name, bottoms, tops, dict(axis=m.axis))]

    # -- structure -----------------------------------------------------------------------------
    def _eltwise(self, name, m, bottoms, tops):
        op = {m.PROD: "PROD", m.SUM: "SUM", m.MAX: "MAX"}[m.op]
        return [Op("eltwise", name, bottoms, tops, dict(op=op, coeffs=list(m.coeffs)))]

    def _concat(self, name, m, bottoms, tops):
        if m.axis == 0:
            return self._reject(name, m, "concatenation along the batch axis")
        return [Op("concat", name, bottoms, tops, dict(axis=m.axis))]

    def _flatten(self, name, m, bottoms, tops):
        start, end = self._flatten_axes(m, bottoms)
        if start == 0:
            return self._reject(name, m, "flattening the batch axis")
        return [Op("flatten", name, bottoms, tops, dict(axis=start, end_axis=end))]

    def _flatten_axes(self, m, bottoms) -> Tuple[int, int]:
        n = len(self.shapes[bottoms[0]])
        p = m.param.flatten_param
        start, end = int(p.axis), int(p.end_axis)
        return (start + n if start < 0 else start, end + n if end < 0 else end)

    def _reshape(self, name, m, bottoms, tops):
        src, dst = self.shapes[bottoms[0]], self.shapes[tops[0]]
        start = m.axis if m.axis >= 0 else len(src) + m.axis + 1
        keeps_batch = start >= 1 or (m.dims and m.dims[0] == 0)
        if not keeps_batch or dst[0] != src[0]:
            return self._reject(name, m, "a reshape that changes the batch axis")
        return [Op("reshape", name, bottoms, tops, dict(shape=tuple(dst[1:])))]

    def _crop(self, name, m, bottoms, tops):
        big, ref = self.shapes[bottoms[0]], self.shapes[bottoms[1]]
        windows = m.windows(big, ref)
        starts, sizes = [0] * (len(big) - 1), list(big[1:])
        for i, off, size in windows:
            if i == 0:
                # The top takes the reference's batch, which an exported model (free batch axis)
                # would not know.
                return self._reject(name, m, "cropping the batch axis (axis 0) to the "
                                             "reference's batch")
            starts[i - 1], sizes[i - 1] = off, size
        # Only the first bottom is read: the reference gives a shape, known at export.
        return [Op("crop", name, bottoms[:1], tops, dict(starts=starts, sizes=sizes))]

    def _slice(self, name, m, bottoms, tops):
        if m.axis == 0:
            return self._reject(name, m, "slicing the batch axis")
        return [Op("slice", name, bottoms, tops,
                   dict(axis=m.axis, sizes=m.sizes(self.shapes[bottoms[0]][m.axis])))]

    def _axpy(self, name, m, bottoms, tops):
        return [Op("axpy", name, bottoms, tops)]

    def _permute(self, name, m, bottoms, tops):
        if m.order[0] != 0:
            return self._reject(name, m, "moving the batch axis")
        return [Op("permute", name, bottoms, tops, dict(order=tuple(m.order)))]

    def _priorbox(self, name, m, bottoms, tops):
        feature, image = self.shapes[bottoms[0]], self.shapes[bottoms[1]]
        value = np.asarray(m.boxes(feature, image), dtype=np.float32)
        return [Op("constant", name, [], tops, {}, OrderedDict(value=value))]

    def _shufflechannel(self, name, m, bottoms, tops):
        return [Op("shuffle_channel", name, bottoms, tops, dict(group=m.group))]

    def _interp(self, name, m, bottoms, tops):
        crop, size = m.sizes(*self.shapes[bottoms[0]][2:4])
        return [Op("interp", name, bottoms, tops, dict(offset=-m.pad_beg, crop=crop, size=size))]

    def _upsample(self, name, m, bottoms, tops):
        if not m.nearest:
            return self._reject(name, m, "SegNet's unpooling needs the pooling's mask top")
        return [Op("upsample_nearest", name, bottoms, tops, dict(scale=tuple(m.scale)))]

    def _argmax(self, name, m, bottoms, tops):
        if m.axis is None or m.axis == 0 or m.top_k != 1 or m.out_max_val:
            return self._reject(name, m, "only the index of the maximum along a non-batch axis "
                                         "(axis set, top_k 1, no out_max_val) is exported")
        return [Op("argmax", name, bottoms, tops, dict(axis=m.axis))]

    # -- losses (only when asked) ----------------------------------------------------------------
    def _softmaxwithloss(self, name, m, bottoms, tops):
        lp = m.param.loss_param
        if lp.HasField("ignore_label") or len(tops) > 1:
            return self._reject(name, m, "ignore_label or a second top")
        if m.class_weights is not None:
            return self._reject(name, m, "SegNet's class_weighting")
        if lp.HasField("normalize") or lp.normalization not in (1, 2):  # VALID, BATCH_SIZE
            return self._reject(name, m, "a normalization other than VALID or BATCH_SIZE")
        shape = self.shapes[bottoms[0]]
        axis = m.param.softmax_param.axis
        axis = axis + len(shape) if axis < 0 else axis
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        # VALID without ignore_label counts every (outer, inner) position: batch * inner.
        per_item = inner if lp.normalization == 1 else 1
        return [Op("softmax_loss", name, bottoms, tops[:1], dict(axis=axis, per_item=per_item))]

    def _euclideanloss(self, name, m, bottoms, tops):
        return [Op("euclidean_loss", name, bottoms, tops[:1])]


def _fold_scales(ops: List[Op], outputs: Set[str]) -> List[Op]:
    """BatchNorm + the per-channel Scale reading it (and nothing else reading BatchNorm's result)
    become one batch_norm op: ``(x - mean) / sqrt(var + eps) * gamma + beta`` is both layers.

    Caffe nets write ``bn`` and ``scale`` in place on the conv's blob; the fold is exact whenever
    the Scale is the only reader of the BatchNorm's value.
    """
    out: List[Op] = []
    skip: Set[int] = set()
    for i, op in enumerate(ops):
        if i in skip:
            continue
        if op.kind == "batch_norm" and "weight" not in op.params:
            nxt = _sole_reader(ops, i, outputs)
            if nxt is not None:
                sc = ops[nxt]
                channels = op.params["mean"].shape[0]
                if (sc.kind == "affine" and sc.attrs["axis"] == 1 and sc.layer_type == "Scale"
                        and "weight" in sc.params and sc.params["weight"].shape == (channels,)):
                    params = OrderedDict(op.params)
                    params["weight"] = sc.params["weight"]
                    params["bias"] = sc.params.get("bias", np.zeros(channels, np.float32))
                    out.append(Op("batch_norm", op.name, op.inputs, sc.outputs, dict(op.attrs),
                                  params, f"BatchNorm+Scale ({sc.name})"))
                    skip.add(nxt)
                    continue
        out.append(op)
    return out


def _sole_reader(ops: List[Op], i: int, outputs: Set[str]) -> Optional[int]:
    """Index of the only op reading the value ops[i] writes, when that op is a one-input op and
    the value is not a graph output; else None."""
    (blob,) = ops[i].outputs
    readers = []
    for j in range(i + 1, len(ops)):
        if blob in ops[j].inputs:
            readers.append(j)
        if blob in ops[j].outputs:
            break
    else:
        if blob in outputs:
            return None
    if len(readers) != 1 or ops[readers[0]].inputs != [blob]:
        return None
    return readers[0]


@dataclass
class PlannedLayer:
    """One layer an exported model runs: its name there, the Net's module, its blob names."""

    name: str
    module: Any
    bottoms: Tuple[str, ...]
    tops: Tuple[str, ...]


@dataclass
class LayerPlan:
    """Which layers of a Net an exported model runs: its inputs, layers (in order), outputs."""

    inputs: List[str]
    layers: List[PlannedLayer]
    outputs: List[str]
    read: Set[str] = field(default_factory=set)  # blobs the layers read or the model returns


def export_names(names: Sequence[str]) -> List[str]:
    """Layer names made unique for an exported model, which names operators and weights after
    layers: Caffe accepts a repeated name (HED's five Crop layers are all 'crop'); the second
    and later of a name get ``_1``, ``_2``... (skipping names the net already uses)."""
    taken, seen, out = set(names), {}, []
    for name in names:
        if name not in seen:
            seen[name] = 0
            out.append(name)
            continue
        while True:
            seen[name] += 1
            candidate = f"{name}_{seen[name]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        out.append(candidate)
    return out


def plan_layers(net, outputs: Optional[Sequence[str]] = None,
                inputs: Optional[Sequence[str]] = None, include_loss: bool = False) -> LayerPlan:
    """Select the layers of a built Net (use ``phase=TEST``) that compute ``outputs``.

    ``outputs``: blob names to return (default: blobs no kept layer reads, sorted as Caffe sorts
    its outputs). ``inputs``: blobs fed from outside (default: the tops of Input and data
    layers, which are replaced by inputs of the data's shape); naming an inner blob cuts the net
    there: a fed blob is its value as the layers after the cut read it, so every layer that
    writes only fed blobs (an in-place rewrite too) is left out. Loss layers are dropped unless
    ``include_loss`` (their label bottoms become inputs); Accuracy and Silence always are.
    """
    steps = net.steps
    layers = [PlannedLayer(name, step.layer, tuple(step.bottoms), tuple(step.tops))
              for name, step in zip(export_names([step.name for step in steps]), steps)]
    blobs = set(net.blobs)
    for kind, names in (("input", inputs), ("output", outputs)):
        for name in names or ():
            if name == ANONYMOUS_TOP:
                # pycaffe lists a loss layer's unnamed top as "(automatic)" (Caffe's
                # Net::AppendTop), a name every such layer shares and no layer can read.
                raise NetError(f"{kind} '{name}' is the hidden top of a loss layer that names "
                               "no top", net.source, "give that loss layer a top: name and "
                               "export that name")
            if name not in blobs:
                listed = list(net.blobs)
                raise NetError(f"{kind} '{name}' is not a blob of this net", net.source,
                               f"blobs: {', '.join(listed[:30])}"
                               f"{f', ... ({len(listed)} in all)' if len(listed) > 30 else ''}")
    fed: List[str] = list(inputs) if inputs is not None else []
    candidates: List[PlannedLayer] = []
    for layer in layers:
        module, bottoms, tops = layer.module, layer.bottoms, layer.tops
        if module.type in DATA_TYPES and not bottoms:
            if inputs is None:
                fed += [t for t in tops if t not in fed]
            continue
        if module.type in METRIC_TYPES or module.type == "Silence":
            continue
        if _is_loss_layer(module) and not include_loss:
            continue
        if inputs is not None and tops and set(tops) <= set(fed):
            continue  # writes only fed blobs (in-place rewrites included): upstream of the cut
        candidates.append(layer)
    if outputs is None:
        # Caffe's rule (Net::Init): walking the layers in order, a layer's bottoms stop being
        # outputs and its tops become ones; a blob rewritten in place stays an output.
        available: Set[str] = set()
        for layer in candidates:
            available -= set(layer.bottoms)
            available |= set(layer.tops)
        outputs = sorted(available)
    outputs = list(outputs)
    # A blob named in ``inputs`` comes from outside, not from the layer that makes it (a cut at
    # one top of a Slice, or below a pooling's mask top). Data layers' tops are fed too, but
    # in-place layers on them still run (their value is the data layer's raw output).
    cut = set(inputs) if inputs is not None else set()
    needed = set(outputs) - cut
    kept: List[PlannedLayer] = []
    for layer in reversed(candidates):
        if needed & set(layer.tops):
            kept.append(layer)
            needed -= set(layer.tops)
            needed |= set(layer.bottoms) - cut
    kept.reverse()
    for layer in kept:
        clash = sorted(cut & set(layer.tops))
        if clash:  # the kept layer would overwrite the value fed from outside
            raise NetError(f"input(s) {', '.join(clash)} are also made by layer '{layer.name}', "
                           "which the outputs need for its other tops "
                           f"({', '.join(t for t in layer.tops if t not in cut)})", net.source,
                           "feed those other tops as inputs too, or cut below the layer")
    read = set(outputs) | {b for layer in kept for b in layer.bottoms}
    missing = sorted(needed - set(fed))
    if missing:
        raise NetError(f"blob(s) {', '.join(missing)} are needed but neither computed by a kept "
                       "layer nor fed as inputs", net.source,
                       "add them to the inputs (--inputs), or keep the loss layers that read them")
    used = [n for n in fed if n in read]
    if inputs is not None:
        unused = [n for n in inputs if n not in read]
        if unused:
            raise NetError(f"input(s) {', '.join(unused)} are not read by the layers that make "
                           f"the outputs {', '.join(outputs)}", net.source,
                           "leave them out of --inputs (or choose outputs that need them)")
    return LayerPlan(used, kept, outputs, read)


def lower_net(net, outputs: Optional[Sequence[str]] = None, inputs: Optional[Sequence[str]] = None,
              include_loss: bool = False) -> Graph:
    """Lower a built Net (use ``phase=TEST``) to a :class:`Graph` (arguments: :func:`plan_layers`).

    Raises one NetError naming every needed layer that has no operator here.
    """
    plan = plan_layers(net, outputs, inputs, include_loss)
    scalars = [n for n in plan.inputs if not net.blobs[n].shape]
    if scalars:
        raise NetError(f"input(s) {', '.join(scalars)} have no axes (one number each); every "
                       "input of an exported model has a batch axis", net.source,
                       "give the blob a shape with a batch axis, e.g. input_param { shape { dim: 1 } }")
    low = _Lowering(net, plan.inputs, plan.read)
    ops: List[Op] = []
    for layer in plan.layers:
        ops.extend(low.lower(layer.name, layer.module, list(layer.bottoms), list(layer.tops)))
    if low.unsupported:
        raise NetError(
            "cannot export layer(s) " + ", ".join(low.unsupported) + ": the export formats have "
            "no operator for them (the other layers convert)", net.source,
            "choose outputs before these layers (--outputs), cut the net above them (--inputs), "
            "or replace them with supported layers (docs/convert.md lists them)")
    # An exported program maps inputs to outputs under distinct names: a net whose only layers
    # work in place on its input (or has none) has nothing of that form to write.
    fed_back = [n for n in plan.outputs if n in plan.inputs]
    if not plan.outputs or not plan.inputs or not ops or fed_back:
        what = (f"the output(s) {', '.join(fed_back)} are also inputs (a layer works in place "
                "on the input blob)") if fed_back else \
            f"it has {len(plan.inputs)} input(s), {len(plan.outputs)} output(s) and " \
            f"{len(ops)} operator(s) between them"
        raise NetError(f"nothing to export: {what}", net.source,
                       "export a net with a layer that writes a new top above its inputs, or "
                       "choose the outputs (--outputs) and inputs (--inputs)")
    ops = _fold_scales(ops, set(plan.outputs))
    graph_inputs = OrderedDict((n, low.shapes[n]) for n in plan.inputs)
    return Graph(net.net_param.name or "CaffeNet", graph_inputs, ops, plan.outputs, low.shapes)
