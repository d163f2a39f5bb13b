"""Round 16 of third-party pycaffe programs run unchanged, aimed at face-detection cascades,
prototxt surgery, classifiers and mean-file converters: the many binaryproto-to-npy mean
converters (RodriguezAndres/Pascal-VOC-2012, convert_binaryproto2npy.py:
np.array(caffe.io.blobproto_to_array(blob))[0] saved with np.save), whose result pycaffe gives as
float64, as BVLC's own python/caffe/imagenet/ilsvrc_2012_mean.npy made that way is. Also run
this round without a divergence found: JFDA's four-stage face detector with its real prototxts,
caffemodels and images (luoyetx/Joint-Face-Detection-and-Alignment, jfda/detector.py: the
data blob reshaped per pyramid scale and per batch of crops, caffe.Net(proto, caffe.TEST,
weights=...); boxes as in the repository's own img/test3_stage4.jpg), latent replay's prototxt
surgery and training loop (lrzpellegrini/Latent-Replay, Project Source/rehe_lat_surgery.py and
inc_training_Core50.py: Input layers per phase, an extra Input concatenated on axis 0 before the
stop layer, copy_from, share_weights, clear_param_diffs, backward(end=stop layer),
apply_update), and an MNIST caffe.Classifier over load_image(color=False)
(jklhj222/caffe_LeNet, test/caffe_test.py). Behaviours they rely on, each checked with a small
program of our own written after the real one's pattern."""
import numpy as np

import pycaffe_alt as caffe
from pycaffe_alt.proto import caffe_pb2


def test_mean_binaryproto_converts_to_a_float64_array(tmp_path):
    # convert_binaryproto2npy.py's pattern on a compute_image_mean-style blob (legacy
    # num/channels/height/width): pycaffe's np.array(blob.data) holds Python floats, so the mean
    # is float64 whatever protobuf's own container offers numpy.
    mean = (np.arange(3 * 4 * 5, dtype=np.float32) / 7).reshape(1, 3, 4, 5)
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=4, width=5)
    blob.data.extend(mean.ravel().tolist())
    blob.diff.extend((-mean).ravel().tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())

    parsed = caffe.proto.caffe_pb2.BlobProto()
    parsed.ParseFromString((tmp_path / "mean.binaryproto").read_bytes())
    arr = np.array(caffe.io.blobproto_to_array(parsed))
    np.save(str(tmp_path / "mean.npy"), arr[0])
    out = np.load(str(tmp_path / "mean.npy"))
    assert out.dtype == np.float64 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, mean[0].astype(np.float64))
    # the per-channel means programs take from it are the float64 ones
    np.testing.assert_array_equal(out.mean(1).mean(1),
                                  mean[0].astype(np.float64).mean(1).mean(1))
    assert caffe.io.blobproto_to_array(parsed, return_diff=True).dtype == np.float64
    vec = caffe.io.arraylist_to_blobprotovector_str([mean[0]])
    assert caffe.io.blobprotovector_str_to_arraylist(vec)[0].dtype == np.float64


def _input(name: str, phase: str, dims) -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" include {{ phase: {phase} }} '
            f'input_param {{ shape {{ {shape} }} }} }}\n')


LATENT_NET = ('name: "latent"\n' + _input("data", "TRAIN", [12, 2, 5, 5])
              + _input("label", "TRAIN", [12]) + _input("data", "TEST", [3, 2, 5, 5])
              + _input("label", "TEST", [3]) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false
                      weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "conv1/bn" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool6" type: "Pooling" bottom: "conv1" top: "pool6"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "mid_fc7" type: "Convolution" bottom: "pool6" top: "mid_fc7"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "mid_fc7" bottom: "label" top: "accuracy" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "mid_fc7" bottom: "label" top: "loss"
  include { phase: TRAIN } }
""")


def _insert_layer(layers, index: int, layer) -> None:
    # rehe_lat_surgery's way of inserting into a repeated message field: grow by one, shift
    # the tail up with CopyFrom, then overwrite the free slot.
    layers.add()
    for i in range(len(layers) - 1, index, -1):
        layers[i].CopyFrom(layers[i - 1])
    layers[index].CopyFrom(layer)


def _find(net_param, name: str, phase=None):
    for i, layer in enumerate(net_param.layer):
        if layer.name == name and (phase is None or layer.include[0].phase == phase):
            return layer, i
    raise AssertionError(name)


def test_latent_replay_surgery_and_explicit_update_loop(tmp_path, monkeypatch):
    """Latent-Replay's pattern: train end to end, keep the pooled features, rewrite the
    prototxt through caffe_pb2 so that replayed features join the new ones on axis 0 just
    before the classifier, then train only the classifier with backward(end=classifier)."""
    from google.protobuf import text_format
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(LATENT_NET)
    solver_text = ('net: "{}" test_iter: 1 test_interval: 100000 test_initialization: false '
                   'base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" '
                   'max_iter: 100 snapshot_prefix: "snap" random_seed: 3')
    (tmp_path / "first.prototxt").write_text(solver_text.format("net.prototxt"))
    rng = np.random.RandomState(0)
    x = rng.rand(12, 2, 5, 5).astype(np.float32)
    y = rng.randint(0, 3, 12).astype(np.float32)

    solver = caffe.get_solver("first.prototxt")
    solver.share_weights(solver.test_nets[0])
    for _ in range(3):
        solver.net.blobs["data"].data[...] = x
        solver.net.blobs["label"].data[...] = y
        solver.net.clear_param_diffs()
        solver.net.forward()
        solver.net.backward()
        solver.apply_update()
    assert solver.iter == 3 and solver.net.blobs["accuracy"].num == 1
    latent = solver.net.blobs["pool6"].data.copy()
    solver.net.save("tmp.caffemodel")

    net_param = caffe_pb2.NetParameter()
    text_format.Merge((tmp_path / "net.prototxt").read_text(), net_param)
    data, at = _find(net_param, "data", caffe_pb2.TRAIN)
    data.input_param.shape[0].dim[0] = 4
    reha = caffe_pb2.LayerParameter()
    text_format.Merge('name: "data_reha" type: "Input" top: "data_reha" include { phase: TRAIN } '
                      'input_param { shape { dim: 8 dim: 4 dim: 1 dim: 1 } }', reha)
    _insert_layer(net_param.layer, at + 1, reha)
    concat = caffe_pb2.LayerParameter()
    text_format.Merge('name: "concat" type: "Concat" bottom: "pool6" bottom: "data_reha" '
                      'top: "concat" include { phase: TRAIN } concat_param { axis: 0 }', concat)
    _, stop_at = _find(net_param, "mid_fc7")
    _insert_layer(net_param.layer, stop_at, concat)
    stop, stop_at = _find(net_param, "mid_fc7")
    test_stop = caffe_pb2.LayerParameter()
    test_stop.CopyFrom(stop)
    stop.include.add().phase = caffe_pb2.TRAIN
    stop.bottom[0] = "concat"
    test_stop.include.add().phase = caffe_pb2.TEST
    _insert_layer(net_param.layer, stop_at + 1, test_stop)
    (tmp_path / "next.prototxt").write_text(str(net_param))
    (tmp_path / "next_solver.prototxt").write_text(solver_text.format("next.prototxt"))

    solver = caffe.get_solver("next_solver.prototxt")
    solver.net.copy_from("tmp.caffemodel")
    solver.share_weights(solver.test_nets[0])
    net = solver.net
    assert net.blobs["concat"].data.shape == (12, 4, 1, 1)
    assert "concat" not in solver.test_nets[0].blobs
    conv_before = net.params["conv1"][0].data.copy()
    fc_before = net.params["mid_fc7"][0].data.copy()
    net.blobs["data"].data[...] = x[:4]
    net.blobs["data_reha"].data[...] = latent[4:]
    net.blobs["label"].data[...] = y
    net.clear_param_diffs()
    net.forward()
    np.testing.assert_array_equal(net.blobs["concat"].data[4:], latent[4:])
    net.backward(end="mid_fc7")
    # The stop layer ran its backward (down to its bottom's diff); nothing below it did.
    assert net.params["mid_fc7"][0].diff.any() and net.blobs["concat"].diff.any()
    assert not net.blobs["pool6"].diff.any() and not net.params["conv1"][0].diff.any()
    grad = net.params["mid_fc7"][0].diff.copy()
    solver.apply_update()
    assert solver.iter == 1
    # Caffe's Regularize still decays the untouched conv weights (first step: no history).
    np.testing.assert_allclose(net.params["conv1"][0].data, conv_before * (1 - 0.1 * 0.01),
                               rtol=1e-6)
    np.testing.assert_allclose(net.params["mid_fc7"][0].data,
                               fc_before - 0.1 * (grad + 0.01 * fc_before), rtol=1e-5, atol=1e-7)
    test_net = solver.test_nets[0]
    np.testing.assert_array_equal(test_net.params["mid_fc7"][0].data,
                                  net.params["mid_fc7"][0].data)
    test_net.blobs["data"].data[...] = x[:3]
    test_net.blobs["label"].data[...] = y[:3]
    test_net.forward()
    assert test_net.blobs["mid_fc7"].data.shape == (3, 3, 1, 1)
