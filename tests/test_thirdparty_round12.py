"""Round 12 of third-party pycaffe programs run unchanged, aimed at programs that read gradients
and weights out of nets and write them back: Grad-CAM, MTCNN's three-stage face detector, a
Caffe-to-TensorFlow converter's weight loader, magnitude pruning saved with net.save, and a
caffemodel turned back into a prototxt through caffe_pb2. Behaviours they rely on, each checked
with a small program of our own written after the real one's pattern."""
import numpy as np
import torch
import torch.nn.functional as F

import pycaffe_alt as caffe
from pycaffe_alt.proto import caffe_pb2

GRADCAM = """name: 'age'
{force}
layer {{ name: 'data' type: 'Input' top: 'data' input_param {{ shape {{ dim: 1 dim: 3 dim: 19 dim: 19 }} }} }}
layer {{ name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param {{ num_output: 4 kernel_size: 3 stride: 2 weight_filler {{ type: 'gaussian' std: 0.3 }} }} }}
layer {{ name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' }}
layer {{ name: 'pool1' type: 'Pooling' bottom: 'conv1' top: 'pool1'
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
layer {{ name: 'fc6' type: 'InnerProduct' bottom: 'pool1' top: 'fc6'
  inner_product_param {{ num_output: 6 weight_filler {{ type: 'gaussian' std: 0.3 }}
  bias_filler {{ type: 'constant' value: 1 }} }} }}
layer {{ name: 'relu6' type: 'ReLU' bottom: 'fc6' top: 'fc6' }}
layer {{ name: 'drop6' type: 'Dropout' bottom: 'fc6' top: 'fc6' }}
layer {{ name: 'my-fc8' type: 'InnerProduct' bottom: 'fc6' top: 'my-fc8'
  inner_product_param {{ num_output: 1 weight_filler {{ type: 'gaussian' std: 0.3 }} }} }}
"""


def _grad_cam(net, input_im, layer_name="conv1", final_layer="my-fc8"):
    # Hzzone/grad-CAM-pycaffe grad-cam.py visualize(), unchanged but for xrange and the
    # PIL colouring of the map: the output's own value is the top diff, the map is the
    # channel-wise mean gradient weighting the layer's activations.
    net.blobs["data"].data[...] = input_im
    output = net.forward()
    predict_age = output[final_layer][0][0]
    label = np.zeros(net.blobs[final_layer].shape)
    label[0, 0] = predict_age
    imdiff = net.backward(diffs=["data", layer_name], **{net.outputs[0]: label})
    gradients = imdiff[layer_name]
    mean_grads = np.mean(np.squeeze(gradients), axis=(1, 2))
    activations = np.squeeze(net.blobs[layer_name].data)
    vis = np.zeros(activations.shape[1:], dtype=np.float32)
    for i in range(activations.shape[0]):
        vis += activations[i, :, :] * mean_grads[i]
    return imdiff, np.maximum(vis, 0)


def test_grad_cam_gradients_of_an_in_place_conv_and_force_backward(tmp_path):
    # A deploy net has no loss layer, so Caffe's Net::Init marks no layer as needing backward
    # (none contributes to a loss) and backward() leaves every diff at zero: Grad-CAM scripts
    # need force_backward: true. With it, conv1's diff under the in-place relu1 is what ReLU's
    # backward wrote into the shared buffer, the gradient of the pre-ReLU convolution output.
    rs = np.random.RandomState(0)
    input_im = (rs.rand(3, 19, 19) * 2 - 1).astype(np.float32)
    for force in ("", "force_backward: true"):
        (tmp_path / "deploy.prototxt").write_text(GRADCAM.format(force=force))
        caffe.set_random_seed(4)
        caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST).save(str(tmp_path / "w.caffemodel"))
        net = caffe.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "w.caffemodel"),
                        caffe.TEST)
        imdiff, vis = _grad_cam(net, input_im)
        # pycaffe's _Net_backward returns the diffs of net.inputs and of `diffs`, not the outputs
        assert sorted(imdiff) == ["conv1", "data"]
        if not force:
            assert not imdiff["conv1"].any() and not imdiff["data"].any()
            continue
        w1, b1, w6, b6, w8, b8 = (torch.tensor(net.params[name][i].data, dtype=torch.float64)
                                  for name in ("conv1", "fc6", "my-fc8") for i in (0, 1))
        x = torch.tensor(input_im[None], dtype=torch.float64, requires_grad=True)
        z = F.conv2d(x, w1, b1, stride=2)
        z.retain_grad()
        pooled = F.max_pool2d(torch.relu(z), 3, 2, ceil_mode=True)
        out = torch.relu(pooled.flatten(1) @ w6.T + b6) @ w8.T + b8
        (out * out.detach()).sum().backward()
        assert z.grad.abs().max() > 0
        np.testing.assert_allclose(imdiff["conv1"][0], z.grad[0].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(imdiff["data"][0], x.grad[0].numpy(), rtol=1e-4, atol=1e-6)
        assert vis.shape == (9, 9) and vis.max() > 0


PNET = """name: 'PNet'
input: 'data' input_dim: 1 input_dim: 3 input_dim: 12 input_dim: 12
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: 'xavier' } } }
layer { name: 'PReLU1' type: 'PReLU' bottom: 'conv1' top: 'conv1' }
layer { name: 'pool1' type: 'Pooling' bottom: 'conv1' top: 'pool1'
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: 'conv2' type: 'Convolution' bottom: 'pool1' top: 'conv2'
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: 'xavier' } } }
layer { name: 'PReLU2' type: 'PReLU' bottom: 'conv2' top: 'conv2' }
layer { name: 'conv4-1' type: 'Convolution' bottom: 'conv2' top: 'conv4-1'
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: 'xavier' } } }
layer { name: 'conv4-2' type: 'Convolution' bottom: 'conv2' top: 'conv4-2'
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: 'xavier' } } }
layer { name: 'prob1' type: 'Softmax' bottom: 'conv4-1' top: 'prob1' }
"""


def test_mtcnn_scale_pyramid_reshapes_the_data_blob_between_forwards(tmp_path):
    # DuinoDu/mtcnn demo.py detect_face (run unchanged but np.float, on its own det1-det3
    # weights and test images, found both faces of test1.jpg): the P-Net's data blob is
    # reshaped to (1, 3, ws, hs) for each scale of the pyramid, an image swapped to the
    # MATLAB layout, and forward() reshapes the fully convolutional net; prob1 is a softmax
    # over the two channels at every position of the map, conv4-2 the box regression there.
    # R-Net and O-Net take a batch of numbox crops the same way, a different count each image.
    import cv2

    (tmp_path / "det1.prototxt").write_text(PNET)
    caffe.set_random_seed(6)
    caffe.Net(str(tmp_path / "det1.prototxt"), caffe.TEST).save(str(tmp_path / "det1.caffemodel"))
    PNet = caffe.Net(str(tmp_path / "det1.prototxt"), str(tmp_path / "det1.caffemodel"),
                     caffe.TEST)
    img = np.random.RandomState(1).randint(0, 256, (40, 30, 3)).astype(float)
    h, w = img.shape[:2]

    def side(n: int) -> int:  # conv 3, pool 2 stride 2 (Caffe rounds up), conv 3
        return -(-(n - 2) // 2) - 2

    for scale in (0.6, 0.709 * 0.6, 0.5):
        hs, ws = int(np.ceil(h * scale)), int(np.ceil(w * scale))
        im_data = (cv2.resize(img, (ws, hs)) - 127.5) * 0.0078125
        im_data = np.array([np.swapaxes(im_data, 0, 2)], dtype=np.float64)
        PNet.blobs["data"].reshape(1, 3, ws, hs)
        PNet.blobs["data"].data[...] = im_data
        out = PNet.forward()
        assert out["prob1"].shape == (1, 2, side(ws), side(hs))
        assert out["conv4-2"].shape == (1, 4, side(ws), side(hs))
        np.testing.assert_allclose(out["prob1"].sum(axis=1), 1, rtol=1e-5)
        np.testing.assert_allclose(PNet.blobs["data"].data, im_data, rtol=1e-6)
        # the map is read per position: a threshold picks the cells, as generateBoundingBox
        x, y = np.where(out["prob1"][0, 1, :, :].T >= 0.5)
        assert len(x) == len(y)
    for numbox in (5, 2):
        PNet.blobs["data"].reshape(numbox, 3, 12, 12)
        PNet.blobs["data"].data[...] = np.random.rand(numbox, 3, 12, 12)
        assert PNet.forward()["prob1"].shape == (numbox, 2, side(12), side(12))


CONVERT = """name: 'tiny'
input: 'data' input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: 'gaussian' std: 0.3 }
  bias_filler { type: 'constant' value: 0.1 } } }
layer { name: 'bn1' type: 'BatchNorm' bottom: 'conv1' top: 'conv1' }
layer { name: 'scale1' type: 'Scale' bottom: 'conv1' top: 'conv1' scale_param { bias_term: true } }
layer { name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' }
layer { name: 'pool1' type: 'Pooling' bottom: 'conv1' top: 'pool1'
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: 'fc1' type: 'InnerProduct' bottom: 'pool1' top: 'fc1'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'prob' type: 'Softmax' bottom: 'fc1' top: 'prob' }
"""


def test_converter_loads_weights_through_pycaffe_and_through_the_protobuf(tmp_path):
    # ethereon/caffe-tensorflow kaffe (convert.py run on a tiny model, with Python-2-only map/
    # basestring/format uses adjusted and tensorflow stubbed, produced the same weights both
    # ways): kaffe.graph reads the prototxt into caffe.proto.caffe_pb2.NetParameter with
    # text_format, DataInjector takes [(name, [blob.data ...])] from net.params.items() in layer
    # order, or without pycaffe parses the caffemodel with MergeFromString and keeps the layers
    # that have blobs, padding each blob's shape.dim to four axes.
    from google.protobuf import text_format

    (tmp_path / "tiny.prototxt").write_text(CONVERT)
    caffe.set_random_seed(1)
    net = caffe.Net(str(tmp_path / "tiny.prototxt"), caffe.TEST)
    net.params["bn1"][0].data[...] = np.arange(4)
    net.params["bn1"][1].data[...] = 2
    net.params["bn1"][2].data[...] = 1
    net.save(str(tmp_path / "tiny.caffemodel"))

    params = caffe.proto.caffe_pb2.NetParameter()
    with open(str(tmp_path / "tiny.prototxt"), "rb") as def_file:
        text_format.Merge(def_file.read(), params)
    assert [layer.type for layer in params.layer][:3] == ["Convolution", "BatchNorm", "Scale"]
    assert list(map(int, params.input_shape[0].dim)) == [1, 3, 8, 8]

    net = caffe.Net(str(tmp_path / "tiny.prototxt"), str(tmp_path / "tiny.caffemodel"), caffe.TEST)
    by_caffe = [(k, [blob.data for blob in v]) for k, v in net.params.items()]
    assert [k for k, _ in by_caffe] == ["conv1", "bn1", "scale1", "fc1"]
    assert [[a.shape for a in v] for _, v in by_caffe] == [
        [(4, 3, 3, 3), (4,)], [(4,), (4,), (1,)], [(4,), (4,)], [(5, 64), (5,)]]

    data = caffe_pb2.NetParameter()
    data.MergeFromString(open(str(tmp_path / "tiny.caffemodel"), "rb").read())
    layers = data.layers or data.layer
    by_pb = []
    for layer in layers:
        if not layer.blobs:
            continue
        arrays = []
        for blob in layer.blobs:
            dims = list(blob.shape.dim)
            assert dims, "Caffe's ToProto writes shape, not num/channels/height/width"
            arrays.append(np.array(blob.data, dtype=np.float32).reshape([1] * (4 - len(dims)) + dims))
        by_pb.append((layer.name, arrays))
    assert [k for k, _ in by_pb] == [k for k, _ in by_caffe]
    for (_, a), (_, b) in zip(by_pb, by_caffe):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.reshape(y.shape), y)
    np.testing.assert_array_equal(by_caffe[1][1][0], [0, 1, 2, 3])


def test_magnitude_pruning_in_place_then_net_save(tmp_path):
    # ChanganVR/ConstraintAwareCompression pruning/prune.py, run unchanged on a tiny model:
    # weights = net.params[layer][0].data is the blob itself, so the boolean-mask assignment
    # prunes the net, and net.save writes the pruned weights the next Net reads.
    (tmp_path / "net.prototxt").write_text(GRADCAM.format(force=""))
    caffe.set_random_seed(2)
    caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST).save(str(tmp_path / "orig.caffemodel"))
    pruning_dict = {"conv1": 0.5, "fc6": 0.75}
    net = caffe.Net(str(tmp_path / "net.prototxt"), str(tmp_path / "orig.caffemodel"), caffe.TEST)
    for layer in pruning_dict:
        weights = net.params[layer][0].data
        threshold = np.percentile(np.abs(weights), pruning_dict[layer] * 100)
        weights[np.abs(weights) < threshold] = 0
    net.save(str(tmp_path / "pruned.caffemodel"))

    orig = caffe.Net(str(tmp_path / "net.prototxt"), str(tmp_path / "orig.caffemodel"), caffe.TEST)
    pruned = caffe.Net(str(tmp_path / "net.prototxt"), str(tmp_path / "pruned.caffemodel"),
                       caffe.TEST)
    for layer, fraction in pruning_dict.items():
        w = orig.params[layer][0].data
        expected = np.where(np.abs(w) < np.percentile(np.abs(w), fraction * 100), 0, w)
        np.testing.assert_array_equal(pruned.params[layer][0].data, expected)
        assert (pruned.params[layer][0].data == 0).mean() == fraction
        np.testing.assert_array_equal(pruned.params[layer][1].data, orig.params[layer][1].data)


def test_caffemodel_without_blobs_is_a_prototxt(tmp_path):
    # afcarl/HelloUtils caffe/caffemodel_to_prototxt.py: ParseFromString of a caffemodel,
    # ClearField('blobs') on every layer, str() written out as a deploy prototxt. Caffe's
    # Net::ToProto writes each layer's parameters with phase: TEST, so the text loads as the
    # same net and, with the caffemodel's weights, gives the same outputs.
    (tmp_path / "net.prototxt").write_text(GRADCAM.format(force=""))
    caffe.set_random_seed(3)
    caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST).save(str(tmp_path / "m.caffemodel"))
    with open(str(tmp_path / "m.caffemodel"), "rb") as f:
        caffemodel = caffe_pb2.NetParameter()
        caffemodel.ParseFromString(f.read())
    for item in caffemodel.layers:
        item.ClearField("blobs")
    for item in caffemodel.layer:
        item.ClearField("blobs")
    with open(str(tmp_path / "deploy_test.prototxt"), "w") as f:
        f.write(str(caffemodel))
    text = (tmp_path / "deploy_test.prototxt").read_text()
    assert "blobs" not in text and text.count("phase: TEST") == len(caffemodel.layer)

    a = caffe.Net(str(tmp_path / "net.prototxt"), str(tmp_path / "m.caffemodel"), caffe.TEST)
    b = caffe.Net(str(tmp_path / "deploy_test.prototxt"), str(tmp_path / "m.caffemodel"),
                  caffe.TEST)
    assert list(a._layer_names) == list(b._layer_names)
    x = np.random.RandomState(2).rand(1, 3, 19, 19)
    np.testing.assert_array_equal(a.forward(data=x)["my-fc8"], b.forward(data=x)["my-fc8"])
