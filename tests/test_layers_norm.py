"""Normalisation layers (LRN, BatchNorm, Scale, Bias, MVN, Softmax): Caffe's formulas written out
independently, BatchNorm's moving averages, Caffe's MVN gradient, shape rules and errors, float64
gradchecks, and parity with Caffe's golden outputs."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from test_golden import ROOT as GOLDEN_ROOT
from test_golden import test_golden_case as golden_case
from layer_check import gradcheck_layer, make_layer
from pycaffe_alt.errors import NetError
from pycaffe_alt.layers import TEST, TRAIN


# -- LRN --------------------------------------------------------------------------------------
def _lrn_across_reference(x: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    n, c = x.shape[:2]
    half = (size - 1) // 2
    out = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - half), min(c, ch + half + 1)
        scale = k + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)
        out[:, ch] = x[:, ch] * scale ** -beta
    return out


def _lrn_within_reference(x: np.ndarray, size: int, alpha: float, beta: float) -> np.ndarray:
    half = (size - 1) // 2
    h, w = x.shape[2:]
    padded = np.pad(x ** 2, ((0, 0), (0, 0), (half, half), (half, half)))
    s = sum(padded[:, :, i:i + h, j:j + w] for i in range(size) for j in range(size))
    return x * (1 + alpha * s / size ** 2) ** -beta


def test_lrn_across_channels_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    layer = make_layer('type: "LRN" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }', [x.shape]).double()
    np.testing.assert_allclose(layer(x).numpy(), _lrn_across_reference(x.numpy(), 5, 0.5, 0.75, 2.0), rtol=1e-12)


def test_lrn_within_channel_formula_ignores_k():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    layer = make_layer('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 7 '
                       'norm_region: WITHIN_CHANNEL }', [x.shape]).double()
    np.testing.assert_allclose(layer(x).numpy(), _lrn_within_reference(x.numpy(), 3, 0.5, 0.75), rtol=1e-12)


def test_lrn_errors():
    with pytest.raises(NetError, match="odd") as err:
        make_layer('name: "n1" type: "LRN" lrn_param { local_size: 4 }', [(1, 3, 4, 4)])
    assert "'n1'" in str(err.value)
    with pytest.raises(NetError, match="4-axis"):
        make_layer('type: "LRN"', [(1, 3, 4)])


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_gradcheck(region):
    torch.manual_seed(2)
    layer = make_layer(f'type: "LRN" lrn_param {{ local_size: 3 alpha: 0.7 beta: 0.75 k: 1.5 norm_region: {region} }}',
                       [(2, 4, 3, 3)])
    assert gradcheck_layer(layer, [torch.randn(2, 4, 3, 3)])


# -- BatchNorm --------------------------------------------------------------------------------
def _bn(text: str, shape, phase):
    return make_layer(f'type: "BatchNorm" batch_norm_param {{ {text} }}', [shape], phase)


def test_batchnorm_global_stats_divide_by_scale_factor():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 4)
    layer = _bn("eps: 0.001", x.shape, TEST)
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([2.0, 4.0, 6.0]))
        layer.variance.copy_(torch.tensor([8.0, 2.0, 4.0]))
        layer.scale_factor.fill_(2.0)
    mean = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    var = torch.tensor([4.0, 1.0, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), (x - mean) / (var + 0.001).sqrt())
    with torch.no_grad():
        layer.scale_factor.zero_()  # factor 0: Caffe uses zero statistics
    torch.testing.assert_close(layer(x), x / torch.tensor(0.001).sqrt())


def test_batchnorm_train_statistics_and_moving_averages():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 5) * 3 + 1
    layer = _bn("moving_average_fraction: 0.9", x.shape, TRAIN)
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.variance.copy_(torch.tensor([1.0, 1.0, 1.0]))
        layer.scale_factor.fill_(5.0)
    y = layer(x)
    bm = x.mean(dim=(0, 2, 3))
    bv = x.var(dim=(0, 2, 3), unbiased=False)
    eps = layer.eps
    torch.testing.assert_close(y, (x - bm.view(1, 3, 1, 1)) / (bv + eps).sqrt().view(1, 3, 1, 1))
    m = 2 * 4 * 5
    torch.testing.assert_close(layer.scale_factor.detach(), torch.tensor([5.0 * 0.9 + 1]))
    torch.testing.assert_close(layer.mean.detach(), torch.tensor([1.0, 2.0, 3.0]) * 0.9 + bm)
    torch.testing.assert_close(layer.variance.detach(), 0.9 + bv * m / (m - 1))
    assert abs(layer.eps - 1e-5) < 1e-10  # proto default


def test_batchnorm_use_global_stats_follows_phase_unless_set():
    torch.manual_seed(5)
    x = torch.randn(4, 2, 3)
    for text, phase, uses_batch in (("", TRAIN, True), ("", TEST, False),
                                    ("use_global_stats: true", TRAIN, False),
                                    ("use_global_stats: false", TEST, True)):
        layer = _bn(text, x.shape, phase)
        before = layer.scale_factor.detach().clone()
        y = layer(x)
        assert (layer.scale_factor.item() != before.item()) == uses_batch
        if uses_batch:
            assert abs(y.mean(dim=(0, 2))).max() < 1e-5
        else:
            torch.testing.assert_close(y, x / torch.tensor(layer.eps).sqrt())
    # The phase is read at forward time: switching to eval stops the updates.
    layer = _bn("", x.shape, TRAIN)
    layer.eval()
    layer(x)
    assert layer.scale_factor.item() == 0.0


def test_batchnorm_blobs_get_no_gradient():
    torch.manual_seed(6)
    x = torch.randn(3, 2, 2, 2, requires_grad=True)
    for phase in (TRAIN, TEST):
        layer = _bn("", x.shape, phase)
        with torch.no_grad():
            layer.scale_factor.fill_(1.0)
            layer.variance.fill_(1.0)
        layer(x).pow(2).sum().backward()
        assert all(p.grad is None for p in layer.blobs)
        assert layer.blob_names == ("mean", "variance", "scale_factor")
        assert [tuple(p.shape) for p in layer.blobs] == [(2,), (2,), (1,)]


def test_batchnorm_top_shapes_do_not_touch_statistics():
    layer = _bn("", (2, 3, 4, 4), TRAIN)
    assert layer.top_shapes([(2, 3, 4, 4)]) == [(2, 3, 4, 4)]
    assert layer.scale_factor.item() == 0.0


def test_batchnorm_errors():
    with pytest.raises(NetError, match="lr_mult") as err:
        make_layer('name: "bn1" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }', [(2, 3, 4)])
    assert "'bn1'" in str(err.value)
    make_layer('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }', [(2, 3, 4)])
    # Like Caffe, missing specs are added with lr_mult 0.
    layer = make_layer('type: "BatchNorm" param { lr_mult: 0 }', [(2, 3, 4)])
    assert [p.lr_mult for p in layer.param.param] == [0.0, 0.0, 0.0]
    layer = _bn("", (2, 3, 4), TEST)
    with pytest.raises(NetError, match="channels"):
        layer(torch.zeros(2, 4, 4))


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_gradcheck(phase):
    torch.manual_seed(7)
    layer = _bn("eps: 0.01", (3, 2, 2, 3), phase)
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([0.5, -1.0]))
        layer.variance.copy_(torch.tensor([2.0, 0.5]))
        layer.scale_factor.fill_(1.0)
    assert gradcheck_layer(layer, [torch.randn(3, 2, 2, 3)])


# -- Scale and Bias ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, shape, blob_shape", [
    ("", (2, 3, 4, 5), (3,)),
    ("axis: 1 num_axes: 2", (2, 3, 4, 5), (3, 4)),
    ("axis: -2 num_axes: -1", (2, 3, 4, 5), (4, 5)),
    ("axis: 0 num_axes: -1", (2, 3), (2, 3)),
    ("num_axes: 0", (2, 3, 4), ()),
])
def test_scale_and_bias_blob_shapes_broadcast_like_caffe(text, shape, blob_shape):
    torch.manual_seed(8)
    x = torch.randn(shape, dtype=torch.float64)
    scale = make_layer(f'type: "Scale" scale_param {{ {text} bias_term: true filler {{ type: "gaussian" std: 1 }} '
                       f'bias_filler {{ type: "gaussian" std: 1 }} }}', [shape]).double()
    bias = make_layer(f'type: "Bias" bias_param {{ {text} filler {{ type: "gaussian" std: 1 }} }}', [shape]).double()
    assert tuple(scale.weight.shape) == blob_shape and tuple(scale.bias.shape) == blob_shape
    assert tuple(bias.bias.shape) == blob_shape
    # Caffe's (outer, dim, inner) loop, written with numpy reshapes.
    axis = 0 if not blob_shape else (len(shape) + int(text.split("axis: ")[1].split()[0]) if "axis: -" in text
                                     else int(text.split("axis: ")[1].split()[0]) if "axis:" in text else 1)
    outer = int(np.prod(shape[:axis]))
    dim = int(np.prod(blob_shape))
    xr = x.numpy().reshape(outer, dim, -1)
    s = scale.weight.detach().numpy().reshape(1, dim, 1)
    b = scale.bias.detach().numpy().reshape(1, dim, 1)
    np.testing.assert_allclose(scale(x).detach().numpy().reshape(outer, dim, -1), xr * s + b, rtol=1e-12)
    bb = bias.bias.detach().numpy().reshape(1, dim, 1)
    np.testing.assert_allclose(bias(x).detach().numpy().reshape(outer, dim, -1), xr + bb, rtol=1e-12)


def test_scale_defaults_to_one_and_bias_to_zero():
    scale = make_layer('type: "Scale" scale_param { bias_term: true }', [(2, 3, 4)])
    assert torch.equal(scale.weight.detach(), torch.ones(3))
    assert torch.equal(scale.bias.detach(), torch.zeros(3))
    assert [n for n, _ in scale.named_parameters()] == ["weight", "bias"]
    bias = make_layer('type: "Bias"', [(2, 3, 4)])
    assert torch.equal(bias.bias.detach(), torch.zeros(3))


def test_scale_two_bottoms_with_bias():
    torch.manual_seed(9)
    x, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    layer = make_layer('type: "Scale" bottom: "x" bottom: "s" scale_param { axis: 0 bias_term: true '
                       'bias_filler { type: "constant" value: 0.5 } }', [x.shape, s.shape])
    # Only the bias is a blob; it spans as many axes as the second bottom.
    assert len(layer.blobs) == 1 and layer.blobs[0] is layer.bias and layer.bias.shape == (2, 3)
    torch.testing.assert_close(layer(x, s), x * s.view(2, 3, 1, 1) + 0.5)


def test_bias_two_bottoms():
    torch.manual_seed(10)
    x, b = torch.randn(2, 3, 4), torch.randn(3, 4)
    layer = make_layer('type: "Bias" bottom: "x" bottom: "b" bias_param { axis: 1 }', [x.shape, b.shape])
    assert len(layer.blobs) == 0
    torch.testing.assert_close(layer(x, b), x + b)


@pytest.mark.parametrize("layer_text, shapes, match", [
    ('type: "Scale" scale_param { axis: 2 num_axes: 3 }', [(2, 3, 4)], "extends past"),
    ('type: "Scale" scale_param { axis: 5 }', [(2, 3, 4)], "out of range"),
    ('type: "Scale" scale_param { num_axes: -2 }', [(2, 3, 4)], "num_axes"),
    ('type: "Scale" bottom: "x" bottom: "s"', [(2, 3, 4), (4,)], "does not match"),
    ('type: "Bias" bottom: "x" bottom: "b" bias_param { axis: 0 }', [(2, 3, 4), (3,)], "does not match"),
    ('type: "Bias" bias_param { axis: -4 }', [(2, 3, 4)], "out of range"),
])
def test_scale_bias_errors_name_layer(layer_text, shapes, match):
    with pytest.raises(NetError, match=match) as err:
        make_layer(f'name: "s1" {layer_text}', shapes)
    assert "'s1'" in str(err.value)


def test_scale_bias_gradcheck():
    torch.manual_seed(11)
    layer = make_layer('type: "Scale" scale_param { num_axes: 2 bias_term: true filler { type: "gaussian" std: 1 } '
                       'bias_filler { type: "gaussian" std: 1 } }', [(2, 3, 2, 2)])
    assert gradcheck_layer(layer, [torch.randn(2, 3, 2, 2)])
    two = make_layer('type: "Scale" bottom: "x" bottom: "s" scale_param { axis: 0 bias_term: true }',
                     [(2, 3, 2), (2, 3)])
    assert gradcheck_layer(two, [torch.randn(2, 3, 2), torch.randn(2, 3)])
    bias = make_layer('type: "Bias" bottom: "x" bottom: "b"', [(2, 3, 2), (3,)])
    assert gradcheck_layer(bias, [torch.randn(2, 3, 2), torch.randn(3)])
    bias1 = make_layer('type: "Bias" bias_param { filler { type: "gaussian" std: 1 } }', [(2, 3, 2)])
    assert gradcheck_layer(bias1, [torch.randn(2, 3, 2)])


# -- MVN --------------------------------------------------------------------------------------
@pytest.mark.parametrize("across", [False, True])
def test_mvn_forward_divides_by_std_plus_eps(across):
    torch.manual_seed(12)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    layer = make_layer(f'type: "MVN" mvn_param {{ across_channels: {str(across).lower()} eps: 0.5 }}', [x.shape])
    dims = (1, 2, 3) if across else (2, 3)
    c = x - x.mean(dim=dims, keepdim=True)
    want = c / ((c * c).mean(dim=dims, keepdim=True).sqrt() + 0.5)
    torch.testing.assert_close(layer.double()(x), want)
    plain = make_layer('type: "MVN" mvn_param { normalize_variance: false }', [x.shape]).double()
    torch.testing.assert_close(plain(x), x - x.mean(dim=(2, 3), keepdim=True))


def test_mvn_backward_is_caffes_formula():
    # Caffe: dx = (g - mean(g) - mean(g*y)*y) / (sqrt(var)+eps); with a large eps this differs
    # from the exact gradient, and the layer must follow Caffe.
    torch.manual_seed(13)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    layer = make_layer('type: "MVN" mvn_param { eps: 0.5 }', [x.shape]).double()
    y = layer(x)
    y.backward(g)
    c = x.detach() - x.detach().mean(dim=(2, 3), keepdim=True)
    d = (c * c).mean(dim=(2, 3), keepdim=True).sqrt() + 0.5
    yd = y.detach()
    want = (g - g.mean(dim=(2, 3), keepdim=True) - (g * yd).mean(dim=(2, 3), keepdim=True) * yd) / d
    torch.testing.assert_close(x.grad, want)


def test_mvn_top_has_four_axes_as_in_caffe():
    # MVNLayer::Reshape: top (num, channels, height, width), missing axes 1.
    layer = make_layer('type: "MVN" mvn_param { across_channels: true }', [(2, 5)])
    assert layer.top_shapes([(2, 5)]) == [(2, 5, 1, 1)]
    x = torch.arange(10.0).view(2, 5) ** 2
    y = layer(x)
    assert y.shape == (2, 5, 1, 1)
    c = x - x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(y.view(2, 5), c / ((c * c).mean(dim=1, keepdim=True).sqrt() + 1e-9))
    with pytest.raises(NetError, match="at most 4 axes"):
        make_layer('type: "MVN"', [(1, 2, 2, 2, 2)])


def test_mvn_gradcheck():
    torch.manual_seed(14)
    for text in ("", "across_channels: true", "normalize_variance: false"):
        layer = make_layer(f'type: "MVN" mvn_param {{ {text} }}', [(2, 3, 2, 3)])
        assert gradcheck_layer(layer, [torch.randn(2, 3, 2, 3)])


# -- Softmax ----------------------------------------------------------------------------------
def test_softmax_axes():
    torch.manual_seed(15)
    x = torch.randn(2, 3, 4, 2)
    for text, dim in (("", 1), ("softmax_param { axis: 2 }", 2), ("softmax_param { axis: -1 }", 3)):
        layer = make_layer(f'type: "Softmax" {text}', [x.shape])
        y = layer(x)
        torch.testing.assert_close(y, torch.exp(x) / torch.exp(x).sum(dim=dim, keepdim=True))
    big = torch.tensor([[1000.0, 1001.0]])  # stable for large inputs
    torch.testing.assert_close(make_layer('type: "Softmax"', [big.shape])(big),
                               torch.tensor([[1 / (1 + np.e), np.e / (1 + np.e)]], dtype=torch.float32))
    with pytest.raises(NetError, match="out of range"):
        make_layer('type: "Softmax" softmax_param { axis: 4 }', [x.shape])


def test_softmax_inplace_backward_is_caffes_formula():
    torch.manual_seed(16)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    layer = make_layer('type: "Softmax" softmax_param { axis: 2 }', [x.shape]).double()
    y = layer(x)
    y.backward(g)
    # With the buffer untouched, Caffe's formula is the exact gradient.
    torch.testing.assert_close(layer.inplace_backward(g, y.detach()), x.grad)


def test_softmax_gradcheck():
    layer = make_layer('type: "Softmax" softmax_param { axis: 2 }', [(2, 3, 4)])
    assert gradcheck_layer(layer, [torch.randn(2, 3, 4)])


# -- golden parity (through the Net, like tests/test_golden.py) -------------------------------
NORM_CASES = ["layers/" + c for c in sorted(os.listdir(os.path.join(GOLDEN_ROOT, "layers")))
              if c.split("_")[0] in ("lrn", "batchnorm", "scale", "bias", "mvn", "softmax")
              and not c.startswith("softmax_loss")]


@pytest.mark.parametrize("case", NORM_CASES)
def test_golden_parity(case):
    golden_case(os.path.join(GOLDEN_ROOT, case))


def test_golden_cases_present():
    assert len(NORM_CASES) == 12
