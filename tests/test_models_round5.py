"""Round 5 of real third-party models: their deploy prototxts build and run here as in Caffe.

Each model (fixtures/models_round5/, origins in its README.md) is built in TEST with random
weights, run forward on a random input (batch 1, and a smaller image where the net allows), and
every blob's shape is checked against Caffe's shape rules worked out independently here
(:func:`caffe_shapes`, from the BVLC layers' Reshape: convolution floor, pooling ceil with the
padding clip, deconvolution, Crop offsets, Concat/Eltwise agreement). Where a family has a layer
worth checking by value, a pure-PyTorch reference of it is compared on the net's own blobs:
SqueezeNet's fire module, depthwise (MobileNet) and grouped (ResNeXt) convolution, ShuffleNet's
channel shuffle, SENet's Axpy and two-bottom Scale, Inception-v3's 1x7 / 7x1 kernels, FCN-8s'
Deconvolution and Crop, MTCNN's PReLU, Faster R-CNN's ROIPooling (behind a stand-in proposal
Python layer), SegNet's unpooling and YOLOv3's nearest Upsample. Nets a fork's layer or a
model's own inconsistency keep from building say so (DeformableConvolution, yolov3-tiny).
"""
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError
from pycaffe_alt.proto import caffe_pb2
import model_fixtures



# -- helpers --------------------------------------------------------------------------------------
def fixture_text(name: str) -> str:
    return model_fixtures.fixture_text("models_round5", name)


def write_model(tmp_path, name: str, text: str = None) -> str:
    path = os.path.join(str(tmp_path), name + ".prototxt")
    with open(path, "w") as f:
        f.write(fixture_text(name) if text is None else text)
    return path


def build(tmp_path, name: str, shape=None, text: str = None, **kw):
    """The net in TEST, reshaped to ``shape`` (first input), params randomised, random input."""
    path = write_model(tmp_path, name, text)
    net = caffe.Net(path, caffe.TEST, **kw)
    data = net.inputs[0]
    if shape is not None:
        net.blobs[data].reshape(*shape)
        net.reshape()
    randomize(net)
    rng = np.random.RandomState(1)
    for name_ in net.inputs:
        net.blobs[name_].data[...] = rng.randn(*net.blobs[name_].data.shape)
    return path, net


def randomize(net, seed: int = 0) -> None:
    """Weights of fan-in scale; BatchNorm statistics of a unit-variance kind (random fillers
    with BatchNorm's zero statistics would blow every activation up by 1/sqrt(eps))."""
    gen = torch.Generator().manual_seed(seed)  # torch's: fcn8s' fc6 alone has 103M weights

    def randn(shape) -> np.ndarray:
        return torch.randn(tuple(shape), generator=gen).numpy()

    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":
            c = blobs[0].data.shape
            blobs[0].data[...] = 0.1 * randn(c)
            blobs[1].data[...] = 0.5 + np.abs(randn(c))
            blobs[2].data[...] = 1.0
            continue
        for b in blobs:
            shape = b.data.shape
            fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            b.data[...] = randn(shape) / math.sqrt(max(fan, 1))


def caffe_shapes(path: str, input_shapes: dict) -> dict:
    """Every blob's shape by Caffe's Reshape rules, worked out from the prototxt alone."""
    net = caffe_pb2.NetParameter()
    with open(path) as f:
        text_format.Merge(f.read(), net)
    shapes = dict(input_shapes)

    def pair(p, rep, h, w, default):
        if p.HasField(h) or p.HasField(w):
            return getattr(p, h), getattr(p, w)
        v = list(rep)
        return (default, default) if not v else (v[0], v[-1])

    def conv(p, s, deconv):
        kh, kw = pair(p, p.kernel_size, "kernel_h", "kernel_w", None)
        sh, sw = pair(p, p.stride, "stride_h", "stride_w", 1)
        ph, pw = pair(p, p.pad, "pad_h", "pad_w", 0)
        dh = dw = (list(p.dilation) or [1])[0]
        if deconv:  # deconv_layer.cpp compute_output_shape
            out = (sh * (s[2] - 1) + dh * (kh - 1) + 1 - 2 * ph,
                   sw * (s[3] - 1) + dw * (kw - 1) + 1 - 2 * pw)
        else:  # conv_layer.cpp compute_output_shape
            out = ((s[2] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
                   (s[3] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)
        return (s[0], p.num_output) + out

    def pool(p, s):
        if p.global_pooling:
            return s[:2] + (1, 1)
        kh, kw = pair(p, [p.kernel_size] if p.HasField("kernel_size") else [], "kernel_h", "kernel_w", None)
        sh, sw = pair(p, [p.stride], "stride_h", "stride_w", 1)
        ph, pw = pair(p, [p.pad], "pad_h", "pad_w", 0)
        rnd = math.ceil if (not p.HasField("ceil_mode") or p.ceil_mode) else math.floor
        oh, ow = rnd((s[2] + 2 * ph - kh) / sh) + 1, rnd((s[3] + 2 * pw - kw) / sw) + 1
        if ph or pw:  # pooling_layer.cpp: the last window must start inside the image
            oh -= (oh - 1) * sh >= s[2] + ph
            ow -= (ow - 1) * sw >= s[3] + pw
        return s[:2] + (oh, ow)

    same = {"ReLU", "PReLU", "BatchNorm", "Scale", "BN", "Dropout", "Sigmoid", "Softmax", "LRN",
            "ShuffleChannel", "TanH"}
    for layer in net.layer:
        t, b = layer.type, [shapes.get(x) for x in layer.bottom]
        if t == "Input" or None in b:
            continue
        if t in ("Convolution", "ConvolutionDepthwise", "Deconvolution"):
            out = [conv(layer.convolution_param, b[0], t == "Deconvolution")]
        elif t == "Pooling":
            out = [pool(layer.pooling_param, b[0])][:1]
        elif t in same or (t == "Scale" and len(b) == 2):
            out = [b[0]]
        elif t == "Axpy":  # axpy_layer.cpp: top is shaped as bottom[1]
            out = [b[1]]
        elif t == "Eltwise":
            assert all(s == b[0] for s in b), (layer.name, b)
            out = [b[0]]
        elif t == "Concat":
            ax = layer.concat_param.axis
            assert all(s[:ax] + s[ax + 1:] == b[0][:ax] + b[0][ax + 1:] for s in b), (layer.name, b)
            out = [b[0][:ax] + (sum(s[ax] for s in b),) + b[0][ax + 1:]]
        elif t == "InnerProduct":
            out = [b[0][:layer.inner_product_param.axis] + (layer.inner_product_param.num_output,)]
        elif t == "Crop":
            ax, offs = layer.crop_param.axis, list(layer.crop_param.offset)
            for i in range(ax, 4):
                off = offs[0] if len(offs) == 1 else (offs[i - ax] if offs else 0)
                assert off + b[1][i] <= b[0][i], (layer.name, b)
            out = [b[0][:ax] + b[1][ax:]]
        elif t == "Flatten":
            out = [b[0][:1] + (int(np.prod(b[0][1:])),)]
        elif t == "Permute":
            out = [tuple(b[0][o] for o in layer.permute_param.order)]
        elif t == "Reshape":
            dims = [b[0][i] if d == 0 else d for i, d in enumerate(layer.reshape_param.shape.dim)]
            if -1 in dims:
                dims[dims.index(-1)] = int(np.prod(b[0])) // -int(np.prod(dims))
            out = [tuple(dims)]
        elif t == "Upsample" and len(b) == 1:  # the YOLOv3 forks' nearest Upsample
            sc = layer.upsample_param.scale
            out = [b[0][:2] + (b[0][2] * sc, b[0][3] * sc)]
        elif t == "Upsample":  # SegNet: H * scale - pad_out_h
            p = layer.upsample_param
            out = [b[0][:2] + (b[0][2] * p.scale - p.pad_out_h, b[0][3] * p.scale - p.pad_out_w)]
        elif t == "Interp":  # hszhao/PSPNet interp_layer.cpp Reshape (pad_beg/pad_end crop)
            p = layer.interp_param
            h, w = b[0][2] + p.pad_beg + p.pad_end, b[0][3] + p.pad_beg + p.pad_end
            if p.HasField("shrink_factor"):
                h, w = (h - 1) // p.shrink_factor + 1, (w - 1) // p.shrink_factor + 1
            if p.HasField("zoom_factor"):
                h, w = h + (h - 1) * (p.zoom_factor - 1), w + (w - 1) * (p.zoom_factor - 1)
            elif not p.HasField("shrink_factor"):
                h, w = p.height, p.width
            out = [b[0][:2] + (h, w)]
        else:
            continue  # a layer with its own rules (PriorBox, ROIPooling...): checked in its test
        for name, s in zip(layer.top, out):
            shapes[name] = tuple(int(v) for v in s)
        if t == "Pooling" and len(layer.top) == 2:  # a MAX pooling's mask top
            shapes[layer.top[1]] = shapes[layer.top[0]]
    return shapes


def check_shapes(path: str, net, min_blobs: int) -> dict:
    ref = caffe_shapes(path, {k: tuple(net.blobs[k].data.shape) for k in net.inputs})
    got = {k: tuple(net.blobs[k].data.shape) for k in ref if k in net.blobs}
    assert len(got) >= min_blobs
    assert {k: ref[k] for k in got} == got
    return ref


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64))


def close(a, b, rtol=1e-4) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max()), 1e-6)
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


def conv_ref(net, layer: str, x, **kw) -> torch.Tensor:
    p = net.params[layer]
    bias = t(p[1].data) if len(p) > 1 else None
    return F.conv2d(t(x), t(p[0].data), bias, **kw)


def with_force_backward(name: str) -> str:
    return "force_backward: true\n" + fixture_text(name)


# -- classification families ----------------------------------------------------------------------
def test_squeezenet_v1_1_fire_module_and_backward(tmp_path):
    """forresti/SqueezeNet v1.1: fire = squeeze 1x1 -> ReLU -> [expand 1x1, expand 3x3] -> ReLU
    -> Concat; pool1 3x3/2 on 113 rounds up (56); with force_backward the data gets a finite,
    non-zero gradient."""
    path, net = build(tmp_path, "squeezenet_v1.1", (1, 3, 227, 227),
                      text=with_force_backward("squeezenet_v1.1"))
    out = net.forward()
    assert out["prob"].shape == (1, 1000, 1, 1)
    np.testing.assert_allclose(out["prob"].sum(), 1.0, rtol=1e-5)
    ref = check_shapes(path, net, 40)
    assert ref["conv1"] == (1, 64, 113, 113) and ref["pool1"] == (1, 64, 56, 56)
    assert ref["fire9/concat"] == (1, 512, 14, 14)  # 56 -> 28 -> 14, ceil
    sq = torch.relu(conv_ref(net, "fire2/squeeze1x1", net.blobs["pool1"].data))
    e1 = torch.relu(conv_ref(net, "fire2/expand1x1", sq.numpy()))
    e3 = torch.relu(conv_ref(net, "fire2/expand3x3", sq.numpy(), padding=1))
    close(net.blobs["fire2/concat"].data, torch.cat([e1, e3], 1))
    net.blobs["prob"].diff[...] = np.random.RandomState(3).randn(*out["prob"].shape)
    diff = net.backward()["data"]
    assert diff.shape == (1, 3, 227, 227) and np.isfinite(diff).all() and np.abs(diff).sum() > 0


@pytest.mark.parametrize("name,stride", [("mobilenet_v1", 1), ("mobilenet_v2", 2)])
def test_mobilenet_depthwise_is_grouped_convolution(tmp_path, name, stride):
    """shicai/MobileNet-Caffe v1 and v2: depthwise 3x3 written as Convolution with group equal to
    the channels; v2's inverted residuals join by Eltwise SUM."""
    path, net = build(tmp_path, name, (1, 3, 128, 128))
    out = net.forward()
    assert out["prob"].shape == (1, 1000, 1, 1)
    check_shapes(path, net, 30)
    layer, below = ("conv2_1/dw", "conv1") if name == "mobilenet_v1" else \
        ("conv2_2/dwise", "conv2_2/expand/bn")
    net.forward(end=layer)
    w = net.params[layer][0].data
    assert w.shape[1] == 1
    ref = F.conv2d(t(net.blobs[below].data), t(w), None, stride=stride, padding=1,
                   groups=w.shape[0])
    close(net.blobs[layer].data, ref)


def test_resnext50_grouped_convolution(tmp_path):
    """soeaver/caffe-model ResNeXt-50 32x4d: 3x3 convolutions with group 32, ceil_mode: false
    on pool1 (a fork's PoolingParameter field: 112 -> 56, not 57)."""
    path, net = build(tmp_path, "resnext50", (1, 3, 96, 96))
    out = net.forward()
    assert out["prob"].shape == (1, 1000)
    ref = check_shapes(path, net, 70)
    assert ref["pool1"] == (1, 64, 24, 24)
    net.forward(end="resx1_conv2")
    ref = conv_ref(net, "resx1_conv2", net.blobs["resx1_conv1"].data, padding=1, groups=32)
    close(net.blobs["resx1_conv2"].data, ref)


def test_shufflenet_channel_shuffle_and_depthwise(tmp_path):
    """farmingyard/ShuffleNet 1x g3: the fork's ShuffleChannel (channel j * g + i takes
    i * k + j) and ConvolutionDepthwise; stage joins by Concat with an AVE pooled shortcut."""
    path, net = build(tmp_path, "shufflenet_g3", (1, 3, 96, 96))
    out = net.forward()
    assert out["fc1000"].shape == (1, 1000, 1, 1)
    check_shapes(path, net, 80)
    net.forward(end="shuffle2")
    x = net.blobs["resx2_conv1"].data
    n, c, h, w = x.shape
    ref = x.reshape(n, 3, c // 3, h, w).transpose(0, 2, 1, 3, 4).reshape(x.shape)
    np.testing.assert_array_equal(net.blobs["shuffle2"].data, ref)


def test_se_resnet50_axpy_and_global_pooling(tmp_path):
    """hujie-frank/SENet SE-ResNet-50: global AVE pooling -> 1x1 down/up -> Sigmoid, then the
    fork's Axpy ``top = a * x + y`` (a per channel), followed by the in-place ReLU."""
    path, net = build(tmp_path, "se_resnet50")  # pool5 is a fixed 7 x 7
    out = net.forward()
    assert out["prob"].shape == (1, 1000)
    ref = check_shapes(path, net, 120)
    assert ref["conv2_1_1x1_up"] == (1, 256, 1, 1)
    a = net.blobs["conv2_1_1x1_up"].data
    assert ((a > 0) & (a < 1)).all()  # the Sigmoid ran in place
    x, y = net.blobs["conv2_1_1x1_increase"].data, net.blobs["conv2_1_1x1_proj"].data
    close(net.blobs["conv2_1"].data, np.maximum(a * x + y, 0))


def test_se_bn_inception_two_bottom_scale(tmp_path):
    """hujie-frank/SENet SE-BN-Inception: the excitation Reshape (0, 0) then Scale with two
    bottoms and axis 0 multiplies each (n, c) plane."""
    path, net = build(tmp_path, "se_bn_inception")  # pool5 is a fixed 7 x 7
    out = net.forward()
    assert out["prob"].shape == (1, 1000)
    check_shapes(path, net, 140)
    x = net.blobs["inception_3a/concat"].data
    s = net.blobs["inception_3a_prob_reshape"].data
    assert s.shape == x.shape[:2]
    net.forward(end="inception_3a_scale")
    close(net.blobs["inception_3a/output"].data, x * s[:, :, None, None])


def test_inception_v3_asymmetric_kernels(tmp_path):
    """soeaver/caffe-model Inception-v3: kernel_h/kernel_w 1x7 and 7x1 with pad_h/pad_w, at
    its 299 input (the grid-reduction pools need it)."""
    path, net = build(tmp_path, "inception_v3")
    out = net.forward()
    assert out["prob"].shape == (1, 1000)
    check_shapes(path, net, 120)
    assert net.params["inception_b1_1x7"][0].data.shape[2:] == (1, 7)
    assert net.params["inception_b1_7x1"][0].data.shape[2:] == (7, 1)
    net.forward(end="inception_b1_1x7")
    below = net.bottom_names["inception_b1_1x7"][0]
    ref = conv_ref(net, "inception_b1_1x7", net.blobs[below].data, padding=(0, 3))
    close(net.blobs["inception_b1_1x7"].data, ref)


def test_age_and_gender_nets_in_v1_format(tmp_path):
    """GilLevi/AgeGenderDeepLearning: V1 ``layers { type: CONVOLUTION }`` prototxts (upgraded on
    load), 7x7/4 then 3x3/2 ceil pooling: 227 -> 56 -> 28."""
    for name, classes in (("age_net", 8), ("gender_net", 2)):
        _, net = build(tmp_path, name, (2, 3, 227, 227))
        out = net.forward()
        assert out["prob"].shape == (2, classes)
        np.testing.assert_allclose(out["prob"].sum(1), 1.0, rtol=1e-5)
        assert net.blobs["conv1"].data.shape == (2, 96, 56, 56)
        assert net.blobs["pool1"].data.shape == (2, 96, 28, 28)


# -- dense prediction -----------------------------------------------------------------------------
def test_fcn8s_deconvolution_and_crop_offsets(tmp_path):
    """shelhamer/fcn.berkeleyvision.org voc-fcn8s deploy: pad 100 on conv1_1, Deconvolution
    (stride 2 / 2 / 8) and Crop at offsets 5, 9 and 31 give a score the size of the input."""
    path, net = build(tmp_path, "fcn8s", (1, 3, 64, 80))
    out = net.forward()
    assert out["score"].shape == (1, 21, 64, 80)
    check_shapes(path, net, 30)
    up2 = F.conv_transpose2d(t(net.blobs["score_fr"].data), t(net.params["upscore2"][0].data),
                             stride=2)
    close(net.blobs["upscore2"].data, up2)
    h, w = net.blobs["upscore2"].data.shape[2:]
    close(net.blobs["score_pool4c"].data, net.blobs["score_pool4"].data[:, :, 5:5 + h, 5:5 + w])
    close(out["score"], net.blobs["upscore8"].data[:, :, 31:31 + 64, 31:31 + 80])


def test_openpose_stage_concat(tmp_path):
    """CMU openpose COCO body model: input given at run time (input_dim 1 x 1), stage outputs
    joined with the VGG features by Concat; net_output is PAFs (38) + heatmaps (19) at 1/8."""
    path, net = build(tmp_path, "openpose_coco", (1, 3, 64, 72))
    out = net.forward()
    assert out["net_output"].shape == (1, 57, 8, 9)
    check_shapes(path, net, 100)
    b = [net.blobs[k].data for k in ("conv5_5_CPM_L1", "conv5_5_CPM_L2", "conv4_4_CPM")]
    np.testing.assert_array_equal(net.blobs["concat_stage2"].data, np.concatenate(b, 1))


def test_segnet_basic_unpooling(tmp_path):
    """alexgkendall/SegNet-Tutorial SegNet-basic inference with its DenseImageData swapped for
    an Input: SegNet's BN (bn_mode INFERENCE) and Upsample unpooling at the MAX pooling's mask,
    pad_out_h on the deepest one (3 x 2 -> 5 x 6 here)."""
    text = fixture_text("segnet_basic_inference")
    data_layer = re.search(r'layer \{\s*name: "data"\s*type: "DenseImageData".*?\n\}\n', text, re.S)
    text = text.replace(data_layer.group(0),
                        'layer { name: "data" type: "Input" top: "data" top: "label" input_param '
                        '{ shape { dim: 1 dim: 3 dim: 40 dim: 48 } shape { dim: 1 dim: 1 dim: 40 '
                        'dim: 48 } } }\n')
    path, net = build(tmp_path, "segnet_basic_inference", text=text)
    out = net.forward()
    assert out["prob"].shape == (1, 11, 40, 48)
    ref = check_shapes(path, net, 24)
    assert ref["pool4"] == (1, 64, 3, 3) and ref["upsample4"] == (1, 64, 5, 6)
    unpooled = F.max_unpool2d(t(net.blobs["conv_decode2"].data),
                              torch.from_numpy(net.blobs["pool1_mask"].data).long(), 2,
                              output_size=(40, 48))
    close(net.blobs["upsample1"].data, unpooled)


# -- detection ------------------------------------------------------------------------------------
def test_mtcnn_pnet_rnet_onet_prelu(tmp_path):
    """kpzhang93/MTCNN v1 det1/det2/det3: PReLU per channel; P-Net is fully convolutional
    (a 37 x 45 input gives 14 x 18 maps: conv 3 -> pool 2/2 ceil -> conv 3 -> conv 3)."""
    _, net = build(tmp_path, "mtcnn_det1", (1, 3, 37, 45))
    out = net.forward()
    assert out["prob1"].shape == (1, 2, 14, 18) and out["conv4-2"].shape == (1, 4, 14, 18)
    net.forward(end="conv1")
    pre = net.blobs["conv1"].data.copy()
    net.forward(start="PReLU1", end="PReLU1")
    close(net.blobs["conv1"].data, F.prelu(t(pre), t(net.params["PReLU1"][0].data)))
    for name, size, tops in (("mtcnn_det2", 24, {"prob1": 2, "conv5-2": 4}),
                             ("mtcnn_det3", 48, {"prob1": 2, "conv6-2": 4, "conv6-3": 10})):
        _, net = build(tmp_path, name, (3, 3, size, size))
        out = net.forward()
        assert {k: v.shape for k, v in out.items()} == {k: (3, n) for k, n in tops.items()}


def test_mobilenet_ssd_priors_and_detections(tmp_path):
    """chuanqi305/MobileNet-SSD VOC deploy: depthwise MobileNet trunk, 6 PriorBox heads
    (19^2 * 3 + (10^2 + 5^2 + 3^2 + 2^2 + 1) * 6 = 1917 priors), DetectionOutput rows
    [image, label, score, box] with labels in 1..20 and scores above the threshold."""
    path, net = build(tmp_path, "mobilenet_ssd")
    out = net.forward()
    check_shapes(path, net, 40)
    assert net.blobs["mbox_priorbox"].data.shape == (1, 2, 1917 * 4)
    assert net.blobs["mbox_loc"].data.shape == (1, 1917 * 4)
    assert net.blobs["mbox_conf_flatten"].data.shape == (1, 1917 * 21)
    det = out["detection_out"]
    assert det.shape[:2] == (1, 1) and det.shape[3] == 7
    rows = det[0, 0]
    if rows[0, 0] != -1:  # -1 marks "no detection"
        assert set(rows[:, 1]) <= set(range(1, 21)) and (rows[:, 2] >= 0.25).all()


def test_faster_rcnn_zf_roi_pooling_behind_a_proposal_stand_in(tmp_path, monkeypatch):
    """rbgirshick/py-faster-rcnn ZF end2end test net. Its proposal layer is Python code of the
    project (rpn.proposal_layer): without it the net says what to do; with a stand-in module
    already imported, ROIPooling pools the given boxes as Caffe's roi_pooling_layer.cpp."""
    with pytest.raises(CaffeError, match=r"(?s)'proposal'.*Python.*rpn\.proposal_layer.*allow_python"):
        caffe.Net(write_model(tmp_path, "frcnn_zf_test"), caffe.TEST)

    rois = np.array([[0, 0, 0, 176, 176], [0, 16, 32, 111, 207], [0, 200, 8, 223, 30]], np.float32)

    class ProposalLayer(caffe.Layer):
        def setup(self, bottom, top):
            assert "feat_stride" in self.param_str

        def reshape(self, bottom, top):
            top[0].reshape(*rois.shape)

        def forward(self, bottom, top):
            top[0].data[...] = rois

        def backward(self, top, propagate_down, bottom):
            pass

    package, module = types.ModuleType("rpn"), types.ModuleType("rpn.proposal_layer")
    module.ProposalLayer = ProposalLayer
    package.proposal_layer = module
    monkeypatch.setitem(sys.modules, "rpn", package)
    monkeypatch.setitem(sys.modules, "rpn.proposal_layer", module)
    _, net = build(tmp_path, "frcnn_zf_test")
    net.blobs["im_info"].data[...] = [[224, 224, 1]]
    out = net.forward()
    assert out["cls_prob"].shape == (3, 21) and out["bbox_pred"].shape == (3, 84)
    feat = net.blobs["conv5"].data[0]
    side = feat.shape[1]
    assert feat.shape[1:] == (15, 15)  # 224 -> 112 -> 57 (pad 1, ceil) -> 29 -> 15
    pooled = net.blobs["roi_pool_conv5"].data
    assert pooled.shape == (3, 256, 6, 6)
    for r, (_, x1, y1, x2, y2) in enumerate(rois):  # roi_pooling_layer.cpp Forward_cpu
        sw, sh, ew, eh = (int(math.floor(v / 16.0 + 0.5)) for v in (x1, y1, x2, y2))
        bh, bw = max(eh - sh + 1, 1) / 6.0, max(ew - sw + 1, 1) / 6.0
        for ph in range(6):
            for pw in range(6):
                hs = min(max(int(math.floor(ph * bh)) + sh, 0), side)
                he = min(max(int(math.ceil((ph + 1) * bh)) + sh, 0), side)
                ws = min(max(int(math.floor(pw * bw)) + sw, 0), side)
                we = min(max(int(math.ceil((pw + 1) * bw)) + sw, 0), side)
                want = feat[:, hs:he, ws:we].max(axis=(1, 2)) if he > hs and we > ws else 0
                np.testing.assert_array_equal(pooled[r, :, ph, pw], want)


def test_yolov3_nearest_upsample_route(tmp_path):
    """ChenYingpeng/caffe-yolov3 yolov3 (darknet2caffe): leaky ReLU, shortcut Eltwise, the
    one-bottom nearest Upsample (scale 2) and route Concat; three heads at 1/32, 1/16, 1/8."""
    path, net = build(tmp_path, "yolov3_416", (1, 3, 96, 128))
    out = net.forward()
    assert {k: v.shape for k, v in out.items()} == {
        "layer82-conv": (1, 255, 3, 4), "layer94-conv": (1, 255, 6, 8),
        "layer106-conv": (1, 255, 12, 16)}
    check_shapes(path, net, 100)
    src = net.blobs[net.bottom_names["layer86-upsample"][0]].data
    up = net.blobs[net.top_names["layer86-upsample"][0]].data
    np.testing.assert_array_equal(up, src.repeat(2, axis=2).repeat(2, axis=3))


# -- refused, with what to do ---------------------------------------------------------------------
def test_yolov3_tiny_stride_one_pool_mismatch_is_caffes_concat_check(tmp_path):
    """ChenYingpeng/caffe-yolov3 yolov3-tiny: darknet's size-2 stride-1 maxpool keeps 13 x 13,
    but Caffe's Pooling gives 12 x 12 (no padding), so the route Concat of the upsampled 24 x 24
    with the 26 x 26 layer fails as Caffe's Concat CHECK does; the error names both shapes."""
    with pytest.raises(CaffeError, match=r"(?s)layer21-route.*\(1, 128, 24, 24\).*\(1, 256, 26, 26\)"):
        caffe.Net(write_model(tmp_path, "yolov3_tiny"), caffe.TEST)


def test_deformable_convolution_is_refused_by_name(tmp_path):
    """unsky/Deformable-ConvNets-caffe LeNet: DeformableConvolution with its own parameter block
    is a fork's layer; the error names it and what can stand in."""
    with pytest.raises(CaffeError) as e:
        caffe.Net(write_model(tmp_path, "deform_lenet"), caffe.TEST)
    msg = str(e.value)
    assert "DeformableConvolution" in msg and "deformable_convolution_param" in msg
    assert "Python layer" in msg


def test_se_resnet50_reshaped_below_its_fixed_pool_says_the_kernel_does_not_fit(tmp_path):
    """SE-ResNet-50's pool5 is a fixed 7 x 7 window: reshaped to 96 x 96 the input reaching it
    is 3 x 3, and Caffe's Pooling Reshape works out a -3 x -3 top (its Blob CHECK fails). The
    error is the one the build gives for that geometry, naming the kernel and the input, not
    torch's pooling message."""
    net = caffe.Net(write_model(tmp_path, "se_resnet50"), caffe.TEST)
    net.blobs["data"].reshape(1, 3, 96, 96)
    with pytest.raises(CaffeError, match=r"pool5/7x7_s1.*kernel \(7, 7\).*does not fit the 3x3 "
                                         r"input: the output would be -3x-3") as e:
        net.reshape()
    assert "global_pooling" in str(e.value) and "too small" not in str(e.value)
