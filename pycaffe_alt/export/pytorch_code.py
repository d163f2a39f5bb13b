"""Standalone PyTorch code from a lowered net: one readable ``.py`` file plus its weights (``.pt``).

The file imports torch only. It defines one ``nn.Module`` class whose ``__init__`` has one
attribute per Caffe layer with parameters or a torch module (``self.conv1 = nn.Conv2d(...)``) and
whose ``forward`` is the Caffe net written out in layer order, each line commented with the
layer's name and type; an in-place Caffe layer rebinds the same variable, which is exactly the
order Caffe runs it in. ``load()`` returns the module, in eval mode, with its weights.

Caffe semantics written out explicitly:

* pooling: ``ceil_mode=True`` (Caffe rounds the output size up) where torch's pooling gives
  Caffe's windows; otherwise explicit padding to Caffe's windows (and, for AVE, Caffe's divisor
  as a constant map);
* ``BatchNorm`` + ``Scale``: one ``nn.BatchNorm2d`` with the Scale as its affine part (exact);
  the statistics are already divided by Caffe's scale factor;
* ``HardThreshold`` (the paper's layer): a small class written into the file;
* ``LRN`` across channels: ``nn.LocalResponseNorm`` (the same formula: alpha/size, odd window).

The same module is what the ``torchscript`` and ``export`` formats compile (see those modules).
"""
from __future__ import annotations

import importlib.util
import keyword
import math
import os
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import NetError
from .graph import Graph, Op

_HARD_THRESHOLD = '''
class HardThreshold(nn.Module):
    """Positive hard threshold (the paper's eq. 9/2) with one beta per channel (or one shared).

    RELU_BIAS: max(x - beta, 0); KEEP: x * (x > beta); SHIFT: (x - beta) * (x > beta).
    """

    def __init__(self, channels: int, mode: str, ndim: int, shared: bool = False):
        super().__init__()
        self.mode = mode
        self.beta = nn.Parameter(torch.zeros(() if shared else (channels,)))
        self.shape: List[int] = [1] if shared else [1, channels] + [1] * (ndim - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta.reshape(self.shape)
        if self.mode == "RELU_BIAS":
            return torch.relu(x - beta)
        keep = (x > beta).to(x.dtype)
        if self.mode == "SHIFT":
            return (x - beta) * keep
        return x * keep
'''

_AFFINE = '''
class Affine(nn.Module):
    """Caffe's Scale / Bias layer: x * weight + bias, the parameters laid over axes from ``axis``."""

    shape: List[int]  # declared: TorchScript cannot infer the type of an empty list (num_axes: 0)

    def __init__(self, param_shape: List[int], shape: List[int], weight: bool, bias: bool):
        super().__init__()
        self.shape = shape
        self.weight = nn.Parameter(torch.ones(param_shape)) if weight else None
        self.bias = nn.Parameter(torch.zeros(param_shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x = x * self.weight.reshape(self.shape)
        if self.bias is not None:
            x = x + self.bias.reshape(self.shape)
        return x
'''

_AVE_POOL = '''
class CaffeAvePool(nn.Module):
    """Caffe's AVE pooling where torch's rounding differs: pad to Caffe's windows explicitly,
    average, and rescale each output by kernel area / Caffe's divisor (window clipped to the
    padded input)."""

    def __init__(self, kernel: List[int], stride: List[int], pads: List[int], out: List[int]):
        super().__init__()
        self.kernel, self.stride, self.pads = kernel, stride, pads
        self.register_buffer("window_scale", torch.ones(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pads)
        return F.avg_pool2d(x, self.kernel, self.stride) * self.window_scale
'''


def identifier(name: str, taken: set) -> str:
    """A Python identifier for a Caffe name (``conv1/7x7_s2`` -> ``conv1_7x7_s2``), unique in
    ``taken`` and clear of keywords and nn.Module attributes.

    ASCII only: Python accepts ``свёртка`` as a name, but TorchScript's serializer writes
    non-ASCII attribute names as escapes its own loader rejects; the comment above each line
    keeps the Caffe name as written.
    """
    ident = re.sub(r"[^0-9A-Za-z_]", "_", name)
    if not re.search(r"[0-9A-Za-z]", ident):
        ident = "x"
    if ident[0].isdigit():
        ident = "_" + ident
    while keyword.iskeyword(ident) or hasattr(nn.Module, ident) or ident in taken or ident in (
            "torch", "nn", "F", "self", "os", "List", "Tuple"):
        ident += "_"
    taken.add(ident)
    return ident


def _t(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _f(v: float) -> str:
    v = float(v)
    # repr gives bare inf / nan, which are no Python (or TorchScript) names.
    return repr(v) if math.isfinite(v) else f"float({repr(v)!r})"


# Op kinds that are one torch function of their input.
_UNARY = {"sigmoid": "torch.sigmoid", "tanh": "torch.tanh", "abs": "torch.abs",
          "softplus": "F.softplus"}


class _Writer:
    """Accumulates the pieces of the generated file for one graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.attrs: set = set()
        self.vars: Dict[str, str] = {}
        self.var_taken: set = set()
        self.init: List[str] = []
        self.body: List[str] = []
        self.state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.helpers: List[str] = []

    def var(self, blob: str) -> str:
        if blob not in self.vars:
            self.vars[blob] = identifier(blob, self.var_taken)
        return self.vars[blob]

    def attr(self, op: Op, ctor: str, state: Dict[str, np.ndarray]) -> str:
        a = identifier(op.name, self.attrs)
        self.init.append(f"        self.{a} = {ctor}")
        for key, value in state.items():
            self.state[f"{a}.{key}"] = torch.from_numpy(np.ascontiguousarray(value))
        return f"self.{a}"

    def helper(self, text: str) -> None:
        if text not in self.helpers:
            self.helpers.append(text)

    def emit(self, op: Op) -> None:
        ins = [self.var(b) for b in op.inputs]
        if op.kind in _UNARY:
            expr = f"{_UNARY[op.kind]}({ins[0]})"
        else:
            expr = getattr(self, "_" + op.kind)(op, ins)
        outs = [self.var(t) for t in op.outputs]
        self.body.append(f"        # {op.name} ({op.layer_type})")
        if isinstance(expr, list):  # one expression per output (Split)
            for o, e in zip(outs, expr):
                self.body.append(f"        {o} = {e}")
        else:
            self.body.append(f"        {', '.join(outs)} = {expr}")

    # -- one method per op kind: returns the forward expression -----------------------------------
    def _conv(self, op: Op, ins: List[str]) -> str:
        w = op.params["weight"]
        a = op.attrs
        nd = a["nd"]
        if a["transposed"]:
            cin, cout = w.shape[0], w.shape[1] * a["group"]
            cls = f"nn.ConvTranspose{nd}d"
        else:
            cin, cout = w.shape[1] * a["group"], w.shape[0]
            cls = f"nn.Conv{nd}d"
        ctor = (f"{cls}({cin}, {cout}, kernel_size={_t(a['kernel'])}, stride={_t(a['stride'])}, "
                f"padding={_t(a['pad'])}, dilation={_t(a['dilation'])}, groups={a['group']}, "
                f"bias={'bias' in op.params})")
        return f"{self.attr(op, ctor, op.params)}({ins[0]})"

    def _linear(self, op: Op, ins: List[str]) -> str:
        w = op.params["weight"]
        ctor = f"nn.Linear({w.shape[1]}, {w.shape[0]}, bias={'bias' in op.params})"
        x = ins[0]
        if len(self.graph.shapes[op.inputs[0]]) > op.attrs["axis"] + 1:  # Caffe flattens from axis
            x = f"torch.flatten({x}, {op.attrs['axis']})"
        return f"{self.attr(op, ctor, op.params)}({x})"

    def _max_pool(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        if a["global_"]:
            return f"{self.attr(op, 'nn.AdaptiveMaxPool2d(1)', {})}({ins[0]})"
        if a["torch_exact"]:
            ctor = (f"nn.MaxPool2d({_t(a['kernel'])}, stride={_t(a['stride'])}, "
                    f"padding={_t(a['pad'])}, ceil_mode={a['ceil']})")
        else:
            pads = (a["pad"][1], a["end_pad"][1], a["pad"][0], a["end_pad"][0])
            ctor = (f"nn.Sequential(nn.ConstantPad2d({_t(pads)}, float('-inf')), "
                    f"nn.MaxPool2d({_t(a['kernel'])}, stride={_t(a['stride'])}))")
        return f"{self.attr(op, ctor, {})}({ins[0]})"

    def _ave_pool(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        if a["global_"]:
            return f"{self.attr(op, 'nn.AdaptiveAvgPool2d(1)', {})}({ins[0]})"
        if a["torch_exact"]:
            ctor = (f"nn.AvgPool2d({_t(a['kernel'])}, stride={_t(a['stride'])}, "
                    f"padding={_t(a['pad'])}, ceil_mode={a['ceil']}, count_include_pad=True)")
            return f"{self.attr(op, ctor, {})}({ins[0]})"
        self.helper(_AVE_POOL)
        pads = [a["pad"][1], a["end_pad"][1], a["pad"][0], a["end_pad"][0]]
        ctor = (f"CaffeAvePool({list(a['kernel'])}, {list(a['stride'])}, {pads}, "
                f"{list(a['out'])})")
        return f"{self.attr(op, ctor, op.params)}({ins[0]})"

    def _relu(self, op: Op, ins: List[str]) -> str:
        slope = op.attrs["negative_slope"]
        ctor = f"nn.LeakyReLU({_f(slope)})" if slope else "nn.ReLU()"
        return f"{self.attr(op, ctor, {})}({ins[0]})"

    def _prelu(self, op: Op, ins: List[str]) -> str:
        slope = op.params["slope"].reshape(-1)  # nn.PReLU keeps a shared slope as shape (1,)
        ctor = f"nn.PReLU({slope.shape[0]})"
        return f"{self.attr(op, ctor, {'weight': slope})}({ins[0]})"

    def _elu(self, op: Op, ins: List[str]) -> str:
        ctor = f"nn.ELU({_f(op.attrs['alpha'])})"
        return f"{self.attr(op, ctor, {})}({ins[0]})"

    def _hard_threshold(self, op: Op, ins: List[str]) -> str:
        self.helper(_HARD_THRESHOLD)
        beta = op.params["beta"]
        ndim = len(self.graph.shapes[op.inputs[0]])
        ctor = (f"HardThreshold({1 if op.attrs['shared'] else beta.shape[0]}, "
                f"{op.attrs['mode']!r}, {ndim}, shared={op.attrs['shared']})")
        return f"{self.attr(op, ctor, op.params)}({ins[0]})"

    def _power(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        inner = ins[0]
        if a["scale"] != 1:
            inner = f"{_f(a['scale'])} * {inner}"
        if a["shift"] != 0:
            inner = f"{_f(a['shift'])} + {inner}"
        return f"({inner}) ** {_f(a['power'])}" if a["power"] != 1 else f"({inner})"

    def _lrn(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        if a["across"]:
            ctor = (f"nn.LocalResponseNorm({a['size']}, alpha={_f(a['alpha'])}, "
                    f"beta={_f(a['beta'])}, k={_f(a['k'])})")
            return f"{self.attr(op, ctor, {})}({ins[0]})"
        x = ins[0]
        return (f"{x} * (F.avg_pool2d({x} * {x}, {a['size']}, 1, {(a['size'] - 1) // 2}, "
                f"count_include_pad=True) * {_f(a['alpha'])} + 1.0) ** {_f(-a['beta'])}")

    def _batch_norm(self, op: Op, ins: List[str]) -> str:
        p = op.params
        ndim = len(self.graph.shapes[op.inputs[0]])
        dims = {2: 1, 3: 1, 4: 2, 5: 3}.get(ndim)
        if dims is None:
            raise NetError(f"layer '{op.name}': BatchNorm of a {ndim}-axis blob", None,
                           "the pytorch format takes 2- to 5-axis BatchNorm inputs")
        affine = "weight" in p
        ctor = (f"nn.BatchNorm{dims}d({p['mean'].shape[0]}, eps={_f(op.attrs['eps'])}, "
                f"affine={affine})")
        state = OrderedDict()
        if affine:
            state["weight"], state["bias"] = p["weight"], p["bias"]
        state["running_mean"], state["running_var"] = p["mean"], p["var"]
        state["num_batches_tracked"] = np.array(0, dtype=np.int64)
        return f"{self.attr(op, ctor, state)}({ins[0]})"

    def _affine(self, op: Op, ins: List[str]) -> str:
        self.helper(_AFFINE)
        ref = op.params.get("weight", op.params.get("bias"))
        ctor = (f"Affine({list(ref.shape)}, {list(op.attrs['shape'])}, weight={'weight' in op.params}, "
                f"bias={'bias' in op.params})")
        return f"{self.attr(op, ctor, op.params)}({ins[0]})"

    def _eltwise(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        if a["op"] == "PROD":
            return " * ".join(ins)
        if a["op"] == "MAX":
            expr = ins[0]
            for x in ins[1:]:
                expr = f"torch.maximum({expr}, {x})"
            return expr
        terms = [x if c == 1 else f"{_f(c)} * {x}" for x, c in zip(ins, a["coeffs"] or [1.0] * len(ins))]
        return " + ".join(terms)

    def _concat(self, op: Op, ins: List[str]) -> str:
        return f"torch.cat([{', '.join(ins)}], {op.attrs['axis']})"

    def _softmax(self, op: Op, ins: List[str]) -> str:
        return f"torch.softmax({ins[0]}, {op.attrs['axis']})"

    def _flatten(self, op: Op, ins: List[str]) -> str:
        return f"torch.flatten({ins[0]}, {op.attrs['axis']}, {op.attrs['end_axis']})"

    def _reshape(self, op: Op, ins: List[str]) -> str:
        dims = ", ".join(str(d) for d in op.attrs["shape"])
        return f"{ins[0]}.reshape([{ins[0]}.shape[0], {dims}])"

    def _identity(self, op: Op, ins: List[str]) -> str:
        return ins[0]

    def _exp(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        inner = ins[0] if a["inner_scale"] == 1 else f"{ins[0]} * {_f(a['inner_scale'])}"
        expr = f"torch.exp({inner})"
        return expr if a["outer_scale"] == 1 else f"{expr} * {_f(a['outer_scale'])}"

    def _log(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        x = ins[0] if a["scale"] == 1 else f"{ins[0]} * {_f(a['scale'])}"
        x = x if a["shift"] == 0 else f"{x} + {_f(a['shift'])}"
        expr = f"torch.log({x})"
        return expr if a["base_scale"] == 1 else f"{expr} * {_f(a['base_scale'])}"

    def _clip(self, op: Op, ins: List[str]) -> str:
        return f"torch.clamp({ins[0]}, {_f(op.attrs['min'])}, {_f(op.attrs['max'])})"

    def _swish(self, op: Op, ins: List[str]) -> str:
        beta = op.attrs["beta"]
        inner = ins[0] if beta == 1 else f"{ins[0]} * {_f(beta)}"
        return f"{ins[0]} * torch.sigmoid({inner})"

    def _threshold(self, op: Op, ins: List[str]) -> str:
        return f"({ins[0]} > {_f(op.attrs['threshold'])}).to({ins[0]}.dtype)"

    def _crop(self, op: Op, ins: List[str]) -> str:
        index = ", ".join(f"{a}:{a + n}" for a, n in zip(op.attrs["starts"], op.attrs["sizes"]))
        return f"{ins[0]}[:, {index}]"

    def _slice(self, op: Op, ins: List[str]) -> List[str]:
        axis, start, out = op.attrs["axis"], 0, []
        for size in op.attrs["sizes"]:
            out.append(f"{ins[0]}.narrow({axis}, {start}, {size})")
            start += size
        return out

    def _scale_by(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        if a["shape"]:
            rest = ", ".join(str(d) for d in a["shape"][1:])
            lead = f"{ins[1]}.shape[0]" if a["axis"] == 0 else str(a["shape"][0])
            expr = f"{ins[0]} * {ins[1]}.reshape([{lead}{', ' if rest else ''}{rest}])"
        else:  # one number
            expr = f"{ins[0]} * {ins[1]}"
        if "bias" in op.params:
            name = identifier(f"{op.name}_bias", self.attrs)
            self.init.append(f"        self.register_buffer({name!r}, torch.zeros({_t(a['bias_shape'])}))")
            self.state[name] = torch.from_numpy(op.params["bias"].reshape(a["bias_shape"]).copy())
            expr = f"{expr} + self.{name}"
        return expr

    def _axpy(self, op: Op, ins: List[str]) -> str:
        a, x, y = ins
        ndim = len(self.graph.shapes[op.inputs[1]])
        ones = ", 1" * (ndim - 2)
        return f"{a}.reshape([{a}.shape[0], {a}.shape[1]{ones}]) * {x} + {y}"

    def _permute(self, op: Op, ins: List[str]) -> str:
        return f"{ins[0]}.permute({list(op.attrs['order'])}).contiguous()"

    def _normalize(self, op: Op, ins: List[str]) -> str:
        x, a = ins[0], op.attrs
        dims = "[1, 2]" if a["across_spatial"] else "[1]"
        scale = op.params["scale"]
        name = identifier(f"{op.name}_scale", self.attrs)
        shape = () if scale.ndim == 0 else (1, scale.shape[0]) + (1,) * (
            len(self.graph.shapes[op.inputs[0]]) - 2)
        self.init.append(f"        self.register_buffer({name!r}, torch.ones({_t(shape)}))")
        self.state[name] = torch.from_numpy(scale.reshape(shape).copy())
        flat = f"{x}.reshape([{x}.shape[0], {x}.shape[1], -1])"
        return (f"({flat} / ({flat}.pow(2).sum({dims}, keepdim=True) + {_f(a['eps'])}).sqrt())"
                f".reshape({x}.shape) * self.{name}")

    def _constant(self, op: Op, ins: List[str]) -> str:
        value = op.params["value"]
        name = identifier(op.name, self.attrs)
        self.init.append(f"        self.register_buffer({name!r}, torch.zeros({_t(value.shape)}))")
        self.state[name] = torch.from_numpy(value.copy())
        return f"self.{name}"

    def _shuffle_channel(self, op: Op, ins: List[str]) -> str:
        x, g = ins[0], op.attrs["group"]
        shape = self.graph.shapes[op.inputs[0]]
        rest = ", ".join(str(d) for d in shape[2:])
        rest = f", {rest}" if rest else ""
        return (f"{x}.reshape([{x}.shape[0], {g}, {shape[1] // g}{rest}]).transpose(1, 2)"
                f".reshape([{x}.shape[0], {shape[1]}{rest}])")

    def _interp(self, op: Op, ins: List[str]) -> str:
        a = op.attrs
        off, (h, w) = a["offset"], a["crop"]
        x = ins[0]
        shape = self.graph.shapes[op.inputs[0]]
        if off or (h, w) != tuple(shape[2:]):
            x = f"{x}[:, :, {off}:{off + h}, {off}:{off + w}]"
        if tuple(a["size"]) == (h, w):
            return f"{x}.clone()"
        return f"F.interpolate({x}, size={_t(a['size'])}, mode='bilinear', align_corners=True)"

    def _upsample_nearest(self, op: Op, ins: List[str]) -> str:
        sh, sw = op.attrs["scale"]
        return f"{ins[0]}.repeat_interleave({sh}, 2).repeat_interleave({sw}, 3)"

    def _argmax(self, op: Op, ins: List[str]) -> str:
        # Caffe ranks ties by index, the higher first; torch.argmax takes the first maximum.
        axis, x = op.attrs["axis"], ins[0]
        last = self.graph.shapes[op.inputs[0]][axis] - 1
        return (f"({last} - torch.argmax(torch.flip({x}, [{axis}]), {axis}, keepdim=True))"
                f".to({x}.dtype)")

    def _softmax_loss(self, op: Op, ins: List[str]) -> str:
        x, label = ins
        a = op.attrs
        if a["axis"] != 1:
            raise NetError(f"layer '{op.name}': SoftmaxWithLoss over axis {a['axis']}", None,
                           "the pytorch format writes the loss over axis 1 only")
        # Caffe: -sum log(max(p[label], FLT_MIN)) / normaliser.
        shape = self.graph.shapes[op.inputs[0]]
        # The trailing sizes are written into the list itself: TorchScript types a bare `[]`
        # (the 2-D case) as List[Tensor], and `[n, 1] + []` then fails to compile.
        rest = "".join(f", {d}" for d in shape[2:])
        idx = f"{label}.long().reshape([{x}.shape[0], 1{rest}])"
        return (f"-torch.log(torch.softmax({x}, 1).gather(1, {idx}).clamp_min(1.1754944e-38)).sum() "
                f"/ ({x}.shape[0] * {a['per_item']})")

    def _euclidean_loss(self, op: Op, ins: List[str]) -> str:
        a, b = ins
        return f"(({a} - {b}) ** 2).sum() / {a}.shape[0] / 2"


def generate(graph: Graph, class_name: Optional[str] = None, weights_file: str = "",
             source: str = "") -> Tuple[str, "OrderedDict[str, torch.Tensor]"]:
    """(Python source, state_dict) of a standalone module computing ``graph``.

    ``weights_file``: the file name (next to the .py) that ``load()`` reads by default.
    """
    w = _Writer(graph)
    base = re.sub(r"\W", "", graph.name) or "CaffeNet"
    cls = class_name or identifier(base[0].upper() + base[1:], set())
    args = [w.var(n) for n in graph.inputs]
    for op in graph.ops:
        w.emit(op)
    outs = [w.var(n) for n in graph.outputs]
    ret = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ")"
    rtype = "torch.Tensor" if len(outs) == 1 else "Tuple[" + ", ".join(["torch.Tensor"] * len(outs)) + "]"
    in_doc = ", ".join(f"{n} {_shape_doc(s)}" for n, s in graph.inputs.items())
    lines = [
        f'"""{graph.name}: PyTorch code written by pycaffe_alt convert_model'
        + (f" from {source}." if source else "."),
        "",
        "Needs torch only. load() returns the module (eval mode) with its weights;",
        f"model(*inputs) takes {in_doc}",
        f"and returns {', '.join(graph.outputs)}. Each forward line names the Caffe layer it computes.",
        '"""',
        "import os",
        "from typing import List, Tuple",
        "",
        "import torch",
        "import torch.nn.functional as F",
        "from torch import nn",
        "",
        f"WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), {weights_file!r})",
        "",
    ]
    for h in w.helpers:
        lines += [h.rstrip("\n"), ""]
    lines += [
        "",
        f"class {cls}(nn.Module):",
        f'    """{graph.name} as Caffe computes it at TEST time (inputs: {", ".join(graph.inputs)})."""',
        "",
        "    def __init__(self):",
        "        super().__init__()",
    ]
    lines += w.init or ["        pass"]
    lines += [
        "",
        f"    def forward(self, {', '.join(f'{a}: torch.Tensor' for a in args)}) -> {rtype}:",
    ]
    lines += w.body
    lines += [f"        return {ret}", "", "",
              f"def load(weights: str = WEIGHTS) -> {cls}:",
              f'    """A {cls} in eval mode with the weights in ``weights`` (a torch.save\'d state_dict)."""',
              f"    model = {cls}()",
              "    model.load_state_dict(torch.load(weights, map_location='cpu', weights_only=True))",
              "    return model.eval()", ""]
    text = "\n".join(lines)
    return text, w.state


def _shape_doc(shape) -> str:
    return "(N, " + ", ".join(str(int(d)) for d in shape[1:]) + ")" if len(shape) > 1 else "(N,)"


def write(graph: Graph, path: str, source: str = "") -> Tuple[str, str]:
    """Write ``path`` (.py) and its weights (same name, .pt); returns both paths."""
    base, _ = os.path.splitext(path)
    weights = base + ".pt"
    text, state = generate(graph, weights_file=os.path.basename(weights), source=source)
    with open(path, "w") as f:
        f.write(text)
    torch.save(state, weights)
    return path, weights


def instantiate(graph: Graph, directory: str) -> nn.Module:
    """The generated module, written into ``directory`` and imported from there (TorchScript
    reads the source of what it compiles, so keep the directory until scripting is done); eval
    mode, with the graph's weights loaded through the file's own ``load()``."""
    path, _ = write(graph, os.path.join(directory, "caffe_generated.py"))
    # TorchScript resolves the helper classes through sys.modules: keep the module there.
    return import_generated(path, keep=True).load()


def import_generated(path: str, keep: bool = False):
    """Import a generated ``.py`` file as a module; ``keep``: leave it in ``sys.modules``."""
    name = f"pycaffe_alt_generated_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if not keep:
            sys.modules.pop(name, None)
    return module
