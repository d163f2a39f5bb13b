"""Random sequences of pycaffe API calls on small valid nets and solvers (fuzz round 14).

:func:`run_sequence` builds a fresh :class:`World` (a few nets and a solver in a folder), applies
``length`` operations drawn from :data:`OPS` with one ``random.Random``, and checks invariants
after each: no exception other than :class:`~pycaffe_alt.errors.CaffeError` (an operation that
passes a wrong type on purpose may also get pycaffe's TypeError/ValueError), no NaN where none
was fed, a full forward equal to a layer-by-layer one, a second backward giving the same blob
diffs and twice the parameter diffs, the new shapes after a reshape, bit-exact
snapshot/restore round trips, and diff arrays held by the caller staying live.

An invariant that does not hold raises :class:`Violation` naming the operation; the log of
operations run so far (``World.log``) is the repro to minimize.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError


class Violation(AssertionError):
    """An invariant that does not hold after an operation."""


class Double(caffe.Layer):
    """y = 2 x with its own backward (the Python layer of the PY net)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * top[0].diff


_INPUT = 'layer {{ name: "{0}" type: "Input" top: "{0}" input_param {{ shape {{ {1} }} }} }}\n'


def _input(name: str, *dims: int) -> str:
    return _INPUT.format(name, " ".join(f"dim: {d}" for d in dims))


_FILL = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 }'

NETS: Dict[str, Tuple[str, int]] = {
    # conv + pool + ip + softmax loss
    "conv": (_input("data", 2, 1, 8, 8) + _input("label", 2) + f"""
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 3 kernel_size: 3 {_FILL} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param {{ num_output: 4 {_FILL} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }}
""", caffe.TRAIN),
    # an in-place BatchNorm + Scale + ReLU chain (TEST: global statistics, deterministic)
    "bn": (_input("data", 2, 2, 5, 5) + _input("target", 2, 3) + f"""
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 3 kernel_size: 3 {_FILL} }} }}
layer {{ name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param {{ use_global_stats: false }} }}
layer {{ name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param {{ bias_term: true
  filler {{ type: "constant" value: 1.5 }} bias_filler {{ type: "constant" value: -0.2 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param {{ num_output: 3 {_FILL} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "loss" }}
""", caffe.TRAIN),
    # Dropout in place (TRAIN: random masks)
    "drop": (_input("data", 3, 6) + _input("target", 3, 2) + f"""
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 5 {_FILL} }} }}
layer {{ name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param {{ dropout_ratio: 0.5 }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 2 {_FILL} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "target" top: "loss" }}
""", caffe.TRAIN),
    # fan-out (automatic Split), Concat, Slice, two losses
    "split": (_input("data", 2, 2, 4, 4) + _input("label", 2) + _input("target", 2, 4) + f"""
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 2 kernel_size: 3 {_FILL} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "ipa" type: "InnerProduct" bottom: "conv1" top: "ipa"
  inner_product_param {{ num_output: 3 {_FILL} }} }}
layer {{ name: "ipb" type: "InnerProduct" bottom: "conv1" top: "ipb"
  inner_product_param {{ num_output: 3 {_FILL} }} }}
layer {{ name: "cat" type: "Concat" bottom: "ipa" bottom: "ipb" top: "cat" }}
layer {{ name: "slice" type: "Slice" bottom: "cat" top: "s1" top: "s2" slice_param {{ slice_point: 2 }} }}
layer {{ name: "loss1" type: "SoftmaxWithLoss" bottom: "s1" bottom: "label" top: "loss1" }}
layer {{ name: "loss2" type: "EuclideanLoss" bottom: "s2" bottom: "target" top: "loss2"
  loss_weight: 0.5 }}
""", caffe.TRAIN),
    # a Python layer with its own backward
    "py": (_input("data", 2, 3) + _input("target", 2, 2) + f"""
layer {{ name: "double" type: "Python" bottom: "data" top: "d"
  python_param {{ module: "api_sequence_case" layer: "Double" }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "d" top: "ip1"
  inner_product_param {{ num_output: 2 {_FILL} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "loss" }}
""", caffe.TRAIN),
    # MemoryData
    "mem": (f"""
layer {{ name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param {{ batch_size: 2 channels: 1 height: 3 width: 3 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 3 {_FILL} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }}
""", caffe.TRAIN),
    # a deploy net with force_backward (input diffs)
    "deploy": ("force_backward: true\n" + _input("data", 1, 2, 5, 5) + f"""
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 3 kernel_size: 3 {_FILL} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: AVE kernel_size: 3 stride: 1 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param {{ num_output: 4 {_FILL} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }}
""", caffe.TEST),
}

SOLVER = """net: "{net}"
test_iter: 1
test_interval: 1000
test_initialization: false
base_lr: 0.05
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 3
max_iter: 1000
display: 0
snapshot_prefix: "{prefix}"
random_seed: 7
type: "{type}"
"""

# Deterministic nets: no Dropout and no data layer that moves on.
DETERMINISTIC = ("conv", "bn", "split", "py", "deploy")


class World:
    """The nets and solvers a sequence works on, plus what the invariants need to know."""

    def __init__(self, folder: str, rng: random.Random):
        self.folder = folder
        self.rng = rng
        self.log: List[str] = []
        self.files: Dict[str, str] = {}
        for kind, (text, _) in NETS.items():
            path = os.path.join(folder, f"{kind}.prototxt")
            with open(path, "w") as f:
                f.write(text)
            self.files[kind] = path
        self.nets: Dict[str, caffe.Net] = {}
        self.tainted: Dict[str, bool] = {}  # a NaN/inf was fed to this net (or its weights)
        self.held: List[Tuple[str, str, str, np.ndarray]] = []  # (net, blob, field, array)
        self.held_params: List[Tuple[str, str, int, np.ndarray]] = []
        self.shared: Dict[str, str] = {}  # net -> net it shares weights with
        self.solver: Optional[caffe.Solver] = None
        self.solver_kind = ""
        self.saved = 0

    def net(self, kind: str) -> caffe.Net:
        net = self.nets.get(kind)
        if net is None:
            net = caffe.Net(self.files[kind], NETS[kind][1])
            self.nets[kind] = net
            self.tainted[kind] = False
            _feed(net, self.rng, kind)
        return net

    def pick(self) -> Tuple[str, caffe.Net]:
        """A net: one of NETS (built on first use) or, at times, one made since (a net that
        shares weights, the solver's)."""
        if self.rng.random() < 0.25 and len(self.nets) > 1:
            key = self.rng.choice(sorted(self.nets))
            return key, self.nets[key]
        kind = self.rng.choice(list(NETS))
        return kind, self.net(kind)

    def kind_of(self, key: str) -> str:
        """The NETS entry a net of the world was built from."""
        return self.solver_kind if key == "solver" else key.split("_shared")[0]

    def taint(self, kind: str) -> None:
        self.tainted[kind] = True
        # Nets sharing weights with it see the NaN too.
        for a, b in self.shared.items():
            if kind in (a, b):
                self.tainted[a] = self.tainted[b] = True


def _feed(net: caffe.Net, rng: random.Random, kind: str) -> None:
    """Valid finite values in every input blob (labels in range)."""
    if kind == "mem":
        n = 4
        net.set_input_arrays(np.asarray(_rand(rng, (n, 1, 3, 3)), np.float32),
                             np.asarray([rng.randrange(3) for _ in range(n)], np.float32))
        return
    for name in net.inputs:
        blob = net.blobs[name]
        if name == "label":
            classes = 2 if kind == "split" else 4
            blob.data[...] = [rng.randrange(classes) for _ in range(blob.shape[0])]
        else:
            blob.data[...] = _rand(rng, blob.shape)


def _rand(rng: random.Random, shape) -> np.ndarray:
    return np.asarray([rng.uniform(-1, 1) for _ in range(int(np.prod(shape)))],
                      np.float32).reshape(shape)


def _finite(arr) -> bool:
    return bool(np.all(np.isfinite(np.asarray(arr))))


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise Violation(what)


def _snapshot_blobs(net: caffe.Net, field: str) -> Dict[str, np.ndarray]:
    return {n: np.array(getattr(b, field), copy=True) for n, b in net.blobs.items()}


def _param_values(net: caffe.Net, field: str) -> Dict[Tuple[str, int], np.ndarray]:
    return {(name, i): np.array(getattr(b, field), copy=True)
            for name, blobs in net.params.items() for i, b in enumerate(blobs)}


def _same(a: np.ndarray, b: np.ndarray, tol: float = 0.0) -> bool:
    if a.shape != b.shape:
        return False
    if tol == 0.0:
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


# -- operations ---------------------------------------------------------------------------------
# Each takes the world and returns a short text for the log; it may raise CaffeError (accepted),
# Violation (an invariant broken) or anything else (a defect).

def op_forward(w: World) -> str:
    kind, net = w.pick()
    out = net.forward()
    if not w.tainted[kind]:
        for name, arr in out.items():
            _check(_finite(arr), f"{kind}: forward() output {name} not finite")
    for name, arr in out.items():
        _check(tuple(arr.shape) == tuple(net.blobs[name].shape),
               f"{kind}: output {name} shape {arr.shape} != blob {net.blobs[name].shape}")
    return f"{kind}.forward()"


def op_forward_kwargs(w: World) -> str:
    kind, net = w.pick()
    if w.kind_of(kind) == "mem":
        return op_forward(w)
    name = w.rng.choice(net.inputs)
    shape = net.blobs[name].shape
    mode = w.rng.choice(["ok", "ok", "wrong", "list", "double"])
    if mode == "wrong":
        arr = np.zeros((shape[0] + 1,) + tuple(shape[1:]), np.float32)
        try:
            net.forward(**{name: arr})
        except CaffeError:
            return f"{kind}.forward({name}=wrong shape) refused"
        raise Violation(f"{kind}: forward({name}=array of shape {arr.shape}) for a blob of "
                        f"{shape} was accepted")
    if name == "label":
        arr = np.zeros(shape, np.float32)
    else:
        arr = _rand(w.rng, shape)
    value = arr.tolist() if mode == "list" else (arr.astype(np.float64) if mode == "double" else arr)
    out = net.forward(**{name: value})
    _check(np.array_equal(net.blobs[name].data, arr), f"{kind}: forward({name}=...) not in blob")
    if not w.tainted[kind]:
        for n, a in out.items():
            _check(_finite(a), f"{kind}: output {n} not finite")
    return f"{kind}.forward({name}=<{mode}>)"


def op_forward_range(w: World) -> str:
    kind, net = w.pick()
    names = list(net._layer_names)
    start = w.rng.choice([None] + names)
    end = w.rng.choice([None] + names)
    blobs = w.rng.sample(list(net.blobs), w.rng.randrange(0, 3))
    out = net.forward(blobs=blobs, start=start, end=end)
    for b in blobs:
        _check(b in out, f"{kind}: forward(blobs={blobs}) lacks {b}")
    return f"{kind}.forward(blobs={blobs}, start={start!r}, end={end!r})"


def op_backward(w: World) -> str:
    kind, net = w.pick()
    names = list(net._layer_names)
    form = w.rng.choice(["plain", "plain", "range", "diffs", "kwargs"])
    if form == "plain":
        net.backward()
        text = "backward()"
    elif form == "range":
        start, end = w.rng.choice([None] + names), w.rng.choice([None] + names)
        net.backward(start=start, end=end)
        text = f"backward(start={start!r}, end={end!r})"
    elif form == "diffs":
        diffs = w.rng.sample(list(net.blobs), w.rng.randrange(1, 3))
        out = net.backward(diffs=diffs)
        for d in diffs:
            _check(d in out, f"{kind}: backward(diffs=) lacks {d}")
        text = f"backward(diffs={diffs})"
    else:
        name = w.rng.choice(net.outputs)
        arr = _rand(w.rng, net.blobs[name].shape)
        net.backward(**{name: arr})
        text = f"backward({name}=<array>)"
    if not w.tainted[kind]:
        for (layer, i), arr in _param_values(net, "diff").items():
            _check(_finite(arr), f"{kind}: param diff {layer}[{i}] not finite after {text}")
    return f"{kind}.{text}"


def op_backward_twice(w: World) -> str:
    """Two backwards after one forward: the same blob diffs, parameter diffs grow by the same
    amount (Caffe accumulates them)."""
    kind = w.rng.choice([k for k in DETERMINISTIC if k not in ("deploy",)] + ["deploy", "drop"])
    net = w.net(kind)
    net.forward()
    p0 = _param_values(net, "diff")
    data, weights = _snapshot_blobs(net, "data"), _param_values(net, "data")
    net.backward()
    b1, p1 = _snapshot_blobs(net, "diff"), _param_values(net, "diff")
    net.backward()
    b2, p2 = _snapshot_blobs(net, "diff"), _param_values(net, "diff")
    for n, v in data.items():
        _check(_same(v, net.blobs[n].data), f"{kind}: backward changed blob data {n}")
    for k, v in weights.items():
        _check(_same(v, net.params[k[0]][k[1]].data), f"{kind}: backward changed param {k}")
    if w.tainted[kind]:
        return f"{kind}: forward(); backward(); backward() (tainted)"
    for n in b1:
        _check(_same(b1[n], b2[n], 1e-5), f"{kind}: blob diff {n} differs on a second backward")
    for k in p1:
        _check(_same(p2[k] - p1[k], p1[k] - p0[k], 1e-4),
               f"{kind}: param diff {k} did not accumulate the same gradient twice")
    return f"{kind}: forward(); backward(); backward()"


def op_layerwise(w: World) -> str:
    """A full forward equals a layer-by-layer loop of forward(start=L, end=L)."""
    kind = w.rng.choice(DETERMINISTIC)
    net = w.net(kind)
    net.forward()
    full = _snapshot_blobs(net, "data")
    names = list(net._layer_names)
    for name in names:
        net.forward(start=name, end=name)
    again = _snapshot_blobs(net, "data")
    for n in full:
        _check(_same(full[n], again[n], 1e-5),
               f"{kind}: blob {n} differs between a full and a layer-by-layer forward")
    return f"{kind}: forward() == layer-by-layer"


def op_write_blob(w: World) -> str:
    kind, net = w.pick()
    name = w.rng.choice(list(net.blobs))
    field = w.rng.choice(["data", "diff"])
    blob = net.blobs[name]
    arr = getattr(blob, field)
    mode = w.rng.choice(["whole", "slice", "setter", "wrong", "nan", "int", "scalar"])
    if mode == "whole":
        value = _rand(w.rng, arr.shape)
        arr[...] = value
        if name == "label":
            arr[...] = 0
    elif mode == "slice" and arr.ndim and arr.shape[0]:
        arr[:1] = 0.25
    elif mode == "setter":
        setattr(blob, field, np.zeros(arr.shape, np.float64))
    elif mode == "wrong":
        try:
            setattr(blob, field, np.zeros(tuple(arr.shape) + (2,), np.float32))
        except CaffeError:
            return f"{kind}.blobs[{name!r}].{field} = wrong shape refused"
        raise Violation(f"{kind}: a wrong-shaped assignment to {name}.{field} was accepted")
    elif mode == "nan":
        arr[...] = np.nan
        w.taint(kind)
    elif mode == "int":
        arr[...] = np.ones(arr.shape, np.int64)
        if name == "label":
            arr[...] = 0
    else:
        arr[...] = 0.5 if name != "label" else 1
    return f"{kind}.blobs[{name!r}].{field} <- {mode}"


def op_hold_diff(w: World) -> str:
    kind, net = w.pick()
    name = w.rng.choice(list(net.blobs))
    field = w.rng.choice(["data", "diff"])
    w.held.append((kind, name, field, getattr(net.blobs[name], field)))
    if net.params:
        layer = w.rng.choice(list(net.params))
        i = w.rng.randrange(len(net.params[layer]))
        w.held_params.append((kind, layer, i, net.params[layer][i].diff))
    return f"hold {kind}.blobs[{name!r}].{field}"


def check_held(w: World) -> None:
    """Arrays taken earlier show what a fresh read gives (Caffe's blobs keep their memory)."""
    for kind, name, field, arr in w.held:
        net = w.nets[kind]
        before = arr.copy()
        fresh = getattr(net.blobs[name], field)
        if fresh.shape == arr.shape:
            _check(_same(before, fresh), f"{kind}: a held {name}.{field} array went stale")
    for kind, layer, i, arr in w.held_params:
        net = w.nets[kind]
        fresh = net.params[layer][i].diff
        if fresh.shape == arr.shape:
            _check(_same(arr, fresh), f"{kind}: a held params[{layer!r}][{i}].diff went stale")


def op_reshape(w: World) -> str:
    kind, net = w.pick()
    if w.kind_of(kind) == "mem":
        return op_forward(w)
    batch = w.rng.choice([1, 2, 3])
    for name in net.inputs:
        shape = net.blobs[name].shape
        net.blobs[name].reshape(batch, *shape[1:])
    net.reshape()
    _feed(net, w.rng, w.kind_of(kind))
    out = net.forward()
    for name in net.blobs:
        arr = net.blobs[name].data
        if arr.ndim and name not in net.loss_tops:
            _check(arr.shape[0] == batch, f"{kind}: blob {name} has batch {arr.shape[0]} after a "
                                          f"reshape to {batch}")
    if not w.tainted[kind]:
        for n, a in out.items():
            _check(_finite(a), f"{kind}: output {n} not finite after reshape")
    return f"{kind}: reshape to batch {batch}; forward()"


def op_write_param(w: World) -> str:
    kind, net = w.pick()
    if not net.params:
        return "no params"
    layer = w.rng.choice(list(net.params))
    i = w.rng.randrange(len(net.params[layer]))
    blob = net.params[layer][i]
    mode = w.rng.choice(["slice", "setter", "reassign", "nan", "whole"])
    if mode == "slice":
        blob.data.flat[0] = 0.125
    elif mode == "whole":
        blob.data[...] = _rand(w.rng, blob.shape) * 0.3
    elif mode == "setter":
        blob.data = np.full(blob.shape, 0.01)
    elif mode == "reassign":
        try:
            net.params[layer][i] = np.zeros(blob.shape)
        except (CaffeError, TypeError):
            return f"{kind}.params[{layer!r}][{i}] = array refused"
        raise Violation("reassigning a param blob was accepted")
    else:
        blob.data[...] = np.nan
        w.taint(kind)
    _check(_same(net.params[layer][i].data, blob.data), "param write not seen")
    return f"{kind}.params[{layer!r}][{i}].data <- {mode}"


def op_save_load(w: World) -> str:
    kind, net = w.pick()
    kind = w.kind_of(kind) if kind != "solver" else kind
    if kind == "solver":
        return "save/load: not on the solver's net"
    net = w.nets[kind]
    w.saved += 1
    fmt = w.rng.choice(["caffemodel", "h5"])
    path = os.path.join(w.folder, f"w{w.saved}.{fmt}")
    if fmt == "h5":
        net.save_hdf5(path)
    else:
        net.save(path)
    other = caffe.Net(w.files[kind], NETS[kind][1])
    if fmt == "h5":
        other.load_hdf5(path)
    else:
        other.copy_from(path)
    for k, v in _param_values(net, "data").items():
        _check(_same(v, other.params[k[0]][k[1]].data), f"{kind}: {fmt} round trip changed {k}")
    # and back into the net itself
    if fmt == "h5":
        net.load_hdf5(path)
    else:
        net.copy_from(path)
    return f"{kind}.save/load {fmt}"


def op_share(w: World) -> str:
    kind = w.rng.choice(list(NETS))
    net = w.net(kind)
    other = caffe.Net(w.files[kind], NETS[kind][1])
    _feed(other, w.rng, kind) if kind != "mem" else None
    other.share_with(net)
    if net.params:
        layer = next(iter(net.params))
        net.params[layer][0].data.flat[0] = 0.375
        _check(other.params[layer][0].data.flat[0] == 0.375, "share_with: write not shared")
    key = f"{kind}_shared{len(w.nets)}"
    w.nets[key] = other
    w.tainted[key] = w.tainted[kind]
    w.shared[key] = kind
    return f"{kind}: share_with into a new net"


def op_clear(w: World) -> str:
    kind, net = w.pick()
    net.clear_param_diffs()
    for k, v in _param_values(net, "diff").items():
        _check(not np.any(v), f"{kind}: clear_param_diffs left {k}")
    return f"{kind}.clear_param_diffs()"


def op_module(w: World) -> str:
    """net(data=tensor) interleaved with pycaffe calls; a torch backward on it sometimes."""
    kind = w.rng.choice([k for k in DETERMINISTIC])
    net = w.net(kind)
    feeds = {n: torch.from_numpy(np.array(net.blobs[n].data, copy=True)) for n in net.inputs}
    out = net(**feeds)
    ref = net.forward()
    for n in ref:
        if n in out:
            _check(_same(out[n].detach().numpy(), ref[n], 1e-5),
                   f"{kind}: module call and pycaffe forward differ on {n}")
    text = f"{kind}: net(**inputs) == net.forward()"
    if w.rng.random() < 0.5:
        out = net(**feeds)
        loss = net.loss(out)
        if loss.requires_grad:
            loss.backward()
            text += "; torch backward"
        if w.rng.random() < 0.5:
            try:
                net.backward()
                text += "; net.backward()"
            except CaffeError:
                text += "; net.backward() refused"
    return text


def op_memory(w: World) -> str:
    net = w.net("mem")
    mode = w.rng.choice(["ok", "ok", "bad"])
    if mode == "bad":
        try:
            net.set_input_arrays(np.zeros((3, 1, 3, 3), np.float32), np.zeros(3, np.float32))
        except CaffeError:
            return "mem.set_input_arrays(3 items for batch 2) refused"
        raise Violation("set_input_arrays with a count not a multiple of the batch was accepted")
    _feed(net, w.rng, "mem")
    out = net.forward()
    return f"mem.set_input_arrays; forward() -> loss {float(out['loss']):.3f}"


def _solver(w: World) -> caffe.Solver:
    if w.solver is None:
        kind = w.rng.choice(["conv", "bn", "split", "py"])
        stype = w.rng.choice(["SGD", "Adam", "Nesterov", "RMSProp", "AdaGrad"])
        path = os.path.join(w.folder, f"solver_{kind}.prototxt")
        with open(path, "w") as f:
            f.write(SOLVER.format(net=w.files[kind], prefix=os.path.join(w.folder, "snap"),
                                  type=stype).replace("momentum: 0.9\n", "" if stype in (
                                      "AdaGrad", "RMSProp") else "momentum: 0.9\n"))
        w.solver = caffe.get_solver(path)
        w.solver_kind = kind
        _feed(w.solver.net, w.rng, kind)
        for t in w.solver.test_nets:
            _feed(t, w.rng, kind)
        w.nets["solver"] = w.solver.net
        w.tainted["solver"] = False
    return w.solver


def op_solver_step(w: World) -> str:
    s = _solver(w)
    n = w.rng.randrange(1, 4)
    it = s.iter
    if w.rng.random() < 0.3:
        s.net.forward()
    s.step(n)
    _check(s.iter == it + n, f"solver iter {s.iter} after step({n}) from {it}")
    if not w.tainted["solver"]:
        for k, v in _param_values(s.net, "data").items():
            _check(_finite(v), f"solver: weight {k} not finite after step")
    return f"solver.step({n})"


def op_solver_roundtrip(w: World) -> str:
    """snapshot(); step(k) -> A; restore(); step(k) -> A bit-exactly."""
    s = _solver(w)
    if w.rng.random() < 0.4:
        s.param.snapshot_format = caffe.proto.caffe_pb2.SolverParameter.HDF5
    model, state = s.snapshot()
    before = _param_values(s.net, "data")
    it = s.iter
    k = w.rng.randrange(1, 3)
    s.step(k)
    after = _param_values(s.net, "data")
    s.restore(state)
    _check(s.iter == it, f"restore gave iter {s.iter}, snapshot was at {it}")
    for key, v in before.items():
        _check(_same(v, s.net.params[key[0]][key[1]].data),
               f"solver: restore did not bring back {key}")
    s.step(k)
    for key, v in after.items():
        _check(_same(v, s.net.params[key[0]][key[1]].data),
               f"solver: step({k}) after restore differs from the first run on {key}")
    return f"solver.snapshot(); step({k}); restore(); step({k}) same"


def op_solver_test(w: World) -> str:
    s = _solver(w)
    for k, t in enumerate(s.test_nets):
        # Caffe's Test shares the train net's weights into the test net (ShareTrainedLayersWith);
        # before the first test it holds its own.
        s.test(k)
        for name, blobs in t.params.items():
            for i, b in enumerate(blobs):
                _check(_same(b.data, s.net.params[name][i].data),
                       f"solver: test net weight {name}[{i}] is not the train net's")
        out = t.forward()
        if not w.tainted["solver"]:
            for n, a in out.items():
                _check(_finite(a), f"solver test net output {n} not finite")
    return "solver.test(i); solver.test_nets[i].forward()"


def op_fresh_backward(w: World) -> str:
    """backward() on a net no forward ran on (pycaffe allows it), then forward; backward."""
    kind = w.rng.choice(list(NETS))
    net = caffe.Net(w.files[kind], NETS[kind][1])
    _feed(net, w.rng, kind)
    net.backward()
    for k, v in _param_values(net, "diff").items():
        _check(_finite(v), f"{kind}: param diff {k} not finite after a backward without forward")
    net.forward()
    net.backward()
    return f"{kind}: fresh net backward(); forward(); backward()"


def op_partial_then_backward(w: World) -> str:
    """forward(end=L) then a whole backward, or forward() then backward(start=, end=) twice."""
    kind, net = w.pick()
    names = list(net._layer_names)
    if w.rng.random() < 0.5:
        end = w.rng.choice(names)
        net.forward(end=end)
        net.backward()
        return f"{kind}: forward(end={end!r}); backward()"
    net.forward()
    lo, hi = sorted(w.rng.sample(range(len(names)), 2)) if len(names) > 1 else (0, 0)
    net.backward(start=names[hi], end=names[lo])
    first = _snapshot_blobs(net, "diff")
    net.backward(start=names[hi], end=names[lo])
    # A start layer whose top a layer of the range rewrites in place (its diff is the seed):
    # Caffe's second BackwardFromTo starts from the diff the first one left, not the same.
    tops = set(net.top_names[names[hi]])
    in_place = any(tops & set(net.bottom_names[n]) for n in names[lo:hi + 1])
    if not w.tainted[kind] and not in_place:
        for n, v in first.items():
            _check(_same(v, net.blobs[n].diff, 1e-5),
                   f"{kind}: backward(start={names[hi]!r}, end={names[lo]!r}) twice: {n} differs")
    return f"{kind}: forward(); backward(start={names[hi]!r}, end={names[lo]!r}) x2"


def op_surgery(w: World) -> str:
    """A parameter blob reshaped to a wrong shape: the next pass is refused with a CaffeError;
    reshaped back and refilled, the net works again."""
    kind, net = w.pick()
    if not net.params:
        return "no params"
    layer = w.rng.choice(list(net.params))
    blob = net.params[layer][0]
    shape, values = blob.shape, blob.data.copy()
    blob.reshape(*(tuple(shape[:-1]) + (shape[-1] + 1,)))
    try:
        net.forward()
        if w.rng.random() < 0.5:
            net.backward()
    except CaffeError:
        pass
    blob.reshape(*shape)
    blob.data[...] = values
    net.forward()
    return f"{kind}: params[{layer!r}][0] reshaped wrong, then back"


def op_middle_write(w: World) -> str:
    """Write a middle blob, then forward(start=) a layer reading it (Caffe reads the buffer)."""
    kind, net = w.pick()
    names = list(net._layer_names)
    layer = w.rng.choice(names[1:])
    bottoms = net.bottom_names[layer]
    if not bottoms:
        return "no bottoms"
    b = w.rng.choice(bottoms)
    net.blobs[b].data[...] = 0.25 if b != "label" else 0
    out = net.forward(start=layer, **({b: net.blobs[b].data.copy()} if w.rng.random() < 0.5 else {}))
    if not w.tainted[kind]:
        for n, a in out.items():
            _check(_finite(a), f"{kind}: output {n} not finite after forward(start={layer!r})")
    return f"{kind}: blobs[{b!r}] written; forward(start={layer!r})"


OPS: List[Tuple[Callable[[World], str], int]] = [
    (op_forward, 4), (op_forward_kwargs, 3), (op_forward_range, 3), (op_backward, 4),
    (op_backward_twice, 2), (op_layerwise, 2), (op_write_blob, 4), (op_hold_diff, 2),
    (op_reshape, 2), (op_write_param, 2), (op_save_load, 1), (op_share, 1), (op_clear, 1),
    (op_module, 2), (op_memory, 1), (op_solver_step, 2), (op_solver_roundtrip, 1),
    (op_solver_test, 1), (op_fresh_backward, 1), (op_partial_then_backward, 2),
    (op_surgery, 1), (op_middle_write, 2),
]


def draw_ops(rng: random.Random, length: int) -> List[Callable[[World], str]]:
    fns, weights = zip(*OPS)
    return rng.choices(fns, weights=weights, k=length)


class Failure(Exception):
    """A sequence broke: ``log`` holds the operations run, the last one failing."""

    def __init__(self, log: List[str], error: BaseException):
        self.log, self.error = log, error
        super().__init__(f"{type(error).__name__}: {error}\n  after: " + " | ".join(log))


def run_sequence(seed: int, folder: str, length: Optional[int] = None,
                 keep: Optional[List[int]] = None) -> List[str]:
    """Run one seeded sequence in ``folder``; returns its log, raises :class:`Failure`.

    Operation ``i`` draws from its own ``Random((seed, i))``, so ``keep`` (the indices of the
    operations to run, the others skipped) shrinks a failing sequence without changing what the
    kept operations do."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    ops = draw_ops(rng, length if length is not None else rng.randrange(5, 31))
    w = World(folder, rng)
    for i, op in enumerate(ops):
        if keep is not None and i not in keep:
            continue
        w.rng = random.Random(f"{seed}/{i}")
        w.log.append(op.__name__)
        try:
            w.log[-1] = op(w)
            check_held(w)
        except CaffeError as e:
            w.log[-1] = f"{op.__name__}: {type(e).__name__}"
            text = str(e)
            if "Traceback" in text or not text.strip():
                raise Failure(w.log, e)
        except BaseException as e:  # Violation or a defect
            raise Failure(w.log, e) from e
    return w.log


def minimize(seed: int, folder_factory: Callable[[], str], length: Optional[int] = None
             ) -> Tuple[List[int], Failure]:
    """The smallest ``keep`` list (one operation dropped at a time) that still fails the same
    way as the whole of sequence ``seed``."""
    def fails(keep):
        try:
            run_sequence(seed, folder_factory(), length, keep)
        except Failure as f:
            return f
        return None

    first = fails(None)
    assert first is not None, "the sequence passes"
    keep = list(range(len(first.log)))
    what = type(first.error), str(first.error).split(":")[0]
    keep = keep[:len(first.log)]
    # the failing operation is the last one run
    i = len(keep) - 2
    while i >= 0:
        trial = keep[:i] + keep[i + 1:]
        f = fails(trial)
        if f is not None and (type(f.error), str(f.error).split(":")[0]) == what:
            keep, first = trial, f
        i -= 1
    return keep, first
