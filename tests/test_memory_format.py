"""Channels-last by default for 4-D conv nets: the rule, the layout, and pycaffe's NCHW views."""
import os

import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt import memory_format as mf
from pycaffe_alt.errors import NetError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.prototxt import parse_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = os.path.join(ROOT, "tests", "fixtures", "golden", "nets", "lenet_loss")
ALLCNN = os.path.join(ROOT, "tests", "fixtures", "golden", "nets", "allcnn_c_deploy")

MLP = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
"""


def lenet(**kw):
    return caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                     caffe.TRAIN, **kw)


def is_channels_last(t):
    return t.stride() == torch.empty(t.shape, memory_format=torch.channels_last).stride()


def test_rule_picks_channels_last_for_conv_nets_on_cpu_only():
    cpu = torch.device("cpu")
    conv = [("Input", []), ("Convolution", [(2, 3, 8, 8)])]
    assert mf.choose("auto", cpu, conv) is torch.channels_last
    assert mf.choose("auto", cpu, [("InnerProduct", [(2, 3)])]) is torch.contiguous_format
    assert mf.choose("auto", cpu, [("Convolution", [(2, 3, 8)])]) is torch.contiguous_format
    assert mf.choose("contiguous", cpu, conv) is torch.contiguous_format
    assert mf.choose(torch.channels_last, cpu, []) is torch.channels_last
    with pytest.raises(NetError, match="memory_format"):
        mf.choose("nhwc", cpu, conv)


def test_conv_net_weights_and_activations_are_channels_last_views_stay_nchw():
    net = lenet()
    assert net.memory_format is torch.channels_last
    # LeNet's first weight has one input channel: the exact channels-last strides still matter.
    assert is_channels_last(net.params["conv1"][0].param)
    x = np.random.default_rng(0).standard_normal(net.blobs["data"].shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    outputs = net(data=torch.from_numpy(x), label=torch.zeros(net.blobs["label"].shape),
                  blobs=["conv1", "pool2"])
    assert is_channels_last(outputs["conv1"]) and is_channels_last(outputs["pool2"])
    arr = net.blobs["conv1"].data
    assert arr.shape == net.blobs["conv1"].shape  # NCHW shape over NHWC memory
    assert not arr.flags.c_contiguous
    # The view writes through: an edit through numpy is the tensor's value.
    arr[0, 1, 2, 3] = 42.0
    assert net.blobs["conv1"].data[0, 1, 2, 3] == 42.0  # a fresh view of the same tensor
    # Weights of more than one channel stay NCHW: pycaffe hands out C-order arrays, which
    # net surgery reshapes in place or writes through reshaped views.
    w = net.params["conv2"][0].data
    assert w.flags.c_contiguous and net.params["conv1"][0].data.flags.c_contiguous
    w[1, 2, 3, 4] = -7.0
    assert float(net.params["conv2"][0].param.detach()[1, 2, 3, 4]) == -7.0
    w.reshape(-1)[5] = 3.5
    w.shape = (w.shape[0], -1)
    assert float(net.params["conv2"][0].param.detach()[0, 0, 1, 0]) == 3.5
    net.backward()
    assert net.params["conv2"][0].param.grad.is_contiguous()
    assert net.params["conv2"][0].diff.shape == net.params["conv2"][0].shape
    assert net.params["conv2"][0].diff.flags.c_contiguous


def test_channels_last_matches_nchw_results():
    a, b = lenet(), lenet(memory_format="contiguous")
    assert b.memory_format is torch.contiguous_format
    x = np.random.default_rng(1).standard_normal(a.blobs["data"].shape).astype(np.float32)
    label = np.arange(a.blobs["label"].count, dtype=np.float32).reshape(a.blobs["label"].shape) % 10
    for net in (a, b):
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = label
        net.forward()
        net.backward()
    np.testing.assert_allclose(a.blobs["loss"].data, b.blobs["loss"].data, rtol=1e-5)
    for name in ("conv1", "conv2", "ip1"):
        for pa, pb in zip(a.params[name], b.params[name]):
            np.testing.assert_allclose(pa.diff, pb.diff, rtol=1e-4, atol=1e-6)


def test_mlp_stays_contiguous():
    net = caffe.Net(parse_text(MLP, caffe_pb2.NetParameter()), caffe.TEST)
    assert net.memory_format is torch.contiguous_format


def test_param_diffs_accumulate_in_place_across_backward_calls():
    net = lenet()
    x = np.random.default_rng(2).standard_normal(net.blobs["data"].shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    net.backward()
    held = net.params["ip1"][0].diff  # a view the user keeps, as in Caffe
    once = held.copy()
    net.forward()
    net.backward()
    np.testing.assert_allclose(held, 2 * once, rtol=1e-5, atol=1e-7)


DATA_CONV = """
layer { name: "data" type: "Data" top: "data" top: "label"
        data_param { source: "%s" batch_size: 4 backend: LMDB }
        transform_param { %s } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
"""


@pytest.mark.parametrize("transform", ["scale: 0.5", "crop_size: 5 mirror: true mean_value: 9",
                                       "mean_value: 1 mean_value: 2 mean_value: 3"])
def test_data_layer_batches_come_channels_last_with_the_same_values(tmp_path, transform):
    from pycaffe_alt.data.datum import array_to_datum
    from pycaffe_alt.data.db import LMDBWriter

    rng = np.random.default_rng(3)
    path = str(tmp_path / "rgb_lmdb")
    with LMDBWriter(path) as w:
        for i in range(10):
            img = rng.integers(0, 256, (3, 7, 6), dtype=np.uint8)
            w.put(f"{i:04d}", array_to_datum(img, i % 3).SerializeToString())
    text = DATA_CONV % (path, transform)
    nets = []
    for f in ("auto", "contiguous"):
        caffe.set_random_seed(4)  # the same crops and flips: Caffe seeds them from its stream
        nets.append(caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN, memory_format=f))
    assert nets[0].memory_format is torch.channels_last
    for _ in range(3):  # a few batches, wrapping around the 10 records
        for net in nets:
            net.forward()
        fast, plain = (net.blob_value("data") for net in nets)
        assert is_channels_last(fast)  # laid out by the data layer, no reorder in the net
        assert plain.is_contiguous()
        torch.testing.assert_close(fast, plain, rtol=0, atol=0)
        np.testing.assert_array_equal(nets[0].blobs["label"].data, nets[1].blobs["label"].data)


def test_private_pass_readers_follow_the_training_batches_layout(tmp_path):
    from pycaffe_alt.alternation.record_stream import test_reader
    from pycaffe_alt.data.datum import array_to_datum
    from pycaffe_alt.data.db import LMDBWriter

    path = str(tmp_path / "rgb_lmdb")
    with LMDBWriter(path) as w:
        for i in range(4):
            w.put(f"{i:04d}", array_to_datum(np.full((3, 7, 6), i, np.uint8), 0)
                  .SerializeToString())
    net = caffe.Net(parse_text(DATA_CONV % (path, "scale: 1"), caffe_pb2.NetParameter()),
                    caffe.TRAIN)
    pipe, n, bs = test_reader(net.layer_dict["data"].module)
    try:
        batch = pipe.next_batch(torch.device("cpu"))
    finally:
        pipe.close()
    assert is_channels_last(batch["data"])  # what the support pass feeds the net
    assert (n, bs) == (4, 4) and batch["data"][:, 0, 0, 0].tolist() == [0, 1, 2, 3]


RGB_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 } }
"""


def test_inputs_are_c_order_arrays_and_reach_the_first_convolution_channels_last():
    # pycaffe programs write inputs through reshaped views (lost in a channels-last copy);
    # the first convolution still computes channels-last, from pycaffe's array or a caller's
    # NCHW tensor (its weight is NCHW, so its input's layout decides).
    net = caffe.Net(parse_text(RGB_NET, caffe_pb2.NetParameter()), caffe.TEST)
    assert net.memory_format is torch.channels_last
    arr = net.blobs["data"].data
    assert arr.flags.c_contiguous
    x = np.random.default_rng(0).standard_normal(arr.shape).astype(np.float32)
    arr.reshape(2, -1)[...] = x.reshape(2, -1)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, x)
    assert is_channels_last(net.blob_value("conv"))
    out = net(data=torch.from_numpy(x), blobs=["conv", "pool"])
    assert is_channels_last(out["conv"]) and is_channels_last(out["pool"])
    np.testing.assert_allclose(out["pool"].detach().numpy(), net.blobs["pool"].data, rtol=1e-6)


def test_channels_last_strides_match_torchs():
    import itertools

    for shape in itertools.product([0, 1, 3], [0, 1, 3], [0, 1, 4], [0, 1, 5]):
        assert mf.channels_last_strides(shape) == \
            torch.empty(shape, memory_format=torch.channels_last, device="meta").stride(), shape


def test_an_input_read_by_an_eltwise_keeps_the_net_channels_last():
    # Review: only convolution readers got the converted input, so a global residual
    # (input + conv) and everything after it ran NCHW.
    text = RGB_NET.split('layer { name: "pool"')[0] + (
        'layer { name: "c2" type: "Convolution" bottom: "data" top: "c2" convolution_param { '
        'num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "c2" top: "sum" }\n'
        'layer { name: "c3" type: "Convolution" bottom: "sum" top: "c3" convolution_param { '
        'num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }\n')
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)
    x = np.random.default_rng(1).standard_normal(net.blobs["data"].shape).astype(np.float32)
    net.forward(data=x)
    assert is_channels_last(net.blob_value("sum")) and is_channels_last(net.blob_value("c3"))
    assert net.blobs["data"].data.flags.c_contiguous
    ref = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST, memory_format="contiguous")
    for p, q in zip(net.learnable_params, ref.learnable_params):
        q.param.data.copy_(p.param.data)
    np.testing.assert_allclose(ref.forward(data=x)["c3"], net.blobs["c3"].data, rtol=1e-5, atol=1e-5)
