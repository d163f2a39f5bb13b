"""Net-level audit of forward and backward semantics against an independent Caffe simulator.

The simulator below is a float64 numpy transcription of what BVLC Caffe's Net does (net.cpp,
insert_splits.cpp and the layers' Forward_cpu/Backward_cpu), written without the project's
net machinery:

- InsertSplits: a blob version read by several bottoms gets a Split layer right after its
  producer; the readers read the split's tops, and Split's backward sums their diffs.
- In-place layers share ONE data buffer and ONE diff buffer per blob: each layer's Backward reads
  the buffers as they are when it runs (a ReLU's mask comes from the chain's final value) and
  writes its bottom diff into the same diff buffer.
- Net::Init's need-backward analysis on the split net (blob_need_backward, propagate_down,
  blobs_under_loss, blobs_skip_backp, force_backward with AllowForceBackward) and param
  propagate_down (lr_mult != 0, or force_backward).
- Loss tops hold their loss weight as diff; parameter diffs accumulate (shared blobs sum their
  users' contributions).

Random small nets (seeded) mixing fan-out, in-place chains, residual joins, Concat, Slice, shared
and frozen parameters, propagate_down and a non-loss output are run through ``pycaffe_alt`` and
compared blob by blob (data after forward; every blob's diff, every parameter diff after
backward), for whole and partial (``start=``/``end=``) backward passes.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import NetError

FWD_TOL, GRAD_TOL = 1e-4, 1e-3
Arr = np.ndarray


# -- net description shared by the prototxt writer and the simulator ----------------------------
@dataclass
class LayerSpec:
    name: str
    type: str
    bottoms: List[str]
    tops: List[str]
    cfg: Dict[str, float] = field(default_factory=dict)
    params: List[Arr] = field(default_factory=list)  # the same array object where shared
    pnames: List[Optional[str]] = field(default_factory=list)  # param { name } (sharing)
    lr_mult: List[Optional[float]] = field(default_factory=list)  # None: not written
    propagate_down: List[bool] = field(default_factory=list)
    loss_weight: List[float] = field(default_factory=list)


@dataclass
class NetSpec:
    inputs: Dict[str, Arr]
    layers: List[LayerSpec]
    force_backward: bool
    phase: int = caffe.TEST
    labels: Tuple[str, ...] = ()  # inputs that hold class indices


def _layer_text(l: LayerSpec) -> str:
    out = [f'layer {{ name: "{l.name}" type: "{l.type}"']
    out += [f'bottom: "{b}"' for b in l.bottoms] + [f'top: "{t}"' for t in l.tops]
    for i in range(len(l.params)):
        entries = []
        if l.pnames and l.pnames[i]:
            entries.append(f'name: "{l.pnames[i]}"')
        if l.lr_mult and l.lr_mult[i] is not None:
            entries.append(f"lr_mult: {l.lr_mult[i]}")
        if entries or any(l.pnames or ()) or any(m is not None for m in l.lr_mult or ()):
            out.append("param { " + " ".join(entries) + " }")
    out += [f"propagate_down: {str(p).lower()}" for p in l.propagate_down]
    out += [f"loss_weight: {w}" for w in l.loss_weight]
    c, t = l.cfg, l.type
    if t == "Convolution":
        out.append(f"convolution_param {{ num_output: {l.params[0].shape[0]} "
                   f"kernel_size: {l.params[0].shape[2]} pad: {int(c['pad'])} }}")
    elif t == "InnerProduct":
        out.append(f"inner_product_param {{ num_output: {l.params[0].shape[0]} }}")
    elif t == "ReLU":
        out.append(f"relu_param {{ negative_slope: {c.get('slope', 0.0)} }}")
    elif t == "BatchNorm":
        out.append("batch_norm_param { eps: 1e-5 }")
    elif t == "Scale":
        out.append(f"scale_param {{ bias_term: {str(len(l.params) == 2).lower()} }}")
    elif t == "Eltwise":
        op = c["op"]
        coeffs = "".join(f" coeff: {k}" for k in c.get("coeff", ()))
        out.append(f"eltwise_param {{ operation: {op}{coeffs} }}")
    elif t == "Slice":
        out.append(f"slice_param {{ axis: 1 slice_point: {int(c['point'])} }}")
    elif t == "Pooling":
        out.append(f"pooling_param {{ pool: {c['pool']} kernel_size: 2 stride: 2 }}")
    elif t == "Power":
        out.append(f"power_param {{ power: {c['power']} scale: {c['scale']} shift: {c['shift']} }}")
    elif t == "Dropout":
        out.append("dropout_param { dropout_ratio: 0.5 }")
    return " ".join(out) + " }\n"


def prototxt(spec: NetSpec) -> str:
    text = "force_backward: true\n" if spec.force_backward else ""
    for name, arr in spec.inputs.items():
        dims = " ".join(f"dim: {d}" for d in arr.shape)
        text += (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
                 f'input_param {{ shape {{ {dims} }} }} }}\n')
    return text + "".join(_layer_text(l) for l in spec.layers)


def build_net(spec: NetSpec) -> caffe.Net:
    fd, path = tempfile.mkstemp(suffix=".prototxt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(prototxt(spec))
        net = caffe.Net(path, spec.phase)
    finally:
        os.unlink(path)
    for l in spec.layers:
        for i, p in enumerate(l.params):
            net.params[l.name][i].data[...] = p
    for k, v in spec.inputs.items():
        net.blobs[k].data[...] = v
    return net


# -- the simulator: Caffe's layers, one buffer per blob --------------------------------------------
@dataclass
class SimLayer:
    name: str
    type: str
    bottoms: List[str]
    tops: List[str]
    spec: Optional[LayerSpec]  # None for a Split
    param_ids: List[int] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    need: bool = False
    bottom_need: List[bool] = field(default_factory=list)
    param_need: List[bool] = field(default_factory=list)
    state: dict = field(default_factory=dict)


def _conv_fwd(x: Arr, w: Arr, b: Arr, pad: int) -> Arr:
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    y = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for u in range(k):
        for v in range(k):
            y += np.einsum("oc,ncij->noij", w[:, :, u, v], xp[:, :, u:u + ho, v:v + wo])
    return y + b[None, :, None, None]


def _conv_bwd(x: Arr, w: Arr, dy: Arr, pad: int) -> Tuple[Arr, Arr, Arr]:
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = dy.shape[2], dy.shape[3]
    dw, dxp = np.zeros_like(w), np.zeros_like(xp)
    for u in range(k):
        for v in range(k):
            dw[:, :, u, v] = np.einsum("noij,ncij->oc", dy, xp[:, :, u:u + ho, v:v + wo])
            dxp[:, :, u:u + ho, v:v + wo] += np.einsum("oc,noij->ncij", w[:, :, u, v], dy)
    dx = dxp[:, :, pad:pad + x.shape[2], pad:pad + x.shape[3]]
    return dx, dw, dy.sum(axis=(0, 2, 3))


def _per_channel(p: Arr, x: Arr) -> Arr:
    """A per-channel (axis 1) parameter broadcast against ``x``."""
    return p.reshape((1, -1) + (1,) * (x.ndim - 2))


def _windows(x: Arr) -> Arr:
    """2x2 stride-2 windows as the last axis, in Caffe's scan order (h, then w)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, h // 2, w // 2, 4)


def _unwindows(x: Arr) -> Arr:
    n, c, ho, wo, _ = x.shape
    return x.reshape(n, c, ho, wo, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho * 2, wo * 2)


class CaffeSim:
    """Net::Init, ForwardFromTo and BackwardFromTo of Caffe on a NetSpec."""

    def __init__(self, spec: NetSpec):
        self.spec = spec
        self.params: List[Arr] = []  # learnable blobs, shared ones once
        self.pdiff: List[Arr] = []
        ids: Dict[int, int] = {}
        self.layers: List[SimLayer] = []
        for name in spec.inputs:
            self.layers.append(SimLayer(name, "Input", [], [name], None))
        for l in spec.layers:
            sl = SimLayer(l.name, l.type, list(l.bottoms), list(l.tops), l)
            for p in l.params:
                if id(p) not in ids:
                    ids[id(p)] = len(self.params)
                    self.params.append(p.astype(np.float64).copy())
                    self.pdiff.append(np.zeros(p.shape))
                sl.param_ids.append(ids[id(p)])
            self.layers.append(sl)
        self._insert_splits()
        self._need_backward()
        self.data: Dict[str, Arr] = {}
        self.diff: Dict[str, Arr] = {}

    # insert_splits.cpp
    def _insert_splits(self) -> None:
        last_top: Dict[str, Tuple[int, int]] = {}
        source: Dict[Tuple[int, int], Tuple[int, int]] = {}
        count: Dict[Tuple[int, int], int] = defaultdict(int)
        for i, l in enumerate(self.layers):
            for j, b in enumerate(l.bottoms):
                source[(i, j)] = last_top[b]
                count[last_top[b]] += 1
            for j, t in enumerate(l.tops):
                last_top[t] = (i, j)
                if l.spec is not None and j < len(l.spec.loss_weight) and l.spec.loss_weight[j]:
                    count[(i, j)] += 1
        used: Dict[Tuple[int, int], int] = defaultdict(int)
        out: List[SimLayer] = []
        for i, l in enumerate(self.layers):
            for j, b in enumerate(l.bottoms):
                src = source[(i, j)]
                if count[src] > 1:
                    l.bottoms[j] = self._split_name(src, used[src])
                    used[src] += 1
            out.append(l)
            for j, t in enumerate(l.tops):
                if count[(i, j)] > 1:
                    out.append(SimLayer(f"{t}_split", "Split", [t],
                                        [self._split_name((i, j), k) for k in range(count[(i, j)])],
                                        None))
        self.layers = out

    def _split_name(self, src: Tuple[int, int], k: int) -> str:
        i, j = src
        return f"{self.layers[i].tops[j]}__{i}_{j}_split_{k}"

    # Net::Init's need-backward analysis
    def _need_backward(self) -> None:
        blob_need: Dict[str, bool] = {}
        for l in self.layers:
            s = l.spec
            need = False
            for j, b in enumerate(l.bottoms):
                flag = blob_need[b]
                need |= flag
                if s is not None and s.propagate_down:
                    flag = s.propagate_down[j]
                l.bottom_need.append(flag)
            for t in l.tops:
                blob_need.setdefault(t, False)
            if s is not None:
                l.loss = list(s.loss_weight) or [1.0 if s.type.endswith("Loss") and j == 0 else 0.0
                                                 for j in range(len(l.tops))]
                l.param_need = [(m if m is not None else 1.0) != 0
                                for m in (s.lr_mult or [None] * len(s.params))]
                need |= any(l.param_need)
            else:
                l.loss = [0.0] * len(l.tops)
            l.need = need
            if need:
                for t in l.tops:
                    blob_need[t] = True
        under_loss, skip = set(), set()
        for l in reversed(self.layers):
            contributes = any(w or t in under_loss for t, w in zip(l.tops, l.loss))
            skip_down = all(t in skip for t in l.tops)
            if l.need and skip_down:
                l.need = False
                l.bottom_need = [False] * len(l.bottoms)
            if not contributes:
                l.need = False
            for j, b in enumerate(l.bottoms):
                if contributes:
                    under_loss.add(b)
                else:
                    l.bottom_need[j] = False
                if not l.bottom_need[j]:
                    skip.add(b)
        if self.spec.force_backward:
            for l in self.layers:
                l.need = True
                l.bottom_need = [n or not (l.type == "SoftmaxWithLoss" and j == 1)
                                 for j, n in enumerate(l.bottom_need)]
                l.param_need = [True] * len(l.param_ids)

    def splits_below(self, end: int) -> List[str]:
        """The blobs whose Split sits below layer ``end`` and feeds a layer at or above it:
        ``backward(end=)`` there does not run the Split, so Caffe writes no diff for the blob
        (its readers' diffs stay in the split tops; known divergence (a))."""
        read_above = {b for l in self.layers[end:] for b in l.bottoms}
        return [l.bottoms[0] for l in self.layers[:end]
                if l.type == "Split" and not read_above.isdisjoint(l.tops)]

    def index(self, name: str) -> int:
        return next(i for i, l in enumerate(self.layers) if l.name == name)

    def is_split(self, name: str) -> bool:
        return "_split_" in name

    # Net::ForwardFromTo
    def forward(self) -> None:
        for name, v in self.spec.inputs.items():
            self.data[name] = v.astype(np.float64).copy()
        for l in self.layers:
            if l.type != "Input":
                tops = self._fwd(l, [self.data[b] for b in l.bottoms])
                for t, v in zip(l.tops, tops):
                    self.data[t] = v
        for name, v in self.data.items():
            self.diff[name] = np.zeros_like(v)
        for l in self.layers:
            for t, w in zip(l.tops, l.loss):
                if w:
                    self.diff[t] = np.full_like(self.data[t], w)

    # Net::BackwardFromTo
    def backward(self, start: Optional[int] = None, end: int = 0,
                 stale_splits: bool = True) -> None:
        """With ``stale_splits`` False, the Splits of the range act as the net without Split
        layers does (known divergence (b)): one whose tops' diffs layers of the range write sums
        those only (it forgets what readers above the range wrote in their last Backward); one
        whose readers in the range write no diff does not run, so the layer below reads the
        blob's own diff (Caffe's sums its tops' stale diffs, which after an in-place chain below
        the Split are not what the blob's diff was left holding)."""
        start = len(self.layers) - 1 if start is None else start
        idle: List[int] = []
        if not stale_splits:
            pos = {b: i for i, l in enumerate(self.layers) for b in l.bottoms}
            writes = {b for l in self.layers[end:start + 1] if l.need
                      for b, n in zip(l.bottoms, l.bottom_need) if n}
            for i in range(end, start + 1):
                l = self.layers[i]
                if l.type != "Split":
                    continue
                if writes.isdisjoint(l.tops):
                    idle.append(i)
                for t in l.tops:
                    if pos[t] > start:
                        self.diff[t] = np.zeros_like(self.diff[t])
        for i in range(start, end - 1, -1):
            l = self.layers[i]
            if l.need and l.type != "Input" and i not in idle:
                got = self._bwd(l, [self.diff[t] for t in l.tops])
                for j, g in got.items():
                    if l.bottom_need[j]:
                        self.diff[l.bottoms[j]] = g

    def _p(self, l: SimLayer, k: int) -> Arr:
        return self.params[l.param_ids[k]]

    def _acc(self, l: SimLayer, k: int, g: Arr) -> None:
        if l.param_need[k]:
            self.pdiff[l.param_ids[k]] += g

    def _fwd(self, l: SimLayer, xs: List[Arr]) -> List[Arr]:
        c = l.spec.cfg if l.spec is not None else {}
        t, st = l.type, l.state
        x = xs[0]
        if t == "Split":
            return [x.copy() for _ in l.tops]
        if t == "Convolution":
            return [_conv_fwd(x, self._p(l, 0), self._p(l, 1), int(c["pad"]))]
        if t == "InnerProduct":
            return [x.reshape(len(x), -1) @ self._p(l, 0).T + self._p(l, 1)]
        if t == "ReLU":
            return [np.where(x > 0, x, x * c.get("slope", 0.0))]
        if t == "Sigmoid":
            return [1 / (1 + np.exp(-x))]
        if t == "TanH":
            return [np.tanh(x)]
        if t == "Dropout":  # TEST phase only
            return [x.copy()]
        if t == "Power":
            st["x"] = x.copy()  # the true gradient (deliberate divergence from in-place Caffe)
            return [(c["shift"] + c["scale"] * x) ** c["power"]]
        if t == "BatchNorm":
            mean, var, fac = (self._p(l, k) for k in range(3))
            if self.spec.phase == caffe.TRAIN:
                axes = (0, 2, 3)
                m = x.size // x.shape[1]
                mu = x.mean(axis=axes)
                v = (x ** 2).mean(axis=axes) - mu ** 2
                fac *= 0.999
                fac += 1
                mean *= 0.999
                mean += mu
                var *= 0.999
                var += v * (m / (m - 1) if m > 1 else 1)
            else:
                s = 0.0 if fac[0] == 0 else 1 / fac[0]
                mu, v = mean * s, var * s
            std = np.sqrt(v + 1e-5)[None, :, None, None]
            y = (x - mu[None, :, None, None]) / std
            st["std"], st["y"] = std, y.copy()
            return [y]
        if t == "Scale":
            st["x"] = x.copy()  # ScaleLayer keeps a copy of an in-place bottom (temp_)
            y = x * _per_channel(self._p(l, 0), x)
            if len(l.param_ids) == 2:
                y = y + _per_channel(self._p(l, 1), x)
            return [y]
        if t == "Eltwise":
            op = c["op"]
            if op == "SUM":
                coeff = c.get("coeff") or [1.0] * len(xs)
                return [sum(k * b for k, b in zip(coeff, xs))]
            if op == "PROD":
                return [np.prod(np.stack(xs), axis=0)]
            y = np.where(xs[0] > xs[1], xs[0], xs[1])  # bottoms 0, 1: ties go to 1
            mask = np.where(xs[0] > xs[1], 0, 1)
            for k in range(2, len(xs)):
                mask = np.where(xs[k] > y, k, mask)
                y = np.where(xs[k] > y, xs[k], y)
            st["mask"] = mask
            return [y]
        if t == "Concat":
            return [np.concatenate(xs, axis=1)]
        if t == "Slice":
            p = int(c["point"])
            return [x[:, :p].copy(), x[:, p:].copy()]
        if t == "Pooling":
            win = _windows(x)
            if c["pool"] == "MAX":
                st["arg"] = win.argmax(axis=-1)  # the first maximum in scan order
                return [win.max(axis=-1)]
            return [win.mean(axis=-1)]
        if t == "Softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            return [e / e.sum(axis=1, keepdims=True)]
        if t == "SoftmaxWithLoss":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            lab = xs[1].astype(int)
            st["p"], st["lab"] = p, lab
            return [np.array(-np.log(np.maximum(p[np.arange(len(x)), lab], np.finfo(np.float32).tiny)).sum() / len(x))]
        if t == "EuclideanLoss":
            d = xs[0] - xs[1]
            st["d"] = d
            return [np.array((d ** 2).sum() / len(x) / 2)]
        raise NotImplementedError(t)

    def _bwd(self, l: SimLayer, dys: List[Arr]) -> Dict[int, Arr]:
        c = l.spec.cfg if l.spec is not None else {}
        t, st, dy = l.type, l.state, dys[0]
        bottom = self.data[l.bottoms[0]] if l.bottoms else None  # the buffer, as Caffe reads it
        top = self.data[l.tops[0]]
        if t == "Split":
            return {0: sum(dys)}
        if t == "Convolution":
            dx, dw, db = _conv_bwd(bottom, self._p(l, 0), dy, int(c["pad"]))
            self._acc(l, 0, dw)
            self._acc(l, 1, db)
            return {0: dx}
        if t == "InnerProduct":
            xf = bottom.reshape(len(bottom), -1)
            self._acc(l, 0, dy.T @ xf)
            self._acc(l, 1, dy.sum(axis=0))
            return {0: (dy @ self._p(l, 0)).reshape(bottom.shape)}
        if t == "ReLU":
            return {0: np.where(bottom > 0, dy, dy * c.get("slope", 0.0))}
        if t == "Sigmoid":
            return {0: dy * top * (1 - top)}
        if t == "TanH":
            return {0: dy * (1 - top * top)}
        if t == "Dropout":
            return {0: dy.copy()}
        if t == "Power":
            x = st["x"]
            return {0: dy * c["power"] * c["scale"] * (c["shift"] + c["scale"] * x) ** (c["power"] - 1)}
        if t == "BatchNorm":
            if self.spec.phase == caffe.TRAIN:
                y, axes = st["y"], (0, 2, 3)
                g = dy - dy.mean(axis=axes, keepdims=True) - \
                    y * (dy * y).mean(axis=axes, keepdims=True)
                return {0: g / st["std"]}
            return {0: dy / st["std"]}
        if t == "Scale":
            x = st["x"]
            axes = (0,) + tuple(range(2, x.ndim))
            self._acc(l, 0, (dy * x).sum(axis=axes))
            if len(l.param_ids) == 2:
                self._acc(l, 1, dy.sum(axis=axes))
            return {0: dy * _per_channel(self._p(l, 0), x)}
        if t == "Eltwise":
            xs = [self.data[b] for b in l.bottoms]
            op = c["op"]
            if op == "SUM":
                coeff = c.get("coeff") or [1.0] * len(xs)
                return {k: dy * coeff[k] for k in range(len(xs))}
            if op == "PROD":  # stable_prod_grad: the product of the other bottoms
                return {k: dy * np.prod(np.stack([b for m, b in enumerate(xs) if m != k]), axis=0)
                        for k in range(len(xs))}
            return {k: dy * (st["mask"] == k) for k in range(len(xs))}
        if t == "Concat":
            out, lo = {}, 0
            for k, b in enumerate(l.bottoms):
                n = self.data[b].shape[1]
                out[k] = dy[:, lo:lo + n].copy()
                lo += n
            return out
        if t == "Slice":
            return {0: np.concatenate(dys, axis=1)}
        if t == "Pooling":
            if c["pool"] == "MAX":
                win = np.zeros(dy.shape + (4,))
                np.put_along_axis(win, st["arg"][..., None], dy[..., None], axis=-1)
            else:
                win = np.repeat(dy[..., None] / 4, 4, axis=-1)
            return {0: _unwindows(win)}
        if t == "Softmax":
            return {0: (dy - (dy * top).sum(axis=1, keepdims=True)) * top}
        if t == "SoftmaxWithLoss":
            g = st["p"].copy()
            g[np.arange(len(g)), st["lab"]] -= 1
            return {0: g * float(dy) / len(g)}
        if t == "EuclideanLoss":
            g = st["d"] * float(dy) / len(st["d"])
            return {0: g, 1: -g}
        raise NotImplementedError(t)


# -- random nets ---------------------------------------------------------------------------------
class NetGen:
    """Builds a random small net: fan-out, in-place chains, joins, shared and frozen params."""

    CHAIN = ("BatchNorm", "Scale", "ReLU", "LeakyReLU", "Sigmoid", "TanH", "Power", "Dropout")

    def __init__(self, seed: int):
        self.rng = np.random.RandomState(seed)
        self.seed = seed
        self.force = bool(self.rng.rand() < 0.65)
        self.phase = caffe.TRAIN if self.rng.rand() < 0.25 else caffe.TEST
        self.layers: List[LayerSpec] = []
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.reads: Dict[str, int] = defaultdict(int)  # reads of the blob's current version
        self.conv_params: Dict[Tuple[int, ...], List[Tuple[Arr, Arr, str]]] = defaultdict(list)
        self.count = 0
        n = 2
        self.inputs: Dict[str, Arr] = {"data": self.rng.randn(n, 3, 4, 4)}
        self.shapes["data"] = (n, 3, 4, 4)

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def add(self, layer: LayerSpec, shapes: Sequence[Tuple[int, ...]]) -> LayerSpec:
        r = self.rng
        if layer.params and not layer.lr_mult:
            layer.lr_mult = [0.0 if r.rand() < 0.2 else None for _ in layer.params]
        if layer.type not in ("Eltwise", "Concat") or self.force:
            pd = r.rand() < 0.15
        else:
            pd = r.rand() < 0.3
        if pd and layer.bottoms and not layer.type.endswith("Loss"):
            layer.propagate_down = [bool(r.rand() < 0.5) for _ in layer.bottoms]
        for b in layer.bottoms:
            self.reads[b] += 1
        for t, s in zip(layer.tops, shapes):
            self.shapes[t] = s
            self.reads[t] = 0
        self.layers.append(layer)
        return layer

    def blobs4(self) -> List[str]:
        return [b for b, s in self.shapes.items() if len(s) == 4]

    def pick(self, candidates: Sequence[str]) -> str:
        # Prefer recent blobs so that nets get deep, but fan out from older ones too.
        k = len(candidates)
        w = np.arange(1, k + 1, dtype=float) ** 2
        return candidates[self.rng.choice(k, p=w / w.sum())]

    def conv(self, src: str, out: Optional[int] = None) -> str:
        r = self.rng
        n, c, h, w = self.shapes[src]
        o = out or int(r.randint(2, 5))
        k = int(r.choice([1, 3]))
        key = (o, c, k)
        pnames: List[Optional[str]] = []
        if self.conv_params[key] and r.rand() < 0.6:
            wt, bs, pname = self.conv_params[key][int(r.randint(len(self.conv_params[key])))]
            pnames = [pname + "_w", pname + "_b"]
        else:
            wt, bs = r.randn(o, c, k, k) * 0.5, r.randn(o) * 0.2
            if r.rand() < 0.5:  # named: a later conv of this shape may share it
                pname = f"share{self.count}"
                self.conv_params[key].append((wt, bs, pname))
                pnames = [pname + "_w", pname + "_b"]
        top = self.name("c")
        lr: List[Optional[float]] = []
        owner = next((l for l in self.layers if l.pnames and l.pnames[0] == pnames[0]), None) \
            if pnames else None
        if owner is not None:
            # A sharer repeats the owner's lr_mult (Caffe checks agreement). Leaving a frozen
            # owner's lr_mult out would give this layer param_propagate_down of its own: see
            # test_shared_param_frozen_in_one_layer for that known divergence.
            lr = list(owner.lr_mult)
        self.add(LayerSpec(top, "Convolution", [src], [top], {"pad": (k - 1) // 2}, [wt, bs],
                           pnames, lr), [(n, o, h, w)])
        return top

    def chain(self, blob: str, length: int) -> None:
        r = self.rng
        n, c = self.shapes[blob][:2]
        for _ in range(length):
            kind = str(r.choice(self.CHAIN))
            if kind == "Dropout" and self.phase == caffe.TRAIN:
                kind = "ReLU"
            name = self.name(kind.lower())
            cfg: Dict[str, float] = {}
            params: List[Arr] = []
            if kind == "LeakyReLU":
                kind, cfg = "ReLU", {"slope": 0.1}
            elif kind == "BatchNorm":
                params = [r.randn(c) * 0.3, r.uniform(0.5, 1.5, c), np.array([r.choice([1.0, 0.5, 2.0])])]
            elif kind == "Scale":
                params = [r.randn(c)] + ([r.randn(c) * 0.3] if r.rand() < 0.6 else [])
            elif kind == "Power":
                cfg = {"power": 2.0, "scale": float(r.choice([0.5, -1.0])), "shift": 0.5}
            layer = LayerSpec(name, kind, [blob], [blob], cfg, params)
            if kind == "BatchNorm":
                layer.lr_mult = [0.0, 0.0, 0.0]
            self.add(layer, [self.shapes[blob]])

    def step(self) -> None:
        r = self.rng
        b4 = self.blobs4()
        op = r.choice(["conv", "chain", "neuron", "eltwise", "concat", "slice", "pool", "residual"],
                      p=[.18, .2, .08, .12, .1, .1, .07, .15])
        if op == "conv":
            self.conv(self.pick(b4))
        elif op == "chain":
            free = [b for b in b4 if self.reads[b] == 0]
            if free:
                self.chain(self.pick(free), int(r.randint(1, 5)))
        elif op == "neuron":
            src = self.pick(b4)
            kind = str(r.choice(["ReLU", "Sigmoid", "TanH"]))
            top = self.name("n")
            self.add(LayerSpec(top, kind, [src], [top]), [self.shapes[src]])
        elif op in ("eltwise", "concat"):
            a = self.pick(b4)
            if op == "eltwise":
                same = [b for b in b4 if self.shapes[b] == self.shapes[a]]
                bs = [a] + [str(r.choice(same)) for _ in range(int(r.choice([1, 1, 2])))]
                kind = str(r.choice(["SUM", "PROD", "MAX"]))
                cfg = {"op": kind}
                if kind == "SUM" and r.rand() < 0.3:
                    cfg["coeff"] = [float(r.choice([0.5, -1.0, 2.0])) for _ in bs]
                top = self.name("e")
                self.add(LayerSpec(top, "Eltwise", bs, [top], cfg), [self.shapes[a]])
            else:
                n, _, h, w = self.shapes[a]
                same = [b for b in b4 if self.shapes[b][2:] == (h, w)]
                bs = [a, str(r.choice(same))]
                top = self.name("cat")
                self.add(LayerSpec(top, "Concat", bs, [top]),
                         [(n, sum(self.shapes[b][1] for b in bs), h, w)])
        elif op == "slice":
            wide = [b for b in b4 if self.shapes[b][1] >= 2]
            if wide:
                src = self.pick(wide)
                n, c, h, w = self.shapes[src]
                p = int(r.randint(1, c))
                t1, t2 = self.name("s"), self.name("s")
                self.add(LayerSpec(t1 + "_", "Slice", [src], [t1, t2], {"point": p}),
                         [(n, p, h, w), (n, c - p, h, w)])
        elif op == "pool":
            even = [b for b in b4 if self.shapes[b][2] % 2 == 0 and self.shapes[b][2] >= 2]
            if even:
                src = self.pick(even)
                n, c, h, w = self.shapes[src]
                top = self.name("p")
                self.add(LayerSpec(top, "Pooling", [src], [top], {"pool": str(r.choice(["MAX", "AVE"]))}),
                         [(n, c, h // 2, w // 2)])
        else:  # residual: x -> conv (same channels) -> in-place chain -> x + y
            x = self.pick(b4)
            y = self.conv(x, out=self.shapes[x][1])
            self.chain(y, int(r.randint(1, 4)))
            top = self.name("res")
            self.add(LayerSpec(top, "Eltwise", [x, y], [top], {"op": "SUM"}), [self.shapes[x]])

    def head(self) -> None:
        r = self.rng
        n = self.shapes["data"][0]
        src = self.pick(self.blobs4())
        ip = self.name("ip")
        k = 3
        self.add(LayerSpec(ip, "InnerProduct", [src], [ip], {},
                           [r.randn(k, int(np.prod(self.shapes[src][1:]))) * 0.3, r.randn(k) * 0.1]),
                 [(n, k)])
        self.inputs["label"] = r.randint(0, k, size=n).astype(float)
        self.shapes["label"] = (n,)
        self.add(LayerSpec("loss", "SoftmaxWithLoss", [ip, "label"], ["loss"]), [()])
        if r.rand() < 0.4:
            src2 = self.pick(self.blobs4())
            ip2 = self.name("ip")
            self.add(LayerSpec(ip2, "InnerProduct", [src2], [ip2], {},
                               [r.randn(4, int(np.prod(self.shapes[src2][1:]))) * 0.3,
                                r.randn(4) * 0.1]), [(n, 4)])
            self.inputs["target"] = r.randn(n, 4)
            self.shapes["target"] = (n, 4)
            self.add(LayerSpec("loss2", "EuclideanLoss", [ip2, "target"], ["loss2"], {},
                               loss_weight=[float(r.choice([1.0, 0.5]))]), [()])
        if r.rand() < 0.3:
            top = self.name("prob")
            self.add(LayerSpec(top, "Softmax", [ip], [top]), [(n, k)])

    def build(self) -> NetSpec:
        r = self.rng
        if r.rand() < 0.4:  # an in-place chain directly on the input
            self.chain("data", int(r.randint(1, 3)))
        for _ in range(int(r.randint(3, 9))):
            self.step()
        self.head()
        labels = ("label",)
        # Input layers come first in the prototxt: order the inputs dict as written.
        return NetSpec(self.inputs, self.layers, self.force, self.phase, labels)


def random_net(seed: int) -> NetSpec:
    return NetGen(seed).build()


# -- comparing -------------------------------------------------------------------------------------
def rel_err(a: Arr, ref: Arr) -> float:
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        return float("inf")
    # Magnitudes below 1e-3 are judged absolutely: a loss of 5e-8 is float32 rounding of
    # log(1 - eps), and a zero reference must be matched by (near) zeros.
    scale = max(np.abs(ref).max() if ref.size else 0.0, 1e-3)
    return float(np.abs(a - ref).max() / scale) if ref.size else 0.0


def top_diffs(spec: NetSpec, net: caffe.Net, seed: int) -> Dict[str, Arr]:
    r = np.random.RandomState(seed + 1000)
    return {o: r.randn(*net.blobs[o].data.shape) for o in net.outputs
            if net.blob_loss_weights[o] == 0}


def mismatches(spec: NetSpec, net: caffe.Net, sim: CaffeSim, what: Sequence[str],
               skip_diffs: Sequence[str] = ()) -> List[str]:
    bad = []
    for b in net.blobs:
        if "data" in what and rel_err(net.blobs[b].data, sim.data[b]) > FWD_TOL:
            bad.append(f"data {b}: {rel_err(net.blobs[b].data, sim.data[b]):.3g}")
        if "diff" in what and b not in skip_diffs and \
                rel_err(net.blobs[b].diff, sim.diff[b]) > GRAD_TOL:
            bad.append(f"diff {b}: {rel_err(net.blobs[b].diff, sim.diff[b]):.3g}")
    if "pdiff" in what or "pdata" in what:
        for l in sim.layers:
            if l.spec is None:
                continue
            for k, pid in enumerate(l.param_ids):
                if "pdiff" in what:
                    e = rel_err(net.layer_dict[l.name].blobs[k].diff, sim.pdiff[pid])
                    if e > GRAD_TOL:
                        bad.append(f"pdiff {l.name}/{k}: {e:.3g}")
                if "pdata" in what:
                    e = rel_err(net.layer_dict[l.name].blobs[k].data, sim.params[pid])
                    if e > FWD_TOL:
                        bad.append(f"pdata {l.name}/{k}: {e:.3g}")
    return bad


def run_pair(spec: NetSpec, seed: int):
    net = build_net(spec)
    sim = CaffeSim(spec)
    net.forward()
    sim.forward()
    diffs = top_diffs(spec, net, seed)
    for k, v in diffs.items():
        net.blobs[k].diff[...] = v
        sim.diff[k] = v.copy()
    return net, sim


def check_whole(seed: int) -> List[str]:
    spec = random_net(seed)
    net, sim = run_pair(spec, seed)
    bad = mismatches(spec, net, sim, ("data", "pdata"))
    net.backward()
    sim.backward()
    return bad + mismatches(spec, net, sim, ("diff", "pdiff"))


# -- targeted cases (each one a defect found by the random nets) ----------------------------------
def _spec(layers: List[LayerSpec], inputs: Dict[str, Arr], force: bool = False,
          phase: int = caffe.TEST) -> NetSpec:
    return NetSpec(inputs, layers, force, phase, ("label",))


def _ip(name: str, bottom: str, top: str, k: int, n_in: int, r: np.random.RandomState,
        **kw) -> LayerSpec:
    return LayerSpec(name, "InnerProduct", [bottom], [top], {}, [r.randn(k, n_in), r.randn(k)], **kw)


def _loss(bottom: str, name: str = "loss") -> LayerSpec:
    return LayerSpec(name, "SoftmaxWithLoss", [bottom, "label"], [name])


def _inputs(r: np.random.RandomState, **shapes: Tuple[int, ...]) -> Dict[str, Arr]:
    out = {k: r.randn(*s) for k, s in shapes.items()}
    out["label"] = np.array([1.0, 2.0])
    return out


def assert_matches(spec: NetSpec, seed: int = 0) -> None:
    net, sim = run_pair(spec, seed)
    bad = mismatches(spec, net, sim, ("data", "pdata"))
    net.backward()
    sim.backward()
    bad += mismatches(spec, net, sim, ("diff", "pdiff"))
    assert not bad, bad


def test_slice_top_read_without_gradient():
    """A Slice top read only by a layer with propagate_down: false: the autograd hook on that top
    got None when the Slice's backward ran for its other top (AttributeError in backward)."""
    r = np.random.RandomState(0)
    assert_matches(_spec([
        _ip("ip0", "data", "x", 4, 4, r),
        LayerSpec("s", "Slice", ["x"], ["s1", "s2"], {"point": 2}),
        _ip("ip1", "s1", "y1", 3, 2, r, propagate_down=[False]),
        _ip("ip2", "s2", "y2", 3, 2, r),
        _loss("y1"), _loss("y2", "loss2")], _inputs(r, data=(2, 4))))


def test_in_place_layer_writing_no_bottom_diff_leaves_the_diff_above():
    """Caffe's in-place layers share one diff buffer: a Scale on a net input (learnable, but no
    input gradient without force_backward) writes no bottom diff, so the input's diff is the
    gradient of the Scale's output that the layer above wrote (ours was zeros)."""
    r = np.random.RandomState(1)
    assert_matches(_spec([
        LayerSpec("sc", "Scale", ["data"], ["data"], {}, [r.randn(3), r.randn(3)]),
        _ip("ip", "data", "y", 3, 3 * 4 * 4, r), _loss("y")], _inputs(r, data=(2, 3, 4, 4))))


def test_reader_computes_diff_of_blob_whose_producer_stops_gradients():
    """An Eltwise with propagate_down: false on both bottoms still has blob_need_backward on its
    top (a bottom needed it), so the layer above computes that top's diff in Caffe; no
    gradient reached the top here, and its diff (and the diffs above it) stayed zero."""
    r = np.random.RandomState(2)
    assert_matches(_spec([
        _ip("ip1", "data", "a", 3, 3, r),
        LayerSpec("e", "Eltwise", ["data", "a"], ["res"], {"op": "SUM"},
                  propagate_down=[False, False]),
        LayerSpec("relu", "ReLU", ["res"], ["r2"]),
        _ip("ip2", "r2", "y", 3, 3, r), _loss("y")], _inputs(r, data=(2, 3))))
    # An in-place BatchNorm with propagate_down: false on a conv: the Scale above it and the
    # layer above the chain still compute their bottom diffs (the chain's diff is the gradient
    # of the BatchNorm's output).
    assert_matches(_spec([
        LayerSpec("c", "Convolution", ["data"], ["c"], {"pad": 0}, [r.randn(3, 3, 1, 1), r.randn(3)]),
        LayerSpec("bn", "BatchNorm", ["c"], ["c"], {}, [r.randn(3), r.uniform(.5, 1.5, 3), np.ones(1)],
                  propagate_down=[False]),
        LayerSpec("sc", "Scale", ["c"], ["c"], {}, [r.randn(3)]),
        _ip("ip", "c", "y", 3, 3 * 4 * 4, r), _loss("y")], _inputs(r, data=(2, 3, 4, 4))))


@pytest.mark.parametrize("kind", ["Sigmoid", "TanH", "Softmax"])
def test_top_reading_backward_sees_later_in_place_layers(kind):
    """Sigmoid/TanH/Softmax backward read their top buffer (SigmoidLayer::Backward_cpu reads
    top[0]->cpu_data()): with a separate top rewritten by a later in-place layer (a Scale, a
    leaky ReLU), Caffe's gradient uses the rewritten values, as it does for an in-place one."""
    r = np.random.RandomState(3)
    assert_matches(_spec([
        _ip("ip0", "data", "x", 4, 4, r),
        LayerSpec("f", kind, ["x"], ["y"]),
        LayerSpec("sc", "Scale", ["y"], ["y"], {}, [r.randn(4) - 1.0]),
        LayerSpec("relu", "ReLU", ["y"], ["y"], {"slope": 0.1}),
        _ip("ip1", "y", "z", 3, 4, r), _loss("z")], _inputs(r, data=(2, 4)), force=True))


def test_second_backward_reads_the_overwritten_buffer():
    """A second backward on the same forward (autograd freed the first one's graph, so the net
    records it again): a TanH whose output a later in-place Sigmoid overwrites reads the
    Sigmoid's output in Caffe (the shared buffer), as in the first backward; the recorded-again
    graph used the TanH's own output. Seen in 29 of 60 random nets (a whole backward twice)."""
    r = np.random.RandomState(7)
    spec = _spec([
        _ip("ip0", "data", "x", 4, 4, r),
        LayerSpec("tanh", "TanH", ["x"], ["x"]),
        LayerSpec("sig", "Sigmoid", ["x"], ["x"]),
        _ip("ip1", "x", "y", 3, 4, r), _loss("y")], _inputs(r, data=(2, 4)))
    net, sim = run_pair(spec, 0)
    for _ in range(2):
        net.backward()
        sim.backward()
    bad = mismatches(spec, net, sim, ("diff", "pdiff"))
    assert not bad, bad


# -- partial backward ranges -----------------------------------------------------------------------
def check_partial(seed: int, which: str, after_full: bool, known_splits: bool = True,
                  every: bool = False) -> List[str]:
    """``backward(start=L)`` or ``backward(end=L)`` for every non-input layer L, each on a fresh
    forward (after a whole backward first, when ``after_full``: Caffe's Split tops then hold that
    backward's diffs, which a range through the Split sums).

    ``known_splits`` False leaves out what only the Split layers Caffe inserts and this net
    does not explain: (a) with ``end=``, the diff of a blob whose Split sits below the range
    (Caffe writes none); (b) the stale diffs a Split in the range sums from the split tops of
    readers above it (the simulator zeroes the split tops first). ``every``: every layer as L
    (else about four)."""
    spec = random_net(seed)
    bad = []
    names = [l.name for l in spec.layers]
    for name in names if every else names[:: max(1, len(names) // 4)]:
        net, sim = run_pair(spec, seed)
        if after_full:
            net.backward()
            sim.backward()
        i = sim.index(name)
        skip: List[str] = []
        if which == "start":
            net.backward(start=name)
            sim.backward(start=i, stale_splits=known_splits)
        else:
            net.backward(end=name)
            sim.backward(end=i, stale_splits=known_splits)
            skip = [] if known_splits else sim.splits_below(i)
        bad += [f"{which}={name}: {m}"
                for m in mismatches(spec, net, sim, ("diff", "pdiff"), skip)]
    return bad


def assert_partial_matches(spec: NetSpec, which: str, name: str, after_full: bool = False) -> None:
    net, sim = run_pair(spec, 0)
    if after_full:
        net.backward()
        sim.backward()
    net.backward(**{which: name})
    sim.backward(**{which: sim.index(name)})
    bad = mismatches(spec, net, sim, ("diff", "pdiff"))
    assert not bad, bad


@pytest.mark.parametrize("start,after_full", [("loss2", False), ("ip2", False), ("ip2", True)])
def test_backward_start_runs_every_layer_of_the_range(start, after_full):
    """Caffe's BackwardFromTo(start, 0) runs every layer up to ``start`` on the diffs its tops
    hold: the first loss (below ``start``) still adds its gradient, and after a whole backward
    ``y2``'s diff is what that pass left. Ours started from ``start``'s tops alone, so
    ``backward(start=<last layer>)`` was not a whole backward."""
    r = np.random.RandomState(8)
    assert_partial_matches(_spec([
        _ip("ip0", "data", "x", 4, 4, r),
        LayerSpec("s", "Slice", ["x"], ["s1", "s2"], {"point": 2}),
        _ip("ip1", "s1", "y1", 3, 2, r), _loss("y1"),
        _ip("ip2", "s2", "y2", 3, 2, r), _loss("y2", "loss2")], _inputs(r, data=(2, 4))),
        "start", start, after_full)


def test_backward_start_from_a_blob_its_range_reads_without_diff():
    """``x``'s readers are ``ipA`` (in the range, ``propagate_down: false``) and ``ipB`` (above
    it): Caffe's ip0 reads the diff ``x``'s Split sums from its tops, ipB's from the whole
    backward before and none from ipA. Ours counted ipA as a reader and started nothing from
    ``x`` (ip0's weight got no second gradient)."""
    r = np.random.RandomState(9)
    assert_partial_matches(_spec([
        _ip("ip0", "data", "x", 4, 4, r),
        _ip("ipA", "x", "a", 3, 4, r, propagate_down=[False]), _loss("a"),
        _ip("ipB", "x", "b", 3, 4, r), _loss("b", "lossB")], _inputs(r, data=(2, 4))),
        "start", "loss", after_full=True)


def _end_case(order: Sequence[str], spec: NetSpec, end: str) -> None:
    """``order`` of whole (``"whole"``) and ``backward(end=)`` (``"end"``) passes on one forward;
    ``end``'s bottoms read below the range too are left out (Caffe writes no diff for them)."""
    net, sim = run_pair(spec, 0)
    i = sim.index(end)
    for kind in order:
        if kind == "whole":
            net.backward()
            sim.backward()
        else:
            net.backward(end=end)
            sim.backward(end=i)
    bad = mismatches(spec, net, sim, ("diff", "pdiff"), sim.splits_below(i))
    assert not bad, bad


@pytest.mark.parametrize("order", [("whole", "end"), ("end", "whole")])
def test_backward_end_reading_a_blob_a_lower_layer_reads(order):
    """``e`` reads ``x`` and ``a = ipA(x)`` (ipA below the range): autograd's way from ``e`` to
    ``x`` passed through ipA, whose graph a whole backward before had freed (NetError blaming a
    torch backward on the module call's outputs); a whole backward after ``backward(end='e')``
    met ipA's graph freed by it."""
    r = np.random.RandomState(10)
    _end_case(order, _spec([
        _ip("ip0", "data", "x", 4, 4, r), _ip("ipA", "x", "a", 4, 4, r),
        LayerSpec("e", "Eltwise", ["x", "a"], ["e"], {"op": "SUM"}),
        _ip("ip2", "e", "y", 3, 4, r), _loss("y")], _inputs(r, data=(2, 4))), "e")


def test_backward_end_leaves_out_outputs_made_below():
    """``o`` is a net output made below ``ip1``: Caffe's ``backward(end='ip1')`` does not run
    ``ipO``, so ``o``'s diff goes nowhere. Ours seeded it, and autograd carried it through
    ``ipO`` into ``data`` (which ``ip1`` reads), after a whole backward through ipO's freed
    graph: NetError."""
    r = np.random.RandomState(11)
    _end_case(("whole", "end"), _spec([
        _ip("ipO", "data", "o", 2, 4, r),
        _ip("ip1", "data", "y", 3, 4, r), _loss("y")], _inputs(r, data=(2, 4)), force=True), "ip1")


# -- the random nets -------------------------------------------------------------------------------
# Seed 18 hits the known divergence of test_in_place_propagate_down_false_under_a_slice.
SWEEP = [s for s in range(100) if s != 18]


def test_random_nets_whole_backward():
    failures = {s: bad for s in SWEEP for bad in [check_whole(s)] if bad}
    assert not failures, failures


# Partial ranges (start=/end=, on a fresh forward and after a whole backward) with the known
# Split divergences (a) and (b) left out (see check_partial). Seed 18: the in-place
# propagate_down: false divergence above; seed 56 (start=, after a whole
# backward): test_backward_start_in_place_propagate_down_false_after_whole. Seed 57 (end=): a
# range sharing a parameter with a layer below it in a net with a layer that does not replay
# exactly (BatchNorm on batch statistics): the range's graph is not recorded again (that would
# update the averages twice), so the shared parameter also takes the lower layer's part
# (test_a_range_sharing_a_weight_below_it_keeps_the_forwards_dropout_masks).
PARTIAL_KNOWN = {("start", False): {18}, ("start", True): {18, 56},
                 ("end", False): {18, 57}, ("end", True): {18, 57}}


@pytest.mark.parametrize("which,after_full", [("start", False), ("start", True),
                                              ("end", False), ("end", True)],
                         ids=["start", "start-after-whole", "end", "end-after-whole"])
def test_random_nets_partial_backward(which, after_full):
    failures = {}
    for s in range(60):
        if s in PARTIAL_KNOWN[(which, after_full)]:
            continue
        try:
            bad = check_partial(s, which, after_full, known_splits=False)
        except NetError as e:
            bad = [f"NetError: {e}"]
        if bad:
            failures[s] = bad
    assert not failures, failures


# -- known divergences (documented; not fixed) -----------------------------------------------------
def test_backward_end_after_whole_on_a_slice_of_an_input():
    """A Slice of a forced net input, one top read below ``end`` (ip2), one by it (ip1):
    ``backward(end='ip1')`` after a whole backward raised NetError (autograd met a graph the
    whole backward freed: the Slice's tops were views of the input, so the range's graph ran
    through the view node of the freed pass); Caffe runs ip1 and the losses. Its tops are
    copies now, as SliceLayer's are."""
    r = np.random.RandomState(12)
    _end_case(("whole", "end"), _spec([
        LayerSpec("s", "Slice", ["data"], ["s3", "s4"], {"point": 2}),
        _ip("ip2", "s3", "z", 3, 2, r), _ip("ip1", "s4", "y", 3, 2, r),
        _loss("y"), _loss("z", "loss2")], _inputs(r, data=(2, 4)), force=True), "ip1")


@pytest.mark.xfail(strict=True, reason="not minimized: see the docstring")
def test_backward_start_in_place_propagate_down_false_after_whole():
    """Random net 56, ``backward(start='c1')`` after a whole backward: c1's parameter diffs
    differ (relative error ~6e3). c1 is a Convolution with an in-place Sigmoid
    (``propagate_down: false``) and ReLU above it; likely the in-place propagate_down: false
    divergence (test_in_place_propagate_down_false_under_a_slice) seen through the diff the
    whole backward left in the shared buffer. Not minimized."""
    assert not check_partial(56, "start", True, known_splits=False, every=True)
@pytest.mark.xfail(strict=True, reason="a parameter takes gradients from every layer using it")
def test_shared_param_frozen_in_one_layer():
    """Caffe's param_propagate_down is per layer and per blob (its own lr_mult != 0): a weight
    shared by a layer that freezes it (lr_mult: 0, but runs backward for its learnable bias) and
    one that leaves lr_mult out (not under the loss, so it runs no backward) accumulates no diff
    in Caffe (the solver's rate is the owner's 0 either way). Ours takes the frozen layer's
    contribution, as the shared tensor requires a gradient for the other layer."""
    r = np.random.RandomState(4)
    w, b = r.randn(3, 3), r.randn(3)
    assert_matches(_spec([
        LayerSpec("a", "InnerProduct", ["data"], ["a"], {}, [w, b], ["w", "b"], [0.0, None]),
        LayerSpec("b", "InnerProduct", ["data"], ["side"], {}, [w, b], ["w", "b"], [None, None]),
        _ip("ip", "a", "y", 3, 3, r), _loss("y")], _inputs(r, data=(2, 3))))


@pytest.mark.xfail(strict=True, reason="propagate_down: false stops the gradient here")
def test_in_place_propagate_down_false_under_a_slice():
    """An in-place layer with propagate_down: false writes no bottom diff, and Caffe's Slice below
    it reads the shared diff buffer anyway: the gradient of the in-place layer's output passes
    down as if the layer were the identity (the Slice runs backward for its other top)."""
    r = np.random.RandomState(5)
    assert_matches(_spec([
        _ip("ip0", "data", "x", 4, 4, r),
        LayerSpec("s", "Slice", ["x"], ["s1", "s2"], {"point": 2}),
        LayerSpec("relu", "ReLU", ["s1"], ["s1"], propagate_down=[False]),
        _ip("ip1", "s1", "y1", 3, 2, r), _ip("ip2", "s2", "y2", 3, 2, r),
        _loss("y1"), _loss("y2", "loss2")], _inputs(r, data=(2, 4))))


@pytest.mark.parametrize("whole_first", [False, True], ids=["fresh", "after a whole backward"])
def test_backward_end_with_param_shared_below(whole_first):
    """``backward(end=L)`` runs Caffe's Backward of L and the layers above only: a parameter L
    shares with a layer below L gets L's contribution alone. Ours followed the graph into the
    lower layer too (and after a whole backward freed that graph, it raised NetError)."""
    r = np.random.RandomState(6)
    w, b = r.randn(3, 3), r.randn(3)
    spec = _spec([
        LayerSpec("a", "InnerProduct", ["data"], ["a"], {}, [w, b], ["w", "b"]),
        LayerSpec("b", "InnerProduct", ["a"], ["y"], {}, [w, b], ["w", "b"]),
        _loss("y")], _inputs(r, data=(2, 3)), force=True)
    net, sim = run_pair(spec, 0)
    if whole_first:
        net.backward()
        net.clear_param_diffs()
        for blob in ("data", "a"):  # as the simulator's, which ran no whole backward
            net.blobs[blob].diff[...] = 0
    net.backward(end="b")
    sim.backward(end=sim.index("b"))
    bad = mismatches(spec, net, sim, ("diff", "pdiff"))
    assert not bad, bad
