"""The SSD fork's layers: Normalize, Permute, PriorBox and DetectionOutput.

Expected values are worked out by hand from the fork's definitions (normalize_layer.cpp,
permute_layer.cpp, prior_box_layer.cpp, detection_output_layer.cpp, bbox_util.cpp); the real
res10 face detector against Caffe's outputs is in test_realmodels.py.
"""
import math

import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError
from pycaffe_alt.layers.ssd import nms_fast
from layer_check import gradcheck_layer, make_layer


# -- Normalize -------------------------------------------------------------------------------------
def normalize_ref(x, scale, across_spatial, eps):
    x = x.astype(np.float64)
    if across_spatial:
        norm = np.sqrt((x ** 2).sum(axis=(1, 2, 3), keepdims=True) + eps)
    else:
        norm = np.sqrt((x ** 2).sum(axis=1, keepdims=True) + eps)
    return x / norm * np.asarray(scale, np.float64).reshape((1, -1, 1, 1) if np.ndim(scale) else ())


@pytest.mark.parametrize("across_spatial", [True, False])
@pytest.mark.parametrize("channel_shared", [True, False])
def test_normalize_forward(across_spatial, channel_shared):
    layer = make_layer(f"""type: "Normalize" norm_param {{ across_spatial: {str(across_spatial).lower()}
        channel_shared: {str(channel_shared).lower()} eps: 0.01
        scale_filler {{ type: "constant" value: 20 }} }}""", [(2, 3, 4, 5)])
    assert tuple(layer.scale.shape) == (() if channel_shared else (3,))
    assert torch.all(layer.scale == 20)
    if not channel_shared:
        with torch.no_grad():
            layer.scale.copy_(torch.tensor([1.0, 2.0, -3.0]))
    x = torch.randn(2, 3, 4, 5)
    got = layer(x).detach().numpy()
    want = normalize_ref(x.numpy(), layer.scale.detach().numpy(), across_spatial, 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_normalize_defaults_are_across_spatial_shared_scale_one():
    layer = make_layer('type: "Normalize"', [(1, 2, 3, 3)])
    assert tuple(layer.scale.shape) == () and float(layer.scale.detach()) == 1.0
    x = torch.randn(1, 2, 3, 3)
    np.testing.assert_allclose(layer(x).detach().numpy(), normalize_ref(x.numpy(), 1.0, True, 1e-10),
                               rtol=1e-5)


@pytest.mark.parametrize("across_spatial", [True, False])
@pytest.mark.parametrize("channel_shared", [True, False])
def test_normalize_gradcheck(across_spatial, channel_shared):
    # The fork's bottom gradient is the exact one only for a scale shared by all channels
    # (tests/test_layer_semantics_audit.py checks its per-channel formula); the scale's is exact.
    layer = make_layer(f"""type: "Normalize" norm_param {{ across_spatial: {str(across_spatial).lower()}
        channel_shared: {str(channel_shared).lower()} scale_filler {{ type: "gaussian" std: 1 }} }}""",
                       [(2, 3, 2, 3)])
    assert gradcheck_layer(layer, [torch.randn(2, 3, 2, 3)], grad_inputs=[channel_shared])


def test_normalize_needs_a_channel_axis():
    with pytest.raises(CaffeError, match="at least 2 axes"):
        make_layer('type: "Normalize"', [(5,)])


# -- Permute ---------------------------------------------------------------------------------------
def test_permute_orders_axes_and_appends_the_rest():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    layer = make_layer('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }', [x.shape])
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy().transpose(0, 2, 3, 1))
    # Unnamed axes follow in increasing order: order {2} means (2, 0, 1, 3).
    layer = make_layer('type: "Permute" permute_param { order: 2 }', [x.shape])
    assert layer.order == (2, 0, 1, 3)
    out = layer(x)
    assert out.is_contiguous()
    np.testing.assert_array_equal(out.numpy(), x.numpy().transpose(2, 0, 1, 3))


def test_permute_gradcheck():
    layer = make_layer('type: "Permute" permute_param { order: 0 order: 3 order: 1 order: 2 }', [(2, 3, 2, 4)])
    assert gradcheck_layer(layer, [torch.randn(2, 3, 2, 4)])


@pytest.mark.parametrize("order, message", [("order: 4", "not an axis"), ("order: 1 order: 1", "twice")])
def test_permute_bad_order(order, message):
    with pytest.raises(CaffeError, match=message):
        make_layer(f'name: "perm" type: "Permute" permute_param {{ {order} }}', [(1, 2, 3, 4)])


# -- PriorBox --------------------------------------------------------------------------------------
PRIOR = """type: "PriorBox" prior_box_param { min_size: 4 max_size: 9 aspect_ratio: 2 flip: true
           variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 %s }"""


def corner(cx, cy, w, h, img=8.0):
    return [(cx - w / 2) / img, (cy - h / 2) / img, (cx + w / 2) / img, (cy + h / 2) / img]


def test_prior_box_boxes_order_and_variances():
    layer = make_layer(PRIOR % "", [(1, 5, 2, 2), (1, 3, 8, 8)])
    top = layer(torch.zeros(1, 5, 2, 2), torch.zeros(1, 3, 8, 8))
    # 4 priors per cell: min box, sqrt(min*max) box, ratio 2, ratio 1/2; 2x2 cells.
    assert tuple(top.shape) == (1, 2, 2 * 2 * 4 * 4)
    assert layer.top_shapes([(1, 5, 2, 2), (1, 3, 8, 8)]) == [(1, 2, 64)]
    boxes = top[0, 0].reshape(2, 2, 4, 4).numpy()
    r = math.sqrt(2)
    for h in range(2):
        for w in range(2):
            cx, cy = (w + 0.5) * 4, (h + 0.5) * 4  # step = image / feature = 4, offset 0.5
            want = [corner(cx, cy, 4, 4), corner(cx, cy, 6, 6), corner(cx, cy, 4 * r, 4 / r),
                    corner(cx, cy, 4 / r, 4 * r)]
            np.testing.assert_allclose(boxes[h, w], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(top[0, 1].reshape(-1, 4).numpy(), np.tile([0.1, 0.1, 0.2, 0.2], (16, 1)),
                               rtol=1e-7)
    assert not top.requires_grad


def test_prior_box_clip_img_size_step_offset_and_one_variance():
    layer = make_layer(PRIOR.replace("variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2", "variance: 0.3")
                       % "clip: true img_size: 16 step: 8 offset: 0", [(1, 5, 2, 2), (1, 3, 99, 77)])
    top = layer(torch.zeros(1, 5, 2, 2), torch.zeros(1, 3, 99, 77))
    boxes = top[0, 0].reshape(2, 2, 4, 4).numpy()
    # Cell (1, 0): centre (0, 8) in a 16x16 image; min box 4x4, clipped to [0, 1].
    np.testing.assert_allclose(boxes[1, 0, 0], [0, 6 / 16, 2 / 16, 10 / 16], atol=1e-6)
    assert boxes.min() >= 0 and boxes.max() <= 1 and boxes.min() == 0
    assert torch.all(top[0, 1] == torch.tensor(0.3))


def test_prior_box_truncates_sizes_to_integers():
    """The fork reads min_size/max_size into ints: 4.7 acts as 4 (sqrt(4*9) = 6)."""
    a = make_layer(PRIOR % "", [(1, 1, 1, 1), (1, 1, 8, 8)])
    b = make_layer(PRIOR.replace("min_size: 4 max_size: 9", "min_size: 4.7 max_size: 9.9") % "",
                   [(1, 1, 1, 1), (1, 1, 8, 8)])
    x, img = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 8, 8)
    assert torch.equal(a(x, img), b(x, img))


def test_prior_box_flip_false_and_duplicate_ratios():
    layer = make_layer('type: "PriorBox" prior_box_param { min_size: 2 aspect_ratio: 1 aspect_ratio: 3 '
                       'aspect_ratio: 3 flip: false }', [(1, 1, 1, 1), (1, 1, 4, 4)])
    assert layer.num_priors == 2  # ratios 1 and 3 only
    top = layer(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 4, 4))
    assert torch.allclose(top[0, 1], torch.tensor(0.1))  # default variance


@pytest.mark.parametrize("param, message", [
    ("", "no min_size"),
    ("min_size: 4 max_size: 3", "not greater"),
    ("min_size: 4 variance: 0.1 variance: 0.2", "variance"),
    ("min_size: 4 img_size: 8 img_h: 8 img_w: 8", "both img_size"),
    ("min_size: 4 step: 8 step_h: 0 step_w: 8", "both step"),
])
def test_prior_box_bad_parameters(param, message):
    with pytest.raises(CaffeError, match=message) as info:
        make_layer(f'name: "pb" type: "PriorBox" prior_box_param {{ {param} }}', [(1, 1, 2, 2), (1, 1, 8, 8)])
    assert "'pb'" in str(info.value)


# -- DetectionOutput -------------------------------------------------------------------------------
PRIORS = np.array([[0.1, 0.1, 0.3, 0.3],     # A
                   [0.12, 0.1, 0.32, 0.3],   # B: IoU(A, B) = 0.036 / 0.044 = 0.82
                   [0.6, 0.6, 0.9, 0.9],     # C
                   [0.1, 0.5, 0.2, 0.7]],    # D
                  dtype=np.float32)
VARIANCE = [0.1, 0.1, 0.2, 0.2]
# conf[p, c]: background, class 1, class 2.
CONF = np.array([[0.05, 0.90, 0.05],
                 [0.10, 0.80, 0.10],
                 [0.10, 0.30, 0.60],
                 [0.90, 0.05, 0.05]], dtype=np.float32)


def prior_blob(priors=PRIORS):
    var = np.tile(np.asarray(VARIANCE, np.float32), (len(priors), 1))
    return torch.from_numpy(np.stack([priors.reshape(-1), var.reshape(-1)])[None].copy())


def detection_layer(num_priors=4, num_classes=3, batch=1, loc_classes=1, **fields):
    """A DetectionOutput layer; ``fields`` override detection_output_param entries (prototxt text)."""
    param = {"num_classes": str(num_classes), "background_label_id": "0",
             "nms_param": "{ nms_threshold: 0.45 }", "code_type": "CENTER_SIZE",
             "confidence_threshold": "0.1"}
    param.update(fields)
    body = " ".join(f"{k}: {v}" if not v.startswith("{") else f"{k} {v}" for k, v in param.items())
    shapes = [(batch, num_priors * loc_classes * 4), (batch, num_priors * num_classes), (1, 2, num_priors * 4)]
    return make_layer(f'name: "det" type: "DetectionOutput" detection_output_param {{ {body} }}', shapes)


def test_detection_output_decodes_suppresses_and_groups_by_label():
    layer = detection_layer()
    assert layer.top_shapes([(1, 16), (1, 12), (1, 2, 16)]) == [(1, 1, 1, 7)]
    out = layer(torch.zeros(1, 16), torch.from_numpy(CONF.reshape(1, -1)), prior_blob())
    rows = out[0, 0].numpy()
    # Class 1: A kept, B suppressed by A (IoU 0.82 > 0.45), C kept, D below the threshold;
    # class 2: C. Rows by ascending label, then descending score.
    np.testing.assert_array_equal(rows[:, :2], [[0, 1], [0, 1], [0, 2]])
    np.testing.assert_allclose(rows[:, 2], [0.9, 0.3, 0.6], rtol=1e-6)
    np.testing.assert_allclose(rows[:, 3:], PRIORS[[0, 2, 2]], atol=1e-6)  # zero offsets: the priors


def test_detection_output_keep_top_k_keeps_best_scores_grouped_by_label():
    layer = detection_layer(keep_top_k="2")
    rows = layer(torch.zeros(1, 16), torch.from_numpy(CONF.reshape(1, -1)), prior_blob())[0, 0].numpy()
    np.testing.assert_array_equal(rows[:, :3], np.float32([[0, 1, 0.9], [0, 2, 0.6]]))


def test_detection_output_nms_top_k_limits_candidates():
    layer = detection_layer(nms_param="{ nms_threshold: 0.45 top_k: 1 }")
    rows = layer(torch.zeros(1, 16), torch.from_numpy(CONF.reshape(1, -1)), prior_blob())[0, 0].numpy()
    np.testing.assert_allclose(rows[:, 1:3], [[1, 0.9], [2, 0.6]], rtol=1e-6)


def test_detection_output_center_size_decoding():
    loc = np.zeros((4, 4), np.float32)
    loc[0] = [1.0, -2.0, 0.5, -1.0]
    layer = detection_layer()
    rows = layer(torch.from_numpy(loc.reshape(1, -1)), torch.from_numpy(CONF.reshape(1, -1)),
                 prior_blob())[0, 0].numpy()
    cx, cy = 0.2 + 0.1 * 1.0 * 0.2, 0.2 + 0.1 * -2.0 * 0.2
    w, h = math.exp(0.2 * 0.5) * 0.2, math.exp(0.2 * -1.0) * 0.2
    np.testing.assert_allclose(rows[0, 3:], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-6)


@pytest.mark.parametrize("code, decode", [
    ("CORNER", lambda p, l, v: p + v * l),
    ("CORNER_SIZE", lambda p, l, v: p + v * l * np.array([p[2] - p[0], p[3] - p[1]] * 2)),
])
def test_detection_output_corner_codes_per_class_locations(code, decode):
    # share_location false: 3 location sets per prior (class 0 unused); two images.
    rng = np.random.RandomState(0)
    loc = rng.uniform(-0.3, 0.3, size=(2, 4, 3, 4)).astype(np.float32)
    conf = np.stack([CONF, CONF[::-1].copy()])
    layer = detection_layer(share_location="false", code_type=code, batch=2, loc_classes=3)
    rows = layer(torch.from_numpy(loc.reshape(2, -1)), torch.from_numpy(conf.reshape(2, -1)),
                 prior_blob())[0, 0].numpy()
    assert set(rows[:, 0]) == {0, 1}
    for image, label, score, *box in rows:
        image, label = int(image), int(label)
        p = int(np.flatnonzero(np.isclose(conf[image, :, label], score))[0])
        np.testing.assert_allclose(box, decode(PRIORS[p], loc[image, p, label], np.float32(VARIANCE)),
                                   atol=1e-6)


def test_detection_output_without_detections_writes_minus_one_rows():
    layer = detection_layer(confidence_threshold="0.95", batch=2)
    conf = torch.from_numpy(np.stack([CONF, CONF]).reshape(2, -1))
    out = layer(torch.zeros(2, 16), conf, prior_blob())
    expected = -np.ones((1, 1, 2, 7), np.float32)
    expected[0, 0, :, 0] = [0, 1]
    np.testing.assert_array_equal(out.numpy(), expected)


def test_detection_output_bad_shapes_name_the_layer():
    with pytest.raises(CaffeError, match="priors") as info:
        make_layer('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 3 }',
                   [(1, 20), (1, 12), (1, 2, 16)])
    assert "'det'" in str(info.value)
    with pytest.raises(CaffeError, match="num_classes"):
        make_layer('type: "DetectionOutput"', [(1, 16), (1, 12), (1, 2, 16)])


def nms_reference(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """The fork's ApplyNMSFast, one candidate and one kept box at a time in float32."""
    f = np.float32
    cand = [i for i in range(len(scores)) if scores[i] > f(score_threshold)]
    cand.sort(key=lambda i: -scores[i])  # Python's sort is stable, like std::stable_sort
    if top_k > -1:
        cand = cand[:top_k]

    def size(b):
        return f(0) if b[2] < b[0] or b[3] < b[1] else f(b[2] - b[0]) * f(b[3] - b[1])

    def iou(a, b):
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            return f(0)
        w = f(min(a[2], b[2]) - max(a[0], b[0]))
        h = f(min(a[3], b[3]) - max(a[1], b[1]))
        if w > 0 and h > 0:
            inter = f(w * h)
            return f(inter / f(f(size(a) + size(b)) - inter))
        return f(0)

    kept, threshold = [], f(nms_threshold)
    for i in cand:
        keep = all(iou(boxes[i], boxes[k]) <= threshold for k in kept)
        if keep:
            kept.append(i)
            if eta < 1 and threshold > 0.5:
                threshold = f(threshold * f(eta))
    return kept


@pytest.mark.parametrize("eta, nms_threshold, top_k", [(1.0, 0.45, -1), (0.9, 0.9, -1), (0.8, 0.95, 50)])
def test_nms_fast_matches_the_forks_greedy_loop(eta, nms_threshold, top_k):
    rng = np.random.RandomState(1)
    centres = rng.uniform(0.2, 0.8, size=(300, 2))
    sizes = rng.uniform(0.05, 0.3, size=(300, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
    boxes[:5] = boxes[5:10]  # exact duplicates
    scores = rng.uniform(0, 1, size=300).astype(np.float32)
    scores[20:25] = scores[30]  # ties keep index order
    got = nms_fast(torch.from_numpy(boxes), torch.from_numpy(scores), 0.05, nms_threshold, eta, top_k)
    want = nms_reference(boxes, scores, 0.05, nms_threshold, eta, top_k)
    assert got.tolist() == want
    if eta < 1:  # the adaptive threshold really changed the result
        assert want != nms_reference(boxes, scores, 0.05, nms_threshold, 1.0, top_k)


# -- in a net --------------------------------------------------------------------------------------
SSD_HEAD = """
name: "tiny_ssd_head"
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "feat" type: "Pooling" bottom: "data" top: "feat" pooling_param { pool: AVE kernel_size: 4 stride: 4 } }
layer { name: "norm" type: "Normalize" bottom: "feat" top: "norm" norm_param { across_spatial: false channel_shared: false } }
layer { name: "loc" type: "Convolution" bottom: "norm" top: "loc"
        convolution_param { num_output: 8 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "norm" top: "conf"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }
layer { name: "conf_out" type: "Flatten" bottom: "conf_softmax" top: "conf_out" }
layer { name: "priors" type: "PriorBox" bottom: "norm" bottom: "data" top: "priors"
        prior_box_param { min_size: 3 aspect_ratio: 2 flip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_out" bottom: "priors"
        top: "detection_out" detection_output_param { num_classes: 2 background_label_id: 0
        nms_param { nms_threshold: 0.3 top_k: 10 } code_type: CENTER_SIZE keep_top_k: 3 confidence_threshold: 0.0 } }
"""


def test_ssd_head_runs_in_a_net(tmp_path):
    path = tmp_path / "ssd_head.prototxt"
    path.write_text(SSD_HEAD)
    net = caffe.Net(str(path), caffe.TEST)
    assert net.blobs["priors"].data.shape == (1, 2, 2 * 2 * 2 * 4)
    assert net.blobs["detection_out"].data.shape == (1, 1, 1, 7)  # Caffe's placeholder before forward
    net.blobs["data"].data[...] = np.random.RandomState(0).uniform(-1, 1, (1, 3, 8, 8))
    out = net.forward()["detection_out"]
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7 and 1 <= out.shape[2] <= 3
    assert np.all(out[0, 0, :, 1] == 1) and np.all(np.diff(out[0, 0, :, 2]) <= 0)
    assert net.params["norm"][0].data.shape == (3,)


@pytest.mark.parametrize("ratio", [0.0, -2.0])
def test_prior_box_aspect_ratio_must_be_positive(ratio):
    # 0 divided by zero in the set-up ("float division by zero" was the whole message).
    with pytest.raises(CaffeError, match="aspect_ratio must be positive"):
        make_layer(f'type: "PriorBox" prior_box_param {{ min_size: 4 aspect_ratio: {ratio} }}',
                   [(1, 2, 3, 3), (1, 3, 12, 12)])


def test_detection_output_ignores_save_output_param_with_a_warning(caplog):
    # SSD's released deploys carry the block; the top blob does not depend on it.
    text = ('type: "DetectionOutput" detection_output_param { num_classes: 2 '
            'nms_param { nms_threshold: 0.45 } save_output_param { output_directory: "out" '
            'label_map_file: "labelmap.prototxt" name_size_file: "sizes.txt" } }')
    with caplog.at_level("WARNING", logger="pycaffe_alt"):
        layer = make_layer(text, [(1, 8), (1, 4), (1, 2, 8)])
    assert layer is not None and any("save_output_param is ignored" in r.getMessage()
                                     for r in caplog.records)


@pytest.mark.parametrize("extra,needle", [
    ("variance: nan", "variance must be positive"),
    ("step: nan", "step must be positive"),
    ("offset: nan", "offset must be finite"),
    ("aspect_ratio: inf", "aspect_ratio must be positive"),
    ("max_size: nan", "max_size nan is not greater"),
])
def test_prior_box_refuses_non_finite_values(extra, needle):
    # NaN passed the "<= 0" tests and gave NaN priors; the fork's CHECK_GT(.., 0) fails on it.
    with pytest.raises(CaffeError, match=needle):
        make_layer(f'type: "PriorBox" prior_box_param {{ min_size: 4 {extra} }}',
                   [(1, 2, 3, 3), (1, 3, 12, 12)])
    with pytest.raises(CaffeError, match="min_size must be positive"):
        make_layer('type: "PriorBox" prior_box_param { min_size: nan }', [(1, 2, 3, 3), (1, 3, 12, 12)])


def test_detection_output_refuses_a_nan_nms_threshold():
    with pytest.raises(CaffeError, match="nms_threshold must be non-negative"):
        make_layer('type: "DetectionOutput" detection_output_param { num_classes: 3 '
                   'nms_param { nms_threshold: nan } }', [(1, 8), (1, 6), (1, 2, 8)])
