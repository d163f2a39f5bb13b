"""Round 11 of third-party pycaffe programs run unchanged, aimed at programs built around
caffe.io and data: SSD detection, FCN training and inference, an LMDB written from Python and
trained on, feature extraction loops, SegNet's BN statistics and BVLC's fine-tuning notebook.
Behaviours they rely on, each checked with a small program of our own written after the real
one's pattern."""
import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import NetError

CLASSIFIER = """name: 'cls'
input: 'data' input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'fc7' type: 'InnerProduct' bottom: 'conv1' top: 'fc7'
  inner_product_param { num_output: 6 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'fc8' type: 'InnerProduct' bottom: 'fc7' top: 'fc8'
  inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'prob' type: 'Softmax' bottom: 'fc8' top: 'prob' }
"""


def test_legacy_dims_of_inner_product_blobs_pad_on_the_right(tmp_path):
    # shelhamer/fcn.berkeleyvision.org surgery.expand_score reads the old class count as
    # net.params[layer][0].num, and scripts size their feature arrays by
    # net.blobs['fc7'].channels: Caffe's Blob::LegacyShape gives axis i of the shape and 1 past
    # the last axis, so a (N, K) top has num N and channels K, an InnerProduct weight (O, I)
    # has num O and channels I, a bias (O,) has num O.
    (tmp_path / "cls.prototxt").write_text(CLASSIFIER)
    net = caffe.Net(str(tmp_path / "cls.prototxt"), caffe.TEST)
    fc7 = net.blobs["fc7"]
    assert (fc7.num, fc7.channels, fc7.height, fc7.width) == (2, 6, 1, 1)
    assert (net.blobs["prob"].num, net.blobs["prob"].channels) == (2, 3)
    w, b = net.params["fc8"]
    assert (w.num, w.channels, w.height, w.width) == (3, 6, 1, 1)
    assert (b.num, b.channels) == (3, 1)
    conv = net.blobs["conv1"]
    assert (conv.num, conv.channels, conv.height, conv.width) == (2, 4, 4, 4)
    # expand_score's pattern: the first old_cl rows of a wider classifier take the old ones.
    new = caffe.Net(str(tmp_path / "cls.prototxt"), caffe.TEST)
    old_cl = net.params["fc8"][0].num
    new.params["fc8"][0].data[:old_cl][...] = 0
    assert not new.params["fc8"][0].data.any()
    # Caffe CHECK-fails on more than four axes; here a NetError names the blob.
    fc7.reshape(1, 2, 3, 4, 5)
    with pytest.raises(NetError, match=r"'fc7'.*5 axes"):
        fc7.num


SSD_DEPLOY = """name: 'tiny_ssd'
input: 'data' input_shape { dim: 1 dim: 3 dim: 24 dim: 24 }
layer { name: 'feat' type: 'Pooling' bottom: 'data' top: 'feat'
  pooling_param { pool: AVE kernel_size: 6 stride: 6 } }
layer { name: 'loc' type: 'Convolution' bottom: 'feat' top: 'loc'
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: 'gaussian' std: 0.1 } } }
layer { name: 'loc_perm' type: 'Permute' bottom: 'loc' top: 'loc_perm'
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: 'loc_flat' type: 'Flatten' bottom: 'loc_perm' top: 'loc_flat' }
layer { name: 'conf' type: 'Convolution' bottom: 'feat' top: 'conf'
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: 'gaussian' std: 1 } } }
layer { name: 'conf_perm' type: 'Permute' bottom: 'conf' top: 'conf_perm'
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: 'conf_flat' type: 'Flatten' bottom: 'conf_perm' top: 'conf_flat' }
layer { name: 'conf_reshape' type: 'Reshape' bottom: 'conf_flat' top: 'conf_reshape'
  reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: 'conf_softmax' type: 'Softmax' bottom: 'conf_reshape' top: 'conf_softmax'
  softmax_param { axis: 2 } }
layer { name: 'conf_out' type: 'Flatten' bottom: 'conf_softmax' top: 'conf_out' }
layer { name: 'priors' type: 'PriorBox' bottom: 'feat' bottom: 'data' top: 'priors'
  prior_box_param { min_size: 8 variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: 'detection_out' type: 'DetectionOutput' bottom: 'loc_flat' bottom: 'conf_out'
  bottom: 'priors' top: 'detection_out' detection_output_param { num_classes: 3
  background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 10 } code_type: CENTER_SIZE
  keep_top_k: 4 confidence_threshold: 0.01 } }
"""


def test_ssd_detect_reads_detection_out_rows_and_the_labelmap(tmp_path):
    # weiliu89/caffe (ssd) examples/ssd/ssd_detect.py, run unchanged but for xrange/print:
    # the labelmap is a caffe_pb2.LabelMap read with text_format, the image goes through
    # load_image and a Transformer (transpose, mean, raw_scale 255, channel swap), the data
    # blob is reshaped to (1, 3, image_resize, image_resize) without net.reshape(), and
    # detection_out's rows are [image, label, score, xmin, ymin, xmax, ymax].
    import cv2
    from google.protobuf import text_format
    from pycaffe_alt.proto import caffe_pb2

    (tmp_path / "deploy.prototxt").write_text(SSD_DEPLOY)
    caffe.set_random_seed(3)
    caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST).save(str(tmp_path / "w.caffemodel"))
    (tmp_path / "labelmap.prototxt").write_text("".join(
        'item { name: "%s" label: %d display_name: "%s" }\n' % (n, i, n)
        for i, n in enumerate(["background", "cat", "dog"])))
    bgr = (np.random.RandomState(0).rand(30, 40, 3) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), bgr)

    net = caffe.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "w.caffemodel"), caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", np.array([104, 117, 123]))
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    labelmap = caffe_pb2.LabelMap()
    text_format.Merge(str(open(str(tmp_path / "labelmap.prototxt")).read()), labelmap)

    net.blobs["data"].reshape(1, 3, 24, 24)
    image = caffe.io.load_image(str(tmp_path / "img.png"))
    transformed_image = transformer.preprocess("data", image)
    expected = caffe.io.resize_image(image, (24, 24))[:, :, ::-1].transpose(2, 0, 1) * 255 \
        - np.array([104, 117, 123])[:, None, None]
    np.testing.assert_allclose(transformed_image, expected, rtol=1e-5, atol=1e-3)
    net.blobs["data"].data[...] = transformed_image
    detections = net.forward()["detection_out"]
    assert detections.shape[:2] == (1, 1) and detections.shape[3] == 7
    assert 1 <= detections.shape[2] <= 4
    det_label, det_conf = detections[0, 0, :, 1], detections[0, 0, :, 2]
    top_indices = [i for i, conf in enumerate(det_conf) if conf >= 0.01]
    names = []
    for label in det_label[top_indices].tolist():  # floats, compared with the int labels
        found = [item.display_name for item in labelmap.item if label == item.label]
        assert len(found) == 1
        names.append(found[0])
    assert set(names) <= {"cat", "dog"}
    # transformer.deprocess undoes the steps but the resize: the 24 x 24 RGB image in [0, 1]
    np.testing.assert_allclose(transformer.deprocess("data", transformed_image),
                               caffe.io.resize_image(image, (24, 24)), atol=1e-5)


class VOCSegDataLayer(caffe.Layer):
    """shelhamer/fcn.berkeleyvision.org voc_layers.VOCSegDataLayer's pattern: one image and
    its label image a forward, the tops reshaped to each image's size in reshape()."""

    def setup(self, bottom, top):
        params = eval(self.param_str)
        self.voc_dir, self.mean = params["voc_dir"], np.array(params["mean"])
        self.indices = open("{}/{}.txt".format(self.voc_dir, params["split"])).read().splitlines()
        self.idx = 0

    def reshape(self, bottom, top):
        from PIL import Image
        name = self.indices[self.idx]
        in_ = np.array(Image.open("{}/{}.jpg".format(self.voc_dir, name)), dtype=np.float32)
        self.data = (in_[:, :, ::-1] - self.mean).transpose((2, 0, 1))
        self.label = np.array(Image.open("{}/{}.png".format(self.voc_dir, name)),
                              dtype=np.uint8)[np.newaxis, ...]
        top[0].reshape(1, *self.data.shape)
        top[1].reshape(1, *self.label.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.data
        top[1].data[...] = self.label
        self.idx = (self.idx + 1) % len(self.indices)

    def backward(self, top, propagate_down, bottom):
        pass


def fcn(voc_dir=None):
    """voc-fcn32s/net.py's layers at toy widths: Python data, pad-100-style first conv, a
    fully convolutional fc, a bias-free Deconvolution with lr_mult 0, coord_map's crop and an
    unnormalised SoftmaxWithLoss with ignore_label 255; Input instead of data for deploy."""
    from pycaffe_alt import layers as L, params as P
    from pycaffe_alt.coord_map import crop

    learned = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
    n = caffe.NetSpec()
    if voc_dir is None:
        n.data = L.Input(shape=dict(dim=[1, 3, 20, 20]))
    else:
        n.data, n.label = L.Python(module=__name__, layer="VOCSegDataLayer", ntop=2,
                                   param_str=str(dict(voc_dir=voc_dir, split="train",
                                                      mean=(104.0, 116.7, 122.7))))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=4, pad=20, param=learned,
                            weight_filler=dict(type="gaussian", std=0.1))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.fc6 = L.Convolution(n.pool1, kernel_size=3, num_output=6, param=learned,
                          weight_filler=dict(type="gaussian", std=0.1))
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.score_fr = L.Convolution(n.drop6, num_output=3, kernel_size=1, param=learned,
                               weight_filler=dict(type="gaussian", std=0.1))
    n.upscore = L.Deconvolution(n.score_fr, convolution_param=dict(
        num_output=3, kernel_size=4, stride=2, bias_term=False), param=[dict(lr_mult=0)])
    n.score = crop(n.upscore, n.data)
    if voc_dir is not None:
        n.loss = L.SoftmaxWithLoss(n.score, n.label,
                                   loss_param=dict(normalize=False, ignore_label=255))
    return str(n.to_proto())


def test_fcn_solve_surgery_and_seg_tests(tmp_path):
    # shelhamer/fcn.berkeleyvision.org voc-fcn32s/solve.py with surgery.py, score.py and
    # voc_layers.py (prints made Python 3): SGDSolver, copy_from, surgery.interp's bilinear
    # kernels written through net.params[l][0].data[range(m), range(k), :, :], solver.step,
    # then score.seg_tests: test_nets[0].share_with(solver.net), forward per image, a
    # confusion histogram from the label and score blobs, loss from blobs['loss'].data.flat[0].
    from PIL import Image

    rs = np.random.RandomState(0)
    voc = tmp_path / "voc"
    voc.mkdir()
    sizes = [(13, 17), (16, 12), (11, 11)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray((rs.rand(h, w, 3) * 255).astype(np.uint8)).save(str(voc / f"{i}.jpg"))
        label = rs.randint(0, 3, (h, w)).astype(np.uint8)
        label[0] = 255
        Image.fromarray(label).save(str(voc / f"{i}.png"))
    (voc / "train.txt").write_text("0\n1\n2\n")
    (tmp_path / "train.prototxt").write_text(fcn(str(voc)))
    (tmp_path / "deploy.prototxt").write_text(fcn())
    (tmp_path / "solver.prototxt").write_text(
        f"train_net: '{tmp_path}/train.prototxt' test_net: '{tmp_path}/train.prototxt' "
        "test_iter: 3 test_interval: 999999999 lr_policy: 'fixed' base_lr: 1e-6 "
        "momentum: 0.99 weight_decay: 0.0005 test_initialization: false display: 0")
    caffe.set_random_seed(1)
    base = caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST)
    base.save(str(tmp_path / "base.caffemodel"))

    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    solver.net.copy_from(str(tmp_path / "base.caffemodel"))
    for l in [k for k in solver.net.params.keys() if "up" in k]:  # surgery.interp
        m, k, h, w = solver.net.params[l][0].data.shape
        factor, center = (h + 1) // 2, (h + 1) // 2 - 0.5
        og = np.ogrid[:h, :h]
        filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
        solver.net.params[l][0].data[range(m), range(k), :, :] = filt
    up = solver.net.params["upscore"][0].data.copy()
    assert up[1, 1, 1, 1] == pytest.approx(0.5625) and up[0, 1].sum() == 0
    solver.step(3)
    np.testing.assert_array_equal(solver.net.params["upscore"][0].data, up)  # lr_mult 0

    net = solver.test_nets[0]
    net.share_with(solver.net)
    n_cl = net.blobs["score"].channels
    assert n_cl == 3
    hist, loss = np.zeros((n_cl, n_cl)), 0
    deploy = caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST)
    for p in solver.net.params:
        for a, b in zip(deploy.params[p], solver.net.params[p]):
            a.data[...] = b.data
    for (h, w) in sizes:
        net.forward()
        gt = net.blobs["label"].data[0, 0].flatten()
        pred = net.blobs["score"].data[0].argmax(0).flatten()
        k = (gt >= 0) & (gt < n_cl)
        hist += np.bincount(n_cl * gt[k].astype(int) + pred[k],
                            minlength=n_cl ** 2).reshape(n_cl, n_cl)
        loss += net.blobs["loss"].data.flat[0]
        assert net.blobs["score"].data.shape == (1, 3, h, w)
        # infer.py on the same image: data reshaped to its size, no net.reshape() call.
        deploy.blobs["data"].reshape(1, *net.blobs["data"].data.shape[1:])
        deploy.blobs["data"].data[...] = net.blobs["data"].data
        deploy.forward()
        np.testing.assert_allclose(deploy.blobs["score"].data, net.blobs["score"].data,
                                   rtol=1e-5, atol=1e-5)
        # normalize: false sums -log max(p, FLT_MIN) over the pixels not ignored
        s = net.blobs["score"].data[0].astype(np.float64)
        logp = s - s.max(0) - np.log(np.exp(s - s.max(0)).sum(0))
        lab = net.blobs["label"].data[0, 0].astype(int)
        keep = lab != 255
        nll = -logp[lab[keep], np.nonzero(keep)[0], np.nonzero(keep)[1]]
        want = np.minimum(nll, -np.log(np.finfo(np.float32).tiny)).sum()
        assert net.blobs["loss"].data.flat[0] == pytest.approx(want, rel=1e-4)
    assert hist.sum() == sum((h - 1) * w for h, w in sizes)  # the 255 row is left out
    assert np.isfinite(loss)


def test_lmdb_of_datums_written_from_python_trains_and_predicts(tmp_path):
    # adilmoujahid/deeplearning-cats-dogs-tutorial: code/create_lmdb.py writes
    # caffe_pb2.Datum(channels, width, height, label, data=np.rollaxis(img, 2) bytes) of cv2
    # images into an LMDB (py3: keys encoded, tobytes for tostring), a Data layer with
    # mean_file, crop_size and mirror trains on it, and code/make_predictions_1.py reads the
    # mean (from compute_image_mean) with BlobProto.ParseFromString, reshaped by its legacy
    # channels/height/width, into
    # a Transformer (set_mean, set_transpose) for uint8 cv2 images.
    import lmdb
    from pycaffe_alt.proto import caffe_pb2

    rs = np.random.RandomState(0)
    imgs = [(rs.rand(8, 8, 3) * 120 + 100 * (i % 2)).astype(np.uint8) for i in range(8)]
    db = lmdb.open(str(tmp_path / "train_lmdb"), map_size=int(1e8))
    with db.begin(write=True) as txn:
        for idx, img in enumerate(imgs):
            datum = caffe_pb2.Datum(channels=3, width=8, height=8, label=idx % 2,
                                    data=np.rollaxis(img, 2).tobytes())
            txn.put("{:0>5d}".format(idx).encode(), datum.SerializeToString())
    db.close()
    # the tutorial's `compute_image_mean -backend=lmdb train_lmdb mean.binaryproto`, whose
    # BlobProto has the legacy num/channels/height/width fields the program reads
    from pycaffe_alt.tools import compute_image_mean
    assert compute_image_mean.main(["-backend=lmdb", str(tmp_path / "train_lmdb"),
                                    str(tmp_path / "mean.binaryproto")]) in (0, None)
    mean = np.mean([np.rollaxis(i, 2) for i in imgs], axis=0, dtype=np.float64)[None]
    layers = """
        layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
          convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: 'gaussian'
          std: 0.01 } } }
        layer { name: 'fc8' type: 'InnerProduct' bottom: 'conv1' top: 'fc8'
          inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 0.01 } } }"""
    (tmp_path / "train_val.prototxt").write_text(f"""
        layer {{ name: 'data' type: 'Data' top: 'data' top: 'label' include {{ phase: TRAIN }}
          transform_param {{ mirror: true crop_size: 8 mean_file: '{tmp_path}/mean.binaryproto' }}
          data_param {{ source: '{tmp_path}/train_lmdb' batch_size: 4 backend: LMDB }} }}
        {layers}
        layer {{ name: 'loss' type: 'SoftmaxWithLoss' bottom: 'fc8' bottom: 'label'
          top: 'loss' }}""")
    (tmp_path / "deploy.prototxt").write_text(
        "input: 'data' input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }" + layers +
        " layer { name: 'prob' type: 'Softmax' bottom: 'fc8' top: 'prob' }")
    (tmp_path / "solver.prototxt").write_text(
        f"net: '{tmp_path}/train_val.prototxt' base_lr: 0.001 lr_policy: 'step' gamma: 0.1 "
        f"stepsize: 2500 momentum: 0.9 max_iter: 4 snapshot: 4 display: 0 "
        f"snapshot_prefix: '{tmp_path}/model_1' solver_mode: GPU")
    caffe.set_random_seed(0)
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    solver.step(1)
    # the first batch: datums 0..3 less the mean, mirrored or not, labels as written
    np.testing.assert_array_equal(solver.net.blobs["label"].data, [0, 1, 0, 1])
    for i in range(4):
        x, want = solver.net.blobs["data"].data[i], np.rollaxis(imgs[i], 2) - mean[0]
        assert (np.allclose(x, want, atol=1e-4) or np.allclose(x, want[:, :, ::-1], atol=1e-4))
    solver.step(3)
    assert (tmp_path / "model_1_iter_4.caffemodel").exists()

    mean_blob = caffe_pb2.BlobProto()
    with open(str(tmp_path / "mean.binaryproto"), "rb") as f:
        mean_blob.ParseFromString(f.read())
    mean_array = np.asarray(mean_blob.data, dtype=np.float32).reshape(
        (mean_blob.channels, mean_blob.height, mean_blob.width))
    net = caffe.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "model_1_iter_4.caffemodel"),
                    caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_mean("data", mean_array)
    transformer.set_transpose("data", (2, 0, 1))
    preds = []
    for img in imgs[:4]:
        net.blobs["data"].data[...] = transformer.preprocess("data", img)
        preds.append(net.forward()["prob"].argmax())
        np.testing.assert_allclose(net.blobs["data"].data[0], np.rollaxis(img, 2) - mean[0],
                                   atol=1e-4)
    assert set(preds) <= {0, 1}


def test_feature_rows_appended_without_copy_alias_the_blob(tmp_path):
    # viggyfresh/viggynet extract_features.py appends net.blobs['fc6'].data.reshape((4096,))
    # for each image (after net.reshape'ing data to one image) and calls net.backward() on the
    # deploy net: in pycaffe every appended row is a view of the blob's one memory (Caffe's
    # Blob keeps it while the count fits), so np.array(D) repeats the last image's features;
    # snownus/Feature-Extraction-with-Caffe's .copy()-free batch form and a .copy() per row
    # give each image its own.
    (tmp_path / "cls.prototxt").write_text(CLASSIFIER)
    net = caffe.Net(str(tmp_path / "cls.prototxt"), caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_raw_scale("data", 255)
    net.blobs["data"].reshape(1, 3, 6, 6)
    images = [np.random.RandomState(i).rand(7, 9, 3).astype(np.float32) for i in range(3)]
    D, copies = [], []
    for img in images:
        net.blobs["data"].data[...] = transformer.preprocess("data", img)
        net.forward()
        feats = net.blobs["fc7"].data.reshape((6,))
        net.backward()
        D.append(feats)
        copies.append(net.blobs["fc7"].data.copy())
    D = np.array(D)
    np.testing.assert_array_equal(D[0], D[2])
    np.testing.assert_array_equal(D[2], copies[2][0])
    assert not np.array_equal(copies[0], copies[2])
    net.blobs["data"].reshape(len(images), 3, 6, 6)
    for i, img in enumerate(images):
        net.blobs["data"].data[i] = transformer.preprocess("data", img)
    net.forward()
    np.testing.assert_allclose(net.blobs["fc7"].data, np.concatenate(copies), rtol=1e-5,
                               atol=1e-5)


def test_segnet_bn_statistics_script(tmp_path):
    # alexgkendall/SegNet-Tutorial Scripts/compute_bn_statistics.py (xrange/print made
    # Python 3): the train prototxt is edited as a caffe_pb2.NetParameter (each BN layer gets
    # '-mean' and '-var' tops), the batch statistics are averaged over forward() results, the
    # BN params are rewritten, and the test net is built by removing the data layer, appending
    # input/input_dim, setting bn_mode INFERENCE and layer.add(name=..., bottom=[...]).
    from google.protobuf import text_format
    from PIL import Image
    from pycaffe_alt.proto import caffe_pb2

    rs = np.random.RandomState(0)
    lines = []
    for i in range(4):
        Image.fromarray((rs.rand(6, 8, 3) * 255).astype(np.uint8)).save(str(tmp_path / f"{i}.png"))
        Image.fromarray(rs.randint(0, 3, (6, 8)).astype(np.uint8)).save(str(tmp_path / f"{i}L.png"))
        lines.append(f"{tmp_path}/{i}.png {tmp_path}/{i}L.png")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    train = f"""name: 'segnet'
        layer {{ name: 'data' type: 'DenseImageData' top: 'data' top: 'label'
          dense_image_data_param {{ source: '{tmp_path}/train.txt' batch_size: 2 }} }}
        layer {{ name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
          convolution_param {{ num_output: 4 kernel_size: 3 pad: 1
            weight_filler {{ type: 'msra' }} }} }}
        layer {{ bottom: 'conv1' top: 'conv1' name: 'conv1_bn' type: 'BN' bn_param {{
          scale_filler {{ type: 'constant' value: 1 }}
          shift_filler {{ type: 'constant' value: 0.001 }} }} }}
        layer {{ name: 'conv_classifier' type: 'Convolution' bottom: 'conv1' top: 'conv_classifier'
          convolution_param {{ num_output: 3 kernel_size: 1 weight_filler {{ type: 'msra' }} }} }}
        layer {{ name: 'loss' type: 'SoftmaxWithLoss' bottom: 'conv_classifier' bottom: 'label'
          top: 'loss' }}
        layer {{ name: 'accuracy' type: 'Accuracy' bottom: 'conv_classifier' bottom: 'label'
          top: 'accuracy' }}"""
    caffe.set_random_seed(0)
    (tmp_path / "train.prototxt").write_text(train)
    caffe.Net(str(tmp_path / "train.prototxt"), caffe.TRAIN).save(str(tmp_path / "w.caffemodel"))

    train_net = caffe_pb2.NetParameter()
    text_format.Merge(open(str(tmp_path / "train.prototxt")).read(), train_net)
    for layer in train_net.layer:
        if layer.type == "BN" and len(layer.top) == 1:
            layer.top.append(layer.top[0] + "-mean")
            layer.top.append(layer.top[0] + "-var")
    with open(str(tmp_path / "bn_calc.prototxt"), "w") as f:
        f.write(text_format.MessageToString(train_net))
    net = caffe.Net(str(tmp_path / "bn_calc.prototxt"), str(tmp_path / "w.caffemodel"), caffe.TEST)
    means, variances = [], []
    for _ in range(2):
        res = net.forward(end="conv1")  # the convolution's output, before BN runs in place
        x = res["conv1"].astype(np.float64)
        means.append(x.mean(axis=(0, 2, 3)))
        variances.append(x.var(axis=(0, 2, 3)))
        net.forward(start="conv1_bn")
        np.testing.assert_allclose(np.squeeze(net.blobs["conv1-mean"].data), means[-1],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.squeeze(net.blobs["conv1-var"].data), variances[-1],
                                   rtol=1e-3, atol=1e-5)
    Ex, Varx = np.mean(means, 0), np.mean(variances, 0)
    gamma = np.squeeze(net.params["conv1_bn"][0].data)
    beta = np.squeeze(net.params["conv1_bn"][1].data)
    new_gamma = gamma / np.sqrt(Varx + 1e-9)
    new_beta = beta - gamma * Ex / np.sqrt(Varx + 1e-9)
    net.params["conv1_bn"][0].data[...] = new_gamma.reshape(net.params["conv1_bn"][0].data.shape)
    net.params["conv1_bn"][1].data[...] = new_beta.reshape(net.params["conv1_bn"][1].data.shape)
    net.save(str(tmp_path / "test_weights.caffemodel"))

    test_msg = train_net
    for data_layer in [l for l in test_msg.layer if l.type.endswith("Data")]:
        test_msg.layer.remove(data_layer)
    test_msg.input.append("data")
    test_msg.input_dim.extend([1, 3, 6, 8])
    for l in test_msg.layer:
        if l.type == "BN":
            for dl in l.top[1:]:
                l.top.remove(dl)
            l.bn_param.bn_mode = caffe_pb2.BNParameter.INFERENCE
    dead_outputs = [l for l in test_msg.layer if l.type in ["SoftmaxWithLoss", "Accuracy"]]
    out_bottom = dead_outputs[0].bottom[0]
    for dead in dead_outputs:
        test_msg.layer.remove(dead)
    test_msg.layer.add(name="prob", type="Softmax", bottom=[out_bottom], top=["prob"])
    with open(str(tmp_path / "deploy.prototxt"), "w") as f:
        f.write(text_format.MessageToString(test_msg))
    test = caffe.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "test_weights.caffemodel"),
                     caffe.TEST)
    x = np.random.RandomState(1).rand(1, 3, 6, 8).astype(np.float32) * 255
    conv = test.forward(data=x, end="conv1")["conv1"].copy()
    prob = test.forward(start="conv1_bn")["prob"]
    assert prob.shape == (1, 3, 6, 8)
    np.testing.assert_allclose(test.blobs["conv1"].data,
                               conv * new_gamma[:, None, None] + new_beta[:, None, None],
                               rtol=1e-4, atol=1e-4)


def test_fine_tuning_notebook_with_a_renamed_classifier(tmp_path):
    # BVLC examples/02-fine-tuning.ipynb: caffenet() names the classifier through
    # n.__setattr__(classifier_name, fc8) and freezes the rest with [dict(lr_mult=0)] * 2;
    # the solver is a caffe_pb2.SolverParameter written as str(s) to a temporary file for
    # caffe.get_solver; copy_from leaves the renamed fc8_flickr at its constant-0 default, so
    # the first loss is log(classes); run_solvers copies s.net.blobs['loss'/'acc'].data each
    # step; the frozen layers stay as loaded; eval_style_net adds forward()['acc'] up.
    import os
    import tempfile
    from pycaffe_alt import layers as L, params as P
    from pycaffe_alt.proto import caffe_pb2

    learned = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
    frozen = [dict(lr_mult=0)] * 2

    def caffenet(data, label=None, train=True, num_classes=5, classifier_name="fc8",
                 learn_all=False):
        n = caffe.NetSpec()
        n.data = data
        param = learned if learn_all else frozen
        n.conv1 = L.Convolution(n.data, kernel_size=3, stride=2, num_output=4, param=param,
                                weight_filler=dict(type="gaussian", std=0.1),
                                bias_filler=dict(type="constant", value=0.1))
        n.relu1 = L.ReLU(n.conv1, in_place=True)
        n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
        n.fc7 = L.InnerProduct(n.pool1, num_output=8, param=param,
                               weight_filler=dict(type="gaussian", std=0.1))
        n.relu7 = L.ReLU(n.fc7, in_place=True)
        fc8input = n.relu7
        if train:
            n.drop7 = fc8input = L.Dropout(n.relu7, in_place=True)
        fc8 = L.InnerProduct(fc8input, num_output=num_classes, param=learned)
        n.__setattr__(classifier_name, fc8)
        if not train:
            n.probs = L.Softmax(fc8)
        if label is not None:
            n.label = label
            n.loss = L.SoftmaxWithLoss(fc8, n.label)
            n.acc = L.Accuracy(fc8, n.label)
        with tempfile.NamedTemporaryFile(mode="w", delete=False, dir=str(tmp_path)) as f:
            f.write(str(n.to_proto()))
            return f.name

    caffe.set_random_seed(0)
    imagenet = caffe.Net(caffenet(L.DummyData(shape=dict(dim=[1, 3, 11, 11])), train=False),
                         caffe.TEST)
    imagenet.params["fc8"][0].data[...] = 1
    weights = str(tmp_path / "imagenet.caffemodel")
    imagenet.save(weights)

    def style_net(train=True, learn_all=False):
        data, label = L.DummyData(shape=[dict(dim=[4, 3, 11, 11]), dict(dim=[4])],
                                  data_filler=[dict(type="gaussian"),
                                               dict(type="constant", value=2)], ntop=2)
        return caffenet(data, label, train=train, num_classes=3,
                        classifier_name="fc8_flickr", learn_all=learn_all)

    def solver(train_net_path, base_lr=0.01):
        s = caffe_pb2.SolverParameter()
        s.train_net = train_net_path
        s.iter_size = 1
        s.max_iter = 100000
        s.type = "SGD"
        s.base_lr = base_lr
        s.lr_policy = "step"
        s.gamma = 0.1
        s.stepsize = 20000
        s.momentum = 0.9
        s.weight_decay = 5e-4
        s.display = 1000
        s.snapshot = 10000
        s.snapshot_prefix = str(tmp_path / "finetune_flickr_style")
        s.solver_mode = caffe_pb2.SolverParameter.GPU
        with tempfile.NamedTemporaryFile(mode="w", delete=False, dir=str(tmp_path)) as f:
            f.write(str(s))
            return f.name

    style_solver = caffe.get_solver(solver(style_net(train=True)))
    style_solver.net.copy_from(weights)
    assert not style_solver.net.params["fc8_flickr"][0].data.any()
    conv1 = style_solver.net.params["conv1"][0].data.copy()
    np.testing.assert_array_equal(conv1, imagenet.params["conv1"][0].data)
    niter = 3
    loss, acc = ({"pretrained": np.zeros(niter)} for _ in ("loss", "acc"))
    for it in range(niter):
        style_solver.step(1)
        loss["pretrained"][it], acc["pretrained"][it] = (
            style_solver.net.blobs[b].data.copy() for b in ("loss", "acc"))
    assert loss["pretrained"][0] == pytest.approx(np.log(3), rel=1e-6)
    # All-zero scores: the fork's Accuracy partial_sorts (score, class) pairs with
    # std::greater, so of tied scores the highest class (2, every label here) comes first.
    assert acc["pretrained"][0] == 1
    np.testing.assert_array_equal(style_solver.net.params["conv1"][0].data, conv1)
    assert style_solver.net.params["fc8_flickr"][0].data.any()
    style_weights = os.path.join(tempfile.mkdtemp(dir=str(tmp_path)), "weights.caffemodel")
    style_solver.net.save(style_weights)

    test_net = caffe.Net(style_net(train=False), style_weights, caffe.TEST)
    accuracy = 0
    for it in range(2):
        accuracy += test_net.forward()["acc"]
    accuracy /= 2
    assert 0 <= float(accuracy) <= 1
    np.testing.assert_array_equal(test_net.params["fc8_flickr"][0].data,
                                  style_solver.net.params["fc8_flickr"][0].data)
    end_to_end = caffe.get_solver(solver(style_net(train=True, learn_all=True)))
    end_to_end.net.copy_from(style_weights)
    end_to_end.step(1)
    assert not np.array_equal(end_to_end.net.params["conv1"][0].data, conv1)
