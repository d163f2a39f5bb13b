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
            phase: int = caffe.TEST):
    """Forward and backward of ``layers`` fed ``inputs``; returns the net afterwards."""
    text = "force_backward: true\n" + "".join(_input(k, v.shape) for k, v in inputs.items()) + layers
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
    loss_tops: Sequence[str] = ()
    ref_grads: Optional[Callable[[Arrays, Dict[ParamKey, np.ndarray], Arrays], Arrays]] = None
    phase: int = caffe.TEST
    seed: int = 0
    extra: dict = field(default_factory=dict)


def check_case(case: Case) -> List[str]:
    rng = np.random.RandomState(case.seed + 1000)
    x64 = {k: np.asarray(v, np.float64).copy() for k, v in case.inputs.items()}
    p64 = {k: np.asarray(v, np.float64).copy() for k, v in case.params.items()}
    outs = case.ref(x64, p64)
    diffs = {k: (np.ones_like(v) if k in case.loss_tops else rng.randn(*v.shape)) for k, v in outs.items()}
    net = run_net(case.layers, {k: v.astype(np.float32) for k, v in case.inputs.items()},
                  {k: v.astype(np.float32) for k, v in case.params.items()},
                  {k: v.astype(np.float32) for k, v in diffs.items()}, case.phase)
    bad = []
    for k, v in outs.items():
        e = rel_err(net.blobs[k].data, v)
        if e > FWD_TOL:
            bad.append(f"{case.name}: forward {k} rel {e:.2e}")
    if case.ref_grads is not None:
        grads = case.ref_grads(x64, p64, diffs)
    else:
        def objective() -> float:
            o = case.ref(x64, p64)
            return float(sum((o[k] * d).sum() for k, d in diffs.items()))
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


def test_threshold_forward_and_no_gradient():
    x = _r(31, 2, 3, 2, 2, lo=0.05)
    net = run_net('layer { name: "t" type: "Threshold" bottom: "x" top: "y" threshold_param { threshold: 0.4 } }',
                  {"x": x.astype(np.float32)}, {}, {"y": np.ones(x.shape, np.float32)})
    np.testing.assert_array_equal(net.blobs["y"].data, (x.astype(np.float32) > np.float32(0.4)).astype(np.float32))


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
