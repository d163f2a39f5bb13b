"""Loss layers and Accuracy: hand-checked values, normalisation modes, float64 gradchecks, and
parity with Caffe's golden outputs (tests/fixtures/golden/layers/<case>)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from layer_check import gradcheck_layer, make_layer
from pycaffe_alt.errors import NetError
from pycaffe_alt.layers import LAYERS, TRAIN, LayerContext
from pycaffe_alt.layers.loss import (BATCH_SIZE, FLT_MIN, FULL, NONE, VALID, loss_normalizer,
                                     normalization_mode, with_caffe_gradient)
from pycaffe_alt.proto import caffe_pb2

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "layers"


def _softmax_loss(extra: str, shapes, tops: str = 'top: "loss"'):
    return make_layer(f'type: "SoftmaxWithLoss" bottom: "x" bottom: "y" {tops} {extra}', shapes)


# -- the shared normalisation rule ------------------------------------------------------------
def _loss_param(text: str):
    lp = caffe_pb2.LossParameter()
    text_format.Parse(text, lp)
    return lp


@pytest.mark.parametrize("text, default, want", [
    ("", VALID, VALID),
    ("", BATCH_SIZE, BATCH_SIZE),
    ("normalize: true", BATCH_SIZE, VALID),
    ("normalize: false", VALID, BATCH_SIZE),
    ("normalization: FULL normalize: false", VALID, FULL),  # the new field wins
    ("normalization: NONE", VALID, NONE),
])
def test_normalization_mode(text, default, want):
    assert normalization_mode(_loss_param(text), default) == want


def test_loss_normalizer_modes_and_floor():
    assert loss_normalizer(FULL, 3, 4, 5) == 12
    assert loss_normalizer(VALID, 3, 4, 5) == 5
    assert loss_normalizer(BATCH_SIZE, 3, 4, 5) == 3
    assert loss_normalizer(NONE, 3, 4, 5) == 1
    assert loss_normalizer(VALID, 3, 4, 0) == 1  # all ignored: no NaN
    assert float(loss_normalizer(VALID, 3, 4, torch.tensor(0))) == 1


def test_with_caffe_gradient_keeps_value_and_takes_surrogate_gradient():
    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    y = with_caffe_gradient(x * 10, x * x)
    assert y.item() == 20.0
    y.backward()
    assert x.grad.item() == 4.0


# -- SoftmaxWithLoss ---------------------------------------------------------------------------
X = torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 3.0], [0.0, 0.3, -0.4], [1.5, 1.0, 0.0]],
                 dtype=torch.float64)
Y = torch.tensor([0.0, 2.0, 1.0, 2.0], dtype=torch.float64)  # ignore_label 2 hides two rows
NLL = -F.log_softmax(X, 1)[torch.arange(4), Y.long()]


@pytest.mark.parametrize("norm, ignore, denom", [
    ("VALID", False, 4), ("VALID", True, 2), ("FULL", True, 4), ("BATCH_SIZE", True, 4),
    ("NONE", True, 1), ("BATCH_SIZE", False, 4), ("NONE", False, 1),
])
def test_softmax_loss_normalization_by_hand(norm, ignore, denom):
    extra = f"loss_param {{ normalization: {norm} {'ignore_label: 2' if ignore else ''} }}"
    layer = _softmax_loss(extra, [(4, 3), (4,)]).double()
    kept = NLL[[0, 2]] if ignore else NLL
    assert torch.allclose(layer(X, Y), kept.sum() / denom)


def test_softmax_loss_legacy_normalize_false_is_batch_size():
    layer = _softmax_loss("loss_param { normalize: false ignore_label: 2 }", [(4, 3), (4,)]).double()
    assert torch.allclose(layer(X, Y), NLL[[0, 2]].sum() / 4)


def test_softmax_loss_all_ignored_is_zero_not_nan():
    layer = _softmax_loss("loss_param { ignore_label: 2 }", [(4, 3), (4,)]).double()
    x = X.clone().requires_grad_(True)
    loss = layer(x, torch.full((4,), 2.0, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_softmax_loss_gradient_is_prob_minus_onehot_and_ignores_rows():
    layer = _softmax_loss("loss_param { ignore_label: 2 }", [(4, 3), (4,)]).double()
    x = X.clone().requires_grad_(True)
    layer(x, Y).backward()
    want = (F.softmax(X, 1) - F.one_hot(Y.long(), 3)) / 2
    want[[1, 3]] = 0
    assert torch.allclose(x.grad, want)


def test_softmax_loss_clamps_log_at_flt_min_but_keeps_caffe_gradient():
    layer = _softmax_loss("", [(1, 2), (1,)])
    x = torch.tensor([[0.0, 200.0]], requires_grad=True)  # p(class 0) underflows to 0
    loss = layer(x, torch.tensor([0.0]))
    assert loss.item() == pytest.approx(-math.log(FLT_MIN), rel=1e-6)
    loss.backward()
    assert torch.allclose(x.grad, torch.tensor([[-1.0, 1.0]]))


def test_softmax_loss_spatial_axis_and_prob_top():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 1, 2, 2)).double()
    layer = _softmax_loss("", [x.shape, y.shape], tops='top: "loss" top: "prob"').double()
    loss, prob = layer(x, y)
    nll = -F.log_softmax(x, 1).gather(1, y.long()).sum()
    assert torch.allclose(loss, nll / 8)  # VALID: N*H*W positions
    assert torch.allclose(prob, F.softmax(x, 1)) and not prob.requires_grad
    assert layer.top_shapes([x.shape, y.shape]) == [(), (2, 3, 2, 2)]
    # softmax_param.axis: classes on the last axis
    xt = x.permute(0, 2, 3, 1).contiguous()
    layer3 = _softmax_loss("softmax_param { axis: -1 }", [xt.shape, y.shape]).double()
    assert torch.allclose(layer3(xt, y.reshape(2, 2, 2)), nll / 8)


def test_softmax_loss_bad_labels_and_shapes_are_named_errors():
    with pytest.raises(NetError, match="labels"):
        _softmax_loss("", [(4, 3), (5,)])
    with pytest.raises(NetError, match="first dimension"):
        _softmax_loss("", [(4, 3), (3, 1)])
    layer = _softmax_loss("", [(4, 3), (4,)])
    with pytest.raises(NetError, match="label 3 is outside"):
        layer(X.float(), torch.tensor([0.0, 3.0, 1.0, 1.0]))
    # A NaN label must not pass as "ignored" (its int64 cast is no class and no ignore_label).
    with pytest.raises(NetError, match="is outside"):
        layer(X.float(), torch.tensor([0.0, float("nan"), 1.0, 1.0]))
    ignoring = _softmax_loss("loss_param { ignore_label: 2 }", [(4, 3), (4,)])
    with pytest.raises(NetError, match="label -1 is outside"):
        ignoring(X.float(), torch.tensor([2.0, -1.0, 1.0, 1.0]))


def test_softmax_loss_clamp_in_one_row_keeps_the_other_rows_exact():
    layer = _softmax_loss("", [(2, 2), (2,)]).double()
    x = torch.tensor([[0.0, 200.0], [0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    loss = layer(x, y)
    other = -F.log_softmax(x.detach()[1], 0)[1]
    assert loss.item() == pytest.approx((-math.log(FLT_MIN) + other.item()) / 2, rel=1e-12)
    loss.backward()
    assert torch.allclose(x.grad, (F.softmax(x.detach(), 1) - F.one_hot(y.long(), 2)) / 2)


# -- float64 gradchecks (non-label bottoms) ----------------------------------------------------
def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


GRADCHECK_CASES = {
    "softmax_ignore": ('type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }',
                       lambda: [_rand(3, 4, 2), torch.tensor([[0., 1.], [2., 3.], [1., 0.]])], [True, False]),
    "softmax_full": ('type: "SoftmaxWithLoss" loss_param { normalization: FULL }',
                     lambda: [_rand(3, 4), torch.tensor([0., 3., 2.])], [True, False]),
    "euclidean": ('type: "EuclideanLoss"', lambda: [_rand(3, 4), _rand(3, 2, 2, seed=1)], [True, True]),
    "sigmoid_ce": ('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 }',
                   lambda: [_rand(2, 5) * 3, torch.tensor([[0., 1., -1., 0.3, 1.], [1., 0., 0., -1., 0.7]])],
                   [True, False]),
    "hinge_l1": ('type: "HingeLoss"', lambda: [_rand(4, 5) * 0.3 + 0.05, torch.tensor([0., 4., 2., 2.])],
                 [True, False]),
    "hinge_l2": ('type: "HingeLoss" hinge_loss_param { norm: L2 }',
                 lambda: [_rand(4, 5) * 0.3 + 0.05, torch.tensor([0., 4., 2., 2.])], [True, False]),
    "infogain_bottom": ('type: "InfogainLoss"',
                        lambda: [F.softmax(_rand(3, 4), 1), torch.tensor([0., 3., 1.]),
                                 _rand(1, 1, 4, 4, seed=2).abs()], [True, False, False]),
    "contrastive": ('type: "ContrastiveLoss" contrastive_loss_param { margin: 3.0 }',
                    lambda: [_rand(6, 3), _rand(6, 3, seed=1), torch.tensor([1., 0., 0., 1., 0., 0.])],
                    [True, True, False]),
    "contrastive_legacy": ('type: "ContrastiveLoss" contrastive_loss_param { margin: 5.0 legacy_version: true }',
                           lambda: [_rand(6, 3), _rand(6, 3, seed=1), torch.tensor([1., 0., 0., 1., 0., 0.])],
                           [True, True, False]),
    "multinomial": ('type: "MultinomialLogisticLoss"',
                    lambda: [F.softmax(_rand(4, 3), 1), torch.tensor([0., 2., 1., 1.])], [True, False]),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_loss_gradcheck_float64(case):
    text, make_inputs, grads = GRADCHECK_CASES[case]
    inputs = make_inputs()
    layer = make_layer(text, [x.shape for x in inputs])
    assert gradcheck_layer(layer, inputs, grad_inputs=grads)


def test_contrastive_caffe_gradient_uses_d_plus_1e4():
    # Not the exact gradient: Caffe divides by (d + 1e-4); at d = 0 it stays finite (0).
    layer = make_layer('type: "ContrastiveLoss"', [(1, 2), (1, 2), (1,)]).double()
    a = torch.tensor([[0.3, 0.4]], dtype=torch.float64, requires_grad=True)  # d = 0.5 < margin 1
    b = torch.zeros(1, 2, dtype=torch.float64)
    loss = layer(a, b, torch.tensor([0.0]))
    assert loss.item() == pytest.approx(0.5 ** 2 / 2)
    loss.backward()
    assert torch.allclose(a.grad, -(1 - 0.5) / (0.5 + 1e-4) * a.detach())
    a2 = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    layer(a2, b, torch.tensor([0.0])).backward()
    assert torch.all(a2.grad == 0)


def test_multinomial_caffe_gradient_under_the_clamp():
    layer = make_layer('type: "MultinomialLogisticLoss"', [(2, 2), (2,)]).double()
    p = torch.tensor([[0.0, 1.0], [0.25, 0.75]], dtype=torch.float64, requires_grad=True)
    loss = layer(p, torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((-math.log(1e-20) - math.log(0.25)) / 2)
    loss.backward()
    assert torch.allclose(p.grad, torch.tensor([[-0.5 / 1e-20, 0.0], [-0.5 / 0.25, 0.0]], dtype=torch.float64))


def test_sigmoid_ce_default_batch_size_and_valid_mode():
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
    per = F.binary_cross_entropy_with_logits(x, t.clamp(min=0), reduction="none")
    keep = per[t != -1].sum()
    lay = make_layer('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 }', [x.shape, t.shape]).double()
    assert torch.allclose(lay(x, t), keep / 2)  # BATCH_SIZE: num = 2
    lay = make_layer('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalize: true }',
                     [x.shape, t.shape]).double()
    assert torch.allclose(lay(x, t), keep / 3)  # VALID: 3 targets kept


def test_euclidean_and_contrastive_force_backward_rules():
    eu = make_layer('type: "EuclideanLoss"', [(2, 3), (2, 3)])
    assert eu.allow_force_backward(0) and eu.allow_force_backward(1)
    sm = _softmax_loss("", [(4, 3), (4,)])
    assert sm.allow_force_backward(0) and not sm.allow_force_backward(1)
    co = make_layer('type: "ContrastiveLoss"', [(2, 3), (2, 3), (2,)])
    assert [co.allow_force_backward(i) for i in range(3)] == [True, True, False]
    with pytest.raises(NetError, match="same number of values"):
        make_layer('type: "EuclideanLoss"', [(2, 3), (2, 4)])


def test_infogain_caffe_gradient_under_the_clamp():
    layer = make_layer('type: "InfogainLoss"', [(1, 2), (1,), (2, 2)]).double()
    h = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    loss = layer(p, torch.tensor([0.0]), h)
    assert loss.item() == pytest.approx(-math.log(1e-20) - 2 * math.log(0.5))
    loss.backward()
    assert torch.allclose(p.grad, torch.tensor([[-1 / 1e-20, -2 / 0.5]], dtype=torch.float64))


def test_infogain_from_binaryproto_source(tmp_path, monkeypatch):
    h = np.array([[1.0, 0.5, 0.0], [0.2, 2.0, 0.1], [0.0, 0.0, 1.0]], dtype=np.float32)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, 1, 3, 3])
    blob.data.extend(h.ravel().tolist())
    (tmp_path / "H.binaryproto").write_bytes(blob.SerializeToString())
    monkeypatch.chdir(tmp_path)  # Caffe reads `source` relative to the working directory
    x, y = _rand(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0])
    layer = make_layer('type: "InfogainLoss" infogain_loss_param { source: "H.binaryproto" }',
                       [x.shape, y.shape]).double()
    p = F.softmax(x, 1)  # InfogainLoss takes probabilities (as the reference Caffe)
    want = -(torch.from_numpy(h).double()[y.long()] * p.log()).sum() / 4
    assert torch.allclose(layer(p, y), want)
    assert "infogain" not in layer.state_dict()
    with pytest.raises(NetError, match="cannot read the infogain matrix"):
        make_layer('type: "InfogainLoss" infogain_loss_param { source: "missing.binaryproto" }',
                   [x.shape, y.shape])
    with pytest.raises(NetError, match="loss_param.normalize"):
        make_layer('type: "InfogainLoss" loss_param { normalize: true }', [x.shape, y.shape, (3, 3)])
    with pytest.raises(NetError, match="infogain_loss_param.axis"):
        make_layer('type: "InfogainLoss" infogain_loss_param { axis: 1 }', [x.shape, y.shape, (3, 3)])
    with pytest.raises(NetError, match="3x3"):
        make_layer('type: "InfogainLoss"', [x.shape, y.shape, (2, 2)])


# -- Accuracy -------------------------------------------------------------------------------
def test_accuracy_top_k_ties_ignore_and_per_class():
    x = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0., 1., 2.],
                      [0.4, 0.4, 0.2]])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 1.0])
    text = 'type: "Accuracy" bottom: "x" bottom: "y" top: "acc" top: "per_class" accuracy_param { %s }'
    acc, per = make_layer(text % "top_k: 1", [x.shape, y.shape])(x, y)
    # Ties rank the higher class index first (the reference's partial_sort of (score, index)
    # pairs with std::greater): row 1 (label 0 tied with class 1) is wrong at top-1, row 5
    # (label 1 tied with class 0) is right.
    assert acc.shape == () and acc.item() == pytest.approx(3 / 6)
    assert torch.allclose(per, torch.tensor([0.0, 2 / 3, 1.0]))
    acc2, _ = make_layer(text % "top_k: 2", [x.shape, y.shape])(x, y)
    assert acc2.item() == pytest.approx(5 / 6)
    acc3, per3 = make_layer(text % "ignore_label: 0", [x.shape, y.shape])(x, y)
    assert acc3.item() == pytest.approx(3 / 4) and per3[0].item() == 0.0
    # Every label ignored: accuracy / count is 0/0 in the reference's float arithmetic.
    all_ignored = make_layer('type: "Accuracy" accuracy_param { ignore_label: 0 }', [(2, 3), (2,)])
    assert torch.isnan(all_ignored(x[:2], torch.zeros(2)))
    with pytest.raises(NetError, match="top_k"):
        make_layer(text % "top_k: 4", [x.shape, y.shape])


def test_accuracy_counts_a_label_outside_the_classes_as_a_miss(caplog):
    # Caffe only DCHECKs the range in Accuracy: a release build counts such a label as a miss,
    # and ENet's recipes rely on it (Cityscapes' 255 reaches an Accuracy without ignore_label).
    import logging

    x = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    y = torch.tensor([1.0, 255.0, 2.0, -1.0])
    layer = make_layer('type: "Accuracy" bottom: "x" bottom: "y" top: "acc" top: "per_class"',
                       [x.shape, y.shape])
    with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
        acc, per = layer(x, y)
        layer(x, y)
    assert acc.item() == pytest.approx(2 / 4)  # two hits over four counted labels
    assert torch.allclose(per, torch.tensor([0.0, 1.0, 1.0]))
    assert sum("counts as a miss" in r.getMessage() for r in caplog.records) == 1


def test_accuracy_counts_in_float32_under_bf16():
    # 1999 of 3000 right: bf16 counts would round to 0.6640625; Caffe's float gives 0.66633.
    x = torch.zeros(3000, 2, dtype=torch.bfloat16)
    x[:1999, 1] = 1
    x[1999:, 0] = 1
    y = torch.ones(3000)
    acc = make_layer('type: "Accuracy"', [x.shape, y.shape])(x, y)
    assert acc.dtype == torch.float32 and acc.item() == pytest.approx(1999 / 3000, rel=1e-6)


def test_accuracy_spatial_axis():
    x = _rand(2, 3, 4).float()
    y = x.argmax(1).float()
    y[0, 0] = (y[0, 0] + 1) % 3
    layer = make_layer('type: "Accuracy" top: "a" top: "b"', [x.shape, y.shape])
    acc, per = layer(x, y)
    assert acc.item() == pytest.approx(7 / 8)
    assert layer.top_shapes([x.shape, y.shape]) == [(), (3,)]


# -- golden parity with Caffe -------------------------------------------------------------------
def _run_golden(case: str):
    """Run a golden net with our layers (InnerProduct and Softmax written directly in torch, since
    they belong to other modules); return {blob: tensor} after forward and backward."""
    folder = GOLDEN / case
    net = caffe_pb2.NetParameter()
    text_format.Parse((folder / "net.prototxt").read_text(), net)
    weights = caffe_pb2.NetParameter.FromString((folder / "weights.caffemodel").read_bytes())
    params = {l.name: [torch.tensor(np.asarray(b.data, np.float32).reshape(tuple(b.shape.dim)),
                                    requires_grad=True) for b in l.blobs] for l in weights.layer}
    ref = np.load(folder / "ref.npz")
    blobs = {k[3:]: torch.tensor(ref[k], requires_grad=True) for k in ref.files if k.startswith("in/")}
    loss = torch.zeros(())
    for lp in net.layer:
        xs = [blobs[b] for b in lp.bottom]
        if lp.type == "Input":
            continue
        if lp.type == "InnerProduct":
            w, b = params[lp.name]
            outs = (F.linear(xs[0].flatten(1), w, b),)
        elif lp.type == "Softmax":
            outs = (F.softmax(xs[0], 1),)
        else:
            layer = LAYERS.get(lp.type)(lp, [tuple(x.shape) for x in xs], LayerContext(phase=TRAIN))
            outs = layer(*xs)
            outs = (outs,) if isinstance(outs, torch.Tensor) else outs
            assert [tuple(o.shape) for o in outs] == layer.top_shapes([tuple(x.shape) for x in xs])
            if layer.is_loss:
                loss = loss + (lp.loss_weight[0] if len(lp.loss_weight) else 1.0) * outs[0]
        blobs.update(zip(lp.top, outs))
    if loss.requires_grad:
        loss.backward()
    return blobs, params, ref


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("case", [
    "softmax_loss", "softmax_loss_ignore", "softmax_loss_spatial", "softmax_loss_weight",
    "euclidean", "euclidean_weighted", "sigmoid_ce", "hinge_l1", "hinge_l2", "infogain",
    "contrastive", "multinomial_logistic", "accuracy_top2", "propagate_down",
])
def test_golden_parity(case):
    blobs, params, ref = _run_golden(case)
    checked = 0
    for key in ref.files:
        kind, _, name = key.partition("/")
        if kind == "out" and "_split_" not in name:
            assert _rel(blobs[name].detach().numpy(), ref[key]) <= 1e-4, key
            checked += 1
        elif kind == "bdiff":
            # propagate_down: Caffe's force_backward overrides `propagate_down: false` on an
            # EuclideanLoss bottom, so both gradients are in the reference.
            assert _rel(blobs[name].grad.numpy(), ref[key]) <= 1e-3, key
            checked += 1
        elif kind == "pdiff":
            layer_name, _, i = name.partition("/")
            assert _rel(params[layer_name][int(i)].grad.numpy(), ref[key]) <= 1e-3, key
            checked += 1
    assert checked >= 2


def test_softmax_loss_weight_by_label_freqs_scales_each_term_and_its_gradient():
    """caffe-segnet softmax_loss_layer.cpp: loss -= log(max(p, FLT_MIN)) * w[label], divided by
    the count of labels (not of weights); the gradient (p - onehot) times w[label]."""
    from layer_check import make_layer

    text = ('type: "SoftmaxWithLoss" loss_param { weight_by_label_freqs: true class_weighting: 0.5 '
            'class_weighting: 2 class_weighting: 1 ignore_label: 255 }')
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    label = torch.tensor([[[0, 1], [2, 255]], [[1, 1], [0, 2]]], dtype=torch.float64).reshape(2, 1, 2, 2)
    layer = make_layer(text, [x.shape, label.shape]).double()
    loss = layer(x, label)
    p = torch.softmax(x.detach(), 1)
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    terms = [-torch.log(p[n, int(label[n, 0, i, j]), i, j]) * w[int(label[n, 0, i, j])]
             for n in range(2) for i in range(2) for j in range(2) if label[n, 0, i, j] != 255]
    assert torch.allclose(loss, sum(terms) / 7)
    loss.backward()
    onehot = torch.zeros_like(p)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                k = int(label[n, 0, i, j])
                if k != 255:
                    onehot[n, k, i, j] = 1
                    expected = (p[n, :, i, j] - onehot[n, :, i, j]) * w[k] / 7
                    assert torch.allclose(x.grad[n, :, i, j], expected)
    with pytest.raises(NetError, match="2 class_weighting values for 3 classes"):
        make_layer('type: "SoftmaxWithLoss" loss_param { weight_by_label_freqs: true '
                   'class_weighting: 1 class_weighting: 2 }', [x.shape, label.shape])
