"""Real pycaffe client code, written the way pycaffe users write it, against ``import pycaffe_alt
as caffe``: the LeNet notebook (NetSpec, SGDSolver, stepping and reading blobs), the
classification notebook (Transformer, reshape, forward), net surgery, Classifier, Detector,
caffe_pb2 + text_format, caffe.io blobproto helpers, Python layers, caffe.draw, and the package's
lazy import."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt import layers as L
from pycaffe_alt import params as P
from pycaffe_alt.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "fixtures", "golden", "data")


# ---------------------------------------------------------------- 01-learning-lenet
def lenet(lmdb, batch_size):
    # The notebook's net, as written there.
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier'))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type='xavier'))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type='xavier'))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


@pytest.fixture
def mnist_solver(tmp_path):
    for name in ("mnist_train_lmdb", "mnist_test_lmdb"):
        shutil.copytree(os.path.join(DATA, name), tmp_path / name)
        for f in (tmp_path / name).iterdir():  # the fixtures are read-only
            f.chmod(0o644)
    train_path, test_path = str(tmp_path / "lenet_auto_train.prototxt"), \
        str(tmp_path / "lenet_auto_test.prototxt")
    with open(train_path, 'w') as f:
        f.write(str(lenet(str(tmp_path / "mnist_train_lmdb"), 16)))
    with open(test_path, 'w') as f:
        f.write(str(lenet(str(tmp_path / "mnist_test_lmdb"), 32)))
    # Part two of the notebook writes the solver with caffe_pb2.
    s = caffe_pb2.SolverParameter()
    s.random_seed = 0xCAFFE
    s.train_net = train_path
    s.test_net.append(test_path)
    s.test_interval = 500
    s.test_iter.append(4)
    s.max_iter = 10000
    s.type = "SGD"
    s.base_lr = 0.01
    s.momentum = 0.9
    s.weight_decay = 5e-4
    s.lr_policy = 'inv'
    s.gamma = 0.0001
    s.power = 0.75
    s.display = 1000
    s.snapshot = 5000
    s.snapshot_prefix = str(tmp_path / "lenet")
    solver_path = str(tmp_path / "lenet_auto_solver.prototxt")
    with open(solver_path, 'w') as f:
        f.write(str(s))
    return solver_path


def test_lenet_notebook(mnist_solver):
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(mnist_solver)
    shapes = [(k, v.data.shape) for k, v in solver.net.blobs.items()]
    assert shapes[:4] == [('data', (16, 1, 28, 28)), ('label', (16,)),
                          ('conv1', (16, 20, 24, 24)), ('pool1', (16, 20, 12, 12))]
    assert [(k, v[0].data.shape) for k, v in solver.net.params.items()] == [
        ('conv1', (20, 1, 5, 5)), ('conv2', (50, 20, 5, 5)), ('fc1', (500, 800)),
        ('score', (10, 500))]

    solver.net.forward()
    solver.test_nets[0].forward()
    assert solver.net.blobs['data'].data[:8, 0].shape == (8, 28, 28)
    assert 0.0 <= solver.net.blobs['data'].data.min() and solver.net.blobs['data'].data.max() <= 1.0
    labels = solver.net.blobs['label'].data[:8]
    assert np.all((labels >= 0) & (labels <= 9)) and np.all(labels == labels.astype(int))

    solver.step(1)
    assert solver.iter == 1
    grads = solver.net.params['conv1'][0].diff[:, 0].reshape(4, 5, 5, 5) \
        .transpose(0, 2, 1, 3).reshape(4 * 5, 5 * 5)
    assert grads.shape == (20, 25) and np.abs(grads).sum() > 0

    niter, test_interval = 20, 10
    train_loss = np.zeros(niter)
    test_acc = np.zeros(int(np.ceil(niter / test_interval)))
    output = np.zeros((niter, 8, 10))
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs['loss'].data
        solver.test_nets[0].forward(start='conv1')
        output[it] = solver.test_nets[0].blobs['score'].data[:8]
        if it % test_interval == 0:
            correct = 0
            for test_it in range(4):
                solver.test_nets[0].forward()
                correct += sum(solver.test_nets[0].blobs['score'].data.argmax(1)
                               == solver.test_nets[0].blobs['label'].data)
            test_acc[it // test_interval] = correct / 128.
    assert solver.iter == 1 + niter
    assert train_loss[-5:].mean() < 0.8 * train_loss[:5].mean()
    assert test_acc[-1] > 0.5  # chance is 0.1
    # The test net shares the train net's weights.
    np.testing.assert_array_equal(solver.test_nets[0].params['conv1'][0].data,
                                  solver.net.params['conv1'][0].data)


def test_get_solver_picks_the_type_of_the_file(mnist_solver):
    solver = caffe.get_solver(mnist_solver)
    assert solver.type == "SGD" and solver.param.base_lr == pytest.approx(0.01)
    assert solver.param.max_iter == 10000 and solver.iter == 0
    assert len(solver.test_nets) == 1


TINY_TRAIN = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("rule", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_get_solver_returns_the_pycaffe_class_of_the_rule(tmp_path, rule):
    # pycaffe's get_solver returns the solver as its dynamic class (AdamSolver for type "Adam"),
    # and every rule's class derives from SGDSolver (python/caffe/_caffe.cpp), so .lr and
    # isinstance checks written against caffe.SGDSolver hold for all of them.
    (tmp_path / "net.prototxt").write_text(TINY_TRAIN)
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                    f'type: "{rule}"\n')
    solver = caffe.get_solver(str(path))
    cls = getattr(caffe, rule + "Solver")
    assert type(solver) is cls
    assert isinstance(solver, caffe.SGDSolver) and isinstance(solver, caffe.Solver)
    assert issubclass(cls, caffe.SGDSolver)
    assert solver.type == rule and solver.lr == pytest.approx(0.01)


# ---------------------------------------------------------------- classification notebook
DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 10 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2
                            weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture
def deploy(tmp_path):
    """A deploy prototxt and random weights for it (saved with net.save, as net surgery does)."""
    path = str(tmp_path / "deploy.prototxt")
    with open(path, "w") as f:
        f.write(DEPLOY)
    weights = str(tmp_path / "tiny.caffemodel")
    caffe.set_random_seed(1)
    caffe.Net(path, caffe.TEST).save(weights)
    return path, weights


def _image(h=20, w=24, seed=0):
    return np.random.RandomState(seed).rand(h, w, 3).astype(np.float32)  # like caffe.io.load_image


def test_classification_notebook(deploy):
    model_def, model_weights = deploy
    net = caffe.Net(model_def, model_weights, caffe.TEST)
    mu = np.array([104.0, 117.0, 123.0])
    transformer = caffe.io.Transformer({'data': net.blobs['data'].data.shape})
    transformer.set_transpose('data', (2, 0, 1))
    transformer.set_mean('data', mu)
    transformer.set_raw_scale('data', 255)
    transformer.set_channel_swap('data', (2, 1, 0))

    net.blobs['data'].reshape(50, 3, 16, 16)
    image = _image(16, 16)
    transformed_image = transformer.preprocess('data', image)
    expected = image[:, :, ::-1].transpose(2, 0, 1) * 255 - mu[:, None, None]
    np.testing.assert_allclose(transformed_image, expected, rtol=1e-6, atol=1e-4)
    net.blobs['data'].data[...] = transformed_image
    output = net.forward()
    output_prob = output['prob'][0]
    assert output['prob'].shape == (50, 5)
    assert output_prob.sum() == pytest.approx(1.0, abs=1e-5)
    assert 0 <= output_prob.argmax() < 5
    # Every copy of the image gets the same prediction.
    np.testing.assert_allclose(output['prob'], np.tile(output_prob, (50, 1)), atol=1e-6)
    top_inds = output_prob.argsort()[::-1][:5]
    assert sorted(top_inds) == list(range(5))

    blob_shapes = {name: blob.data.shape for name, blob in net.blobs.items()}
    assert blob_shapes == {'data': (50, 3, 16, 16), 'conv1': (50, 4, 7, 7),
                           'pool1': (50, 4, 3, 3), 'fc': (50, 5), 'prob': (50, 5)}
    param_shapes = {name: (p[0].data.shape, p[1].data.shape) for name, p in net.params.items()}
    assert param_shapes == {'conv1': ((4, 3, 3, 3), (4,)), 'fc': ((5, 36), (5,))}
    feat = net.blobs['conv1'].data[0, :36]
    assert feat.min() >= 0  # after the in-place ReLU
    assert np.allclose(transformer.deprocess('data', net.blobs['data'].data[0]), image, atol=1e-5)


def test_net_surgery_fc_to_conv(deploy, tmp_path):
    """Cast the InnerProduct into a convolution over the same window (net_surgery notebook)."""
    model_def, model_weights = deploy
    net = caffe.Net(model_def, model_weights, caffe.TEST)
    full_conv = DEPLOY.replace("dim: 16 dim: 16", "dim: 24 dim: 24").replace(
        'name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"\n'
        '        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } }',
        'name: "fc-conv" type: "Convolution" bottom: "pool1" top: "fc-conv"\n'
        '        convolution_param { num_output: 5 kernel_size: 3 }').replace(
        'bottom: "fc" top: "prob"', 'bottom: "fc-conv" top: "prob" softmax_param { axis: 1 }')
    conv_path = str(tmp_path / "full_conv.prototxt")
    with open(conv_path, "w") as f:
        f.write(full_conv)
    net_full_conv = caffe.Net(conv_path, model_weights, caffe.TEST)  # fc-conv is not in the file

    params, params_full_conv = ['fc'], ['fc-conv']
    fc_params = {pr: (net.params[pr][0].data, net.params[pr][1].data) for pr in params}
    conv_params = {pr: (net_full_conv.params[pr][0].data, net_full_conv.params[pr][1].data)
                   for pr in params_full_conv}
    assert conv_params['fc-conv'][0].shape == (5, 4, 3, 3)
    for pr, pr_conv in zip(params, params_full_conv):
        conv_params[pr_conv][0].flat = fc_params[pr][0].flat  # flat unrolls the arrays
        conv_params[pr_conv][1][...] = fc_params[pr][1]
    surgery_weights = str(tmp_path / "full_conv.caffemodel")
    net_full_conv.save(surgery_weights)

    net_full_conv = caffe.Net(conv_path, surgery_weights, caffe.TEST)
    image = np.random.RandomState(3).rand(10, 3, 24, 24).astype(np.float32) * 100
    out = net_full_conv.forward(data=image)
    assert out['prob'].shape == (10, 5, 3, 3)
    # The top-left position of the map is the classifier applied to the top-left 16 x 16 window
    # (conv stride 2, pool stride 2: one step of the map is 4 input pixels).
    fc_out = net.forward(data=image[:, :, :16, :16])['prob']
    np.testing.assert_allclose(out['prob'][:, :, 0, 0], fc_out, rtol=1e-4, atol=1e-6)
    shifted = net.forward(data=image[:, :, 4:20, 8:24])['prob']
    np.testing.assert_allclose(out['prob'][:, :, 1, 2], shifted, rtol=1e-4, atol=1e-6)


def test_classifier_predict(deploy):
    model_def, model_weights = deploy
    mean = np.array([0.2, 0.4, 0.6])
    clf = caffe.Classifier(model_def, model_weights, image_dims=(20, 20), mean=mean,
                           raw_scale=255, channel_swap=(2, 1, 0))
    images = [_image(30, 26, seed=i) for i in range(3)]
    net = caffe.Net(model_def, model_weights, caffe.TEST)

    def reference(crops):
        t = clf.transformer
        batch = np.stack([t.preprocess('data', c) for c in crops])
        return net.forward_all(data=batch)['prob']

    resized = np.stack([caffe.io.resize_image(im, (20, 20)) for im in images])
    center = clf.predict(images, oversample=False)
    assert center.shape == (3, 5)
    np.testing.assert_allclose(center, reference(resized[:, 2:18, 2:18]), rtol=1e-5, atol=1e-7)
    ten = clf.predict(images)
    expected = reference(caffe.io.oversample(resized, (16, 16))).reshape(3, 10, 5).mean(1)
    np.testing.assert_allclose(ten, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ten.sum(1), 1.0, atol=1e-5)


def test_detector_windows_and_context(deploy, tmp_path):
    import cv2

    model_def, model_weights = deploy
    image = (np.random.RandomState(5).rand(40, 50, 3) * 255).astype(np.uint8)
    path = str(tmp_path / "im.png")
    cv2.imwrite(path, image)
    det = caffe.Detector(model_def, model_weights, raw_scale=255, channel_swap=(2, 1, 0))
    windows = [np.array([0, 0, 20, 30]), np.array([10, 5, 38, 45])]
    found = det.detect_windows([(path, windows)])
    assert [d['filename'] for d in found] == [path, path]
    loaded = caffe.io.load_image(path).astype(np.float32)
    crop = loaded[10:38, 5:45]
    expected = det.forward_all(data=det.transformer.preprocess('data', crop)[None])['prob'][0]
    np.testing.assert_allclose(found[1]['prediction'], expected, rtol=1e-5, atol=1e-7)

    padded = caffe.Detector(model_def, model_weights, raw_scale=255, channel_swap=(2, 1, 0),
                            mean=np.array([10.0, 20.0, 30.0]), context_pad=2)
    assert tuple(padded.crop_dims) == (16, 16, 3)
    window = padded.crop(loaded, np.array([0, 0, 20, 30]))
    assert window.shape == (16, 16, 3)
    # Off the image (top-left) the crop holds the mean in raw space: BGR mean back to RGB / 255.
    np.testing.assert_allclose(window[0, 0], np.array([30.0, 20.0, 10.0]) / 255, rtol=1e-6)
    with pytest.raises(caffe.CaffeError, match="selective_search"):
        det.detect_selective_search([path])
    # pycaffe divides by zero at context_pad = crop / 2; a short or NaN window indexed out of
    # range or was cropped silently.
    for pad in (8, 9, -1):
        with pytest.raises(TypeError, match="context_pad must be in 0..7"):
            caffe.Detector(model_def, model_weights, context_pad=pad)
    for bad in (np.array([0, 0, 5]), np.array([np.nan, 0, 5, 5]), "abcd"):
        with pytest.raises(caffe.CaffeError, match="a window is 4 finite numbers"):
            padded.crop(loaded, bad)


# ---------------------------------------------------------------- protobuf and caffe.io
def test_caffe_pb2_text_format_edit(deploy, tmp_path):
    model_def, _ = deploy
    net_param = caffe_pb2.NetParameter()
    with open(model_def) as f:
        text_format.Merge(f.read(), net_param)
    assert caffe.proto.caffe_pb2 is caffe_pb2
    assert [l.type for l in net_param.layer][:3] == ["Input", "Convolution", "ReLU"]
    net_param.layer[1].convolution_param.num_output = 6
    edited = str(tmp_path / "edited.prototxt")
    with open(edited, "w") as f:
        f.write(text_format.MessageToString(net_param))
    net = caffe.Net(edited, caffe.TEST)
    assert net.params['conv1'][0].data.shape == (6, 3, 3, 3)
    assert caffe_pb2.TRAIN == caffe.TRAIN and caffe_pb2.TEST == caffe.TEST


def test_blobproto_round_trip_and_mean_file():
    arr = np.random.RandomState(0).rand(2, 3, 4, 5).astype(np.float32)
    blob = caffe.io.array_to_blobproto(arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), arr)
    again = caffe_pb2.BlobProto()
    again.ParseFromString(blob.SerializeToString())
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(again), arr)
    # How pycaffe users read a mean file.
    mean_blob = caffe.proto.caffe_pb2.BlobProto()
    with open(os.path.join(DATA, "mnist_mean.binaryproto"), "rb") as f:
        mean_blob.ParseFromString(f.read())
    mean = np.array(caffe.io.blobproto_to_array(mean_blob))
    assert mean.shape == (1, 1, 28, 28) and 0 < mean.mean() < 255


# ---------------------------------------------------------------- Python layers
LAYER_MODULE = '''
import numpy as np
import pycaffe_alt as caffe


class EuclideanLossLayer(caffe.Layer):
    """The Euclidean loss of Caffe's examples/pycaffe/layers/pyloss.py, as users write it."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num
'''


def test_python_layer_subclassing_caffe_layer(tmp_path, monkeypatch):
    (tmp_path / "pyloss_user.py").write_text(LAYER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    n = caffe.NetSpec()
    n.data, n.target = L.Input(shape=[dict(dim=[4, 3]), dict(dim=[4, 3])], ntop=2)
    n.loss = L.Python(n.data, n.target, module='pyloss_user', layer='EuclideanLossLayer',
                      loss_weight=1)
    proto = n.to_proto()
    proto.force_backward = True
    net = caffe.Net(proto, caffe.TRAIN, allow_python=True)
    rs = np.random.RandomState(0)
    a, b = rs.rand(4, 3).astype(np.float32), rs.rand(4, 3).astype(np.float32)
    out = net.forward(data=a, target=b)
    assert out['loss'][0] == pytest.approx(np.sum((a - b) ** 2) / 4 / 2, rel=1e-5)
    net.backward()
    np.testing.assert_allclose(net.blobs['data'].diff, (a - b) / 4, rtol=1e-5)
    sys.modules.pop("pyloss_user", None)


# ---------------------------------------------------------------- Net extras
def test_net_extras(deploy, tmp_path):
    model_def, model_weights = deploy
    net = caffe.Net(model_def, model_weights, caffe.TEST)
    names = list(net.blobs)
    assert [names[i] for i in net._top_ids(1)] == ['conv1']
    assert [names[i] for i in net._bottom_ids(3)] == ['conv1']
    assert net._blob_loss_weights == [0.0] * len(names)
    assert [b.shape for b in net._blobs] == [net.blobs[n].shape for n in names]
    assert list(net.layer_dict) == net._layer_names

    data = np.random.RandomState(0).rand(13, 3, 16, 16).astype(np.float32)
    batches = list(net._batch({'data': data}))
    assert [len(b['data']) for b in batches] == [10, 10]
    assert np.all(batches[1]['data'][3:] == 0)
    outs, diffs = net.forward_backward_all(data=data)
    assert outs['prob'].shape == (13, 5) and diffs['data'].shape == (13, 3, 16, 16)
    np.testing.assert_allclose(outs['prob'], net.forward_all(data=data)['prob'], atol=1e-6)

    h5 = str(tmp_path / "tiny.weights")  # load_hdf5 does not go by the extension
    net.save_hdf5(h5)
    other = caffe.Net(model_def, caffe.TEST)
    other.load_hdf5(h5)
    for name in net.params:
        for mine, theirs in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(mine.data, theirs.data)
    net.params['fc'][0].diff[...] = 1
    net.clear_param_diffs()
    assert not net.params['fc'][0].diff.any()


# ---------------------------------------------------------------- caffe.draw
def test_draw_to_dot(tmp_path):
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=8, source="x", backend=P.Data.LMDB, ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, stride=2, num_output=20)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.acc = L.Accuracy(n.pool1, n.label, include=dict(phase=caffe.TEST))
    proto = n.to_proto()
    proto.name = "drawn"
    dot = caffe.draw.to_dot(proto, "LR")
    assert dot.startswith('digraph "drawn" {') and "rankdir=LR;" in dot
    assert ('"conv1_Convolution" [label="conv1\\n(Convolution)\\nkernel size: 5\\nstride: 2'
            '\\npad: 0"') in dot
    assert 'fillcolor="#FF5050"' in dot and 'fillcolor="#90EE90"' in dot  # conv; in-place ReLU
    assert '"pool1_Pooling" [label="pool1\\n(Pooling MAX)' in dot
    assert '"data_blob" -> "conv1_Convolution";' in dot
    assert '"conv1_Convolution" -> "conv1_blob" [label="20"];' in dot
    assert '"data_Data" -> "label_blob" [label="Batch 8"];' in dot
    assert '"conv1_blob" [label="conv1", shape="octagon"' in dot
    assert "acc_Accuracy" not in caffe.draw.to_dot(proto, "TB", phase=caffe.TRAIN)
    assert "conv1 (Convolution) kernel size: 5" in caffe.draw.to_dot(proto, "TB")
    target = tmp_path / "net.dot"
    caffe.draw.draw_net_to_file(proto, str(target))
    assert target.read_text() == dot


def test_draw_png_needs_graphviz_or_says_so(tmp_path):
    proto = caffe.to_proto(L.ReLU(L.Input(shape=dict(dim=[1]))))
    if shutil.which("dot") is None:
        with pytest.raises(caffe.CaffeError, match="Graphviz"):
            caffe.draw.draw_net(proto, "LR", ext="png")
    else:
        assert caffe.draw.draw_net(proto, "LR", ext="png").startswith(b"\x89PNG")


# ---------------------------------------------------------------- the package itself
def test_public_names():
    public = dir(caffe)
    for name in ("Net", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device",
                 "set_random_seed", "layer_type_list", "Layer", "get_solver", "SGDSolver",
                 "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
                 "AdamSolver", "NetSpec", "layers", "params", "to_proto", "Classifier", "Detector",
                 "io", "draw", "proto", "__version__", "CaffeError", "init_log", "log",
                 "solver_count", "set_solver_count", "solver_rank", "set_solver_rank",
                 "set_multiprocess", "has_nccl", "Timer"):
        assert name in public, name
        assert getattr(caffe, name) is not None
    from pycaffe_alt import Net
    from pycaffe_alt.layers.python_layer import PythonLayerBase
    assert Net is caffe.Net and caffe.Layer is PythonLayerBase
    assert "Convolution" in caffe.layer_type_list()
    # Importing the layer implementations does not take caffe.layers away from NetSpec.
    import pycaffe_alt.layers.base  # noqa: F401
    import pycaffe_alt.log  # noqa: F401
    assert caffe.layers is L and callable(caffe.log)
    assert caffe.solver_count() == 1 and not caffe.has_nccl()
    with pytest.raises(caffe.CaffeError, match="not supported"):
        caffe.set_solver_count(2)
    with pytest.raises(AttributeError):
        caffe.no_such_name
    timer = caffe.Timer()
    timer.start()
    timer.stop()
    assert timer.ms >= 0


def test_import_is_lazy():
    # How long the import takes is measured by benchmarks/import_time.py (not a timed test).
    code = textwrap.dedent("""
        import sys
        import pycaffe_alt
        import pycaffe_alt.data.db
        from pycaffe_alt.proto import caffe_pb2
        assert pycaffe_alt.TRAIN == 0 and pycaffe_alt.TEST == 1
        print('torch' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True).stdout.split()
    assert out[-1] == "False"  # torch loads on first use of a net or solver, not on import


@pytest.mark.parametrize("dims", [(-5, 10), (20, 20, 3), "ab"])
def test_classifier_refuses_image_dims_that_are_not_a_size(deploy, dims):
    # pycaffe keeps image_dims as given and only predict() resizes to it: the net is built, and
    # predict() refuses the size by name (pycaffe failed inside numpy or skimage).
    from pycaffe_alt.errors import DataError

    model_def, model_weights = deploy
    clf = caffe.Classifier(model_def, model_weights, image_dims=dims)
    with pytest.raises(DataError, match="is not \\(height, width\\)"):
        clf.predict([np.zeros((20, 20, 3), np.float32)])


def test_classifier_predict_reads_image_dims_when_it_runs(deploy):
    # pycaffe's predict() reads self.image_dims at each call: a program may change it after
    # construction (it was read once, at construction, and a new value was ignored).
    model_def, model_weights = deploy
    images = [_image(30, 26, seed=i) for i in range(2)]
    clf = caffe.Classifier(model_def, model_weights, image_dims=(20, 20))
    clf.image_dims = (24, 24)
    expected = caffe.Classifier(model_def, model_weights, image_dims=(24, 24)).predict(images)
    np.testing.assert_array_equal(clf.predict(images), expected)


def test_a_pycaffe_solver_runs_where_set_mode_says_not_where_solver_mode_says(tmp_path):
    # Caffe's Solver does not read solver_mode (the caffe tool does): with set_mode_cpu() a
    # solver file saying GPU still trains on the CPU, without a warning.
    import pycaffe_alt as caffe
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 1 } }\n')
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nsolver_mode: GPU\n'
        f'device_id: 3\nsnapshot_prefix: "{tmp_path}/s"\n')
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    assert solver.device.type == "cpu" and solver.net.device.type == "cpu"
