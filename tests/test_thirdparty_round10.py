"""Round 10 of third-party pycaffe programs run unchanged, aimed at programs that look inside
nets (saliency and sensitivity maps, DeepDream, adversarial examples, layer-by-layer timing) and
at NetSpec generators: behaviours they rely on, each checked with a small program of our own
written after the real one's pattern."""
import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe

# A small GoogLeNet-like deploy net: blob names as the programs address them.
DEPLOY = """name: 'TinyGoogLeNet'
input: 'data' input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
layer { name: 'conv1/7x7_s2' type: 'Convolution' bottom: 'data' top: 'conv1/7x7_s2'
  convolution_param { num_output: 4 pad: 1 kernel_size: 3 stride: 2
    weight_filler { type: 'gaussian' std: 0.3 } bias_filler { type: 'constant' value: 0.2 } } }
layer { name: 'conv1/relu_7x7' type: 'ReLU' bottom: 'conv1/7x7_s2' top: 'conv1/7x7_s2' }
layer { name: 'inception_3b/1x1' type: 'Convolution' bottom: 'conv1/7x7_s2'
  top: 'inception_3b/1x1' convolution_param { num_output: 3 kernel_size: 1
    weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'inception_3b/output' type: 'Concat' bottom: 'inception_3b/1x1'
  bottom: 'conv1/7x7_s2' top: 'inception_3b/output' }
layer { name: 'pool5' type: 'Pooling' bottom: 'inception_3b/output' top: 'pool5'
  pooling_param { pool: AVE global_pooling: true } }
layer { name: 'loss3/classifier' type: 'InnerProduct' bottom: 'pool5' top: 'loss3/classifier'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'prob' type: 'Softmax' bottom: 'loss3/classifier' top: 'prob' }
"""


@pytest.fixture
def deploy(tmp_path):
    caffe.set_random_seed(7)
    net_fn, param_fn = str(tmp_path / "deploy.prototxt"), str(tmp_path / "w.caffemodel")
    with open(net_fn, "w") as f:
        f.write(DEPLOY)
    caffe.Net(net_fn, caffe.TEST).save(param_fn)
    # google/deepdream dream.ipynb: the deploy file is patched through caffe.io.caffe_pb2 so
    # that backward reaches the data blob.
    model = caffe.io.caffe_pb2.NetParameter()
    text_format.Merge(open(net_fn).read(), model)
    model.force_backward = True
    with open(str(tmp_path / "tmp.prototxt"), "w") as f:
        f.write(str(model))
    return str(tmp_path / "tmp.prototxt"), param_fn


def test_classifier_takes_a_phase_passed_third_and_gives_sensitivity_maps(deploy):
    # lmzintgraf/DeepVis-PredDiff (utils_classifiers.py) builds its nets with
    # caffe.Classifier(net_fn, param_fn, caffe.TEST, channel_swap=(2,1,0), mean=mean): pycaffe
    # takes caffe.TEST as image_dims and keeps it (only predict() resizes), and the program
    # feeds net.transformer.preprocess'd crops of net.crop_dims through forward itself.
    net_fn, param_fn = deploy
    net = caffe.Classifier(net_fn, param_fn, caffe.TEST, channel_swap=(2, 1, 0),
                           mean=np.float32([104.0, 117.0, 123.0]))
    assert list(net.crop_dims) == [16, 16]
    img = np.float32(np.random.RandomState(0).rand(16, 16, 3) * 255)
    x = net.transformer.preprocess("data", img)
    # sensitivity_analysis_caffe.get_sensitivity_map: the chosen unit's diff set on the
    # penultimate blob, the blobs above zeroed, backward from that layer.
    layer = list(net.blobs.keys())[-2]
    net.blobs["data"].data[0] = x
    net.forward()
    unit = int(np.argmax(net.blobs["prob"].data[0]))
    diffs = net.blobs[layer].diff * 0
    diffs[0][unit] = net.blobs[layer].data[0, unit]
    net.blobs[layer].diff[...] = diffs
    net.blobs["prob"].diff[...] = 0
    smap = net.backward(start=layer)["data"][0]

    def unit_value(xx):
        net.blobs["data"].data[0] = xx
        net.forward()
        return float(net.blobs[layer].data[0, unit])

    scale = unit_value(x)
    for c, i, j in [(0, 3, 4), (2, 10, 11)]:
        e = np.zeros_like(x)
        e[c, i, j] = 0.5
        numeric = (unit_value(x + e) - unit_value(x - e)) / 1.0 * scale
        assert smap[c, i, j] == pytest.approx(numeric, rel=2e-2, abs=1e-4)


def test_deepdream_step_and_guided_objective(deploy):
    # google/deepdream dream.ipynb: make_step resizes the data blob itself, runs
    # forward(end=), sets the objective as the end blob's diff and runs backward(start=end);
    # the guided objective writes through dst.diff[0].reshape(ch, -1)[:].
    net_fn, param_fn = deploy
    net = caffe.Classifier(net_fn, param_fn, mean=np.float32([104.0, 116.0, 122.0]),
                           channel_swap=(2, 1, 0))
    assert net.transformer.mean["data"].shape == (3, 1, 1)
    end = "inception_3b/output"
    src, dst = net.blobs["data"], net.blobs[end]
    src.reshape(1, 3, 12, 20)
    img = np.float32(np.random.RandomState(1).rand(12, 20, 3) * 255)
    src.data[0] = np.float32(np.rollaxis(img, 2)[::-1]) - net.transformer.mean["data"]
    x = src.data[0].copy()
    net.forward(end=end)
    assert dst.data.shape == (1, 7, 6, 10)
    dst.diff[:] = dst.data  # objective_L2
    net.backward(start=end)
    g = src.diff[0].copy()

    def half_norm(xx):
        src.data[0] = xx
        net.forward(end=end)
        return 0.5 * float((dst.data.astype(np.float64) ** 2).sum())

    for c, i, j in [(0, 2, 3), (1, 7, 15)]:
        e = np.zeros_like(x)
        e[c, i, j] = 0.5
        assert g[c, i, j] == pytest.approx(half_norm(x + e) - half_norm(x - e), rel=2e-2,
                                           abs=1e-3)
    ch = dst.data.shape[1]
    y = np.arange(dst.data[0].size, dtype=np.float32).reshape(ch, -1)
    dst.diff[0].reshape(ch, -1)[:] = y  # objective_guide
    np.testing.assert_array_equal(dst.diff[0].reshape(ch, -1), y)


def test_fgsm_backward_with_diffs_gives_the_data_gradient(tmp_path):
    # Anurag Arnab's attacks.py (Caffe FGSM, "On the Robustness of Semantic Segmentation Models
    # to Adversarial Attacks"): the label input is set to the net's own argmax, then
    # net.backward(diffs=['data']) returns the inputs' diffs (data and label, as pycaffe).
    (tmp_path / "seg.prototxt").write_text("""name: 'seg' force_backward: true
        input: 'data' input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }
        input: 'label' input_shape { dim: 1 dim: 1 dim: 6 dim: 6 }
        layer { name: 'conv' type: 'Convolution' bottom: 'data' top: 'output'
          convolution_param { num_output: 4 kernel_size: 3 pad: 1
            weight_filler { type: 'gaussian' std: 0.5 } } }
        layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'output' bottom: 'label'
          top: 'loss' }""")
    caffe.set_random_seed(0)
    net = caffe.Net(str(tmp_path / "seg.prototxt"), caffe.TEST)
    x = np.random.RandomState(0).randn(1, 3, 6, 6).astype(np.float32)
    net.blobs["data"].data[0, :, :, :] = np.squeeze(x)
    net.blobs["label"].data[...] = np.zeros(net.blobs["label"].data.shape)
    net.forward()
    net.blobs["label"].data[...] = net.blobs["output"].data[0].argmax(axis=0).astype(np.uint32)
    grads = net.backward(diffs=["data"])
    assert sorted(grads) == ["data", "label"]
    loss = float(net.forward(data=x)["loss"])
    adversarial = x + np.sign(grads["data"]) * 0.1
    assert float(net.forward(data=adversarial)["loss"]) > loss


TRAIN_NET = """name: 'tiny'
layer { name: 'data' type: 'DummyData' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 }
    data_filler { type: 'gaussian' } data_filler { type: 'constant' value: 1 } } }
layer { name: 'conv' type: 'Convolution' bottom: 'data' top: 'conv'
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: 'xavier' } } }
layer { name: 'relu' type: 'ReLU' bottom: 'conv' top: 'conv' }
layer { name: 'ip' type: 'InnerProduct' bottom: 'conv' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'xavier' } } }
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""


def test_layer_by_layer_forward_and_backward(tmp_path):
    # philkr's time_net (layer timing): net._forward(j, j) and net._backward(j, j) for every
    # layer in turn. Caffe's ForwardFromTo returns the loss of the layers it ran (0 below the
    # loss layer; the whole loss was looked up and a KeyError raised), and the layer-by-layer
    # backward gives the whole backward's diffs.
    (tmp_path / "trainval.prototxt").write_text(TRAIN_NET)
    net = caffe.Net(str(tmp_path / "trainval.prototxt"), caffe.TRAIN)
    losses = [net._forward(j, j) for j in range(len(net._layer_names))]
    assert losses[:-1] == [0.0] * (len(losses) - 1)
    assert losses[-1] == pytest.approx(float(net.blobs["loss"].data))
    for j in reversed(range(len(net._layer_names))):
        net._backward(j, j)
    layerwise = {k: [b.diff.copy() for b in v] for k, v in net.params.items()}
    for v in net.params.values():
        for b in v:
            b.diff[...] = 0
    net.forward(start="conv")  # the same batch
    net.backward()
    for k, v in net.params.items():
        for a, b in zip(layerwise[k], v):
            np.testing.assert_allclose(a, b.diff, rtol=1e-6, atol=1e-7)



def test_densenet_generator_writes_what_pycaffe_wrote():
    # liuzhuang13/DenseNetCaffe make_densenet.py (run unchanged but for Python 2's `/`, its
    # train/test_densenet.prototxt came out byte for byte as committed, written by pycaffe): a
    # BatchNorm, an in-place Scale with filler/bias_filler, ReLU, Convolution, Dropout, Concat;
    # the expected texts are those layers of the committed train_densenet.prototxt.
    from pycaffe_alt import layers as L, params as P

    data, label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64, ntop=2,
                         transform_param=dict(mean_file="mean.binaryproto"))
    conv = L.Convolution(data, kernel_size=3, stride=1, num_output=16, pad=1, bias_term=False,
                         weight_filler=dict(type="msra"), bias_filler=dict(type="constant"))
    bn = L.BatchNorm(conv, in_place=False, param=[dict(lr_mult=0, decay_mult=0)] * 3)
    scale = L.Scale(bn, bias_term=True, in_place=True, filler=dict(value=1),
                    bias_filler=dict(value=0))
    relu = L.ReLU(scale, in_place=True)
    conv2 = L.Convolution(relu, kernel_size=3, stride=1, num_output=12, pad=1, bias_term=False,
                          weight_filler=dict(type="msra"), bias_filler=dict(type="constant"))
    drop = L.Dropout(conv2, dropout_ratio=0.2)
    text = str(caffe.to_proto(L.Concat(conv, drop, axis=1), label))
    assert """  name: "Scale1"
  type: "Scale"
  bottom: "BatchNorm1"
  top: "BatchNorm1"
  scale_param {
    filler {
      value: 1
    }
    bias_term: true
    bias_filler {
      value: 0
    }
  }
}""" in text
    assert """  name: "Concat1"
  type: "Concat"
  bottom: "Convolution1"
  bottom: "Dropout1"
  top: "Concat1"
  concat_param {
    axis: 1""" in text
