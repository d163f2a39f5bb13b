"""Audit of layer semantics against Caffe's C++, for parameter combinations the golden fixtures do
not cover (padding with stride > kernel, rectangular kernels, dilation with groups, negative axes,
loss normalization modes, ...).

Each case builds a one-layer net from prototxt text, as a golden fixture does (Input layers,
``force_backward: true``), runs forward and backward in float32 and compares with a float64
numpy transcription of the formula in Caffe's layer source: the forward values, and the bottom and
parameter gradients as central differences of that forward (where Caffe's backward is the exact
gradient) or as Caffe's own backward formula written out (where it is not). The tolerances are
the fixtures' (forward 1e-4, gradients 1e-3, relative to the largest reference magnitude).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

import pycaffe_alt as caffe

FWD_TOL, GRAD_TOL = 1e-4, 1e-3
Arrays = Dict[str, np.ndarray]
ParamKey = Tuple[str, int]


# -- running a net the way a golden fixture does --------------------------------------------------
def _input(name: str, shape: Sequence[int]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def run_net(layers: str, inputs: Arrays, params: Dict[ParamKey, np.ndarray], top_diffs: Arrays,
            phase: int = caffe.TEST, backward: bool = True):
    """Forward (and backward) of ``layers`` fed ``inputs``; returns the net afterwards."""
    text = ("force_backward: true\n" if backward else "") + \
        "".join(_input(k, v.shape) for k, v in inputs.items()) + layers
    fd, path = tempfile.mkstemp(suffix=".prototxt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        net = caffe.Net(path, phase)
    finally:
        os.unlink(path)
    for k, v in inputs.items():
        net.blobs[k].data[...] = v
    for (layer, i), v in params.items():
        net.params[layer][i].data[...] = v
    net.forward()
    if backward:
        for k, v in top_diffs.items():
            net.blobs[k].diff[...] = v
        net.backward()
    return net


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64).reshape(np.shape(b))
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-6, np.max(np.abs(b)))) if b.size else 0.0


def numeric_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``f()`` w.r.t. the float64 array ``x`` (perturbed in place)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


@dataclass
class Case:
    """One layer configuration: prototxt, inputs, parameters, and Caffe's forward in numpy.

    ``ref(inputs, params)`` returns every output blob (float64). Gradients w.r.t. ``grad_inputs``
    and every parameter are checked against central differences of ``sum(out * top_diff)``
    unless ``ref_grads`` gives Caffe's backward explicitly (``{"bdiff/x": .., "pdiff/l/0": ..}``).
    """

    name: str
    layers: str
    inputs: Arrays
    params: Dict[ParamKey, np.ndarray]
    ref: Callable[[Arrays, Dict[ParamKey, np.ndarray]], Arrays]
    grad_inputs: Sequence[str] = ()
    # Loss tops and their loss_weight: Caffe's top holds the unweighted loss and backward starts
    # from the loss weight as the top's diff (as the fixtures' topdiff/<loss>).
    loss_tops: Dict[str, float] = field(default_factory=dict)
    ref_grads: Optional[Callable[[Arrays, Dict[ParamKey, np.ndarray], Arrays], Arrays]] = None
    phase: int = caffe.TEST
    seed: int = 0
    # Outputs whose top diff reaches the bottoms (None: all); Caffe's recurrent layers do not
    # propagate the diff of an exposed final state.
    grad_outputs: Optional[Sequence[str]] = None
    backward: bool = True  # False: a layer without backward in Caffe (no force_backward)


def check_case(case: Case) -> List[str]:
    rng = np.random.RandomState(case.seed + 1000)
    x64 = {k: np.asarray(v, np.float64).copy() for k, v in case.inputs.items()}
    p64 = {k: np.asarray(v, np.float64).copy() for k, v in case.params.items()}
    outs = case.ref(x64, p64)
    outs = {k: np.asarray(v, np.float64) for k, v in outs.items()}
    diffs = {k: (np.full_like(v, case.loss_tops[k]) if k in case.loss_tops else np.asarray(rng.randn(*v.shape)))
             for k, v in outs.items()}
    net = run_net(case.layers, {k: v.astype(np.float32) for k, v in case.inputs.items()},
                  {k: v.astype(np.float32) for k, v in case.params.items()},
                  {k: v.astype(np.float32) for k, v in diffs.items()}, case.phase, case.backward)
    bad = []
    for k, v in outs.items():
        e = rel_err(net.blobs[k].data, v)
        if e > FWD_TOL:
            bad.append(f"{case.name}: forward {k} rel {e:.2e}")
    if not case.backward:
        grads = {}
    elif case.ref_grads is not None:
        grads = case.ref_grads(x64, p64, diffs)
    else:
        def objective() -> float:
            o = case.ref(x64, p64)
            return float(sum((o[k] * d).sum() for k, d in diffs.items()
                             if case.grad_outputs is None or k in case.grad_outputs))
        grads = {f"bdiff/{k}": numeric_grad(objective, x64[k]) for k in case.grad_inputs}
        grads.update({f"pdiff/{l}/{i}": numeric_grad(objective, p64[(l, i)]) for (l, i) in p64})
    for key, ref in grads.items():
        if key.startswith("bdiff/"):
            got = net.blobs[key[6:]].diff
        else:
            _, layer, i = key.split("/")
            got = net.params[layer][int(i)].diff
        e = rel_err(got, ref)
        if e > GRAD_TOL:
            bad.append(f"{case.name}: {key} rel {e:.2e}")
    return bad


# -- Caffe's formulas, transcribed loop by loop -----------------------------------------------------
def caffe_pool(x: np.ndarray, k: Tuple[int, int], s: Tuple[int, int], p: Tuple[int, int],
               method: str) -> np.ndarray:
    """PoolingLayer (ceil rounding; with padding the last window must start inside the image;
    AVE divides by the window clipped to the padded extent, MAX scans the unpadded window)."""
    n, c, h, w = x.shape
    oh = int(math.ceil((h + 2 * p[0] - k[0]) / s[0])) + 1
    ow = int(math.ceil((w + 2 * p[1] - k[1]) / s[1])) + 1
    if p[0] or p[1]:
        if (oh - 1) * s[0] >= h + p[0]:
            oh -= 1
        if (ow - 1) * s[1] >= w + p[1]:
            ow -= 1
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s[0] - p[0], j * s[1] - p[1]
            if method == "ave":
                he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                y[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
            else:
                he, we = min(hs + k[0], h), min(ws + k[1], w)
                hs, ws = max(hs, 0), max(ws, 0)
                y[:, :, i, j] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
    return y


def caffe_conv(x, w, b, stride, pad, dil, group):
    """im2col + gemm per group, written as loops over the kernel taps."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    xp = np.zeros((n, c, h + 2 * pad[0], wd + 2 * pad[1]))
    xp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd] = x
    y = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        for a in range(kh):
            for bb in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           a * dil[0]:a * dil[0] + stride[0] * (oh - 1) + 1:stride[0],
                           bb * dil[1]:bb * dil[1] + stride[1] * (ow - 1) + 1:stride[1]]
                y[:, g * og:(g + 1) * og] += np.einsum("ncij,oc->noij", patch, w[g * og:(g + 1) * og, :, a, bb])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def caffe_deconv(x, w, b, stride, pad, dil, group):
    """col2im of W^T x: every input pixel scatters its kernel-weighted value into the output."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    oh = stride[0] * (h - 1) + dil[0] * (kh - 1) + 1 - 2 * pad[0]
    ow = stride[1] * (wd - 1) + dil[1] * (kw - 1) + 1 - 2 * pad[1]
    full = np.zeros((n, og * group, oh + 2 * pad[0], ow + 2 * pad[1]))
    cg = c // group
    for g in range(group):
        for a in range(kh):
            for bb in range(kw):
                contrib = np.einsum("ncij,co->noij", x[:, g * cg:(g + 1) * cg], w[g * cg:(g + 1) * cg, :, a, bb])
                full[:, g * og:(g + 1) * og,
                     a * dil[0]:a * dil[0] + stride[0] * (h - 1) + 1:stride[0],
                     bb * dil[1]:bb * dil[1] + stride[1] * (wd - 1) + 1:stride[1]] += contrib
    y = full[:, :, pad[0]:pad[0] + oh, pad[1]:pad[1] + ow]
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y


def _r(seed: int, *shape: int, lo: Optional[float] = None) -> np.ndarray:
    a = np.random.RandomState(seed).randn(*shape)
    return a if lo is None else np.sign(a) * (np.abs(a) + lo)


# -- the cases ------------------------------------------------------------------------------------
def _pool_case(name: str, shape, geom: str, k, s, p, method: str, seed: int) -> Case:
    return Case(name, f'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param {{ '
                      f'pool: {method.upper()} {geom} }} }}',
                {"x": _r(seed, *shape)}, {},
                lambda x, _: {"y": caffe_pool(x["x"], k, s, p, method)}, grad_inputs=["x"])


def _global_pool_case(name: str, shape, method: str, seed: int) -> Case:
    return Case(name, f'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param {{ '
                      f'pool: {method.upper()} global_pooling: true }} }}',
                {"x": _r(seed, *shape)}, {},
                lambda x, _: {"y": caffe_pool(x["x"], shape[2:], (1, 1), (0, 0), method)},
                grad_inputs=["x"])


POOLING = [
    _pool_case("ave_pad1_k3_s2", (1, 2, 5, 6), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), "ave", 1),
    _pool_case("ave_pad2_k3_s1", (1, 2, 4, 5), "kernel_size: 3 stride: 1 pad: 2", (3, 3), (1, 1), (2, 2), "ave", 2),
    _pool_case("ave_rect_pad_h", (2, 1, 6, 5), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
               (3, 2), (2, 1), (1, 0), "ave", 3),
    _pool_case("ave_stride_gt_kernel", (1, 2, 7, 8), "kernel_size: 2 stride: 3", (2, 2), (3, 3), (0, 0), "ave", 4),
    _pool_case("ave_stride_gt_kernel_pad", (1, 2, 7, 8), "kernel_size: 2 stride: 3 pad: 1", (2, 2), (3, 3), (1, 1), "ave", 5),
    _pool_case("max_stride_gt_kernel_pad", (1, 2, 7, 8), "kernel_size: 2 stride: 3 pad: 1", (2, 2), (3, 3), (1, 1), "max", 6),
    _pool_case("max_pad2_k3_s2", (1, 2, 6, 7), "kernel_size: 3 stride: 2 pad: 2", (3, 3), (2, 2), (2, 2), "max", 7),
    _pool_case("max_rect_pad_w", (1, 2, 5, 7), "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1",
               (2, 3), (1, 2), (0, 1), "max", 8),
    _pool_case("max_ceil_overhang", (1, 1, 6, 6), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), "max", 9),
    _global_pool_case("global_ave_3x5", (2, 3, 3, 5), "ave", 10),
    _global_pool_case("global_max_4x2", (2, 3, 4, 2), "max", 11),
]


def _conv_case(name: str, typ: str, shape, w_shape, geom: str, stride, pad, dil, group, bias: bool, seed: int) -> Case:
    num_output = w_shape[0] if typ == "Convolution" else w_shape[1] * group
    params = {("conv", 0): _r(seed + 1, *w_shape)}
    if bias:
        params[("conv", 1)] = _r(seed + 2, num_output)
    fn = caffe_conv if typ == "Convolution" else caffe_deconv

    def ref(x, p):
        return {"y": fn(x["x"], p[("conv", 0)], p.get(("conv", 1)), stride, pad, dil, group)}
    return Case(name, f'layer {{ name: "conv" type: "{typ}" bottom: "x" top: "y" convolution_param {{ '
                      f'num_output: {num_output} group: {group} bias_term: {str(bias).lower()} {geom} }} }}',
                {"x": _r(seed, *shape)}, params, ref, grad_inputs=["x"])


CONV = [
    _conv_case("conv_dilation2_pad2_group2_nobias", "Convolution", (1, 4, 7, 6), (4, 2, 3, 3),
               "kernel_size: 3 dilation: 2 pad: 2", (1, 1), (2, 2), (2, 2), 2, False, 20),
    _conv_case("conv_rect_stride_hw", "Convolution", (2, 2, 7, 5), (3, 2, 3, 1),
               "kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (2, 1), (1, 0), (1, 1), 1, True, 21),
    _conv_case("conv_stride_gt_kernel", "Convolution", (1, 3, 8, 8), (2, 3, 2, 2),
               "kernel_size: 2 stride: 3 pad: 1", (3, 3), (1, 1), (1, 1), 1, True, 22),
    _conv_case("conv_depthwise_group", "Convolution", (1, 3, 5, 5), (3, 1, 3, 3),
               "kernel_size: 3 pad: 1", (1, 1), (1, 1), (1, 1), 3, True, 23),
    _conv_case("deconv_s2_p1_k4_group2", "Deconvolution", (1, 4, 3, 3), (4, 1, 4, 4),
               "kernel_size: 4 stride: 2 pad: 1", (2, 2), (1, 1), (1, 1), 2, True, 24),
    _conv_case("deconv_rect_dilation_nobias", "Deconvolution", (1, 2, 3, 4), (2, 3, 2, 3),
               "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1 dilation: 2",
               (1, 2), (0, 1), (2, 2), 1, False, 25),
]


@pytest.mark.parametrize("case", POOLING + CONV, ids=lambda c: c.name)
def test_vision_layers_match_caffe(case: Case):
    assert not check_case(case)


# -- neuron layers --------------------------------------------------------------------------------
def _neuron_case(name: str, typ: str, body: str, fn, shape=(2, 3, 2, 2), lo: float = 0.05,
                 seed: int = 30, x: Optional[np.ndarray] = None, params=None, ref=None) -> Case:
    x = _r(seed, *shape, lo=lo) if x is None else x
    return Case(name, f'layer {{ name: "n" type: "{typ}" bottom: "x" top: "y" {body} }}', {"x": x},
                params or {}, ref or (lambda v, _: {"y": fn(v["x"])}), grad_inputs=["x"])


def _prelu_ref(x, p):
    slope = p[("n", 0)]
    s = slope.reshape(1, -1, *([1] * (x["x"].ndim - 2))) if slope.ndim else slope
    return {"y": np.where(x["x"] > 0, x["x"], s * x["x"])}


NEURON = [
    _neuron_case("elu_alpha_0.3", "ELU", "elu_param { alpha: 0.3 }", lambda x: np.where(x > 0, x, 0.3 * (np.exp(x) - 1))),
    _neuron_case("power_3_scale_shift", "Power", "power_param { power: 3 scale: 0.5 shift: 1 }", lambda x: (1 + 0.5 * x) ** 3),
    _neuron_case("power_half_shift", "Power", "power_param { power: 0.5 scale: 2 shift: 5 }", lambda x: (5 + 2 * x) ** 0.5),
    _neuron_case("power_neg2_noshift", "Power", "power_param { power: -2 scale: 1.5 }", lambda x: (1.5 * x) ** -2.0, lo=0.3),
    _neuron_case("exp_base2_scale_shift", "Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }", lambda x: 2.0 ** (1 + 0.5 * x)),
    _neuron_case("log_base10_scale_shift", "Log", "log_param { base: 10 scale: 2 shift: 5 }", lambda x: np.log10(5 + 2 * x)),
    _neuron_case("bnll", "BNLL", "", lambda x: np.log1p(np.exp(x))),
    _neuron_case("absval", "AbsVal", "", np.abs),
    _neuron_case("relu_leaky_0.2", "ReLU", "relu_param { negative_slope: 0.2 }", lambda x: np.where(x > 0, x, 0.2 * x)),
    _neuron_case("prelu_channel_shared", "PReLU", "prelu_param { channel_shared: true }", None,
                 params={("n", 0): np.array(0.3)}, ref=_prelu_ref),
    _neuron_case("prelu_2d_bottom", "PReLU", "", None, shape=(4, 3),
                 params={("n", 0): np.array([0.1, -0.4, 0.7])}, ref=_prelu_ref),
    _neuron_case("sigmoid", "Sigmoid", "", lambda x: 1 / (1 + np.exp(-x))),
    _neuron_case("tanh", "TanH", "", np.tanh),
]


@pytest.mark.parametrize("case", NEURON, ids=lambda c: c.name)
def test_neuron_layers_match_caffe(case: Case):
    assert not check_case(case)


def test_threshold_forward_and_no_backward():
    x = _r(31, 2, 3, 2, 2, lo=0.05)
    net = run_net('layer { name: "t" type: "Threshold" bottom: "x" top: "y" threshold_param { threshold: 0.4 } }',
                  {"x": x.astype(np.float32)}, {}, {}, backward=False)
    np.testing.assert_array_equal(net.blobs["y"].data, (x.astype(np.float32) > np.float32(0.4)).astype(np.float32))
    # ThresholdLayer::Backward_cpu is NOT_IMPLEMENTED: with force_backward Caffe aborts at the
    # backward (tests/test_fidelity_stop28.py); it used to be a silent zero gradient here.
    from pycaffe_alt.errors import NetError

    with pytest.raises(NetError, match="layer 't' \\(type Threshold\\): has no backward"):
        run_net('layer { name: "t" type: "Threshold" bottom: "x" top: "y" }',
                {"x": x.astype(np.float32)}, {}, {"y": np.ones(x.shape, np.float32)})


# -- normalization layers -------------------------------------------------------------------------
def _lrn_across(x, size, alpha, beta, k):
    c = x.shape[1]
    pre = (size - 1) // 2
    y = np.empty_like(x)
    for ch in range(c):
        window = x[:, max(0, ch - pre):min(c, ch - pre + size)]
        y[:, ch] = x[:, ch] * (k + alpha / size * (window ** 2).sum(axis=1)) ** -beta
    return y


def _lrn_within(x, size, alpha, beta):
    # Caffe: split -> square -> AVE pooling (pad (size-1)/2, stride 1) -> power(shift 1, scale
    # alpha, power -beta) -> product; k is not used.
    pad = (size - 1) // 2
    avg = caffe_pool(x ** 2, (size, size), (1, 1), (pad, pad), "ave")
    return x * (1 + alpha * avg) ** -beta


def _mvn(x, across: bool, variance: bool, eps: float):
    lead = 1 if across else 2
    flat = x.reshape(x.shape[:lead] + (-1,))
    c = flat - flat.mean(-1, keepdims=True)
    if variance:
        c = c / (np.sqrt((c ** 2).mean(-1, keepdims=True)) + eps)
    return c.reshape(x.shape)


def _mvn_caffe_grad(x, variance: bool, eps: float, g, across: bool):
    """MVNLayer::Backward_cpu: (g - mean(g) - y * mean(g * y)) / (std + eps)."""
    lead = 1 if across else 2
    xs, gs = x.reshape(x.shape[:lead] + (-1,)), g.reshape(x.shape[:lead] + (-1,))
    if not variance:
        return (gs - gs.mean(-1, keepdims=True)).reshape(x.shape)
    c = xs - xs.mean(-1, keepdims=True)
    d = np.sqrt((c ** 2).mean(-1, keepdims=True)) + eps
    y = c / d
    return ((gs - gs.mean(-1, keepdims=True) - y * (gs * y).mean(-1, keepdims=True)) / d).reshape(x.shape)


def _bn_global(x, p, eps):
    f = p[("bn", 2)][0]
    inv = 0.0 if f == 0 else 1.0 / f
    view = (1, -1) + (1,) * (x["x"].ndim - 2)
    mean, var = p[("bn", 0)] * inv, p[("bn", 1)] * inv
    return {"y": (x["x"] - mean.reshape(view)) / np.sqrt(var.reshape(view) + eps)}


def _bn_global_grads(x, p, d, eps=1e-5):
    f = p[("bn", 2)][0]
    inv = 0.0 if f == 0 else 1.0 / f
    view = (1, -1) + (1,) * (x["x"].ndim - 2)
    # Caffe's statistics get no gradient (lr_mult 0; their diffs stay 0).
    return {"bdiff/x": d["y"] / np.sqrt((p[("bn", 1)] * inv).reshape(view) + eps),
            "pdiff/bn/0": np.zeros(p[("bn", 0)].shape), "pdiff/bn/1": np.zeros(p[("bn", 1)].shape)}


def _scale_ref(axis: int, with_bias: bool, second: bool):
    def ref(x, p):
        s = x["s"] if second else p[("sc", 0)]
        shape = (1,) * axis + s.shape + (1,) * (x["x"].ndim - axis - s.ndim)
        y = x["x"] * s.reshape(shape)
        if with_bias:
            b = p[("sc", 0 if second else 1)]
            y = y + b.reshape((1,) * axis + b.shape + (1,) * (x["x"].ndim - axis - b.ndim))
        return {"y": y}
    return ref


def _bias_ref(axis: int):
    def ref(x, p):
        b = x["b"]
        return {"y": x["x"] + b.reshape((1,) * axis + b.shape + (1,) * (x["x"].ndim - axis - b.ndim))}
    return ref


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


NORM = [
    Case("lrn_across_size3_k2", 'layer { name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 3 alpha: 0.7 beta: 0.6 k: 2 } }',
         {"x": _r(40, 2, 4, 2, 3)}, {}, lambda x, _: {"y": _lrn_across(x["x"], 3, 0.7, 0.6, 2.0)}, grad_inputs=["x"]),
    Case("lrn_across_size7_over3", 'layer { name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 7 alpha: 1.5 beta: 0.75 } }',
         {"x": _r(41, 1, 3, 2, 2)}, {}, lambda x, _: {"y": _lrn_across(x["x"], 7, 1.5, 0.75, 1.0)}, grad_inputs=["x"]),
    Case("lrn_within_size5", 'layer { name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 5 alpha: 2 beta: 0.75 k: 3 norm_region: WITHIN_CHANNEL } }',
         {"x": _r(42, 1, 2, 4, 5)}, {}, lambda x, _: {"y": _lrn_within(x["x"], 5, 2.0, 0.75)}, grad_inputs=["x"]),
    Case("mvn_across_no_variance", 'layer { name: "m" type: "MVN" bottom: "x" top: "y" mvn_param { across_channels: true normalize_variance: false } }',
         {"x": _r(43, 2, 3, 2, 2)}, {}, lambda x, _: {"y": _mvn(x["x"], True, False, 1e-9)}, grad_inputs=["x"]),
    Case("mvn_eps_0.1", 'layer { name: "m" type: "MVN" bottom: "x" top: "y" mvn_param { eps: 0.1 } }',
         {"x": _r(44, 2, 3, 2, 2) * 0.3}, {}, lambda x, _: {"y": _mvn(x["x"], False, True, 0.1)},
         ref_grads=lambda x, p, d: {"bdiff/x": _mvn_caffe_grad(x["x"], True, 0.1, d["y"], False)}),
    Case("mvn_across_eps_0.1", 'layer { name: "m" type: "MVN" bottom: "x" top: "y" mvn_param { eps: 0.1 across_channels: true } }',
         {"x": _r(45, 2, 3, 2, 2) * 0.3}, {}, lambda x, _: {"y": _mvn(x["x"], True, True, 0.1)},
         ref_grads=lambda x, p, d: {"bdiff/x": _mvn_caffe_grad(x["x"], True, 0.1, d["y"], True)}),
    Case("batchnorm_global_factor0", 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { use_global_stats: true } }',
         {"x": _r(46, 2, 3, 2, 2)}, {("bn", 0): _r(47, 3), ("bn", 1): np.abs(_r(48, 3)) + 0.5, ("bn", 2): np.array([0.0])},
         lambda x, p: _bn_global(x, p, 1e-5), ref_grads=_bn_global_grads),
    Case("batchnorm_global_factor2.5_eps", 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { use_global_stats: true eps: 0.01 } }',
         {"x": _r(49, 2, 3, 5)}, {("bn", 0): _r(50, 3), ("bn", 1): np.abs(_r(51, 3)) + 0.5, ("bn", 2): np.array([2.5])},
         lambda x, p: _bn_global(x, p, 0.01), ref_grads=lambda x, p, d: _bn_global_grads(x, p, d, 0.01)),
    Case("scale_axis0_numaxes2_bias", 'layer { name: "sc" type: "Scale" bottom: "x" top: "y" scale_param { axis: 0 num_axes: 2 bias_term: true } }',
         {"x": _r(52, 2, 3, 2, 2)}, {("sc", 0): _r(53, 2, 3), ("sc", 1): _r(54, 2, 3)}, _scale_ref(0, True, False), grad_inputs=["x"]),
    Case("scale_negative_axis_numaxes0", 'layer { name: "sc" type: "Scale" bottom: "x" top: "y" scale_param { axis: -1 num_axes: 0 } }',
         {"x": _r(55, 2, 3, 4)}, {("sc", 0): np.array(1.7)}, _scale_ref(0, False, False), grad_inputs=["x"]),
    Case("scale_second_bottom_axis2_bias", 'layer { name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: 2 bias_term: true } }',
         {"x": _r(56, 2, 3, 4, 2), "s": _r(57, 4, 2)}, {("sc", 0): _r(58, 4, 2)}, _scale_ref(2, True, True), grad_inputs=["x", "s"]),
    Case("scale_last_axis_numaxes_minus1", 'layer { name: "sc" type: "Scale" bottom: "x" top: "y" scale_param { axis: -2 num_axes: -1 } }',
         {"x": _r(59, 2, 3, 4)}, {("sc", 0): _r(60, 3, 4)}, _scale_ref(1, False, False), grad_inputs=["x"]),
    Case("bias_second_bottom_axis0", 'layer { name: "b" type: "Bias" bottom: "x" bottom: "b" top: "y" bias_param { axis: 0 } }',
         {"x": _r(61, 2, 3, 2), "b": _r(62, 2, 3)}, {}, _bias_ref(0), grad_inputs=["x", "b"]),
    Case("softmax_axis_minus1", 'layer { name: "s" type: "Softmax" bottom: "x" top: "y" softmax_param { axis: -1 } }',
         {"x": _r(63, 2, 3, 4)}, {}, lambda x, _: {"y": _softmax(x["x"], -1)}, grad_inputs=["x"]),
]


def _ssd_normalize(x, scale, across: bool, shared: bool, eps: float = 1e-10):
    """normalize_layer.cpp (the SSD fork): x / sqrt(sum x^2 + eps) times the scale; the sum over
    (C, H, W) per item or over C per position."""
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1)
    norm = np.sqrt((xs ** 2).sum(axis=(1, 2) if across else 1, keepdims=True) + eps)
    s = np.full(c, float(scale)) if shared else scale
    return xs, norm, s.reshape(1, c, 1)


def _normalize_case(across: bool, shared: bool, seed: int) -> Case:
    flags = f"across_spatial: {str(across).lower()} channel_shared: {str(shared).lower()}"
    scale = np.array(1.3) if shared else np.abs(_r(seed + 1, 3)) + 0.5

    def ref(x, p):
        xs, norm, s = _ssd_normalize(x["x"], p[("n", 0)], across, shared)
        return {"y": (xs / norm * s).reshape(x["x"].shape)}

    def grads(x, p, d):
        # NormalizeLayer::Backward_cpu: a = sum(x * g) over the normalized span; the bottom diff
        # (g - x a / norm^2) / norm is multiplied by the scale afterwards, so a per-channel scale
        # does not enter the sum (not the exact gradient unless the scale is shared); the scale's
        # diff is sum(top * g) / scale.
        xs, norm, s = _ssd_normalize(x["x"], p[("n", 0)], across, shared)
        g = d["y"].reshape(xs.shape)
        a = (xs * g).sum(axis=(1, 2) if across else 1, keepdims=True)
        bdiff = (g - xs * a / norm ** 2) / norm * s
        pdiff = ((xs / norm) * g).sum(axis=(0, 2))
        return {"bdiff/x": bdiff.reshape(x["x"].shape),
                "pdiff/n/0": np.array(pdiff.sum()) if shared else pdiff}
    return Case(f"normalize_{'across' if across else 'channels'}_{'shared' if shared else 'per_channel'}",
                f'layer {{ name: "n" type: "Normalize" bottom: "x" top: "y" norm_param {{ {flags} }} }}',
                {"x": _r(seed, 2, 3, 2, 3)}, {("n", 0): scale}, ref, ref_grads=grads)


NORMALIZE = [_normalize_case(a, s, 70 + 2 * a + s) for a in (False, True) for s in (False, True)]


@pytest.mark.parametrize("case", NORM + NORMALIZE, ids=lambda c: c.name)
def test_normalization_layers_match_caffe(case: Case):
    assert not check_case(case)


# -- structure layers -----------------------------------------------------------------------------
def _reduce(x, op: str, axis: int, coeff: float):
    rows = x.reshape(x.shape[:axis] + (-1,))
    y = {"sum": rows.sum(-1), "asum": np.abs(rows).sum(-1), "sumsq": (rows ** 2).sum(-1),
         "mean": rows.mean(-1)}[op]
    return coeff * y


def _reduction_case(op: str, axis: int, coeff: float, seed: int) -> Case:
    x = _r(seed, 2, 3, 4, lo=0.05)
    canon = axis % 3
    return Case(f"reduction_{op}_axis{axis}_coeff{coeff}",
                f'layer {{ name: "r" type: "Reduction" bottom: "x" top: "y" reduction_param {{ '
                f'operation: {op.upper()} axis: {axis} coeff: {coeff} }} }}',
                {"x": x}, {}, lambda v, _: {"y": _reduce(v["x"], op, canon, coeff)}, grad_inputs=["x"])


def _argmax_ref(axis: Optional[int], k: int, out_max_val: bool):
    def ref(v, _):
        x = v["x"]
        if axis is not None:
            order = np.argsort(-x, axis=axis, kind="stable")[(slice(None),) * axis + (slice(0, k),)]
            vals = np.take_along_axis(x, order, axis=axis)
            return {"y": vals if out_max_val else order.astype(np.float64)}
        flat = x.reshape(x.shape[0], -1)
        order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
        parts = [order.astype(np.float64)] + ([np.take_along_axis(flat, order, 1)] if out_max_val else [])
        y = np.stack(parts, axis=1)
        return {"y": y.reshape(y.shape + (1,) * max(0, x.ndim - 3))}
    return ref


def _accuracy_ref(k: int, ignore: Optional[int], axis: int):
    def ref(v, _):
        x, label = np.moveaxis(v["x"], axis, -1), v["label"].astype(int)
        scores = x.reshape(-1, x.shape[-1])
        labels = label.reshape(-1)
        hits = count = 0
        for row, lab in zip(scores, labels):
            if ignore is not None and lab == ignore:
                continue
            count += 1
            # the SSD fork's AccuracyLayer: partial_sort of (score, class) pairs, greater first
            top = sorted(((s, c) for c, s in enumerate(row)), reverse=True)[:k]
            hits += any(c == lab for _, c in top)
        return {"acc": np.array(hits / count)}
    return ref


STRUCTURE = [
    Case("ip_transpose_axis2", 'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 3 axis: 2 transpose: true } }',
         {"x": _r(80, 2, 3, 2, 2)}, {("ip", 0): _r(81, 4, 3), ("ip", 1): _r(82, 3)},
         lambda v, p: {"y": v["x"].reshape(2, 3, 4) @ p[("ip", 0)] + p[("ip", 1)]}, grad_inputs=["x"]),
    Case("ip_axis_minus1_nobias", 'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 axis: -1 bias_term: false } }',
         {"x": _r(83, 2, 3, 4)}, {("ip", 0): _r(84, 2, 4)},
         lambda v, p: {"y": v["x"] @ p[("ip", 0)].T}, grad_inputs=["x"]),
    _reduction_case("sum", 1, -2.0, 85),
    _reduction_case("asum", -1, 0.5, 86),
    _reduction_case("sumsq", 1, 1.5, 87),
    _reduction_case("mean", -2, 3.0, 88),
    _reduction_case("mean", 0, 1.0, 89),
    Case("crop_axis_minus2_two_offsets", 'layer { name: "c" type: "Crop" bottom: "x" bottom: "ref" top: "y" crop_param { axis: -2 offset: 1 offset: 2 } }',
         {"x": _r(90, 2, 3, 5, 6), "ref": _r(91, 1, 1, 3, 2)}, {},
         lambda v, _: {"y": v["x"][:, :, 1:4, 2:4]}, grad_inputs=["x"]),
    Case("crop_axis1_one_offset", 'layer { name: "c" type: "Crop" bottom: "x" bottom: "ref" top: "y" crop_param { axis: 1 offset: 1 } }',
         {"x": _r(92, 2, 4, 5, 5), "ref": _r(93, 2, 2, 3, 3)}, {},
         lambda v, _: {"y": v["x"][:, 1:3, 1:4, 1:4]}, grad_inputs=["x"]),
    Case("slice_axis_minus1_points", 'layer { name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" slice_param { axis: -1 slice_point: 1 slice_point: 4 } }',
         {"x": _r(94, 2, 3, 6)}, {},
         lambda v, _: {"a": v["x"][..., :1], "b": v["x"][..., 1:4], "c": v["x"][..., 4:]}, grad_inputs=["x"]),
    Case("concat_axis_minus3", 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" concat_param { axis: -3 } }',
         {"a": _r(95, 2, 1, 3, 2), "b": _r(96, 2, 2, 3, 2)}, {},
         lambda v, _: {"y": np.concatenate([v["a"], v["b"]], axis=1)}, grad_inputs=["a", "b"]),
    Case("flatten_axis1_end_minus2", 'layer { name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 1 end_axis: -2 } }',
         {"x": _r(97, 2, 3, 2, 4)}, {}, lambda v, _: {"y": v["x"].reshape(2, 6, 4)}, grad_inputs=["x"]),
    Case("reshape_axis_minus2_numaxes1", 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { dim: 2 dim: -1 } axis: -2 num_axes: 1 } }',
         # axis -2 of a 3-axis bottom starts at 3 - 2 + 1 = 2 (Caffe counts -1 as after the last)
         {"x": _r(98, 2, 6, 4)}, {}, lambda v, _: {"y": v["x"].reshape(2, 6, 2, 2)}, grad_inputs=["x"]),
    Case("reshape_copy_and_infer", 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }',
         {"x": _r(99, 3, 2, 2, 2)}, {}, lambda v, _: {"y": v["x"].reshape(3, 4, 2)}, grad_inputs=["x"]),
    Case("tile_axis_minus1", 'layer { name: "t" type: "Tile" bottom: "x" top: "y" tile_param { axis: -1 tiles: 3 } }',
         {"x": _r(100, 2, 2, 3)}, {}, lambda v, _: {"y": np.concatenate([v["x"]] * 3, axis=-1)}, grad_inputs=["x"]),
    Case("tile_axis1", 'layer { name: "t" type: "Tile" bottom: "x" top: "y" tile_param { axis: 1 tiles: 2 } }',
         {"x": _r(101, 2, 2, 3)}, {}, lambda v, _: {"y": np.concatenate([v["x"]] * 2, axis=1)}, grad_inputs=["x"]),
    Case("eltwise_prod_three", 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" eltwise_param { operation: PROD } }',
         {"a": _r(102, 2, 3), "b": _r(103, 2, 3), "c": _r(104, 2, 3)}, {},
         lambda v, _: {"y": v["a"] * v["b"] * v["c"]}, grad_inputs=["a", "b", "c"]),
    Case("eltwise_sum_negative_coeffs", 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" eltwise_param { operation: SUM coeff: -1 coeff: 0.5 coeff: 2 } }',
         {"a": _r(105, 2, 3), "b": _r(106, 2, 3), "c": _r(107, 2, 3)}, {},
         lambda v, _: {"y": -v["a"] + 0.5 * v["b"] + 2 * v["c"]}, grad_inputs=["a", "b", "c"]),
    Case("eltwise_max_three", 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" eltwise_param { operation: MAX } }',
         {"a": _r(108, 2, 5), "b": _r(109, 2, 5), "c": _r(110, 2, 5)}, {},
         lambda v, _: {"y": np.maximum(np.maximum(v["a"], v["b"]), v["c"])}, grad_inputs=["a", "b", "c"]),
    Case("embed_bias", 'layer { name: "e" type: "Embed" bottom: "idx" top: "y" embed_param { input_dim: 5 num_output: 3 } }',
         {"idx": np.array([[0, 4, 2], [2, 2, 1]], np.float64)}, {("e", 0): _r(111, 5, 3), ("e", 1): _r(112, 3)},
         lambda v, p: {"y": p[("e", 0)][v["idx"].astype(int)] + p[("e", 1)]}),
    Case("argmax_axis1_top2_values", 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: 1 top_k: 2 out_max_val: true } }',
         {"x": _r(113, 2, 5, 3)}, {}, _argmax_ref(1, 2, True), backward=False),
    Case("argmax_axis_minus1_top3_indices", 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: -1 top_k: 3 } }',
         {"x": _r(114, 2, 3, 5)}, {}, _argmax_ref(2, 3, False), backward=False),
    Case("argmax_flat_top3", 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 3 } }',
         {"x": _r(115, 2, 3, 2, 2)}, {}, _argmax_ref(None, 3, False), backward=False),
    Case("argmax_flat_2d_bottom", 'layer { name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 2 out_max_val: true } }',
         {"x": _r(116, 3, 6)}, {}, _argmax_ref(None, 2, True), backward=False),
    Case("accuracy_top3_ignore", 'layer { name: "a" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" accuracy_param { top_k: 3 ignore_label: 1 } }',
         {"x": _r(117, 8, 5), "label": np.array([0, 1, 2, 3, 4, 1, 3, 2], np.float64)}, {},
         _accuracy_ref(3, 1, 1), backward=False),
    Case("accuracy_spatial_axis2", 'layer { name: "a" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" accuracy_param { axis: 2 } }',
         {"x": _r(118, 2, 3, 4), "label": np.array([[0, 3, 1], [2, 2, 0]], np.float64)}, {},
         _accuracy_ref(1, None, 2), backward=False),
]


@pytest.mark.parametrize("case", STRUCTURE, ids=lambda c: c.name)
def test_structure_layers_match_caffe(case: Case):
    assert not check_case(case)


# -- losses ---------------------------------------------------------------------------------------
def _normalizer(mode: str, outer: int, inner: int, valid: int) -> float:
    """LossLayer::GetNormalizer, never below 1."""
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(n))


def _softmax_loss_case(mode: Optional[str], ignore: Optional[int], axis: int, shape, seed: int,
                       weight: float = 1.0, normalize: Optional[bool] = None) -> Case:
    rng = np.random.RandomState(seed)
    name_axis, axis = axis, axis % len(shape)
    c = shape[axis]
    label_shape = shape[:axis] + shape[axis + 1:]
    label = rng.randint(0, c, size=label_shape).astype(np.float64)
    opts = ([f"normalization: {mode}"] if mode else []) + \
        ([f"ignore_label: {ignore}"] if ignore is not None else []) + \
        ([f"normalize: {str(normalize).lower()}"] if normalize is not None else [])
    eff = mode or ("BATCH_SIZE" if normalize is False else "VALID")

    def ref(v, _):
        x = np.moveaxis(v["x"], axis, -1)
        logp = np.log(_softmax(x, -1))
        lab = v["label"].astype(int)
        outer = int(np.prod(shape[:axis]))
        inner = int(np.prod(shape[axis + 1:]))
        keep = np.ones(lab.shape, bool) if ignore is None else lab != ignore
        total = -np.take_along_axis(logp, np.where(keep, lab, 0)[..., None], -1)[..., 0][keep].sum()
        return {"loss": np.array(total / _normalizer(eff, outer, inner, int(keep.sum())))}
    return Case(f"softmax_loss_{eff}_ignore{ignore}_axis{name_axis}_w{weight}",
                f'layer {{ name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" '
                f'loss_weight: {weight} softmax_param {{ axis: {name_axis} }} loss_param {{ {" ".join(opts)} }} }}',
                {"x": _r(seed, *shape), "label": label}, {}, ref, grad_inputs=["x"], loss_tops={"loss": weight})


def _sigmoid_ce_case(mode: Optional[str], ignore: Optional[int], seed: int, normalize: Optional[bool] = None) -> Case:
    rng = np.random.RandomState(seed)
    shape = (3, 2, 2)
    target = rng.rand(*shape)
    if ignore is not None:
        target[rng.rand(*shape) < 0.3] = ignore
    opts = ([f"normalization: {mode}"] if mode else []) + \
        ([f"ignore_label: {ignore}"] if ignore is not None else []) + \
        ([f"normalize: {str(normalize).lower()}"] if normalize is not None else [])
    eff = mode or ({True: "VALID", False: "BATCH_SIZE", None: "BATCH_SIZE"}[normalize])

    def ref(v, _):
        x, t = v["x"], v["t"]
        keep = np.ones(x.shape, bool) if ignore is None else t.astype(int) != ignore
        per = -(x * (t - (x >= 0)) - np.log1p(np.exp(x - 2 * x * (x >= 0))))
        return {"loss": np.array(per[keep].sum() / _normalizer(eff, shape[0], 4, int(keep.sum())))}
    return Case(f"sigmoid_ce_{eff}_ignore{ignore}_normalize{normalize}",
                f'layer {{ name: "l" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss" '
                f'loss_param {{ {" ".join(opts)} }} }}',
                {"x": _r(seed + 1, *shape), "t": target}, {}, ref, grad_inputs=["x"], loss_tops={"loss": 1.0})


def _contrastive_case(legacy: bool, seed: int) -> Case:
    a, b = _r(seed, 6, 3) * 0.6, _r(seed + 1, 6, 3) * 0.6
    y = np.array([1, 0, 0, 1, 0, 0], np.float64)
    margin = 1.5

    def ref(v, _):
        d2 = ((v["a"] - v["b"]) ** 2).sum(1)
        dis = np.maximum(margin - d2, 0) if legacy else np.maximum(margin - np.sqrt(d2), 0) ** 2
        return {"loss": np.array(np.where(v["y"] != 0, d2, dis).sum() / 6 / 2)}

    def grads(v, _, d):
        # ContrastiveLossLayer::Backward_cpu; non-legacy divides by (dist + 1e-4).
        diff = v["a"] - v["b"]
        d2 = (diff ** 2).sum(1)
        alpha = 1.0 / 6
        out = np.zeros_like(diff)
        for j in range(6):
            if v["y"][j]:
                out[j] = alpha * diff[j]
            else:
                if legacy:
                    mdist, beta = margin - d2[j], -alpha
                else:
                    dist = np.sqrt(d2[j])
                    mdist = margin - dist
                    beta = -alpha * mdist / (dist + 1e-4)
                out[j] = beta * diff[j] if mdist > 0 else 0
        return {"bdiff/a": out, "bdiff/b": -out}
    return Case(f"contrastive_legacy{legacy}",
                f'layer {{ name: "l" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "loss" '
                f'contrastive_loss_param {{ margin: {margin} legacy_version: {str(legacy).lower()} }} }}',
                {"a": a, "b": b, "y": y}, {}, ref, ref_grads=grads, loss_tops={"loss": 1.0})


def _infogain_ref(v, _):
    p, lab, h = v["p"], v["label"].astype(int), v["H"].reshape(3, 3)
    return {"loss": np.array(-(h[lab] * np.log(np.maximum(p, 1e-20))).sum() / p.shape[0])}


def _hinge_ref(norm: str):
    def ref(v, _):
        x, lab = v["x"].copy(), v["label"].astype(int)
        x[np.arange(len(lab)), lab] *= -1
        m = np.maximum(0, 1 + x)
        return {"loss": np.array((m if norm == "L1" else m ** 2).sum() / x.shape[0])}
    return ref


_PROBS = _softmax(_r(120, 4, 3), 1)
LOSSES = [
    _softmax_loss_case("FULL", 2, 1, (2, 3, 2, 2), 121),
    _softmax_loss_case("BATCH_SIZE", 0, 1, (2, 3, 3), 122),
    _softmax_loss_case("NONE", None, 1, (4, 5), 123, weight=2.5),
    _softmax_loss_case("VALID", 1, 2, (2, 3, 4), 124),
    _softmax_loss_case(None, None, 1, (3, 4, 2), 125, normalize=False),
    _softmax_loss_case(None, 3, -1, (2, 2, 5), 126),
    _sigmoid_ce_case("VALID", -1, 127),
    _sigmoid_ce_case("FULL", -1, 128),
    _sigmoid_ce_case("NONE", None, 129),
    _sigmoid_ce_case(None, -1, 130, normalize=True),
    _sigmoid_ce_case(None, None, 131),
    _contrastive_case(True, 132),
    _contrastive_case(False, 133),
    Case("euclidean_both_bottoms_loss_weight", 'layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss" loss_weight: 3 }',
         {"a": _r(134, 3, 2, 2), "b": _r(135, 3, 4)}, {},
         lambda v, _: {"loss": np.array(((v["a"].reshape(3, 4) - v["b"]) ** 2).sum() / 3 / 2)},
         grad_inputs=["a", "b"], loss_tops={"loss": 3.0}),
    Case("hinge_l1_4d", 'layer { name: "l" type: "HingeLoss" bottom: "x" bottom: "label" top: "loss" }',
         {"x": _r(136, 4, 3, 1, 1) * 0.7, "label": np.array([0, 2, 1, 2], np.float64)}, {},
         _hinge_ref("L1"), grad_inputs=["x"], loss_tops={"loss": 1.0}),
    Case("hinge_l2", 'layer { name: "l" type: "HingeLoss" bottom: "x" bottom: "label" top: "loss" hinge_loss_param { norm: L2 } }',
         {"x": _r(137, 4, 5) * 0.7, "label": np.array([4, 2, 1, 0], np.float64)}, {},
         _hinge_ref("L2"), grad_inputs=["x"], loss_tops={"loss": 1.0}),
    Case("infogain_asymmetric_h", 'layer { name: "l" type: "InfogainLoss" bottom: "p" bottom: "label" bottom: "H" top: "loss" }',
         {"p": _PROBS, "label": np.array([2, 0, 1, 2], np.float64), "H": np.abs(_r(138, 1, 1, 3, 3))}, {},
         _infogain_ref, grad_inputs=["p"], loss_tops={"loss": 1.0}),
    Case("multinomial_logistic", 'layer { name: "l" type: "MultinomialLogisticLoss" bottom: "p" bottom: "label" top: "loss" }',
         {"p": _PROBS, "label": np.array([1, 0, 2, 2], np.float64)}, {},
         lambda v, _: {"loss": np.array(-np.log(v["p"][np.arange(4), v["label"].astype(int)]).sum() / 4)},
         grad_inputs=["p"], loss_tops={"loss": 1.0}),
]


@pytest.mark.parametrize("case", LOSSES, ids=lambda c: c.name)
def test_loss_layers_match_caffe(case: Case):
    assert not check_case(case)


# -- recurrent layers -----------------------------------------------------------------------------
def _sigm(x):
    return 1 / (1 + np.exp(-x))


def _rnn_ref(v, p):
    """RNNLayer's unrolled net: h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h),
    o_t = tanh(W_ho h_t + b_o)."""
    w_xh, b_h, w_hh, w_ho, b_o = (p[("r", i)] for i in range(5))
    h, outs = v["h0"][0], []
    for t in range(v["x"].shape[0]):
        h = np.tanh((v["cont"][t][:, None] * h) @ w_hh.T + v["x"][t].reshape(h.shape[0], -1) @ w_xh.T + b_h)
        outs.append(np.tanh(h @ w_ho.T + b_o))
    return {"o": np.stack(outs), "hT": h[None]}


def _lstm_ref(v, p):
    """LSTMLayer's unrolled net and LSTMUnit: gates (i, f, o, g) = W_hc (cont h) + W_xc x + b_c,
    f scaled by cont, c = f c + i g, h = o tanh(c)."""
    w_xc, b_c, w_hc = (p[("r", i)] for i in range(3))
    h, c, outs = v["h0"][0], v["c0"][0], []
    for t in range(v["x"].shape[0]):
        cont = v["cont"][t][:, None]
        gates = (cont * h) @ w_hc.T + v["x"][t].reshape(h.shape[0], -1) @ w_xc.T + b_c
        i, f, o, g = np.split(gates, 4, axis=1)
        c = cont * _sigm(f) * c + _sigm(i) * np.tanh(g)
        h = _sigm(o) * np.tanh(c)
        outs.append(h)
    return {"h": np.stack(outs), "hT": h[None], "cT": c[None]}


def _rnn_grads(ref, out: str, state_inputs: Sequence[str]):
    """Caffe's recurrent backward: the diff of the outputs reaches x and the parameters; the
    exposed final state's diff goes nowhere and the initial state's bottom diff stays 0."""
    def grads(x, p, d):
        def objective() -> float:
            return float((ref(x, p)[out] * d[out]).sum())
        g = {"bdiff/x": numeric_grad(objective, x["x"])}
        g.update({f"pdiff/r/{i}": numeric_grad(objective, p[("r", i)]) for (_, i) in p})
        g.update({f"bdiff/{s}": np.zeros_like(x[s]) for s in state_inputs})
        return g
    return grads


_T, _N, _H = 3, 2, 3
_CONT = np.array([[0, 0], [1, 0], [1, 1]], np.float64)
RECURRENT = [
    Case("rnn_expose_hidden", 'layer { name: "r" type: "RNN" bottom: "x" bottom: "cont" bottom: "h0" top: "o" top: "hT" '
         'recurrent_param { num_output: 3 expose_hidden: true } }',
         {"x": _r(140, _T, _N, 2, 2), "cont": _CONT, "h0": _r(141, 1, _N, _H) * 0.5},
         {("r", 0): _r(142, _H, 4) * 0.5, ("r", 1): _r(143, _H) * 0.5, ("r", 2): _r(144, _H, _H) * 0.5,
          ("r", 3): _r(145, _H, _H) * 0.5, ("r", 4): _r(146, _H) * 0.5},
         _rnn_ref, ref_grads=_rnn_grads(_rnn_ref, "o", ["h0"])),
    Case("lstm_expose_hidden", 'layer { name: "r" type: "LSTM" bottom: "x" bottom: "cont" bottom: "h0" bottom: "c0" '
         'top: "h" top: "hT" top: "cT" recurrent_param { num_output: 3 expose_hidden: true } }',
         {"x": _r(147, _T, _N, 2), "cont": _CONT, "h0": _r(148, 1, _N, _H) * 0.5, "c0": _r(149, 1, _N, _H) * 0.5},
         {("r", 0): _r(150, 4 * _H, 2) * 0.5, ("r", 1): _r(151, 4 * _H) * 0.5, ("r", 2): _r(152, 4 * _H, _H) * 0.5},
         _lstm_ref, ref_grads=_rnn_grads(_lstm_ref, "h", ["h0", "c0"])),
]


@pytest.mark.parametrize("case", RECURRENT, ids=lambda c: c.name)
def test_recurrent_layers_match_caffe(case: Case):
    assert not check_case(case)


# -- batch statistics and pyramids ----------------------------------------------------------------
def _bn_train_ref(v, p):
    """BatchNormLayer in TRAIN: batch mean and biased variance per channel (axis 1)."""
    x = v["x"]
    axes = tuple(a for a in range(x.ndim) if a != 1)
    view = (1, -1) + (1,) * (x.ndim - 2)
    c = x - x.mean(axis=axes).reshape(view)
    return {"y": c / np.sqrt((c ** 2).mean(axis=axes).reshape(view) + 1e-5)}


def _spp_ref(levels: int, method: str):
    def ref(v, _):
        x = v["x"]
        h, w = x.shape[2:]
        outs = []
        for level in range(levels):
            bins = 2 ** level
            # SPPLayer::GetPoolingParam: kernel = ceil(size / bins), pad = (kernel*bins - size + 1) / 2
            kh, kw = int(math.ceil(h / bins)), int(math.ceil(w / bins))
            ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
            outs.append(caffe_pool(x, (kh, kw), (kh, kw), (ph, pw), method).reshape(x.shape[0], -1))
        return {"y": np.concatenate(outs, axis=1)}
    return ref


BATCH = [
    Case("batchnorm_train_2d", 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }',
         {"x": _r(160, 5, 3)}, {}, _bn_train_ref, grad_inputs=["x"], phase=caffe.TRAIN),
    Case("batchnorm_train_3d", 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }',
         {"x": _r(161, 2, 3, 4)}, {}, _bn_train_ref, grad_inputs=["x"], phase=caffe.TRAIN),
    Case("spp_ave_3_levels_nonsquare", 'layer { name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 3 pool: AVE } }',
         {"x": _r(162, 1, 2, 6, 7)}, {}, _spp_ref(3, "ave"), grad_inputs=["x"]),
    Case("spp_max_2_levels_nonsquare", 'layer { name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 2 pool: MAX } }',
         {"x": _r(163, 1, 2, 3, 6)}, {}, _spp_ref(2, "max"), grad_inputs=["x"]),
]


@pytest.mark.parametrize("case", BATCH, ids=lambda c: c.name)
def test_batch_statistics_and_pyramids_match_caffe(case: Case):
    assert not check_case(case)
