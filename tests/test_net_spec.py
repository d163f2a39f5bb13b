"""caffe.NetSpec / caffe.layers / caffe.params / caffe.to_proto, as pycaffe users write them."""
import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe
from pycaffe_alt import layers as L, params as P
from pycaffe_alt.errors import NetError
from pycaffe_alt.net_spec import param_name_dict
from pycaffe_alt.proto import caffe_pb2


def _layer(net_param, name):
    return next(layer for layer in net_param.layer if layer.name == name)


def test_param_name_dict_follows_caffe_proto_names():
    names = param_name_dict()
    assert names["Convolution"] == "convolution"
    assert names["InnerProduct"] == "inner_product"
    assert names["ReLU"] == "relu"
    assert names["HDF5Data"] == "hdf5_data"
    assert names["Data"] == "data"
    assert names["Pooling"] == "pooling"
    # Layer types that read another type's message.
    assert names["Deconvolution"] == "convolution"


def test_params_give_enum_values():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX == 0
    assert P.Pooling.AVE == 1
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM
    with pytest.raises(AttributeError):
        P.Pooling.NOPE
    with pytest.raises(AttributeError):
        P.NoSuchLayer.MAX


def test_attribute_names_become_blob_and_layer_names():
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=64, backend=P.Data.LMDB, source="train_lmdb",
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.relu1, n.label)
    proto = n.to_proto()
    assert [layer.name for layer in proto.layer] == ["data", "conv1", "pool1", "ip1", "relu1",
                                                      "loss"]
    data = _layer(proto, "data")
    assert list(data.top) == ["data", "label"]
    assert data.data_param.batch_size == 64 and data.data_param.source == "train_lmdb"
    assert data.data_param.backend == caffe_pb2.DataParameter.LMDB
    assert data.transform_param.scale == pytest.approx(1 / 255)
    conv = _layer(proto, "conv1")
    assert list(conv.bottom) == ["data"] and list(conv.top) == ["conv1"]
    assert list(conv.convolution_param.kernel_size) == [5]  # a single value into a repeated field
    assert conv.convolution_param.weight_filler.type == "xavier"
    assert _layer(proto, "pool1").pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    relu = _layer(proto, "relu1")
    assert list(relu.bottom) == ["ip1"] and list(relu.top) == ["ip1"]  # in place
    # A layer reading an in-place top reads the blob it overwrote.
    assert list(_layer(proto, "loss").bottom) == ["ip1", "label"]


def test_prototxt_text_round_trips():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1,
                           param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)])
    text = str(n.to_proto())
    assert 'name: "conv"' in text and "lr_mult: 2" in text and "dim: 8" in text
    parsed = text_format.Parse(text, caffe_pb2.NetParameter())
    assert parsed == n.to_proto()
    conv = _layer(parsed, "conv")
    assert [p.lr_mult for p in conv.param] == [1, 2] and conv.param[1].decay_mult == 0


def test_layer_level_keywords_loss_weight_include_propagate():
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[2, 3]), dict(dim=[2])], ntop=2)
    n.ip = L.InnerProduct(n.data, num_output=3)
    n.loss = L.SoftmaxWithLoss(n.ip, n.label, loss_weight=0.5, propagate_down=[True, False])
    n.acc = L.Accuracy(n.ip, n.label, include=dict(phase=caffe.TEST), top_k=2)
    proto = n.to_proto()
    loss = _layer(proto, "loss")
    assert list(loss.loss_weight) == [0.5]
    assert list(loss.propagate_down) == [True, False]
    acc = _layer(proto, "acc")
    assert [r.phase for r in acc.include] == [caffe.TEST]
    assert acc.accuracy_param.top_k == 2
    assert [len(s.dim) for s in _layer(proto, "data").input_param.shape] == [2, 1]


def test_automatic_names_for_unassigned_tops():
    data = L.Input(shape=dict(dim=[1, 2]))
    ip = L.InnerProduct(L.ReLU(data), num_output=2)
    proto = caffe.to_proto(L.TanH(ip), L.Silence(ip, ntop=0))
    assert [layer.name for layer in proto.layer] == ["Input1", "ReLU1", "InnerProduct1", "TanH1",
                                                      "Silence1"]
    assert list(_layer(proto, "InnerProduct1").bottom) == ["ReLU1"]
    assert len(_layer(proto, "Silence1").top) == 0
    # Top.to_proto: just what that blob needs.
    assert [layer.name for layer in ip.to_proto().layer] == ["Input1", "ReLU1", "InnerProduct1"]


def test_netspec_items_and_function_without_tops():
    n = caffe.NetSpec()
    n["data"] = L.Input(shape=dict(dim=[1, 2]))
    n.silence = L.Silence(n["data"], ntop=0)
    assert "data" in n and n["data"] is n.data
    proto = n.to_proto()
    assert [layer.name for layer in proto.layer] == ["data", "silence"]
    with pytest.raises(AttributeError):
        n.missing
    with pytest.raises(KeyError):
        n["missing"]


def test_multi_top_unassigned_names_and_shared_layer():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 4]))
    a, b = L.Slice(n.data, slice_param=dict(axis=1, slice_point=[2]), ntop=2)
    n.out = L.Eltwise(a, b, operation=P.Eltwise.PROD)
    proto = n.to_proto()
    assert list(_layer(proto, "Slice1").top) == ["Slice1", "Slice2"]
    assert list(_layer(proto, "out").bottom) == ["Slice1", "Slice2"]
    assert _layer(proto, "out").eltwise_param.operation == caffe_pb2.EltwiseParameter.PROD


def test_extensions_tuples_messages_and_deconvolution():
    filler = caffe_pb2.FillerParameter(type="constant", value=0.5)
    d = L.Deconvolution(L.Input(shape=dict(dim=[1, 1, 3, 3])), num_output=2,
                        kernel_size=(2, 2), weight_filler=filler, bias_term=False)
    layer = d.to_proto().layer[-1]
    assert layer.type == "Deconvolution"
    assert list(layer.convolution_param.kernel_size) == [2, 2]
    assert layer.convolution_param.weight_filler.value == 0.5
    assert layer.convolution_param.bias_term is False


def test_errors_name_the_layer_and_keyword():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.ip = L.InnerProduct(n.data, num_outputs=3)  # typo
    with pytest.raises(NetError, match=r"layer 'ip'.*num_outputs"):
        n.to_proto()
    n.ip = L.InnerProduct(n.data, num_output="three")
    with pytest.raises(NetError, match="bad value for 'num_output'"):
        n.to_proto()
    with pytest.raises(TypeError, match=r"^ReLU input 0 is not a Top \(type is <class 'numpy.ndarray'>\)$"):
        L.ReLU(np.zeros(3))
    with pytest.raises(NetError, match="cannot assign"):
        n.x = 3


def test_generated_lenet_builds_and_runs():
    """A NetSpec net is a valid net: build it, run it, check the loss is a finite scalar."""
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[4, 1, 28, 28]), dict(dim=[4])], ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=10, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.relu1, n.label)
    net = caffe.Net(n.to_proto(), caffe.TRAIN)
    assert net.blobs["conv1"].data.shape == (4, 20, 24, 24)
    assert net.blobs["pool1"].data.shape == (4, 20, 12, 12)
    net.blobs["data"].data[...] = np.random.RandomState(0).rand(4, 1, 28, 28)
    net.blobs["label"].data[...] = [0, 1, 2, 3]
    loss = float(net.forward()["loss"])
    assert np.isfinite(loss) and loss > 0


def test_a_long_unnamed_chain_is_written_without_recursion_limit():
    # pycaffe's recursive walk stops at Python's recursion limit; ours walks with a stack and
    # gives the same order and automatic names.
    x = L.Input(shape=dict(dim=[1, 3]))
    for _ in range(3000):
        x = L.ReLU(x)
    net = x.to_proto()
    assert len(net.layer) == 3001
    assert [net.layer[i].name for i in (0, 1, 3000)] == ["Input1", "ReLU1", "ReLU3000"]
    assert list(net.layer[2].bottom) == ["ReLU1"] and list(net.layer[2].top) == ["ReLU2"]


def test_diamond_graph_order_and_names_match_the_recursive_walk():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3]))
    a = L.ReLU(n.data)
    b = L.Sigmoid(a)
    c = L.TanH(a)
    n.out = L.Eltwise(b, c)
    net = n.to_proto()
    assert [(l.name, list(l.bottom), list(l.top)) for l in net.layer] == [
        ("data", [], ["data"]), ("ReLU1", ["data"], ["ReLU1"]), ("Sigmoid1", ["ReLU1"], ["Sigmoid1"]),
        ("TanH1", ["ReLU1"], ["TanH1"]), ("out", ["Sigmoid1", "TanH1"], ["out"])]


@pytest.mark.parametrize("ntop", [-1, "2", 1.5, True])
def test_ntop_must_be_a_whole_number(ntop):
    with pytest.raises(NetError, match="ntop="):
        L.ReLU(L.Input(shape=dict(dim=[1])), ntop=ntop)


def test_in_place_needs_as_many_tops_as_bottoms_and_blob_names_are_strings():
    data = L.Input(shape=dict(dim=[1, 4]))
    with pytest.raises(NetError, match="must equal the number of bottoms"):
        L.Slice(data, ntop=2, in_place=True)
    n = caffe.NetSpec()
    n.data = data
    n.tops[3] = L.ReLU(n.data)
    with pytest.raises(NetError, match="blob name 3 is not a string"):
        n.to_proto()


def test_the_ssd_forks_netspec_methods():
    # weiliu89/caffe's model_libs.py: net.keys(), net.vals(), net.update(name, params), del net[k].
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.extra = L.Sigmoid(n.relu)
    assert n.keys() == ["data", "conv", "relu", "extra"] and n.vals()[1] is n.conv
    n.update("conv", {"dilation": 2, "pad": 2})
    del n["extra"]
    net = n.to_proto()
    conv = _layer(net, "conv").convolution_param
    assert list(conv.dilation) == [2] and list(conv.pad) == [2]
    assert [l.name for l in net.layer] == ["data", "conv", "relu"]
    with pytest.raises(KeyError):
        del n["nope"]
