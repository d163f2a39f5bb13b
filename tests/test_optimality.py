"""Sec. 3.3 as a test: with the teacher's supports fixed, SGD on least squares finds the global
optimum of a two-layer net from random starts, and the lifted solution gives W1, W2 up to scale.

The net ``F(x) = W2 M(x) W1 x`` is built from prototxt text with our layers: InnerProduct (no bias),
HardThreshold with ``fixed_support`` (the teacher's eq. 12 support), InnerProduct, EuclideanLoss.
A second net uses SupportMask (source BOTTOM) with the masks as an input blob; both must agree.

What is identifiable (our finding, see docs/alternation.md): F only depends on the per-hidden-unit
outer products ``w1_j w2_j^T`` (the diagonal blocks of the paper's lifted V = vec(W1) vec(W2)^T),
each fixed up to a scale c_j / (1/c_j). With one hidden unit V itself is unique; with more, the
off-diagonal blocks of V depend on the per-unit scales, so V matches the teacher's only after
rescaling each unit — and eq. 28's SVD then recovers W1, W2 up to one scale.
"""
import os
import tempfile

import pytest
import torch

import pycaffe_alt
from pycaffe_alt.layers import TRAIN

NET = """
name: "two_layer"
layer {{ name: "input" type: "Input" top: "data" top: "label" {mask_top}
  input_param {{ shape {{ dim: {n} dim: {d} }} shape {{ dim: {n} dim: {o} }} {mask_shape} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "q1"
  inner_product_param {{ num_output: {h} bias_term: false }} }}
{support}
layer {{ name: "ip2" type: "InnerProduct" bottom: "z1" top: "out"
  inner_product_param {{ num_output: {o} bias_term: false }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "label" top: "loss" }}
"""
HT = ('layer { name: "ht1" type: "HardThreshold" bottom: "q1" top: "z1" param { lr_mult: 0 } '
      'hard_threshold_param { mode: THRESHOLD output: KEEP } }')
SM = 'layer { name: "sm1" type: "SupportMask" bottom: "q1" bottom: "mask" top: "z1" }'


def build(n, d, h, o, with_mask_bottom=False):
    text = NET.format(n=n, d=d, h=h, o=o, support=SM if with_mask_bottom else HT,
                      mask_top='top: "mask"' if with_mask_bottom else "",
                      mask_shape=f"shape {{ dim: {n} dim: {h} }}" if with_mask_bottom else "")
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text)
    try:
        return pycaffe_alt.Net(f.name, phase=TRAIN).double()
    finally:
        os.unlink(f.name)


def teacher(n, d, h, o, seed):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(h, d, generator=g, dtype=torch.float64)
    w2 = torch.randn(o, h, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q = x @ w1.T
    m = q > 0                                  # the teacher's own eq. 12 support (beta = 0)
    y = (m * q) @ w2.T
    return w1, w2, x, m, y


def sgd(net, inputs, iters, lr, momentum=0.9):
    """Caffe's SGD (history = momentum * history + lr * grad) on the net's loss, full batch."""
    params = [p for p in net.parameters() if p.requires_grad]
    hist = [torch.zeros_like(p) for p in params]
    for _ in range(iters):
        loss = net.loss(net.run(inputs))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, v in zip(params, grads, hist):
                v.mul_(momentum).add_(g, alpha=lr)
                p.sub_(v)
    with torch.no_grad():
        return net.loss(net.run(inputs)).item()


def lifted(w1, w2):
    """The paper's V = vec(W1) vec(W2)^T (row-major vec, as torch flattens)."""
    return torch.outer(w1.reshape(-1), w2.reshape(-1))


def fit(n, d, h, o, teacher_seed, init_seed, iters=1500, lr=0.05):
    w1s, w2s, x, m, y = teacher(n, d, h, o, teacher_seed)
    net = build(n, d, h, o)
    net.layer_modules["ht1"].fixed_support = lambda q: m
    g = torch.Generator().manual_seed(init_seed)
    with torch.no_grad():
        net.layer_modules["ip1"].weight.copy_(torch.randn(h, d, generator=g, dtype=torch.float64))
        net.layer_modules["ip2"].weight.copy_(torch.randn(o, h, generator=g, dtype=torch.float64))
    inputs = {"data": x, "label": y}
    start = net.loss(net.run(inputs)).item()
    final = sgd(net, inputs, iters, lr)
    scale = (y * y).sum().item() / (2 * n)     # EuclideanLoss of predicting 0
    w1 = net.layer_modules["ip1"].weight.detach()
    w2 = net.layer_modules["ip2"].weight.detach()
    return dict(start=start / scale, final=final / scale, w1=w1, w2=w2, w1s=w1s, w2s=w2s,
                net=net, x=x, m=m, y=y)


@pytest.mark.parametrize("init_seed", [11, 12, 13])
def test_single_hidden_unit_recovers_V_and_weights(init_seed):
    r = fit(n=60, d=5, h=1, o=3, teacher_seed=1, init_seed=init_seed)
    assert r["start"] > 1e-2            # a random start is far from the optimum
    assert r["final"] < 1e-6            # the global optimum (zero loss) is reached
    v, vs = lifted(r["w1"], r["w2"]), lifted(r["w1s"], r["w2s"])
    assert torch.allclose(v, vs, atol=1e-4 * vs.abs().max())
    # V is rank one; eq. 28's SVD gives W1, W2 equal to the teacher's up to a scale.
    u, s, vh = torch.linalg.svd(v)
    assert s[1] < 1e-6 * s[0]
    w1_hat, w2_hat = s[0].sqrt() * u[:, 0], s[0].sqrt() * vh[0]
    for est, true in ((w1_hat, r["w1s"].reshape(-1)), (w2_hat, r["w2s"].reshape(-1))):
        c = (est @ true) / (est @ est)
        assert torch.allclose(c * est, true, atol=1e-4 * true.abs().max())


@pytest.mark.parametrize("init_seed", [21, 22, 23])
def test_several_hidden_units_global_optimum_up_to_per_unit_scale(init_seed):
    h = 3
    r = fit(n=200, d=6, h=h, o=2, teacher_seed=2, init_seed=init_seed)
    assert r["start"] > 1e-2 and r["final"] < 1e-6
    w1, w2, w1s, w2s = r["w1"], r["w2"], r["w1s"], r["w2s"]
    # Each unit's outer product (a diagonal block of the lifted V) equals the teacher's.
    for j in range(h):
        block, block_s = torch.outer(w1[j], w2[:, j]), torch.outer(w1s[j], w2s[:, j])
        assert torch.allclose(block, block_s, atol=1e-4 * block_s.abs().max())
    # The raw lifted V does not match (per-unit scales differ, some even negative: with the
    # support fixed, a unit's sign is free too) ...
    vs = lifted(w1s, w2s)
    assert not torch.allclose(lifted(w1, w2), vs, atol=1e-2 * vs.abs().max())
    # ... but matches once every unit is brought to the teacher's scale ...
    c = (w1 * w1s).sum(1) / (w1 * w1).sum(1)
    v = lifted(c[:, None] * w1, w2 / c[None, :])
    assert torch.allclose(v, vs, atol=1e-4 * vs.abs().max())
    u, s, vh = torch.linalg.svd(v)
    assert s[1] < 1e-6 * s[0]
    w1_hat = (s[0].sqrt() * u[:, 0]).reshape(w1s.shape)
    k = (w1_hat * w1s).sum() / (w1_hat * w1_hat).sum()
    assert torch.allclose(k * w1_hat, w1s, atol=1e-4 * w1s.abs().max())
    # ... and the net with the SupportMask (mask as a bottom) gives the same optimum.
    net2 = build(200, 6, h, 2, with_mask_bottom=True)
    with torch.no_grad():
        net2.layer_modules["ip1"].weight.copy_(w1)
        net2.layer_modules["ip2"].weight.copy_(w2)
        inputs = {"data": r["x"], "label": r["y"]}
        a = net2.loss(net2.run(dict(inputs, mask=r["m"].double()))).item()
        b = r["net"].loss(r["net"].run(inputs)).item()
    assert a == pytest.approx(b, rel=1e-9, abs=1e-15)


def test_wrong_support_does_not_reach_zero():
    # The control: the same SGD with a support other than the teacher's stays away from zero loss,
    # so the tests above measure the effect of the fixed (correct) support.
    n, d, h, o = 200, 6, 3, 2
    w1s, w2s, x, m, y = teacher(n, d, h, o, 2)
    net = build(n, d, h, o)
    flipped = m.clone()
    flipped[: n // 2] = ~flipped[: n // 2]
    net.layer_modules["ht1"].fixed_support = lambda q: flipped
    final = sgd(net, {"data": x, "label": y}, 1500, 0.05)
    assert final / ((y * y).sum().item() / (2 * n)) > 1e-3
