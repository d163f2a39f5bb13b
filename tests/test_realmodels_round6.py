"""Round 6 of real third-party models, with their real pretrained weights.

- MTCNN (kpzhang93/MTCNN_face_detection_alignment, MTCNNv2): P-Net, R-Net and O-Net
  (det1-det3, PReLU, a fully convolutional P-Net over a scale pyramid) ship in
  fixtures/realmodels_round6 with the repository's two sample photos (see the README there).
  Their caffemodels hold the *training* nets (data, Slice and Silence layers the deploy
  prototxts do not have), so loading matches layers by name and ignores the rest.
- Optional, found in ``$PYCAFFE_ALT_CACHE`` (default ``~/.cache/pycaffe_alt/models``) and
  skipped with instructions when absent: MTCNN's fourth net det4 (L-Net, landmark refinement:
  Slice into five patches, 5 x (conv, PReLU) branches, Concat) and the Caffe MNIST LeNet
  trained weights that ethereon/caffe-tensorflow ships (examples/mnist).

No reference Caffe ran these: the checks are the models' known behaviour (both faces of
test1.jpg found with landmarks inside them, rendered digits classified) and exact equality
between one set of weights stored in the layouts Caffe reads (V1 ``layers {}``, legacy 4-D
blob dimensions, layers left out, parameters shared by name).
"""
import os
from typing import List, Tuple

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt.proto import caffe_pb2

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "realmodels_round6")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def cache_dir() -> str:
    return os.environ.get("PYCAFFE_ALT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "pycaffe_alt", "models")


def cached(folder: str, names: Tuple[str, ...], origin: str) -> List[str]:
    """Paths of ``names`` under ``$PYCAFFE_ALT_CACHE/folder``; skips saying where they come from."""
    paths = [os.path.join(cache_dir(), folder, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        pytest.skip(f"{', '.join(missing)} absent: copy {', '.join(names)} there from {origin}")
    return paths


def mtcnn_nets():
    return [caffe.Net(fixture(f"det{i}.prototxt"), fixture(f"det{i}.caffemodel"), caffe.TEST)
            for i in (1, 2, 3)]


def read_image(name: str) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    return cv2.imread(fixture(name))[:, :, ::-1].astype(np.float64)  # RGB, as MATLAB's imread


def as_matlab(img: np.ndarray) -> np.ndarray:
    # MTCNN was trained from MATLAB, whose column-major images reach Caffe as (C, W, H): the
    # Python ports feed the image with its two spatial axes swapped, normalised to [-1, 1].
    return ((img - 127.5) * 0.0078125).transpose(2, 1, 0)


# ---- a compact MTCNN (after kpzhang93's detect_face.m and DuinoDu/mtcnn's demo.py) ----------

def nms(boxes: np.ndarray, threshold: float, kind: str = "union") -> np.ndarray:
    x1, y1, x2, y2, score = boxes[:, :5].T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = score.argsort()[::-1], []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        union = np.minimum(area[i], area[rest]) if kind == "min" else area[i] + area[rest] - inter
        order = rest[inter / union <= threshold]
    return np.array(keep, int)


def to_square(b: np.ndarray) -> np.ndarray:
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += (w - side) / 2
    b[:, 1] += (h - side) / 2
    b[:, 2:4] = b[:, 0:2] + side[:, None]
    b[:, :4] = np.fix(b[:, :4])
    return b


def regress(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, :4] += reg[:, :4] * np.stack([w, h, w, h], 1)
    return b


def crops(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    import cv2

    rows, cols = img.shape[:2]
    out = []
    for x1, y1, x2, y2 in boxes[:, :4].astype(int):
        patch = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3))  # zero padding outside the image
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, cols - 1), min(y2, rows - 1)
        patch[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = img[sy1:sy2 + 1, sx1:sx2 + 1]
        out.append(as_matlab(cv2.resize(patch, (size, size))))
    return np.array(out, np.float32)


def run(net, data: np.ndarray) -> dict:
    net.blobs["data"].reshape(*data.shape)
    net.blobs["data"].data[...] = data
    return net.forward()


def detect_faces(img, pnet, rnet, onet, minsize=20, thresholds=(0.6, 0.7, 0.7), factor=0.709):
    """(boxes (n, 5): x1 y1 x2 y2 score, landmarks (n, 10): 5 x then 5 y)."""
    import cv2

    rows, cols = img.shape[:2]
    m = 12.0 / minsize
    scales, side = [], min(rows, cols) * m
    while side >= 12:
        scales.append(m * factor ** len(scales))
        side *= factor
    found = []
    for s in scales:
        size = (int(np.ceil(cols * s)), int(np.ceil(rows * s)))
        out = run(pnet, as_matlab(cv2.resize(img, size))[None])
        prob, reg = out["prob1"][0, 1].T, out["conv4-2"][0].transpose(0, 2, 1)
        y, x = np.where(prob >= thresholds[0])
        corner = np.stack([x, y], 1) * 2.0  # P-Net's stride 2, cell 12
        b = np.hstack([(corner + 1) / s, (corner + 12) / s, prob[y, x][:, None], reg[:, y, x].T])
        found.append(b[nms(b, 0.5)])
    b = np.vstack(found)
    b = b[nms(b, 0.7)]
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    b[:, :4] += b[:, 5:9] * np.stack([w, h, w, h], 1)
    b = to_square(b[:, :5])

    out = run(rnet, crops(img, b, 24))
    keep = out["prob1"][:, 1] > thresholds[1]
    b, reg = b[keep], out["conv5-2"][keep]
    b[:, 4] = out["prob1"][keep, 1]
    k = nms(b, 0.7)
    b = to_square(regress(b[k], reg[k]))

    out = run(onet, crops(img, b, 48))
    keep = out["prob1"][:, 1] > thresholds[2]
    b, reg, pts = b[keep], out["conv6-2"][keep], out["conv6-3"][keep]
    b[:, 4] = out["prob1"][keep, 1]
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    marks = np.hstack([b[:, [0]] + w[:, None] * pts[:, :5] - 1,
                       b[:, [1]] + h[:, None] * pts[:, 5:] - 1])
    b = regress(b, reg)
    k = nms(b, 0.7, "min")
    return b[k], marks[k]


def check_face(box: np.ndarray, marks: np.ndarray) -> None:
    x, y = marks[:5], marks[5:]  # left eye, right eye, nose, left and right mouth corners
    assert box[4] > 0.99
    assert np.all((x > box[0]) & (x < box[2]) & (y > box[1]) & (y < box[3])), (box, marks)
    assert x[0] < x[1] and x[3] < x[4]  # left of the picture first
    assert max(y[0], y[1]) < y[2] < min(y[3], y[4])  # eyes, then nose, then mouth


def test_mtcnn_finds_both_faces_of_test1_and_the_face_of_test2():
    pnet, rnet, onet = mtcnn_nets()
    boxes, marks = detect_faces(read_image("test1.jpg"), pnet, rnet, onet)
    assert len(boxes) == 2
    order = np.argsort(boxes[:, 0])
    # The two men of test1.jpg (450 x 344): left face about x 89-150, y 17-101; right face
    # about x 297-359, y 90-168 (drawn and looked at when this test was written).
    np.testing.assert_allclose(boxes[order, :4], [[89, 17, 150, 101], [297, 90, 359, 168]], atol=6)
    for i in order:
        check_face(boxes[i], marks[i])

    boxes, marks = detect_faces(read_image("test2.jpg"), pnet, rnet, onet)
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0, :4], [194, 71, 341, 268], atol=8)
    check_face(boxes[0], marks[0])


def test_mtcnn_training_caffemodels_fill_the_deploy_nets():
    # The files hold the training nets: data/label layers, Slice, Silence and the losses have
    # no deploy counterpart and are ignored ("Ignoring source layer", as CopyTrainedLayersFrom).
    stored = caffe_pb2.NetParameter()
    with open(fixture("det1.caffemodel"), "rb") as f:
        stored.ParseFromString(f.read())
    assert {"data12", "slicer_label", "silence"} <= {layer.name for layer in stored.layer}
    file_blobs = {layer.name: layer.blobs for layer in stored.layer if layer.blobs}
    pnet = mtcnn_nets()[0]
    assert set(pnet.params) == set(file_blobs)
    for name, blobs in pnet.params.items():
        for got, want in zip(blobs, file_blobs[name]):
            np.testing.assert_array_equal(got.data.ravel(), np.asarray(want.data, np.float32))
    slopes = pnet.params["PReLU1"][0].data
    assert slopes.shape == (10,) and not np.allclose(slopes, 0.25)  # learned, not the filler
    # fully convolutional: any size maps to a grid of two-way softmaxes (31: conv 29, pool 15
    # (Caffe rounds up), conv 13, conv 11; 40: 38, 19, 17, 15)
    out = run(pnet, np.random.RandomState(0).uniform(-1, 1, (2, 3, 31, 40)).astype(np.float32))
    assert out["prob1"].shape == (2, 2, 11, 15) and out["conv4-2"].shape == (2, 4, 11, 15)
    np.testing.assert_allclose(out["prob1"].sum(axis=1), 1, rtol=1e-5)


def write_model(path, model: caffe_pb2.NetParameter) -> str:
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return str(path)


def read_model(path: str) -> caffe_pb2.NetParameter:
    model = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        model.ParseFromString(f.read())
    return model


def onet_outputs(weights: str, data: np.ndarray) -> dict:
    net = caffe.Net(fixture("det3.prototxt"), weights, caffe.TEST)
    return {k: v.copy() for k, v in run(net, data).items()}, net


def test_mtcnn_onet_weights_in_legacy_4d_blobs_and_with_a_layer_left_out(tmp_path):
    data = crops(read_image("test1.jpg"), np.array([[85., 15, 152, 102]]), 48)
    want, ref = onet_outputs(fixture("det3.caffemodel"), data)
    assert set(want) == {"prob1", "conv6-2", "conv6-3"}

    # Blobs written before BlobShape (num/channels/height/width only, 1s in front): Caffe's
    # Blob::ShapeEquals accepts them for a blob of up to four axes (a bias (n,) is 1 x 1 x 1 x n).
    legacy = read_model(fixture("det3.caffemodel"))
    for layer in legacy.layer:
        for blob in layer.blobs:
            dims = [1] * (4 - len(blob.shape.dim)) + list(blob.shape.dim)
            blob.ClearField("shape")
            blob.num, blob.channels, blob.height, blob.width = dims
    got, _ = onet_outputs(write_model(tmp_path / "legacy.caffemodel", legacy), data)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])

    # A file without the landmark layer: Caffe copies what it has and leaves conv6-3 at its
    # filler (no error); the other outputs are the trained model's.
    cut = read_model(fixture("det3.caffemodel"))
    kept = [layer for layer in cut.layer if layer.name != "conv6-3"]
    del cut.layer[:]
    cut.layer.extend(kept)
    got, net = onet_outputs(write_model(tmp_path / "cut.caffemodel", cut), data)
    np.testing.assert_array_equal(got["prob1"], want["prob1"])
    np.testing.assert_array_equal(got["conv6-2"], want["conv6-2"])
    assert not np.allclose(net.params["conv6-3"][0].data, ref.params["conv6-3"][0].data)
    np.testing.assert_array_equal(net.params["conv6-3"][1].data, 0)  # bias_filler constant 0


def test_mtcnn_pnet_twin_shares_the_trained_weights_by_param_name(tmp_path):
    # A siamese copy of P-Net: every learnable layer repeated with a suffix, both copies naming
    # their parameters alike. The file fills the first copies; the twins, absent from the file,
    # share the same blobs (Net::AppendParam), so both branches compute P-Net.
    deploy = caffe_pb2.NetParameter()
    with open(fixture("det1.prototxt")) as f:
        text_format.Merge(f.read(), deploy)
    twin = caffe_pb2.NetParameter()
    twin.name = "PNetTwin"
    feed = twin.layer.add(name="data", type="Input", top=["data", "data_b"])
    for _ in range(2):
        feed.input_param.shape.add(dim=[1, 3, 12, 12])
    blob_count = {"Convolution": 2, "PReLU": 1}
    for suffix in ("", "_b"):
        for layer in deploy.layer:
            copy = twin.layer.add()
            copy.CopyFrom(layer)
            copy.name = layer.name + suffix
            copy.bottom[:] = [b + suffix for b in layer.bottom]
            copy.top[:] = [t + suffix for t in layer.top]
            for i in range(blob_count.get(layer.type, 0)):
                spec = copy.param[i] if i < len(copy.param) else copy.param.add()
                spec.name = f"{layer.name}_{i}"
    (tmp_path / "twin.prototxt").write_text(text_format.MessageToString(twin))
    net = caffe.Net(str(tmp_path / "twin.prototxt"), fixture("det1.caffemodel"), caffe.TEST)
    pnet = mtcnn_nets()[0]
    x = np.random.RandomState(1).uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.blobs["data_b"].data[...] = x
    net.forward()
    want = run(pnet, x)
    for top in ("prob1", "conv4-2"):
        np.testing.assert_array_equal(net.blobs[top].data, want[top])
        np.testing.assert_array_equal(net.blobs[top + "_b"].data, want[top])


def test_mtcnn_lnet_refines_the_onet_landmarks():
    import cv2

    det4 = cached("mtcnn", ("det4.prototxt", "det4.caffemodel"),
                  "kpzhang93/MTCNN_face_detection_alignment on GitHub, code/codes/MTCNNv2/model/")
    lnet = caffe.Net(det4[0], det4[1], caffe.TEST)
    img = read_image("test1.jpg")
    boxes, marks = detect_faces(img, *mtcnn_nets())
    # detect_face.m's extended stage: a 24 x 24 patch of a quarter of the box around each
    # landmark, five patches stacked on the channels; each fc5_k says where in its patch.
    side = np.fix(0.25 * np.maximum(boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1))
    side += side % 2
    patches = np.zeros((len(boxes), 15, 24, 24), np.float32)
    for k in range(5):
        corner = np.fix(np.stack([marks[:, k], marks[:, k + 5]], 1) - side[:, None] / 2)
        square = np.hstack([corner, corner + side[:, None] - 1])
        patches[:, 3 * k:3 * k + 3] = crops(img, square, 24)
    out = run(lnet, patches)
    assert [out[f"fc5_{k}"].shape for k in range(1, 6)] == [(len(boxes), 2)] * 5
    moves = np.stack([out[f"fc5_{k}"] for k in range(1, 6)], 1) - 0.5  # (faces, 5, x/y)
    # the refinement is a small correction (detect_face.m drops any above 0.35 of the patch)
    assert np.all(np.abs(moves) < 0.35), moves
    refined = np.concatenate([marks[:, :5] + moves[:, :, 0] * side[:, None],
                              marks[:, 5:] + moves[:, :, 1] * side[:, None]], 1)
    for box, m in zip(boxes, refined):
        check_face(box, m)


LENET_ORIGIN = "ethereon/caffe-tensorflow on GitHub, examples/mnist/"


def lenet_files() -> List[str]:
    return cached("lenet", ("lenet.prototxt", "lenet_iter_10000.caffemodel"), LENET_ORIGIN)


def rendered_digits() -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    digits = []
    for d in range(10):
        im = np.zeros((28, 28), np.uint8)
        cv2.putText(im, str(d), (6, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
        digits.append(im)
    return np.array(digits, np.float32)[:, None] * 0.00390625  # the MNIST scale 1/256


def test_lenet_mnist_weights_read_printed_digits():
    prototxt, weights = lenet_files()
    net = caffe.Net(prototxt, weights, caffe.TEST)
    prob = run(net, rendered_digits())["prob"]
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    assert list(prob.argmax(axis=1)) == list(range(10))
    assert np.all(prob.max(axis=1) > 0.9)


V1_TYPES = {"Data": "DATA", "Convolution": "CONVOLUTION", "Pooling": "POOLING",
            "InnerProduct": "INNER_PRODUCT", "ReLU": "RELU", "SoftmaxWithLoss": "SOFTMAX_LOSS"}


def test_lenet_weights_rewritten_as_v1_layers_load_the_same(tmp_path):
    # The same trained blobs in the V1 format of 2014 caffemodels (layers {} with enum types,
    # blobs with num/channels/height/width): UpgradeNetAsNeeded reads them as the V2 file.
    prototxt, weights = lenet_files()
    stored = read_model(weights)
    v1 = caffe_pb2.NetParameter(name=stored.name)
    for layer in stored.layer:
        old = v1.layers.add(name=layer.name, bottom=layer.bottom, top=layer.top,
                            type=caffe_pb2.V1LayerParameter.LayerType.Value(V1_TYPES[layer.type]))
        for blob in layer.blobs:
            dims = [1] * (4 - len(blob.shape.dim)) + list(blob.shape.dim)
            old.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3],
                          data=blob.data)
    x = rendered_digits()
    want = run(caffe.Net(prototxt, weights, caffe.TEST), x)["prob"].copy()
    v1_net = caffe.Net(prototxt, write_model(tmp_path / "v1.caffemodel", v1), caffe.TEST)
    got = run(v1_net, x)["prob"]
    np.testing.assert_array_equal(got, want)
