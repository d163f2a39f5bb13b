"""Round 7 of real third-party models: train_val and deploy prototxts of families not covered yet.

Each model (fixtures/models_round7/, origins in its README.md) is built in the phases it has, fed
data written here where its data layer needs a source (LMDB, HDF5, image lists), every blob's shape
is checked against Caffe's Reshape rules (``caffe_shapes`` of test_models_round5), it is run forward
and backward, and its weights are saved to a caffemodel and read back bit for bit. Losses are
checked against numpy written after the layers' Caffe sources. Fork layers we do not have (R-FCN's
PSROIPooling, R-CNN's WindowData) and Python layers without the opt-in are refused by name.

Some nets are slimmed for time (``slim``: every num_output divided, input sizes kept); that keeps
the topology and every spatial shape rule, which is what the tests check.
"""
import os
import re
import subprocess
import sys

import h5py
import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError
from pycaffe_alt.proto import caffe_pb2
import model_fixtures
from test_models_round5 import caffe_shapes, randomize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers --------------------------------------------------------------------------------------
def fixture_text(name: str) -> str:
    return model_fixtures.fixture_text("models_round7", name)


def sub(text: str, pattern: str, repl: str, count: int = 0) -> str:
    """re.sub that insists the pattern is there (a fixture edit that silently misses is a bug)."""
    out, n = re.subn(pattern, repl, text, count=count)
    assert n, pattern
    return out


def slim(text: str, factor: int, keep=()) -> str:
    """Every num_output divided by ``factor`` (at least 1) except the values in ``keep``."""
    def one(m):
        v = int(m.group(1))
        return m.group(0) if v in keep else "num_output: %d" % max(1, v // factor)
    return sub(text, r"num_output: (\d+)", one)


def write(tmp_path, name: str, text: str) -> str:
    path = os.path.join(str(tmp_path), name + ".prototxt")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_lmdb(path: str, images: np.ndarray, labels) -> None:
    env = lmdb.open(path, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, (a, label) in enumerate(zip(images, labels)):
            d = caffe_pb2.Datum(channels=a.shape[0], height=a.shape[1], width=a.shape[2],
                                data=a.astype(np.uint8).tobytes(), label=int(label))
            txn.put(b"%08d" % i, d.SerializeToString())
    env.close()


def randomize_all(net, seed: int = 0) -> None:
    """randomize() plus a positive running variance for PSPNet's BN (blob 3)."""
    randomize(net, seed)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BN" and len(blobs) == 4:
            blobs[3].data[...] = 0.5 + np.abs(blobs[3].data)


def check_shapes(path: str, net, min_blobs: int) -> None:
    """Every blob worked out by Caffe's rules from the net's inputs and data layers' tops."""
    sources = [t for name, bottoms in net.bottom_names.items() if not bottoms
               for t in net.top_names[name]]
    ref = caffe_shapes(path, {k: tuple(net.blobs[k].data.shape) for k in sources})
    got = {k: tuple(net.blobs[k].data.shape) for k in ref if k in net.blobs}
    assert len(got) >= min_blobs, len(got)
    assert {k: ref[k] for k in got} == got


def assert_roundtrip(net, tmp_path) -> None:
    """net.save, every param overwritten with NaN, then net.copy_from the caffemodel (Caffe's
    CopyTrainedLayersFrom, as weights= does): every param blob the same bits again."""
    weights = os.path.join(str(tmp_path), "saved.caffemodel")
    net.save(weights)
    saved = {name: [b.data.tobytes() for b in blobs] for name, blobs in net.params.items()}
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = np.nan
    net.copy_from(weights)
    assert {name: [b.data.tobytes() for b in blobs] for name, blobs in net.params.items()} == saved


def forward_backward(net) -> dict:
    """Forward, then backward from the losses, or from all-ones diffs of a deploy net's outputs."""
    out = {k: v.copy() for k, v in net.forward().items()}
    for v in out.values():
        assert np.isfinite(v).all()
    if not any(net.blob_loss_weights.values()):
        for k in net.outputs:
            net.blobs[k].diff[...] = 1
    net.backward()
    return out


def any_grad(net) -> bool:
    return any(np.abs(b.diff).max() > 0 for blobs in net.params.values() for b in blobs)


def refused(excinfo, *words) -> str:
    msg = str(excinfo.value)
    assert "Traceback" not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# -- deploy nets ----------------------------------------------------------------------------------
def test_densenet121_dense_blocks_concat(tmp_path):
    """shicai/DenseNet-Caffe DenseNet-121: 58 Concats growing each block by 32 channels,
    BatchNorm + Scale before every conv, global AVE pool5 and a 1x1 conv classifier."""
    text = sub(fixture_text("densenet121"), r"input_dim: 224\s+input_dim: 224", "input_dim: 64 input_dim: 64")
    path = write(tmp_path, "densenet121", "force_backward: true\n" + text)
    net = caffe.Net(path, caffe.TEST)
    randomize_all(net)
    net.blobs["data"].data[...] = np.random.RandomState(1).randn(1, 3, 64, 64)
    check_shapes(path, net, 300)
    assert sum(layer.type == "Concat" for layer in net.layers) == 58
    assert net.blobs["concat_2_6"].data.shape[1] == 64 + 6 * 32  # block 1: 64 + 6 x growth 32
    out = forward_backward(net)
    assert out["fc6"].shape == (1, 1000, 1, 1)
    # Concat copies its bottoms along channels: block 1's last concat is its input + new maps.
    np.testing.assert_array_equal(net.blobs["concat_2_6"].data[:, :net.blobs["concat_2_5"].data.shape[1]],
                                  net.blobs["concat_2_5"].data)
    assert np.abs(net.blobs["data"].diff).max() > 0
    assert_roundtrip(net, tmp_path)
    np.testing.assert_array_equal(net.forward()["fc6"], out["fc6"])


def test_pspnet50_pyramid_pooling_interp_and_bn(tmp_path):
    """hszhao/PSPNet PSPNet-50 (ADE20K, 473 x 473), at 1/16 width: dilated ResNet with the fork's
    BN (4 blobs), the pyramid pooling module (AVE pools 60/30/20/10 on the 60 x 60 map, each
    Interp'ed back to 60 x 60 and concatenated) and the final zoom_factor 8 Interp to 473."""
    path = write(tmp_path, "pspnet", "force_backward: true\n" + slim(fixture_text("pspnet50_ade20k"), 16))
    net = caffe.Net(path, caffe.TEST)
    randomize_all(net)
    net.blobs["data"].data[...] = np.random.RandomState(1).randn(*net.blobs["data"].data.shape)
    check_shapes(path, net, 80)
    # interp_layer.cpp: zoom_factor z gives H + (H - 1)(z - 1): 60 -> 473.
    assert net.blobs["conv6_interp"].data.shape == (1, 150 // 16, 473, 473)
    for k in (1, 2, 3, 6):
        assert net.blobs["conv5_3_pool%d" % k].data.shape[2:] == (k, k)
        assert net.blobs["conv5_3_pool%d_interp" % k].data.shape[2:] == (60, 60)
    assert [len(net.params[n]) for n in net.params if net.layer_dict[n].type == "BN"][:1] == [4]
    forward_backward(net)
    assert np.abs(net.blobs["data"].diff).max() > 0
    assert_roundtrip(net, tmp_path)
    # The pyramid's pools and Interps are sized for 473: at 713 (the Cityscapes size) pool1 is
    # 2 x 2, Interp'ed to 60 x 60 against a 90 x 90 map, and Caffe's Concat check stops it.
    net.blobs["data"].reshape(1, 3, 713, 713)
    with pytest.raises(CaffeError) as e:
        net.reshape()
    refused(e, "conv5_3_concat", "Concat", "(1, 32, 60, 60)")


def enet_deploy(tmp_path, h: int, w: int) -> str:
    text = sub(fixture_text("enet_deploy_final"), r"dim: 512\s+dim: 1024", f"dim: {h}\n dim: {w}")
    return write(tmp_path, "enet_deploy", "force_backward: true\n" + text)


def test_enet_deploy_unpooling_with_masks(tmp_path):
    """TimoSaemann/ENet final deploy net: SegNet's BN in INFERENCE mode (scale and shift only),
    PReLU, MAX pools with mask tops that the decoder's Upsample layers unpool with, and
    Deconvolution. Built at 64 x 128 by writing the size into the prototxt: the fork's
    Upsample keeps the size it worked out at the first Reshape, so a net reshaped afterwards
    cannot unpool to the new size; it is refused naming the layer."""
    path = enet_deploy(tmp_path, 64, 128)
    net = caffe.Net(path, caffe.TEST)
    randomize_all(net)
    net.blobs["data"].data[...] = np.random.RandomState(1).rand(1, 3, 64, 64 * 2)
    check_shapes(path, net, 200)
    bn = [n for n in net.params if net.layer_dict[n].type == "BN"]
    assert len(bn) == 3 and all(len(net.params[n]) == 2 for n in bn)
    # bn_mode INFERENCE (the fork's bn_layer.cpp): top = x * scale + shift per channel.
    s, b = (p.data.reshape(1, -1, 1, 1) for p in net.params["bn0_1"])
    out = forward_backward(net)
    np.testing.assert_allclose(net.blobs["bn0_1"].data, net.blobs["concat0_1"].data * s + b,
                               rtol=1e-5, atol=1e-6)
    assert out["deconv6_0_0"].shape == (1, 19, 64, 128)
    # Unpooling puts each value at its mask's index: every input value appears in the top.
    up, src = net.blobs["upsample5_0_4"].data, net.blobs["conv5_0_4"].data
    assert up.shape[2:] == (src.shape[2] * 2, src.shape[3] * 2)
    assert np.count_nonzero(up) <= src.size
    assert np.abs(net.blobs["data"].diff).max() > 0
    assert_roundtrip(net, tmp_path)
    np.testing.assert_array_equal(net.forward()["deconv6_0_0"], out["deconv6_0_0"])
    net.blobs["data"].reshape(1, 3, 32, 64)
    with pytest.raises(CaffeError) as e:
        net.reshape()
    refused(e, "upsample4_0_4", "Upsample")


SPATIAL_DROPOUT = '''import pycaffe_alt as caffe


class SpatialDropoutLayer(caffe.Layer):
    """Stand-in for ENet's spatial_dropout.py: passes its input through (p is 0.01)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
'''


def test_enet_encoder_training_dense_image_data_and_python_dropout(tmp_path, monkeypatch):
    """TimoSaemann/ENet encoder train net: DenseImageData with the fork's label_divide_factor 8,
    SegNet's BN in LEARN mode (batch statistics), 22 Python spatial-dropout layers, and a
    SoftmaxWithLoss / two-top Accuracy on 1/8-size labels. Images shrunk to 64 x 128 (new_height,
    new_width) and batch 2 for time."""
    import cv2
    rng = np.random.RandomState(0)
    lines = []
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"im{i}.png"), rng.randint(0, 256, (40, 80, 3)).astype(np.uint8))
        cv2.imwrite(str(tmp_path / f"lb{i}.png"), rng.randint(0, 19, (40, 80)).astype(np.uint8))
        lines.append(f"{tmp_path}/im{i}.png {tmp_path}/lb{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    text = fixture_text("enet_train_encoder")
    text = sub(text, r'source: "[^"]*"', f'source: "{tmp_path}/list.txt"')
    text = sub(sub(sub(text, r"batch_size: 4", "batch_size: 2"), r"new_height: 512", "new_height: 64"),
               r"new_width: 1024", "new_width: 128")
    path = write(tmp_path, "enet_train", text)
    with pytest.raises(CaffeError) as e:
        caffe.Net(path, caffe.TRAIN)
    refused(e, "drop1_0_3", "Python", "spatial_dropout", "allow_python")
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "spatial_dropout.py").write_text(SPATIAL_DROPOUT)
    monkeypatch.syspath_prepend(str(tmp_path / "py"))
    net = caffe.Net(path, caffe.TRAIN, allow_python=True)
    check_shapes(path, net, 15)  # up to the first Python layer
    assert net.blobs["data"].data.shape == (2, 3, 64, 128)
    assert net.blobs["label"].data.shape == (2, 1, 8, 16)  # 64 / 8 x 128 / 8
    assert net.blobs["deconv_encoder6_0_0"].data.shape == (2, 19, 8, 16)
    randomize_all(net)
    out = forward_backward(net)
    assert out["per_class_accuracy"].shape == (19,)
    # SoftmaxWithLoss (no ignored pixel here): mean over the 2 x 8 x 16 labels of -log p.
    x = net.blobs["deconv_encoder6_0_0"].data.astype(np.float64)
    logp = x - x.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    lab = net.blobs["label"].data[:, 0].astype(int)
    ref = -np.take_along_axis(logp, lab[:, None], 1).mean()
    np.testing.assert_allclose(out["loss"], ref, rtol=1e-5)
    # LEARN mode normalises with the batch's statistics: bn0_1's output has zero channel means.
    y = (net.blobs["bn0_1"].data - net.params["bn0_1"][1].data) / net.params["bn0_1"][0].data
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    assert any_grad(net)
    assert_roundtrip(net, tmp_path)


# -- detection ------------------------------------------------------------------------------------
def test_rfcn_psroi_pooling_is_refused_by_name(tmp_path):
    """YuwenXiong/py-R-FCN ResNet-50 test net: PSROIPooling (and its psroi_pooling_param) is the
    fork's own layer; building the net names the layer, its type and what to do."""
    path = write(tmp_path, "rfcn", fixture_text("rfcn_r50_test_agnostic"))
    for phase in (caffe.TEST, caffe.TRAIN):
        with pytest.raises(CaffeError) as e:
            caffe.Net(path, phase)
        msg = refused(e, "psroipooled_cls_rois", "PSROIPooling", "rfcn.prototxt:")
        assert "Python layer" in msg  # what to do: a stand-in


ROI_DATA = '''import numpy as np
import pycaffe_alt as caffe


class RoIDataLayer(caffe.Layer):
    """Stand-in for py-faster-rcnn's roi_data_layer: one 96 x 128 image, 4 RoIs, 21 classes."""

    def setup(self, bottom, top):
        rng = np.random.RandomState(0)
        self.blobs_out = [
            rng.randn(1, 3, 96, 128),
            np.array([[0, 0, 0, 63, 47], [0, 16, 8, 127, 95], [0, 40, 30, 60, 50], [0, 0, 0, 15, 15]]),
            np.array([3, 0, 15, 20]),
            rng.randn(4, 84) * 0.5,
            (rng.rand(4, 84) > 0.7).astype(float),
            (rng.rand(4, 84) > 0.5).astype(float),
        ]
        for t, v in zip(top, self.blobs_out):
            t.reshape(*v.shape)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        for t, v in zip(top, self.blobs_out):
            t.data[...] = v

    def backward(self, top, propagate_down, bottom):
        pass
'''


def test_fast_rcnn_training_roi_pooling_and_smooth_l1(tmp_path, monkeypatch):
    """py-R-FCN's Fast R-CNN VGG_CNN_M_1024 train net: a Python RoIDataLayer with six tops,
    ROIPooling 6 x 6 at 1/16, and the fork's four-bottom SmoothL1Loss next to SoftmaxWithLoss.
    Refused without the Python opt-in; with a stand-in data layer it trains (fc widths /8)."""
    text = slim(fixture_text("fast_rcnn_vgg_cnn_m_1024_train"), 8, keep=(21, 84))
    path = write(tmp_path, "fast_rcnn", text)
    with pytest.raises(CaffeError) as e:
        caffe.Net(path, caffe.TRAIN)
    refused(e, "'data'", "Python", "roi_data_layer.layer", "RoIDataLayer", "allow_python")
    pkg = tmp_path / "py" / "roi_data_layer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layer.py").write_text(ROI_DATA)
    monkeypatch.syspath_prepend(str(tmp_path / "py"))
    net = caffe.Net(path, caffe.TRAIN, allow_python=True)
    randomize_all(net)
    out = forward_backward(net)
    check_shapes(path, net, 10)
    assert net.blobs["pool5"].data.shape == (4, 512 // 8, 6, 6)
    assert net.blobs["bbox_pred"].data.shape == (4, 84)
    # smooth_L1_loss_layer.cu, sigma 1: d = w_in (pred - target); 0.5 d^2 if |d| < 1 else
    # |d| - 0.5; times w_out, summed, over num (4 RoIs).
    pred = net.blobs["bbox_pred"].data.astype(np.float64)
    tgt, w_in, w_out = (net.blobs[k].data.astype(np.float64) for k in
                        ("bbox_targets", "bbox_inside_weights", "bbox_outside_weights"))
    d = w_in * (pred - tgt)
    f = np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)
    np.testing.assert_allclose(out["loss_bbox"], (w_out * f).sum() / 4, rtol=1e-5)
    g = np.where(np.abs(d) < 1, d, np.sign(d)) * w_in * w_out / 4
    np.testing.assert_allclose(net.blobs["bbox_pred"].diff, g, rtol=1e-5, atol=1e-7)
    # conv1/conv2 are frozen (lr_mult 0): Caffe skips their backward; conv3 learns.
    assert np.abs(net.params["conv1"][0].diff).max() == 0 < np.abs(net.params["conv3"][0].diff).max()
    assert_roundtrip(net, tmp_path)


def test_ssd300_vgg_normalize_dilated_fc6_and_8732_priors(tmp_path, caplog):
    """weiliu89/caffe SSD300 VGG16 deploy (as ssd_pascal.py writes it): conv4_3 through
    Normalize (per-channel scale, across_spatial false), pool5 3x3 stride 1 pad 1, fc6 as a
    dilation-6 conv, six heads Permute/Flatten/Concat'ed, 8732 PriorBoxes and DetectionOutput
    with a save_output_param naming files of the author's machine (ignored, with a warning:
    the top is the same). VGG widths /16; the heads keep theirs."""
    text = slim(fixture_text("ssd300_vgg_deploy"), 16, keep=(16, 24, 84, 126))
    path = write(tmp_path, "ssd300", "force_backward: true\n" + text)
    net = caffe.Net(path, caffe.TEST)
    assert "save_output_param is ignored" in caplog.text
    randomize_all(net)
    net.blobs["data"].data[...] = np.random.RandomState(0).randn(1, 3, 300, 300) * 50
    check_shapes(path, net, 55)
    # 38^2 x 4 + 19^2 x 6 + 10^2 x 6 + 5^2 x 6 + 3^2 x 4 + 1 x 4 priors, 4 coordinates each
    assert net.blobs["mbox_priorbox"].data.shape == (1, 2, 8732 * 4)
    assert net.blobs["mbox_conf_flatten"].data.shape == (1, 8732 * 21)
    assert net.blobs["fc6"].data.shape[2:] == (19, 19)
    out = net.forward()
    assert out["detection_out"].shape[:2] == (1, 1) and out["detection_out"].shape[3] == 7
    # normalize_layer.cpp: x / sqrt(sum_c x^2 + eps 1e-10) * scale_c
    x = net.blobs["conv4_3"].data.astype(np.float64)
    scale = net.params["conv4_3_norm"][0].data.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(net.blobs["conv4_3_norm"].data,
                               x / np.sqrt((x * x).sum(1, keepdims=True) + 1e-10) * scale, rtol=1e-5, atol=1e-7)
    net.blobs["mbox_conf_flatten"].diff[...] = np.random.RandomState(1).randn(1, 8732 * 21)
    net.backward(start="mbox_conf_flatten")
    assert np.abs(net.blobs["data"].diff).max() > 0 and np.abs(net.params["conv4_3_norm"][0].diff).max() > 0
    assert_roundtrip(net, tmp_path)


# -- BVLC examples' train_val nets ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist_siamese_train_test", "v1_mnist_siamese_train_test"])
def test_mnist_siamese_shared_weights_and_contrastive_loss(tmp_path, name):
    """BVLC examples/siamese: a 2-channel pair Datum sliced into two LeNets sharing every weight
    by param name, then ContrastiveLoss (margin 1) on the 2-d features. The LevelDBs become an
    LMDB here. The 2014 V1 original names its shared blobs with ``param: "conv1_w"`` strings,
    slices with ``slice_dim`` and scales in data_param: upgraded, it is the same net."""
    rng = np.random.RandomState(0)
    write_lmdb(str(tmp_path / "pairs"), rng.randint(0, 256, (8, 2, 28, 28)), [1, 0] * 4)
    text = sub(fixture_text(name), r'source: "[^"]*"', f'source: "{tmp_path}/pairs"')
    # No backend field: Caffe's default is LevelDB; we take the database found (an LMDB).
    text = sub(text, r"batch_size: \d+", "batch_size: 4")
    path = write(tmp_path, "siamese", text)
    for phase in (caffe.TRAIN, caffe.TEST):
        net = caffe.Net(path, phase)
        assert net.blobs["data"].data.shape == net.blobs["data_p"].data.shape == (4, 1, 28, 28)
        for name in ("conv1", "conv2", "ip1", "ip2", "feat"):
            for a, b in zip(net.params[name], net.params[name + "_p"]):
                assert np.shares_memory(a.data, b.data) and np.shares_memory(a.diff, b.diff)
        out = forward_backward(net)
        # contrastive_loss_layer.cpp (legacy_version false): similar pairs d^2, dissimilar
        # max(margin - d, 0)^2, summed over the batch / (2 N).
        a, b = (net.blobs[k].data.astype(np.float64) for k in ("feat", "feat_p"))
        sim = net.blobs["sim"].data
        d = np.sqrt(((a - b) ** 2).sum(1))
        ref = np.where(sim > 0, d * d, np.maximum(1 - d, 0) ** 2).sum() / 8
        np.testing.assert_allclose(out["loss"], ref, rtol=1e-5)
        np.testing.assert_array_equal(net.blobs["sim"].data, [1, 0, 1, 0])
        np.testing.assert_array_equal(net.blobs["data_p"].data[:, 0], net.blobs["pair_data"].data[:, 1])
        assert net.blobs["pair_data"].data.max() <= 255 / 256  # scale 0.00390625
        assert any_grad(net)
    assert_roundtrip(net, tmp_path)


def test_mnist_autoencoder_test_stages_and_two_losses(tmp_path):
    """BVLC examples/mnist/mnist_autoencoder: the TEST data layers sit under the stages
    test-on-train / test-on-test, so a TEST net without a stage has no 'data' (Caffe stops at
    the Flatten's unknown bottom, and so do we); SigmoidCrossEntropyLoss (normalised by the batch
    size by default) and EuclideanLoss on the sigmoid."""
    rng = np.random.RandomState(0)
    write_lmdb(str(tmp_path / "mnist"), rng.randint(0, 256, (8, 1, 28, 28)), range(8))
    text = sub(fixture_text("mnist_autoencoder"), r'source: "[^"]*"', f'source: "{tmp_path}/mnist"')
    path = write(tmp_path, "autoencoder", sub(text, r"batch_size: \d+", "batch_size: 4"))
    with pytest.raises(CaffeError) as e:
        caffe.Net(path, caffe.TEST)
    refused(e, "flatdata", "'data'")
    for phase, stages in ((caffe.TRAIN, []), (caffe.TEST, ["test-on-train"]), (caffe.TEST, ["test-on-test"])):
        net = caffe.Net(path, phase, stages=stages)
        assert net.blobs["encode4"].data.shape == (4, 30)
        out = forward_backward(net)
        x = net.blobs["decode1"].data.astype(np.float64)
        t = net.blobs["flatdata"].data.astype(np.float64)
        sce = (np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))).sum() / 4
        np.testing.assert_allclose(out["cross_entropy_loss"], sce, rtol=1e-5)
        p = 1 / (1 + np.exp(-x))
        np.testing.assert_allclose(out["l2_error"], ((p - t) ** 2).sum() / 8, rtol=1e-5)
        assert any_grad(net)
    assert_roundtrip(net, tmp_path)


def test_cifar10_sigmoid_batchnorm_with_mean_file(tmp_path):
    """BVLC examples/cifar10 full sigmoid net with BatchNorm: a mean_file, BatchNorm with no
    use_global_stats (batch statistics in TRAIN, the stored ones in TEST) and bias-free convs."""
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (4, 3, 32, 32))
    write_lmdb(str(tmp_path / "cifar"), images, range(4))
    mean = rng.rand(1, 3, 32, 32) * 255
    (tmp_path / "mean.binaryproto").write_bytes(caffe.io.array_to_blobproto(mean).SerializeToString())
    text = sub(fixture_text("cifar10_full_sigmoid_train_test_bn"), r'source: "[^"]*"', f'source: "{tmp_path}/cifar"')
    text = sub(text, r'mean_file: "[^"]*"', f'mean_file: "{tmp_path}/mean.binaryproto"')
    path = write(tmp_path, "cifar", sub(text, r"batch_size: \d+", "batch_size: 4"))
    train = caffe.Net(path, caffe.TRAIN)
    check_shapes(path, train, 10)
    out = forward_backward(train)
    np.testing.assert_array_equal(train.blobs["data"].data,
                                  np.float32(images) - np.float32(mean[0]))  # scale 1
    # TRAIN: bn1 normalises conv1 -> pool1 with the batch's mean and biased variance.
    x = train.blobs["pool1"].data.astype(np.float64)
    y = (x - x.mean((0, 2, 3), keepdims=True)) / np.sqrt(x.var((0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(train.blobs["bn1"].data, y, rtol=1e-4, atol=1e-4)
    assert train.params["bn1"][2].data[0] == 1.0 and any_grad(train)
    assert set(out) == {"loss"}
    weights = str(tmp_path / "cifar.caffemodel")
    train.save(weights)
    test = caffe.Net(path, caffe.TEST, weights=weights)
    out = test.forward()
    assert set(out) == {"accuracy", "loss"}
    # TEST: the stored statistics over the stored scale factor (here 1).
    mean1, var1 = train.params["bn1"][0].data, train.params["bn1"][1].data
    x = test.blobs["pool1"].data.astype(np.float64)
    ref = (x - mean1[None, :, None, None]) / np.sqrt(var1[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(test.blobs["bn1"].data, ref, rtol=1e-4, atol=1e-4)
    assert_roundtrip(test, tmp_path)


def test_hdf5_nonlinear_classifier(tmp_path):
    """BVLC examples/hdf5_classification nonlinear_train_val: HDF5Data (data, label) into two
    InnerProducts with a ReLU, SoftmaxWithLoss, and Accuracy in TEST."""
    rng = np.random.RandomState(0)
    with h5py.File(str(tmp_path / "d.h5"), "w") as f:
        f["data"] = rng.randn(10, 4).astype(np.float32)
        f["label"] = (rng.rand(10) > 0.5).astype(np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path}/d.h5\n")
    text = sub(fixture_text("hdf5_nonlinear_train_val"), r'source: "[^"]*"', f'source: "{tmp_path}/list.txt"')
    path = write(tmp_path, "hdf5", text)
    for phase in (caffe.TRAIN, caffe.TEST):
        net = caffe.Net(path, phase)
        out = forward_backward(net)
        assert net.blobs["data"].data.shape == (10, 4) and net.blobs["fc2"].data.shape == (10, 2)
        with h5py.File(str(tmp_path / "d.h5"), "r") as f:
            np.testing.assert_array_equal(net.blobs["label"].data, f["label"][:])
        x = net.blobs["fc2"].data.astype(np.float64)
        lab = net.blobs["label"].data.astype(int)
        logp = x - np.log(np.exp(x).sum(1, keepdims=True))
        np.testing.assert_allclose(out["loss"], -logp[np.arange(10), lab].mean(), rtol=1e-5)
        assert any_grad(net)
    assert_roundtrip(net, tmp_path)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def lstm_reference(x, cont, w_x, b, w_h, static=None, w_s=None):
    """Caffe's LSTM (lstm_layer.cpp unrolled, lstm_unit_layer.cpp): gates i, f, o, g from
    W_xc x_t + b_c [+ W_xc_static s] + W_hc (cont_t h_{t-1}); c_t = cont_t f c_{t-1} + i g;
    h_t = o tanh(c_t). x (T, N, D), cont (T, N)."""
    T, N = cont.shape
    H = w_h.shape[1]
    h, c, hs = np.zeros((N, H)), np.zeros((N, H)), []
    for t in range(T):
        m = cont[t][:, None]
        g = x[t] @ w_x.T + b + (m * h) @ w_h.T
        if static is not None:
            g += static @ w_s.T
        i, f, o = sigmoid(g[:, :H]), sigmoid(g[:, H:2 * H]), sigmoid(g[:, 2 * H:3 * H])
        c = m * f * c + i * np.tanh(g[:, 3 * H:])
        h = o * np.tanh(c)
        hs.append(h)
    return np.array(hs)


def test_lrcn_lstm_language_model_trains_on_hdf5_sentences(tmp_path):
    """LRCN's COCO caption language model (jeffdonahue/caffe recurrent branch): time-major
    HDF5 sentences (cont, input, target; T x N), Embed, LSTM with sequence-continuation
    markers, an InnerProduct and a SoftmaxWithLoss on axis 2 ignoring -1, loss_weight 20;
    Dropout only under stages. Vocabulary 8801 -> 12 and width 1000 -> 6 for time."""
    T, N, V, H = 5, 3, 12, 6
    rng = np.random.RandomState(0)
    cont = np.ones((T, N))
    cont[0] = 0
    cont[3, 1] = 0  # a new sentence starts in stream 1
    target = rng.randint(0, V, (T, N)).astype(float)
    target[4, 2] = -1
    with h5py.File(str(tmp_path / "lm.h5"), "w") as f:
        f["cont_sentence"] = cont.astype(np.float32)
        f["input_sentence"] = rng.randint(0, V, (T, N)).astype(np.float32)
        f["target_sentence"] = target.astype(np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path}/lm.h5\n")
    text = sub(fixture_text("lrcn_lstm_language_model"), r'source: "[^"]*"', f'source: "{tmp_path}/list.txt"')
    text = sub(sub(text, r"batch_size: 20", f"batch_size: {T}"), r"(input_dim|num_output): 8801", rf"\1: {V}")
    path = write(tmp_path, "lm", sub(text, r"num_output: 1000", f"num_output: {H}"))
    for phase, stages in ((caffe.TRAIN, []), (caffe.TEST, ["test-on-val"])):
        net = caffe.Net(path, phase, stages=stages)
        assert [layer.type for layer in net.layers].count("Dropout") == 0
        assert net.blobs["predict"].data.shape == (T, N, V)
        out = forward_backward(net)
        ref = lstm_reference(net.blobs["embedded_input_sentence"].data.astype(np.float64), cont,
                             *(p.data.astype(np.float64) for p in net.params["lstm1"]))
        np.testing.assert_allclose(net.blobs["lstm1"].data, ref, atol=1e-6)
        p = net.blobs["predict"].data.astype(np.float64)
        logp = p - np.log(np.exp(p).sum(2, keepdims=True))
        valid = target >= 0
        picked = np.take_along_axis(logp, np.maximum(target, 0).astype(int)[..., None], 2)[..., 0]
        np.testing.assert_allclose(out["cross_entropy_loss"], -(picked * valid).sum() / valid.sum(), rtol=1e-5)
        assert net.blob_loss_weights["cross_entropy_loss"] == 20 and any_grad(net)
        if phase == caffe.TEST:  # accuracy_layer.cpp: over the labels not ignored
            hits = (p.argmax(2) == target) & valid
            np.testing.assert_allclose(out["accuracy"], hits.sum() / valid.sum(), rtol=1e-6)
    assert_roundtrip(net, tmp_path)
    net = caffe.Net(path, caffe.TRAIN, stages=["lstm-drop", "embed-drop"])
    assert [layer.type for layer in net.layers].count("Dropout") == 2


def test_lrcn_word_to_preds_lstm_with_static_image_features(tmp_path):
    """LRCN's caption deploy net: two LSTMs, the second with a third, static bottom (image
    features, (N, D)) through its own W_xc_static; Softmax on axis 2. Widths shrunk."""
    text = sub(sub(fixture_text("lrcn_word_to_preds_deploy"), r"dim: 1000", "dim: 8"),
               r"num_output: 1000", "num_output: 8")
    path = write(tmp_path, "w2p", "force_backward: true\n" + sub(text, r"(input_dim|num_output): 8801", r"\1: 20"))
    net = caffe.Net(path, caffe.TEST)
    assert [p.data.shape for p in net.params["lstm2"]] == [(32, 8), (32,), (32, 8), (32, 8)]
    randomize_all(net)
    rng = np.random.RandomState(0)
    net.blobs["cont_sentence"].data[...] = 1
    net.blobs["input_sentence"].data[...] = rng.randint(0, 20, (1, 8))
    net.blobs["image_features"].data[...] = rng.randn(8, 8)
    out = net.forward()
    w_x, b, w_s, w_h = (p.data.astype(np.float64) for p in net.params["lstm2"])
    ref = lstm_reference(net.blobs["lstm1"].data.astype(np.float64), np.ones((1, 8)), w_x, b, w_h,
                         net.blobs["image_features"].data.astype(np.float64), w_s)
    np.testing.assert_allclose(net.blobs["lstm2"].data, ref, atol=1e-6)
    np.testing.assert_allclose(out["probs"].sum(2), 1, rtol=1e-5)
    net.blobs["probs"].diff[...] = rng.randn(1, 8, 20)
    net.backward()
    assert np.abs(net.blobs["image_features"].diff).max() > 0
    assert_roundtrip(net, tmp_path)


def test_pascal_finetune_window_data_is_refused_by_name(tmp_path):
    """BVLC examples/finetune_pascal_detection: R-CNN's WindowData, which we do not implement;
    refused naming the layer and its type, with what to use instead."""
    path = write(tmp_path, "pascal", fixture_text("pascal_finetune_trainval_test"))
    for phase in (caffe.TRAIN, caffe.TEST):
        with pytest.raises(CaffeError) as e:
            caffe.Net(path, phase)
        refused(e, "layer 'data'", "WindowData", "ImageData")


# -- old formats ----------------------------------------------------------------------------------
def upgrade_text(tmp_path, name: str, text: str) -> str:
    """tools/upgrade_net_proto_text on the text, returning the upgraded text."""
    src, dst = write(tmp_path, name, text), str(tmp_path / (name + "_v2.prototxt"))
    r = subprocess.run([sys.executable, "-m", "pycaffe_alt.tools.upgrade_net_proto_text", src, dst],
                       capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    with open(dst) as f:
        return f.read()


def test_v0_caffenet_with_padding_layers_upgrades_and_trains(tmp_path):
    """BVLC's 2014-02 CaffeNet imagenet_train.prototxt in the V0 format (``layers { layer {
    type: "conv" ... } }``, padding layers, meanfile/cropsize/mirror in the data layer, a
    softmax_loss without a top). Caffe's upgrade folds each padding layer into the next conv's
    pad, moves the transformation into transform_param, and the loss gets an anonymous top that
    still drives the backward. V0 data layers read LevelDB: switched to an LMDB here, fc6/fc7
    slimmed. The V0 data layer has no backend (Caffe's default LevelDB): the LMDB found is read.
    """
    rng = np.random.RandomState(0)
    write_lmdb(str(tmp_path / "img"), rng.randint(0, 256, (2, 3, 256, 256)), [3, 7])
    mean = rng.rand(1, 3, 256, 256) * 255
    (tmp_path / "mean.binaryproto").write_bytes(caffe.io.array_to_blobproto(mean).SerializeToString())
    text = fixture_text("v0_caffenet_imagenet_train")
    text = sub(text, r'source: "[^"]*"', f'source: "{tmp_path}/img"')
    text = sub(text, r'meanfile: "[^"]*"', f'meanfile: "{tmp_path}/mean.binaryproto"')
    text = sub(sub(text, r"batchsize: 256", "batchsize: 2"), r"num_output: 4096", "num_output: 64")
    v2 = upgrade_text(tmp_path, "v0", text)
    net_param = caffe_pb2.NetParameter()
    text_format.Merge(v2, net_param)
    assert not len(net_param.layers) and len(net_param.layer) == 28 - 4  # padding layers folded
    by_name = {layer.name: layer for layer in net_param.layer}
    assert [by_name[k].convolution_param.pad for k in ("conv2", "conv3", "conv4", "conv5")] == [[2], [1], [1], [1]]
    assert by_name["data"].transform_param.crop_size == 227 and by_name["data"].transform_param.mirror
    assert by_name["loss"].type == "SoftmaxWithLoss" and not len(by_name["loss"].top)
    path = write(tmp_path, "v0_lmdb", text)  # the V0 net itself: upgraded on reading
    net = caffe.Net(path, caffe.TRAIN)
    check_shapes(write(tmp_path, "v2", v2), net, 12)
    assert net.blobs["conv2"].data.shape == (2, 256, 27, 27) and net.blobs["pool5"].data.shape == (2, 256, 6, 6)
    assert forward_backward(net) == {}  # the anonymous loss top is no output, as in Caffe
    assert np.abs(net.params["conv1"][0].diff).max() > 0
    assert_roundtrip(net, tmp_path)


def test_v1_lenet_with_scale_in_data_param(tmp_path):
    """BVLC's 2014-04 lenet_train.prototxt: V1 ``layers { type: DATA }`` with ``scale`` still in
    data_param and blobs_lr; the upgrade moves scale into transform_param (data in [0, 1))."""
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (4, 1, 28, 28))
    write_lmdb(str(tmp_path / "mnist"), images, range(4))
    text = sub(fixture_text("v1_lenet_train"), r'source: "[^"]*"', f'source: "{tmp_path}/mnist"\n    backend: LMDB')
    path = write(tmp_path, "lenet_v1", sub(text, r"batch_size: 64", "batch_size: 4"))
    net = caffe.Net(path, caffe.TRAIN)
    out = forward_backward(net)
    np.testing.assert_array_equal(net.blobs["data"].data, (images * np.float32(0.00390625)).astype(np.float32))
    assert out == {} and any_grad(net)  # the V1 loss has no top: an anonymous one
    assert net.blobs["ip2"].data.shape == (4, 10)
    assert_roundtrip(net, tmp_path)
