"""ONNX from a lowered net, written node by node with ``onnx.helper``.

Why not ``torch.onnx.export``: its TorchScript-based exporter writes Caffe's BatchNorm and LRN as
element-wise arithmetic (our layers compute them with plain tensor ops), and the dynamo exporter
needs onnxscript and still decomposes ``F.local_response_norm``. Writing the graph ourselves from
:mod:`.graph` gives each Caffe layer its standard operator (Conv, Gemm, MaxPool, AveragePool,
LRN, BatchNormalization, Softmax, Concat, ...), keeps Caffe's blob names as input/output names,
and needs only the ``onnx`` package (docs/convert.md compares the three).

Caffe semantics in ONNX terms:

* pooling: explicit ``pads`` reaching exactly Caffe's last window (Caffe rounds the output size
  up but drops a window that would start in the padding); ``ceil_mode`` stays 0 so every runtime
  agrees. AVE: ``count_include_pad=1`` then a constant rescale to Caffe's divisor (the window
  clipped to the padded input) where that differs from the kernel area;
* in-place layers: every rewrite of a blob is a new value (``conv1@thr1``); the last one keeps the
  blob's name, so outputs are named as in Caffe;
* the batch axis of every input and output is the symbolic dimension ``batch``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CaffeError, NetError
from .graph import Graph, Op

OPSET = 17  # ONNX 1.12 (2022): what current runtimes (onnxruntime, TensorRT, OpenVINO) all read
# Above this many bytes of weights, they go to a side file (protobuf's 2 GB message limit).
EXTERNAL_DATA_BYTES = 1_800_000_000
# Op kinds that are one ONNX operator of their input, with no attributes.
_UNARY = {"sigmoid": "Sigmoid", "tanh": "Tanh", "abs": "Abs", "identity": "Identity",
          "softplus": "Softplus"}


def require_onnx():
    """The ``onnx`` module, or a CaffeError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise CaffeError("the onnx format needs the 'onnx' package, which is not installed",
                         hint="pip install onnx onnxruntime   (or: pip install pycaffe_alt[export])"
                         ) from None
    return onnx


class _Builder:
    """Nodes, initializers and SSA value names for one graph."""

    def __init__(self, graph: Graph):
        self.onnx = require_onnx()
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.graph = graph
        self.nodes: list = []
        self.inits: list = []
        self.current: Dict[str, str] = {n: n for n in graph.inputs}
        # The op index writing each blob last: that write keeps the plain blob name.
        self.last_writer: Dict[str, int] = {}
        for i, op in enumerate(graph.ops):
            for t in op.outputs:
                self.last_writer[t] = i
        self.taken = set(graph.inputs)
        # Blobs computed from constants only (PriorBox): their batch axis is 1, not symbolic.
        self.static: set = set()
        self.const_names: set = set()
        self.counter = 0

    # -- names ----------------------------------------------------------------------------------
    def value(self, blob: str) -> str:
        return self.current[blob]

    def fresh(self, hint: str) -> str:
        self.counter += 1
        name = f"{hint}#{self.counter}"
        self.taken.add(name)
        return name

    def out_name(self, i: int, op: Op, blob: str) -> str:
        if self.last_writer[blob] == i and blob not in self.graph.inputs:
            name = blob
        else:
            name = f"{blob}@{op.name}"
            while name in self.taken:
                name += "'"
        self.taken.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        # A layer applied to several bottoms (Convolution with 2 bottoms) reuses its weights.
        if name not in self.const_names:
            self.const_names.add(name)
            self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, op: Op, what: str, value: float) -> str:
        return self.const(f"{op.name}.{what}", np.array(value, dtype=np.float32))

    def node(self, op_type: str, inputs: List[str], outputs: List[str], op: Op, **attrs) -> None:
        self.nodes.append(self.helper.make_node(op_type, inputs, outputs,
                                                name=f"{op.name}#{len(self.nodes)}", **attrs))

    # -- the graph ------------------------------------------------------------------------------
    def build(self):
        for i, op in enumerate(self.graph.ops):
            ins = [self.value(b) for b in op.inputs]
            outs = [self.out_name(i, op, t) for t in op.outputs]
            if op.kind in _UNARY:
                self.node(_UNARY[op.kind], ins, outs, op)
            elif hasattr(self, "_" + op.kind):
                getattr(self, "_" + op.kind)(op, ins, outs)
            else:
                raise NetError(f"layer '{op.name}' ({op.layer_type}) has no ONNX form here", None,
                               "export it in the pytorch, torchscript or export format, or "
                               "leave it out (loss layers are left out unless asked)")
            for t, o in zip(op.outputs, outs):
                self.current[t] = o
            if op.kind == "constant" or (op.inputs and all(b in self.static for b in op.inputs)):
                self.static.update(op.outputs)
        h = self.helper
        tp = self.onnx.TensorProto.FLOAT

        def info(name: str, blob: str):
            shape = self.graph.shapes[blob]
            dims = [int(d) for d in shape] if blob in self.static else \
                ["batch"] + [int(d) for d in shape[1:]] if shape else []
            return h.make_tensor_value_info(name, tp, dims)

        inputs = [info(n, n) for n in self.graph.inputs]
        outputs = []
        for blob in self.graph.outputs:
            name = self.current[blob]
            if name != blob:  # an output that is also an input, or never rewritten: name it
                self.nodes.append(h.make_node("Identity", [name], [blob], name=f"{blob}#out"))
            outputs.append(info(blob, blob))
        g = h.make_graph(self.nodes, self.graph.name, inputs, outputs, self.inits)
        model = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)],
                             producer_name="pycaffe_alt")
        model.ir_version = 8  # the IR that opset 17 came with: readable by older runtimes too
        return model

    # -- one method per op kind ---------------------------------------------------------------------
    def _conv(self, op, ins, outs):
        a = op.attrs
        w = self.const(f"{op.name}.weight", op.params["weight"])
        args = [ins[0], w] + ([self.const(f"{op.name}.bias", op.params["bias"])]
                              if "bias" in op.params else [])
        self.node("ConvTranspose" if a["transposed"] else "Conv", args, outs, op,
                  kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                  pads=list(a["pad"]) * 2, dilations=list(a["dilation"]), group=a["group"])

    def _linear(self, op, ins, outs):
        ndim = len(self.graph.shapes[op.inputs[0]])
        if op.attrs["axis"] != 1:
            raise NetError(f"layer '{op.name}' (InnerProduct): axis {op.attrs['axis']}", None,
                           "the onnx format writes InnerProduct over axis 1 only")
        x = ins[0]
        if ndim > 2:
            x = self.fresh(f"{op.inputs[0]}/flat")
            self.node("Flatten", [ins[0]], [x], op, axis=1)
        args = [x, self.const(f"{op.name}.weight", op.params["weight"])]
        if "bias" in op.params:
            args.append(self.const(f"{op.name}.bias", op.params["bias"]))
        self.node("Gemm", args, outs, op, transB=1)

    def _pool_attrs(self, op) -> dict:
        a = op.attrs
        pads = [a["pad"][0], a["pad"][1], a["end_pad"][0], a["end_pad"][1]]
        return dict(kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=pads)

    def _max_pool(self, op, ins, outs):
        if op.attrs["global_"]:
            return self.node("GlobalMaxPool", ins, outs, op)
        self.node("MaxPool", ins, outs, op, **self._pool_attrs(op))

    def _ave_pool(self, op, ins, outs):
        if op.attrs["global_"]:
            return self.node("GlobalAveragePool", ins, outs, op)
        scale = op.params["window_scale"]
        exact = bool(np.all(scale == 1.0))
        mid = outs[0] if exact else self.fresh(f"{op.outputs[0]}/mean")
        self.node("AveragePool", ins, [mid], op, count_include_pad=1, **self._pool_attrs(op))
        if not exact:
            self.node("Mul", [mid, self.const(f"{op.name}.window_scale", scale)], outs, op)

    def _relu(self, op, ins, outs):
        slope = op.attrs["negative_slope"]
        if slope:
            return self.node("LeakyRelu", ins, outs, op, alpha=float(slope))
        self.node("Relu", ins, outs, op)

    def _prelu(self, op, ins, outs):
        ndim = len(self.graph.shapes[op.inputs[0]])
        slope = op.params["slope"]
        # ONNX PRelu broadcasts the slope from the right: (C, 1, 1) for an (N, C, H, W) input.
        slope = slope.reshape((-1,) + (1,) * (ndim - 2)) if slope.ndim else slope.reshape(1)
        self.node("PRelu", [ins[0], self.const(f"{op.name}.slope", slope)], outs, op)

    def _elu(self, op, ins, outs):
        self.node("Elu", ins, outs, op, alpha=float(op.attrs["alpha"]))

    def _hard_threshold(self, op, ins, outs):
        ndim = len(self.graph.shapes[op.inputs[0]])
        beta = op.params["beta"]
        if beta.ndim:
            beta = beta.reshape((1, -1) + (1,) * (ndim - 2))
        b = self.const(f"{op.name}.beta", beta)
        mode = op.attrs["mode"]
        shifted = self.fresh(f"{op.outputs[0]}/shifted")
        if mode == "RELU_BIAS":
            self.node("Sub", [ins[0], b], [shifted], op)
            return self.node("Relu", [shifted], outs, op)
        keep = self.fresh(f"{op.outputs[0]}/support")
        self.node("Greater", [ins[0], b], [keep], op)
        value = ins[0]
        if mode == "SHIFT":
            self.node("Sub", [ins[0], b], [shifted], op)
            value = shifted
        self.node("Where", [keep, value, self.scalar(op, "zero", 0.0)], outs, op)

    def _power(self, op, ins, outs):
        # Caffe's Power: (shift + scale * x) ^ power.
        a = op.attrs
        steps = []
        if a["scale"] != 1:
            steps.append(("Mul", "scale", a["scale"]))
        if a["shift"] != 0:
            steps.append(("Add", "shift", a["shift"]))
        if a["power"] != 1:
            steps.append(("Pow", "power", a["power"]))
        if not steps:
            return self.node("Identity", ins, outs, op)
        x = ins[0]
        for j, (kind, what, v) in enumerate(steps):
            y = outs[0] if j == len(steps) - 1 else self.fresh(f"{op.outputs[0]}/{what}")
            self.node(kind, [x, self.scalar(op, what, v)], [y], op)
            x = y

    def _lrn(self, op, ins, outs):
        a = op.attrs
        if a["across"]:
            return self.node("LRN", ins, outs, op, size=a["size"], alpha=float(a["alpha"]),
                             beta=float(a["beta"]), bias=float(a["k"]))
        # WITHIN_CHANNEL: x * (1 + alpha * mean_{size x size}(x^2))^-beta, pad (size-1)/2.
        x, n = ins[0], op.outputs[0]
        sq, avg, sc, base, powd = (self.fresh(f"{n}/{s}") for s in ("sq", "avg", "sc", "base", "pow"))
        p = (a["size"] - 1) // 2
        self.node("Mul", [x, x], [sq], op)
        self.node("AveragePool", [sq], [avg], op, kernel_shape=[a["size"]] * 2, strides=[1, 1],
                  pads=[p] * 4, count_include_pad=1)
        self.node("Mul", [avg, self.scalar(op, "alpha", a["alpha"])], [sc], op)
        self.node("Add", [sc, self.scalar(op, "one", 1.0)], [base], op)
        self.node("Pow", [base, self.scalar(op, "neg_beta", -a["beta"])], [powd], op)
        self.node("Mul", [x, powd], outs, op)

    def _batch_norm(self, op, ins, outs):
        p = op.params
        c = p["mean"].shape[0]
        weight = p.get("weight", np.ones(c, np.float32))
        bias = p.get("bias", np.zeros(c, np.float32))
        args = [ins[0]] + [self.const(f"{op.name}.{k}", v) for k, v in
                           (("weight", weight), ("bias", bias), ("mean", p["mean"]), ("var", p["var"]))]
        self.node("BatchNormalization", args, outs, op, epsilon=float(op.attrs["eps"]))

    def _affine(self, op, ins, outs):
        shape = tuple(op.attrs["shape"])
        x = ins[0]
        keys = [k for k in ("weight", "bias") if k in op.params]
        for j, key in enumerate(keys):
            v = op.params[key]
            v = v.reshape(shape) if v.ndim else v
            y = outs[0] if j == len(keys) - 1 else self.fresh(f"{op.outputs[0]}/scaled")
            self.node("Mul" if key == "weight" else "Add",
                      [x, self.const(f"{op.name}.{key}", v)], [y], op)
            x = y

    def _eltwise(self, op, ins, outs):
        a = op.attrs
        if a["op"] in ("PROD", "MAX"):
            if a["op"] == "MAX":
                return self.node("Max", ins, outs, op)
            x = ins[0]
            for j, y_in in enumerate(ins[1:]):
                y = outs[0] if j == len(ins) - 2 else self.fresh(f"{op.outputs[0]}/prod")
                self.node("Mul", [x, y_in], [y], op)
                x = y
            return None
        terms = []
        for j, (x, c) in enumerate(zip(ins, a["coeffs"] or [1.0] * len(ins))):
            if c != 1:
                y = self.fresh(f"{op.outputs[0]}/term{j}")
                self.node("Mul", [x, self.scalar(op, f"coeff{j}", c)], [y], op)
                x = y
            terms.append(x)
        self.node("Sum", terms, outs, op)

    def _concat(self, op, ins, outs):
        self.node("Concat", ins, outs, op, axis=op.attrs["axis"])

    def _softmax(self, op, ins, outs):
        self.node("Softmax", ins, outs, op, axis=op.attrs["axis"])

    def _reshape_to(self, op, ins, outs, shape: Sequence[int]):
        target = self.const(f"{op.name}.shape", np.array([0] + [int(d) for d in shape], np.int64))
        self.node("Reshape", [ins[0], target], outs, op)

    def _flatten(self, op, ins, outs):
        ndim = len(self.graph.shapes[op.inputs[0]])
        if op.attrs["axis"] == 1 and op.attrs["end_axis"] == ndim - 1:
            return self.node("Flatten", ins, outs, op, axis=1)
        self._reshape_to(op, ins, outs, self.graph.shapes[op.outputs[0]][1:])

    def _reshape(self, op, ins, outs):
        self._reshape_to(op, ins, outs, op.attrs["shape"])

    def ints(self, op: Op, what: str, values: Sequence[int]) -> str:
        return self.const(f"{op.name}.{what}", np.array([int(v) for v in values], np.int64))

    def _chain(self, op, x: str, outs, steps) -> None:
        """Apply (onnx op, second input or None) steps in turn; the last writes ``outs``."""
        for j, (kind, arg) in enumerate(steps):
            y = outs[0] if j == len(steps) - 1 else self.fresh(f"{op.outputs[0]}/{kind.lower()}")
            self.node(kind, [x] + ([arg] if arg is not None else []), [y], op)
            x = y

    def _exp(self, op, ins, outs):
        a = op.attrs
        steps = ([("Mul", self.scalar(op, "inner", a["inner_scale"]))] if a["inner_scale"] != 1 else [])
        steps.append(("Exp", None))
        if a["outer_scale"] != 1:
            steps.append(("Mul", self.scalar(op, "outer", a["outer_scale"])))
        self._chain(op, ins[0], outs, steps)

    def _log(self, op, ins, outs):
        a = op.attrs
        steps = [("Mul", self.scalar(op, "scale", a["scale"]))] if a["scale"] != 1 else []
        if a["shift"] != 0:
            steps.append(("Add", self.scalar(op, "shift", a["shift"])))
        steps.append(("Log", None))
        if a["base_scale"] != 1:
            steps.append(("Mul", self.scalar(op, "base", a["base_scale"])))
        self._chain(op, ins[0], outs, steps)

    def _clip(self, op, ins, outs):
        self.node("Clip", [ins[0], self.scalar(op, "min", op.attrs["min"]),
                           self.scalar(op, "max", op.attrs["max"])], outs, op)

    def _swish(self, op, ins, outs):
        beta = op.attrs["beta"]
        gate = self.fresh(f"{op.outputs[0]}/gate")
        steps = [("Mul", self.scalar(op, "beta", beta))] if beta != 1 else []
        self._chain(op, ins[0], [gate], steps + [("Sigmoid", None)])
        self.node("Mul", [ins[0], gate], outs, op)

    def _threshold(self, op, ins, outs):
        above = self.fresh(f"{op.outputs[0]}/above")
        self.node("Greater", [ins[0], self.scalar(op, "threshold", op.attrs["threshold"])], [above], op)
        self.node("Cast", [above], outs, op, to=self.onnx.TensorProto.FLOAT)

    def _crop(self, op, ins, outs):
        starts, sizes = op.attrs["starts"], op.attrs["sizes"]
        axes = list(range(1, len(starts) + 1))
        self.node("Slice", [ins[0], self.ints(op, "starts", starts),
                            self.ints(op, "ends", [a + n for a, n in zip(starts, sizes)]),
                            self.ints(op, "axes", axes)], outs, op)

    def _slice(self, op, ins, outs):
        self.node("Split", [ins[0], self.ints(op, "split", op.attrs["sizes"])], outs, op,
                  axis=op.attrs["axis"])

    def _scale_by(self, op, ins, outs):
        a = op.attrs
        laid = ins[1]
        if a["shape"]:
            target = ([0] + list(a["shape"][1:])) if a["axis"] == 0 else list(a["shape"])
            laid = self.fresh(f"{op.inputs[1]}/laid")
            self.node("Reshape", [ins[1], self.ints(op, "shape", target)], [laid], op)
        if "bias" not in op.params:
            return self.node("Mul", [ins[0], laid], outs, op)
        scaled = self.fresh(f"{op.outputs[0]}/scaled")
        self.node("Mul", [ins[0], laid], [scaled], op)
        bias = op.params["bias"].reshape(a["bias_shape"])
        self.node("Add", [scaled, self.const(f"{op.name}.bias", bias)], outs, op)

    def _axpy(self, op, ins, outs):
        a, x, y = ins
        ndim = len(self.graph.shapes[op.inputs[1]])
        laid, prod = self.fresh(f"{op.inputs[0]}/laid"), self.fresh(f"{op.outputs[0]}/ax")
        self.node("Reshape", [a, self.ints(op, "shape", [0, 0] + [1] * (ndim - 2))], [laid], op)
        self.node("Mul", [laid, x], [prod], op)
        self.node("Add", [prod, y], outs, op)

    def _permute(self, op, ins, outs):
        self.node("Transpose", ins, outs, op, perm=list(op.attrs["order"]))

    def _normalize(self, op, ins, outs):
        n = op.outputs[0]
        flat, sq, total, shifted, norm, unit, unflat = (
            self.fresh(f"{n}/{s}") for s in ("flat", "sq", "sum", "eps", "norm", "unit", "shape"))
        self.node("Reshape", [ins[0], self.ints(op, "flat", [0, 0, -1])], [flat], op)
        self.node("Mul", [flat, flat], [sq], op)
        axes = [1, 2] if op.attrs["across_spatial"] else [1]
        self.node("ReduceSum", [sq, self.ints(op, "axes", axes)], [total], op, keepdims=1)
        self.node("Add", [total, self.scalar(op, "eps", op.attrs["eps"])], [shifted], op)
        self.node("Sqrt", [shifted], [norm], op)
        self.node("Div", [flat, norm], [unit], op)
        shape = self.fresh(f"{n}/in_shape")
        self.node("Shape", [ins[0]], [shape], op)
        self.node("Reshape", [unit, shape], [unflat], op)
        scale = op.params["scale"]
        ndim = len(self.graph.shapes[op.inputs[0]])
        if scale.ndim:
            scale = scale.reshape((1, -1) + (1,) * (ndim - 2))
        self.node("Mul", [unflat, self.const(f"{op.name}.scale", scale)], outs, op)

    def _constant(self, op, ins, outs):
        self.node("Identity", [self.const(f"{op.name}.value", op.params["value"])], outs, op)

    def _shuffle_channel(self, op, ins, outs):
        shape = self.graph.shapes[op.inputs[0]]
        g, rest = op.attrs["group"], list(shape[2:])
        grid, swapped = self.fresh(f"{op.outputs[0]}/grid"), self.fresh(f"{op.outputs[0]}/swapped")
        self.node("Reshape", [ins[0], self.ints(op, "grid", [0, g, shape[1] // g] + rest)], [grid], op)
        perm = [0, 2, 1] + list(range(3, 3 + len(rest)))
        self.node("Transpose", [grid], [swapped], op, perm=perm)
        self.node("Reshape", [swapped, self.ints(op, "shape", [0, shape[1]] + rest)], outs, op)

    def _interp(self, op, ins, outs):
        a = op.attrs
        off, (h, w) = a["offset"], a["crop"]
        x = ins[0]
        if off or (h, w) != tuple(self.graph.shapes[op.inputs[0]][2:]):
            x = self.fresh(f"{op.inputs[0]}/crop")
            self.node("Slice", [ins[0], self.ints(op, "starts", [off, off]),
                                self.ints(op, "ends", [off + h, off + w]),
                                self.ints(op, "axes", [2, 3])], [x], op)
        if tuple(a["size"]) == (h, w):
            return self.node("Identity", [x], outs, op)
        # Resize needs the full output size: (N, C) of the input, then the fork's (h, w).
        shape, lead, sizes = (self.fresh(f"{op.outputs[0]}/{s}") for s in ("shape", "nc", "sizes"))
        self.node("Shape", [x], [shape], op)
        self.node("Slice", [shape, self.ints(op, "zero", [0]), self.ints(op, "two", [2])], [lead], op)
        self.node("Concat", [lead, self.ints(op, "size", a["size"])], [sizes], op, axis=0)
        self.node("Resize", [x, "", "", sizes], outs, op, mode="linear",
                  coordinate_transformation_mode="align_corners")

    def _upsample_nearest(self, op, ins, outs):
        # top[h][w] = bottom[h / s][w / s]: nearest with asymmetric coordinates, rounding down.
        sh, sw = op.attrs["scale"]
        scales = self.const(f"{op.name}.scales", np.array([1, 1, sh, sw], np.float32))
        self.node("Resize", [ins[0], "", scales], outs, op, mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def _argmax(self, op, ins, outs):
        # Caffe ranks ties by index, the higher first: select_last_index.
        index = self.fresh(f"{op.outputs[0]}/index")
        self.node("ArgMax", ins, [index], op, axis=op.attrs["axis"], keepdims=1, select_last_index=1)
        self.node("Cast", [index], outs, op, to=self.onnx.TensorProto.FLOAT)


def to_model(graph: Graph):
    """The ``onnx.ModelProto`` of ``graph`` (checked with ``onnx.checker``)."""
    onnx = require_onnx()
    model = _Builder(graph).build()
    onnx.checker.check_model(model)
    return model


def write(graph: Graph, path: str) -> str:
    """Write ``graph`` as one .onnx file (weights inside unless they pass protobuf's 2 GB limit,
    then ``PATH.data`` beside it); returns the path."""
    onnx = require_onnx()
    model = to_model(graph)
    if graph.param_count() * 4 > EXTERNAL_DATA_BYTES:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + ".data")
    else:
        onnx.save(model, path)
    return path


def run_onnxruntime(path: str, inputs: Dict[str, np.ndarray],
                    outputs: Optional[Sequence[str]] = None, threads: int = 1) -> List[np.ndarray]:
    """Run an .onnx file with onnxruntime (CPU) on named numpy inputs."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CaffeError("checking an onnx file needs 'onnxruntime', which is not installed",
                         hint="pip install onnxruntime   (or: pip install pycaffe_alt[export]); "
                              "or convert with --no-verify") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(list(outputs) if outputs else None, inputs)


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def op_counts(path: str) -> Tuple[int, Dict[str, int]]:
    """(node count, {op type: count}) of an .onnx file."""
    onnx = require_onnx()
    model = onnx.load(path, load_external_data=False)
    counts: Dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return len(model.graph.node), counts
