"""HardThreshold and SupportMask: formulas, hooks, gradients (float64, away from the kink), errors."""
import pytest
import torch

from layer_check import gradcheck_layer, make_layer
from pycaffe_alt.alternation import rules
from pycaffe_alt.errors import NetError

SHAPE = (3, 4, 2, 3)
BETA = torch.tensor([0.3, -0.2, 0.0, 0.5], dtype=torch.float64)


def ht(extra: str = "", shape=SHAPE, beta=BETA):
    layer = make_layer(f'type: "HardThreshold" {extra}', [shape]).double()
    if beta is not None:
        with torch.no_grad():
            layer.beta.copy_(beta)
    return layer


def away_from_beta(shape=SHAPE, beta=BETA, margin=0.05) -> torch.Tensor:
    """Inputs at least ``margin`` from their channel's threshold (finite differences need it)."""
    b = rules.channel_view(beta, torch.empty(shape))
    off = torch.randn(shape, dtype=torch.float64)
    off = torch.where(off.abs() < margin, torch.sign(off + 1e-12) * 2 * margin, off)
    return b + off


# -- HardThreshold forward ----------------------------------------------------------------------
def test_threshold_keep_is_eq9():
    q = away_from_beta()
    m = q > rules.channel_view(BETA, q)
    z = ht()(q)
    assert torch.equal(z, torch.where(m, q, torch.zeros_like(q)))
    # Exact values: the thresholded units are copied, not recomputed.
    assert torch.equal(z[m], q[m]) and (z[~m] == 0).all()


def test_threshold_shift_is_eq2():
    q = away_from_beta()
    b = rules.channel_view(BETA, q)
    z = ht("hard_threshold_param { output: SHIFT }")(q)
    assert torch.allclose(z, (q - b) * (q > b), rtol=0, atol=0)


def test_relu_bias_is_relu_after_bias():
    q = away_from_beta()
    layer = ht("hard_threshold_param { mode: RELU_BIAS }")
    assert torch.equal(layer(q), torch.relu(q - rules.channel_view(BETA, q)))
    # RELU_BIAS ignores the output choice: it is a ReLU either way.
    layer2 = ht("hard_threshold_param { mode: RELU_BIAS output: KEEP }")
    assert torch.equal(layer2(q), layer(q))


def test_set_mode_switches_and_rejects_unknown():
    q = away_from_beta()
    layer = ht("hard_threshold_param { mode: RELU_BIAS }")
    relu_out = layer(q)
    layer.set_mode("THRESHOLD")
    keep = layer(q)
    m = q > rules.channel_view(BETA, q)
    assert torch.equal(keep, q * m) and not torch.equal(keep, relu_out)
    with pytest.raises(NetError, match="unknown HardThreshold mode 'SOFT'"):
        layer.set_mode("SOFT")


def test_channel_shared_and_2d():
    layer = ht("hard_threshold_param { channel_shared: true }", beta=torch.tensor(0.25))
    assert layer.beta.shape == ()
    q = torch.randn(SHAPE, dtype=torch.float64)
    assert torch.equal(layer(q), q * (q > 0.25))
    layer2 = ht(shape=(5, 4))
    q2 = torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(layer2(q2), q2 * (q2 > BETA))


def test_beta_filler_and_default():
    assert (make_layer('type: "HardThreshold"', [SHAPE]).beta == 0).all()
    layer = make_layer('type: "HardThreshold" hard_threshold_param { beta_filler { type: "constant" '
                       'value: 0.7 } }', [SHAPE])
    assert layer.beta.shape == (4,) and (layer.beta == 0.7).all()


# -- HardThreshold gradients --------------------------------------------------------------------
@pytest.mark.parametrize("extra", ["hard_threshold_param { mode: RELU_BIAS }",
                                   "hard_threshold_param { output: SHIFT }",
                                   "hard_threshold_param { output: SHIFT channel_shared: true }"])
def test_gradcheck_exact_modes(extra):
    # In RELU_BIAS and SHIFT the beta surrogate is the true derivative: check both q and beta.
    beta = torch.tensor(0.1, dtype=torch.float64) if "channel_shared" in extra else BETA
    layer = ht(extra, beta=beta)
    assert gradcheck_layer(layer, [away_from_beta(beta=beta)])


def test_gradcheck_keep_input_and_beta_surrogate():
    layer = ht()
    q = away_from_beta()
    assert gradcheck_layer(layer, [q], params=False)
    # KEEP's beta gradient is the ReLU surrogate -(q > beta), summed per channel (documented).
    q = q.clone().requires_grad_(True)
    g = torch.randn(SHAPE, dtype=torch.float64)
    layer(q).backward(g)
    m = (q > rules.channel_view(BETA, q)).double()
    assert torch.allclose(layer.beta.grad, -(g * m).sum(dim=(0, 2, 3)))
    assert torch.allclose(q.grad, g * m)


def test_beta_frozen_by_lr_mult_zero_in_net():
    import pycaffe_alt
    net = pycaffe_alt.Net(_net_text("param { lr_mult: 0 }"), phase=pycaffe_alt.TRAIN)
    assert not net.layer_modules["ht"].beta.requires_grad
    net = pycaffe_alt.Net(_net_text(""), phase=pycaffe_alt.TRAIN)
    assert net.layer_modules["ht"].beta.requires_grad


def _net_text(ht_extra: str) -> str:
    import tempfile
    text = f"""
    layer {{ name: "data" type: "Input" top: "data" top: "label"
      input_param {{ shape {{ dim: 4 dim: 5 }} shape {{ dim: 4 dim: 3 }} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
      inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "ht" type: "HardThreshold" bottom: "ip" top: "ip" {ht_extra} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }}
    """
    f = tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False)
    f.write(text)
    f.close()
    return f.name


# -- HardThreshold hooks ------------------------------------------------------------------------
def test_support_method_is_eq12():
    layer = ht()
    q = away_from_beta()
    s = layer.support(q)
    assert s.dtype == torch.bool and torch.equal(s, q > rules.channel_view(BETA, q))


@pytest.mark.parametrize("extra,shift", [("", False),
                                         ("hard_threshold_param { output: SHIFT }", True),
                                         ("hard_threshold_param { mode: RELU_BIAS }", True)])
def test_fixed_support_makes_layer_linear(extra, shift):
    layer = ht(extra)
    q = away_from_beta().requires_grad_(True)
    fixed = torch.rand(SHAPE) > 0.5
    layer.fixed_support = lambda x: fixed
    z = layer(q)
    b = rules.channel_view(BETA, q)
    want = fixed * (q - b) if shift else fixed * q
    assert torch.equal(z, want)
    # Linear in q: z(2q) - z(q) = m * q regardless of where q sits relative to beta.
    assert torch.allclose(layer(2 * q) - z, fixed * q)
    g = torch.randn(SHAPE, dtype=torch.float64)
    z.backward(g)
    assert torch.equal(q.grad, g * fixed)
    if shift:
        assert torch.allclose(layer.beta.grad, -(g * fixed).sum(dim=(0, 2, 3)))
    else:
        assert layer.beta.grad is None  # beta does not enter eq. 13's output
    assert gradcheck_layer(layer, [away_from_beta()], params=shift)
    layer.fixed_support = None
    assert torch.equal(layer(q.detach()), ht(extra)(q.detach()))


def test_fixed_support_bad_shape_names_layer():
    layer = ht()
    layer.fixed_support = lambda x: torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(NetError, match="under_test.*fixed_support gave a mask of shape"):
        layer(torch.randn(SHAPE, dtype=torch.float64))


def test_record_support_receives_detached_eq12_mask():
    layer = ht()
    got = []
    layer.record_support = got.append
    q = away_from_beta().requires_grad_(True)
    layer(q)
    assert len(got) == 1 and got[0].dtype == torch.bool and not got[0].requires_grad
    assert torch.equal(got[0], q.detach() > rules.channel_view(BETA, q))
    # Recorded also while the support is fixed: the trainer sees what thresholding would give.
    layer.fixed_support = lambda x: torch.zeros(SHAPE, dtype=torch.bool)
    layer(q)
    assert torch.equal(got[1], got[0])


def test_hardthreshold_bad_bottom():
    with pytest.raises(NetError, match="at least 2 axes"):
        make_layer('type: "HardThreshold"', [(5,)])
    layer = make_layer('type: "HardThreshold"', [SHAPE])
    with pytest.raises(NetError, match="has 4 thresholds"):
        layer(torch.randn(3, 5, 2, 3))


# -- SupportMask --------------------------------------------------------------------------------
def test_supportmask_bottom():
    layer = make_layer('type: "SupportMask"', [SHAPE, SHAPE]).double()
    q = torch.randn(SHAPE, dtype=torch.float64)
    mb = (torch.rand(SHAPE) > 0.5).double() * torch.rand(SHAPE).add(0.5).double()
    assert torch.equal(layer(q, mb), q * (mb != 0))
    assert gradcheck_layer(layer, [q, mb], grad_inputs=[True, False])
    # The mask bottom gets no gradient even when it asks for one.
    mb = mb.clone().requires_grad_(True)
    out = layer(q, mb)
    assert not out.grad_fn or torch.autograd.grad(out.sum(), mb, allow_unused=True)[0] is None
    # A broadcast mask (per channel) is accepted.
    lb = make_layer('type: "SupportMask"', [SHAPE, (1, 4, 1, 1)]).double()
    mc = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    assert torch.equal(lb(q, mc), q * mc)


def test_supportmask_batch_is_eq41():
    layer = make_layer('type: "SupportMask" support_mask_param { source: BATCH beta: 2.0 }',
                       [SHAPE]).double()
    q = torch.randn(SHAPE, dtype=torch.float64)
    sums = (q * q).sum(0)
    m = sums > 2.0
    assert 0 < m.sum() < m.numel()  # the test data straddles the threshold
    assert torch.equal(layer(q), q * m)
    # Away from the threshold (sums far from beta) the mask is locally constant: gradcheck holds.
    q = q * torch.where((sums - 2.0).abs() < 0.2, 3.0, 1.0)
    assert gradcheck_layer(layer, [q])


def test_supportmask_batch_reduce_hook():
    layer = make_layer('type: "SupportMask" support_mask_param { source: BATCH beta: 1.0 }',
                       [SHAPE]).double()
    q = torch.randn(SHAPE, dtype=torch.float64) * 0.1  # alone, every sum is below beta
    assert (layer(q) == 0).all()
    seen = []
    # Stands in for torch.distributed.all_reduce over 2 processes holding the same data x 100.
    layer.reduce_sums = lambda s: (seen.append(s.shape), s * 100)[1]
    assert seen == [] and torch.equal(layer(q), q * ((q * q).sum(0) * 100 > 1.0))
    assert seen == [SHAPE[1:]]


def test_supportmask_store_needs_provider():
    layer = make_layer('type: "SupportMask" support_mask_param { source: STORE key: "k1" }', [SHAPE])
    assert layer.key == "k1"
    with pytest.raises(NetError, match=r"(?s)under_test.*STORE.*alternation solver.*BOTTOM"):
        layer(torch.randn(SHAPE))
    fixed = torch.rand(SHAPE) > 0.5
    layer.support_provider = lambda q: fixed
    q = torch.randn(SHAPE)
    assert torch.equal(layer(q), q * fixed)
    assert make_layer('type: "SupportMask" support_mask_param { source: STORE }', [SHAPE]).key == \
        "under_test"


def test_supportmask_in_net_without_provider_builds():
    # Shape inference must not call the STORE provider (it exists only during training).
    import pycaffe_alt
    net = pycaffe_alt.Net(_store_net(), phase=pycaffe_alt.TEST)
    assert net.blobs["z"].shape == (2, 3)


def _store_net() -> str:
    import tempfile
    f = tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False)
    f.write('layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "sm" type: "SupportMask" bottom: "x" top: "z" '
            'support_mask_param { source: STORE } }\n')
    f.close()
    return f.name


def test_supportmask_bad_configs():
    with pytest.raises(NetError, match="source BOTTOM takes 2 bottom"):
        make_layer('type: "SupportMask"', [SHAPE])
    with pytest.raises(NetError, match="source BATCH takes 1 bottom"):
        make_layer('type: "SupportMask" support_mask_param { source: BATCH }', [SHAPE, SHAPE])
    with pytest.raises(NetError, match="does not broadcast"):
        make_layer('type: "SupportMask"', [SHAPE, (3, 5, 2, 3)])
    with pytest.raises(NetError, match="beta must be >= 0"):
        make_layer('type: "SupportMask" support_mask_param { source: BATCH beta: -1 }', [SHAPE])


def test_record_support_on_supportmask():
    layer = make_layer('type: "SupportMask" support_mask_param { source: BATCH beta: 1.0 }', [SHAPE])
    got = []
    layer.record_support = got.append
    q = torch.randn(SHAPE)
    layer(q)
    assert torch.equal(got[0], ((q * q).sum(0) > 1.0).unsqueeze(0))


# -- the pure rules -----------------------------------------------------------------------------
def test_rules():
    q = torch.randn(SHAPE, dtype=torch.float64)
    assert torch.equal(rules.threshold_support(q, BETA), q > BETA.reshape(1, 4, 1, 1))
    assert torch.equal(rules.threshold_support(q, 0.1), q > 0.1)
    x = torch.relu(q)
    # Eq. 38 on the thresholded signal with beta 0 is eq. 12's support.
    assert torch.equal(rules.reconstruction_support(x, 0.0), q > 0)
    assert torch.equal(rules.reconstruction_support(q, 0.5), q * q > 0.5)
    s = rules.batch_support_sums(q)
    assert s.shape == SHAPE[1:] and torch.allclose(s, (q ** 2).sum(0))
    assert rules.batch_support_sums(q.half()).dtype == torch.float32
    assert torch.equal(rules.batch_support(s, 3.0), s > 3.0)


def test_changed_fraction():
    import numpy as np
    a = np.array([0b10110000, 0x00], np.uint8)
    b = np.array([0b10010001, 0x01], np.uint8)
    assert rules.changed_fraction(a, b) == 3 / 16
    assert rules.changed_fraction(torch.from_numpy(a), torch.from_numpy(b), num_bits=12) == 3 / 12
    assert rules.changed_fraction(a, a) == 0.0
    with pytest.raises(ValueError):
        rules.changed_fraction(a, b[:1])
