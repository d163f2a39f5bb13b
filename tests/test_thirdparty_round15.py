"""Round 15 of third-party pycaffe programs run unchanged, aimed at programs that optimise or
read inside nets, at video classification and at weight files: Temporal Segment Networks' frame
classifier (yjxiong/temporal-segment-networks, pyActionRecog/action_caffe.py with utils/io.py:
oversampled crops of each frame, the data blob reshaped to the crop count,
forward(blobs=[...], data=...)), whose BN-Inception caffemodels come from yjxiong/caffe
(action_recog), a fork whose "BN" layer stores its four blobs (1, C); and caffe2pytorch's
CaffeData (wwwanghao/caffe2pytorch, caffenet.py), which builds a data-layer net with a zero-byte
weights file. Also run this round without a divergence found: Gatys style transfer by L-BFGS
over input gradients chained with backward(start=layer, end=next_layer) (fzliu/style-transfer,
style.py, against torch autograd), class activation maps from the last conv blob and the fc
weights (sourav-sahaji/CAM-Python, py_demo.py), Arm's 8-bit quantizer driving an LMDB TEST net
layer by layer with forward(start=, end=) and HDF5 weights (ARM-software/ML-examples,
cmsisnn-cifar10/nn_quantizer.py), forward_all of an unbatched (C, H, W) image for HDF5 features,
which pycaffe slices into C one-channel batches, and a caffe.Net subclass batching fc features
with forward_all. Behaviours they rely on, each checked with a small program of our own written
after the real one's pattern."""
import numpy as np
import torch
import torch.nn.functional as F

import pycaffe_alt as caffe
from pycaffe_alt.proto import caffe_pb2

TSN = """name: 'BN-Inception-mini'
input: 'data'
input_dim: 1
input_dim: 3
input_dim: 16
input_dim: 16
layer { name: 'conv1/7x7_s2' type: 'Convolution' bottom: 'data' top: 'conv1/7x7_s2'
  convolution_param { num_output: 4 pad: 3 kernel_size: 7 stride: 2 } }
layer { name: 'conv1/7x7_s2_bn' type: 'BN' bottom: 'conv1/7x7_s2' top: 'conv1/7x7_s2_bn'
  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
  bn_param { frozen: true slope_filler { type: 'constant' value: 1 }
             bias_filler { type: 'constant' value: 0 } } }
layer { name: 'conv1/relu_7x7' type: 'ReLU' bottom: 'conv1/7x7_s2_bn' top: 'conv1/7x7_s2_bn' }
layer { name: 'global_pool' type: 'Pooling' bottom: 'conv1/7x7_s2_bn' top: 'global_pool'
  pooling_param { pool: AVE kernel_size: 8 stride: 1 } }
layer { name: 'dropout' type: 'Dropout' bottom: 'global_pool' top: 'global_pool'
  dropout_param { dropout_ratio: 0.8 } }
layer { name: 'fc-action' type: 'InnerProduct' bottom: 'global_pool' top: 'fc-action'
  inner_product_param { num_output: 3 } }
"""


def _action_caffemodel(path, rng, channels=4):
    # What yjxiong/caffe's Net::ToProto writes: BNLayer::LayerSetUp shapes its slope, bias,
    # running mean and running variance (1, C), not (1, C, 1, 1) as PSPNet's copy of the layer.
    arrays = {"conv1/7x7_s2": [rng.randn(channels, 3, 7, 7) * 0.1, rng.randn(channels) * 0.1],
              "conv1/7x7_s2_bn": [1 + 0.1 * rng.randn(1, channels), 0.1 * rng.randn(1, channels),
                                  0.1 * rng.randn(1, channels), 0.5 + rng.rand(1, channels)],
              "fc-action": [rng.randn(3, channels), rng.randn(3) * 0.1]}
    net = caffe_pb2.NetParameter(name="BN-Inception-mini")
    for name, blobs in arrays.items():
        layer = net.layer.add(name=name, type="BN" if name.endswith("_bn") else "X")
        for a in blobs:
            b = layer.blobs.add()
            b.shape.dim.extend(a.shape)
            b.data.extend(a.astype(np.float32).ravel())
    path.write_bytes(net.SerializeToString())
    return {k: [a.astype(np.float32) for a in v] for k, v in arrays.items()}


def _frame_scores(net, transformer, frame, crop):
    # action_caffe.py predict_single_frame: ten crops, preprocessed one by one, the data blob
    # reshaped to the batch, then forward with the batch as a keyword and the score blob asked.
    os_frame = caffe.io.oversample([frame], crop)
    data = np.array([transformer.preprocess("data", x) for x in os_frame])
    net.blobs["data"].reshape(*data.shape)
    net.reshape()
    out = net.forward(blobs=["fc-action"], data=data)
    return out["fc-action"].copy(), data


def test_tsn_frames_through_a_bn_inception_caffemodel_of_the_action_fork(tmp_path):
    proto = tmp_path / "tsn_bn_inception_rgb_deploy.prototxt"
    proto.write_text(TSN)
    weights = tmp_path / "ucf101_split_1_tsn_rgb.caffemodel"
    stored = _action_caffemodel(weights, np.random.RandomState(0))
    # Caffe of the fork: the blobs keep the file's (1, C) shape, as its own BN made them.
    net = caffe.Net(str(proto), str(weights), caffe.TEST)
    assert [b.data.shape for b in net.params["conv1/7x7_s2_bn"]] == [(1, 4)] * 4
    for got, want in zip(net.params["conv1/7x7_s2_bn"], stored["conv1/7x7_s2_bn"]):
        np.testing.assert_array_equal(got.data, want)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", np.array([104, 117, 123]))
    frame = (np.random.RandomState(1).rand(20, 24, 3) * 255).astype(np.uint8)
    scores, data = _frame_scores(net, transformer, frame, (16, 16))
    assert scores.shape == (10, 3) and net.blobs["data"].data.shape == (10, 3, 16, 16)
    # The fork's frozen BN: (x - mean) / sqrt(var + eps) * slope + bias, per channel.
    w, b = (torch.tensor(a, dtype=torch.float64) for a in stored["conv1/7x7_s2"])
    slope, bias, mean, var = (torch.tensor(a, dtype=torch.float64).reshape(1, -1, 1, 1)
                              for a in stored["conv1/7x7_s2_bn"])
    h = F.conv2d(torch.tensor(data, dtype=torch.float64), w, b, stride=2, padding=3)
    h = torch.relu((h - mean) / torch.sqrt(var + 1e-5) * slope + bias).mean((2, 3))
    fw, fb = (torch.tensor(a, dtype=torch.float64) for a in stored["fc-action"])
    np.testing.assert_allclose(scores, F.linear(h, fw, fb).numpy(), rtol=1e-4, atol=1e-3)
    # Saved and loaded again, by path and by copy_from, the layout stays the fork's.
    again = tmp_path / "again.caffemodel"
    net.save(str(again))
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(again.read_bytes())
    bn = [l for l in saved.layer if l.name == "conv1/7x7_s2_bn"][0]
    assert [tuple(bl.shape.dim) for bl in bn.blobs] == [(1, 4)] * 4
    fresh = caffe.Net(str(proto), caffe.TEST)
    fresh.copy_from(str(again))
    np.testing.assert_array_equal(fresh.params["conv1/7x7_s2_bn"][3].data,
                                  stored["conv1/7x7_s2_bn"][3])
    assert np.allclose(_frame_scores(fresh, transformer, frame, (16, 16))[0], scores)


TSN_TRAIN = """name: 'BN-Inception-mini'
layer { name: 'data' type: 'Input' top: 'data' top: 'label'
  input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } shape { dim: 2 } } }
layer { name: 'conv1/7x7_s2' type: 'Convolution' bottom: 'data' top: 'conv1/7x7_s2'
  convolution_param { num_output: 4 pad: 3 kernel_size: 7 stride: 2 } }
layer { name: 'conv1/7x7_s2_bn' type: 'BN' bottom: 'conv1/7x7_s2' top: 'conv1/7x7_s2_bn'
  bn_param { slope_filler { type: 'constant' value: 1 } bias_filler { type: 'constant' value: 0 } } }
layer { name: 'global_pool' type: 'Pooling' bottom: 'conv1/7x7_s2_bn' top: 'global_pool'
  pooling_param { pool: AVE kernel_size: 8 stride: 1 } }
layer { name: 'fc-action' type: 'InnerProduct' bottom: 'global_pool' top: 'fc-action'
  inner_product_param { num_output: 3 } }
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'fc-action' bottom: 'label' top: 'loss' }
"""


def test_fine_tuning_from_an_action_fork_caffemodel_after_the_solver_is_built(tmp_path):
    # TSN fine-tunes from the fork's BN-Inception init model; from pycaffe that is
    # solver.net.copy_from() after the solver (and its momentum history) exists. The learnt BN
    # slope and bias then step with histories of the file's (1, C) shape, exactly as the same
    # weights stored (1, C, 1, 1) do.
    (tmp_path / "train.prototxt").write_text(TSN_TRAIN)
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(f"net: '{tmp_path / 'train.prototxt'}'\nbase_lr: 0.1\nmomentum: 0.9\n"
                           "lr_policy: 'fixed'\nmax_iter: 10\ndisplay: 0\ntest_iter: 1\n"
                           "test_interval: 2\ntest_initialization: false\n")
    action = tmp_path / "bn_inception_rgb_init.caffemodel"
    _action_caffemodel(action, np.random.RandomState(0))
    padded = caffe_pb2.NetParameter()
    padded.ParseFromString(action.read_bytes())
    for layer in padded.layer:
        for blob in layer.blobs if layer.type == "BN" else []:
            blob.shape.dim.extend([1, 1])
    psp = tmp_path / "pspnet_layout.caffemodel"
    psp.write_bytes(padded.SerializeToString())
    learnt = []
    for weights in (action, psp):
        solver = caffe.SGDSolver(str(solver_path))
        solver.net.copy_from(str(weights))
        for i in range(3):
            solver.net.blobs["data"].data[...] = np.random.RandomState(i).rand(2, 3, 16, 16) * 10
            solver.net.blobs["label"].data[...] = [0, 2]
            solver.step(1)
        learnt.append([b.data.copy() for name in ("conv1/7x7_s2", "conv1/7x7_s2_bn", "fc-action")
                       for b in solver.net.params[name]])
        # The test at iteration 2 shared the train net's blobs into the test net, which was
        # built (1, C, 1, 1) and never loaded the file; a program shares again by hand.
        test_net = solver.test_nets[0]
        test_net.share_with(solver.net)
        assert test_net.params["conv1/7x7_s2_bn"][0].data.shape == learnt[-1][2].shape
        assert np.isfinite(test_net.forward()["loss"])
    assert [a.shape for a in learnt[0][2:6]] == [(1, 4)] * 4
    assert [a.shape for a in learnt[1][2:6]] == [(1, 4, 1, 1)] * 4
    assert not np.allclose(learnt[0][2], 1 + 0.1 * np.random.RandomState(0).randn(1, 4))
    for a, b in zip(*learnt):
        np.testing.assert_array_equal(a.ravel(), b.ravel())


def test_a_zero_byte_weights_file_is_an_empty_net_as_in_caffe(tmp_path, caplog):
    # wwwanghao/caffe2pytorch caffenet.py CaffeData: a Caffe data layer alone is written to a
    # prototxt, an empty weights file beside it (open(weightfile, 'w').close()), and
    # caffe.Net(protofile, weightfile, caffe.TRAIN) feeds the PyTorch model's batches. Caffe
    # parses zero bytes as an empty NetParameter and copies nothing.
    import lmdb

    db = str(tmp_path / "train_lmdb")
    env = lmdb.open(db, map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(4):
            img = np.full((3, 5, 5), 10 * i, np.uint8)
            txn.put(b"%08d" % i, caffe.io.array_to_datum(img, i).SerializeToString())
    env.close()
    proto = tmp_path / ".temp_data0.5.prototxt"
    proto.write_text(f"""name: 'temp network'
layer {{ name: 'data' type: 'Data' top: 'data' top: 'label'
  data_param {{ source: '{db}' batch_size: 2 backend: LMDB }} }}
""")
    weightfile = tmp_path / ".temp_data0.5.caffemodel"
    open(str(weightfile), "w").close()
    net = caffe.Net(str(proto), str(weightfile), caffe.TRAIN)
    net.forward()
    assert net.blobs["data"].data.shape == (2, 3, 5, 5)
    np.testing.assert_array_equal(net.blobs["label"].data, [0, 1])
    np.testing.assert_array_equal(net.blobs["data"].data[1], np.full((3, 5, 5), 10.0))
    # A net with weights to fill keeps its initial ones, and says so.
    mini = tmp_path / "mini.prototxt"
    mini.write_text("""name: 'mini'
layer { name: 'data' type: 'Input' top: 'data' input_param { shape { dim: 1 dim: 2 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 3 bias_filler { type: 'constant' value: 0.5 } } }
""")
    caplog.clear()
    with caplog.at_level("WARNING", logger="pycaffe_alt"):
        filled = caffe.Net(str(mini), str(weightfile), caffe.TEST)
    np.testing.assert_array_equal(filled.params["ip"][1].data, [0.5] * 3)
    assert any("nothing was copied" in r.getMessage() and str(weightfile) in r.getMessage()
               for r in caplog.records)


def test_forward_all_of_an_unbatched_image_runs_one_batch_per_channel(tmp_path):
    # Boretto & Salehi's CaffeFeaturesExtraction.py Caffe_extract_feature: after
    # net.blobs['data'].reshape(1, 3, H, W), forward_all(**{net.inputs[0]: img_chw,
    # 'blobs': [layer]}) with a preprocessed (3, H, W) image. pycaffe's _batch slices the
    # first axis: three batches of one (H, W) channel, each broadcast over the data blob's
    # channels, so out[layer][0] is the features of channel 0 repeated (the features saved
    # to HDF5 are those).
    proto = tmp_path / "deploy.prototxt"
    proto.write_text("""name: 'mini'
input: 'data'
input_shape { dim: 10 dim: 3 dim: 8 dim: 8 }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
layer { name: 'fc' type: 'InnerProduct' bottom: 'conv1' top: 'fc'
  inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
""")
    caffe.set_random_seed(5)
    net = caffe.Net(str(proto), caffe.TEST)
    net.blobs["data"].reshape(1, 3, 8, 8)
    img = np.random.RandomState(4).rand(3, 8, 8).astype(np.float32)
    out = net.forward_all(**{net.inputs[0]: img, "blobs": ["conv1"]})
    assert out["conv1"].shape == (3, 2, 6, 6) and out["fc"].shape == (3, 3)
    w, b = (torch.tensor(p.data, dtype=torch.float64) for p in net.params["conv1"])
    for c in range(3):
        x = torch.tensor(np.repeat(img[c][None, None], 3, axis=1), dtype=torch.float64)
        np.testing.assert_allclose(out["conv1"][c], F.conv2d(x, w, b)[0].numpy(),
                                   rtol=1e-5, atol=1e-5)
