"""Neuron layers: Caffe golden parity, float64 gradchecks, and Caffe's special cases."""
import math

import pytest
import torch

from layer_check import gradcheck_layer, make_layer
from pycaffe_alt.errors import NetError
from pycaffe_alt.layers import TEST, TRAIN

# Parity with Caffe's outputs and gradients: tests/test_golden.py runs the golden cases relu*,
# prelu*, elu, sigmoid, tanh, absval, power*, exp, log, bnll, threshold, dropout_test,
# inplace_chain through the Net.


def away_from(x: torch.Tensor, kinks, margin: float = 0.05) -> torch.Tensor:
    """Move entries closer than ``margin`` to any kink away from it (finite differences need it)."""
    x = x.clone()
    for k in kinks:
        near = (x - k).abs() < margin
        x[near] = k + margin * torch.where(x[near] >= k, 1.0, -1.0).to(x.dtype) * 2
    return x


SHAPE = (2, 3, 2, 2)
GRADCHECKS = [  # (layer text, input transform, kinks)
    ('type: "ReLU"', None, [0.0]),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', None, [0.0]),
    ('type: "PReLU"', None, [0.0]),
    ('type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" value: -0.3 } }',
     None, [0.0]),
    ('type: "ELU" elu_param { alpha: 0.7 }', None, [0.0]),
    ('type: "Sigmoid"', None, []),
    ('type: "TanH"', None, []),
    ('type: "AbsVal"', None, [0.0]),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', None, []),
    ('type: "Power" power_param { power: 0.5 scale: 2 shift: 3 }', lambda x: x.abs(), []),
    ('type: "Power" power_param { power: -1.5 }', lambda x: x.abs() + 0.5, []),
    ('type: "Power" power_param { power: 3 scale: -1 }', None, []),
    ('type: "Exp"', None, []),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: -1 }', None, []),
    ('type: "Log"', lambda x: x.abs() + 0.5, []),
    ('type: "Log" log_param { base: 10 scale: 2 shift: 3 }', lambda x: x.abs(), []),
    ('type: "BNLL"', lambda x: x * 10, []),
    ('type: "Dropout"', None, []),
    ('type: "Clip" clip_param { min: -0.5 max: 0.7 }', None, [-0.5, 0.7]),
    ('type: "Swish" swish_param { beta: 1.5 }', None, []),
]


@pytest.mark.parametrize("text,transform,kinks", GRADCHECKS)
def test_gradcheck(text, transform, kinks):
    torch.manual_seed(0)
    x = torch.randn(SHAPE, dtype=torch.float64)
    if transform:
        x = transform(x)
    x = away_from(x, kinks)
    layer = make_layer(text, [SHAPE])
    if layer.blobs:  # non-trivial parameter values for the parameter gradient
        with torch.no_grad():
            p = layer.blobs[0]
            p.copy_(torch.linspace(-0.4, 0.6, p.numel()).reshape(p.shape))
    assert gradcheck_layer(layer, [x])


ALL_TEXTS = [t for t, _, _ in GRADCHECKS] + ['type: "Threshold"']


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_input_untouched_and_new_tensor(text):
    # In-place use (top == bottom) relies on layers never writing into their bottom.
    x = torch.randn(SHAPE).abs() + 0.1
    before = x.clone()
    y = make_layer(text, [SHAPE], TRAIN)(x)
    assert y is not x
    assert torch.equal(x, before)


def grad_of(layer, x):
    x = x.clone().requires_grad_(True)
    layer(x).sum().backward()
    return x.grad


def test_relu_gradient_at_zero_follows_caffe():
    # Caffe: top_diff * ((x > 0) + slope * (x <= 0)): the negative side at exactly 0.
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert grad_of(make_layer('type: "ReLU"', [(3,)]), x).tolist() == [0.0, 0.0, 1.0]
    g = grad_of(make_layer('type: "ReLU" relu_param { negative_slope: 0.25 }', [(3,)]), x)
    assert g.tolist() == [0.25, 0.25, 1.0]


def test_prelu_blobs_and_values():
    layer = make_layer('type: "PReLU"', [(2, 3, 2)])
    assert layer.blob_names == ("slope",)
    assert layer.slope.shape == (3,) and torch.all(layer.slope == 0.25)  # Caffe's default filler
    shared = make_layer('type: "PReLU" prelu_param { channel_shared: true }', [(2, 3, 2)])
    assert shared.slope.shape == ()  # a 0-axis blob, as Caffe stores it
    with torch.no_grad():
        layer.slope.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = -torch.ones(2, 3, 2)
    assert torch.allclose(layer(x)[0, :, 0], torch.tensor([-0.1, -0.2, -0.3]))


def test_prelu_needs_channels():
    with pytest.raises(NetError, match="under_test.*at least 2 axes"):
        make_layer('type: "PReLU"', [(5,)])


def test_power_constant_cases_have_zero_gradient():
    x = torch.tensor([-2.0, 0.0, 3.0])
    zero_power = make_layer('type: "Power" power_param { power: 0 scale: 2 shift: 1 }', [(3,)])
    assert zero_power(x).tolist() == [1.0, 1.0, 1.0]
    zero_scale = make_layer('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', [(3,)])
    assert zero_scale(x).tolist() == [8.0, 8.0, 8.0]
    for layer in (zero_power, zero_scale):
        x_ = x.clone().requires_grad_(True)
        y = layer(x_)
        if y.requires_grad:
            y.sum().backward()
            assert x_.grad is None or torch.all(x_.grad == 0)
    identity = make_layer('type: "Power"', [(3,)])
    assert torch.equal(identity(x), x)
    assert grad_of(identity, x).tolist() == [1.0, 1.0, 1.0]


def test_power_values():
    layer = make_layer('type: "Power" power_param { power: 3 scale: 2 shift: -1 }', [(3,)])
    x = torch.tensor([0.0, 1.0, 2.0])
    assert layer(x).tolist() == [-1.0, 1.0, 27.0]


def test_exp_and_log_bases():
    x = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    e = make_layer('type: "Exp" exp_param { base: 2 scale: 3 shift: 1 }', [(3,)])
    assert torch.allclose(e(x), 2.0 ** (1 + 3 * x))
    lg = make_layer('type: "Log" log_param { base: 10 scale: 3 shift: 1 }', [(3,)])
    assert torch.allclose(lg(x), torch.log10(1 + 3 * x))
    assert torch.allclose(make_layer('type: "Exp"', [(3,)])(x), torch.exp(x))


@pytest.mark.parametrize("text", ['type: "Exp" exp_param { base: -2 }', 'type: "Log" log_param { base: 0 }',
                                  'type: "Log" log_param { base: 1 }'])
def test_bad_base(text):
    with pytest.raises(NetError, match="under_test"):
        make_layer(text, [(3,)])


def test_bnll_is_stable():
    x = torch.tensor([-200.0, -1.0, 0.0, 1.0, 200.0])
    y = make_layer('type: "BNLL"', [(5,)])(x)
    assert torch.isfinite(y).all()
    soft1 = math.log1p(math.exp(-1))
    assert torch.allclose(y, torch.tensor([0.0, soft1, math.log(2), 1 + soft1, 200.0]))
    g = grad_of(make_layer('type: "BNLL"', [(5,)]), x)
    assert torch.allclose(g, torch.sigmoid(x))


def test_threshold_values_and_no_gradient():
    layer = make_layer('type: "Threshold" threshold_param { threshold: 0.5 }', [(4,)])
    x = torch.tensor([0.2, 0.5, 0.6, -1.0], requires_grad=True)
    y = layer(x)
    assert y.tolist() == [0.0, 0.0, 1.0, 0.0]  # strictly greater
    assert not y.requires_grad  # Caffe has no backward for Threshold


def test_dropout_train_scales_kept_units():
    torch.manual_seed(1)
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.25 }', [(4000,)], TRAIN)
    x = torch.ones(4000)
    y = layer(x)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    x_ = x.clone().requires_grad_(True)
    torch.manual_seed(2)
    out = layer(x_)
    out.sum().backward()
    assert torch.equal(x_.grad, (out != 0).float() / 0.75)  # same mask, same scale


def test_dropout_masks_follow_caffes_stream_on_the_cpu():
    # DropoutLayer::Forward_cpu: caffe_rng_bernoulli(count, 1. - threshold_) draws one raw number
    # per unit from Caffe's stream (boost's bernoulli_distribution<double>: keep when
    # u <= p * (2^32 - 1)); top = bottom * mask * scale_ (float(1 / (1 - threshold_))).
    import numpy as np

    from pycaffe_alt import caffe_rng

    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [(2, 3, 4, 5)], TRAIN)
    caffe_rng.seed(11)
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(x)
    raw = caffe_rng.CaffeRNG(11).raw(2 * 3 * 4 * 5 * 2)
    keep = raw[:120].astype(np.float64) <= (1.0 - float(np.float32(0.3))) * 4294967295.0
    scale = np.float32(1.0 / (1.0 - float(np.float32(0.3))))
    want = x.detach().numpy() * keep.reshape(2, 3, 4, 5).astype(np.float32) * scale
    np.testing.assert_array_equal(y.detach().numpy(), want)
    y.backward(torch.ones_like(y))
    np.testing.assert_array_equal(x.grad.numpy(), keep.reshape(2, 3, 4, 5) * scale)
    # The next forward takes the next 120 numbers; TEST passes take none.
    second = layer(x.detach())
    keep2 = raw[120:].astype(np.float64) <= (1.0 - float(np.float32(0.3))) * 4294967295.0
    np.testing.assert_array_equal(second.numpy() != 0, keep2.reshape(2, 3, 4, 5) & (x.detach().numpy() != 0))
    layer.eval()
    layer(x.detach())
    assert caffe_rng.stream().raw(1)[0] == caffe_rng.CaffeRNG(11).raw(241)[240]


def test_dropout_scale_train_false_scales_at_test_time():
    # caffe-fast-rcnn's DropoutParameter.scale_train (py-faster-rcnn's ZF models): TRAIN keeps
    # survivors unscaled, TEST multiplies by float(1 / scale_) = 1 - ratio.
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.25 scale_train: false }'
    x = torch.full((4000,), 2.0, requires_grad=True)
    y = make_layer(text, [(4000,)], TRAIN)(x)
    assert set(y.detach().unique().tolist()) == {0.0, 2.0}
    y.sum().backward()
    assert set(x.grad.unique().tolist()) == {0.0, 1.0}
    test = make_layer(text, [(4000,)], TEST)(torch.full((4000,), 2.0))
    assert torch.equal(test, torch.full((4000,), 2.0 * 0.75))


def test_dropout_sample_weights_test_drops_at_test_time():
    # Bayesian SegNet's caffe-segnet DropoutParameter.sample_weights_test: TEST draws a mask
    # from Caffe's stream and scales survivors, exactly as TRAIN does (Monte Carlo dropout).
    from pycaffe_alt import caffe_rng

    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.5 sample_weights_test: true }'
    layer = make_layer(text, [(1000,)], TEST)
    caffe_rng.seed(4)
    y = layer(torch.ones(1000))
    keep = caffe_rng.CaffeRNG(4).bernoulli(1000, 0.5)
    assert torch.equal(y, torch.from_numpy(keep).float() * 2.0)
    plain = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.5 }', [(1000,)], TEST)
    assert torch.equal(plain(torch.ones(1000)), torch.ones(1000))


def test_dropout_test_phase_is_identity_and_follows_train_flag():
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.5 }', [(100,)], TEST)
    x = torch.randn(100)
    assert torch.equal(layer(x), x)
    layer.train(True)
    assert not torch.equal(layer(x), x)


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_dropout_bad_ratio(ratio):
    with pytest.raises(NetError, match="dropout_ratio"):
        make_layer(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [(3,)])


def test_clip_gradient_passes_at_bounds():
    layer = make_layer('type: "Clip" clip_param { min: -1 max: 1 }', [(5,)])
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert layer(x).tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert grad_of(layer, x).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # Caffe: min <= x <= max


def test_clip_bad_bounds():
    with pytest.raises(NetError, match="greater than max"):
        make_layer('type: "Clip" clip_param { min: 2 max: 1 }', [(3,)])


def test_swish_and_elu_values():
    x = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    sw = make_layer('type: "Swish" swish_param { beta: 2 }', [(2,)])
    assert torch.allclose(sw(x), x / (1 + torch.exp(-2 * x)))
    elu = make_layer('type: "ELU" elu_param { alpha: 0.5 }', [(2,)])
    assert torch.allclose(elu(x), torch.tensor([0.5 * (math.exp(-1) - 1), 0.5], dtype=torch.float64))



INPLACE_TEXTS = ['type: "ReLU" relu_param { negative_slope: 0.2 }', 'type: "ReLU"', 'type: "ELU"',
                 'type: "Sigmoid"', 'type: "TanH"', 'type: "Exp" exp_param { base: 3 scale: 0.5 shift: 1 }']


@pytest.mark.parametrize("text", INPLACE_TEXTS)
def test_inplace_backward_on_own_output_is_the_true_gradient(text):
    # With nothing overwriting the blob afterwards, Caffe's in-place formula is the exact gradient.
    x = away_from(torch.randn(SHAPE, dtype=torch.float64), [0.0]).requires_grad_(True)
    layer = make_layer(text, [SHAPE]).double()
    g = torch.randn(SHAPE, dtype=torch.float64)
    y = layer(x)
    (expected,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(layer.inplace_backward(g, y.detach()), expected)


def test_inplace_backward_reads_the_final_buffer_like_caffe():
    # Caffe: ReLU in place followed by an in-place Scale takes its mask from the scaled blob.
    layer = make_layer('type: "ReLU"', [(4,)])
    final = torch.tensor([0.5, -0.1, 0.3, -0.2])  # what a later in-place layer left in the blob
    assert layer.inplace_backward(torch.ones(4), final).tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("kind", ["AbsVal", "Power", "Log", "BNLL", "Clip", "Swish", "PReLU", "Dropout"])
def test_no_buffer_backward_where_caffe_in_place_is_not_a_gradient(kind):
    # Documented choice: these keep their true gradient in in-place chains (see NeuronLayer).
    cls = __import__("pycaffe_alt.layers", fromlist=["LAYERS"]).LAYERS.get(kind)
    assert cls.inplace_backward is None
