"""Legacy net/solver upgrades (Caffe's upgrade_proto.cpp) and the three upgrade tools."""
import importlib
import os
import subprocess
import sys

import pytest

from pycaffe_alt import prototxt, upgrade
from pycaffe_alt.errors import PrototxtError
from pycaffe_alt.proto import caffe_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(HERE, "fixtures", "prototxt")
LENET_V1 = os.path.join(HERE, "fixtures", "golden", "nets", "legacy_v1_lenet")


def fixture(name):
    return os.path.join(FIX, name)


def parse_net(text):
    return prototxt.parse_text(text, caffe_pb2.NetParameter(), "t")


def layer_named(net, name):
    return [layer for layer in net.layer if layer.name == name][0]


# ---------------------------------------------------------------------------------- V1 -> V2

def test_legacy_v1_lenet_upgrade_is_exact():
    net = prototxt.read_net(os.path.join(LENET_V1, "net.prototxt"))
    expected = parse_net('''
        name: "LeNetV1" force_backward: true
        layer { name: "input" type: "Input" top: "data"
                input_param { shape { dim: 2 dim: 1 dim: 28 dim: 28 } } }
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
                param { lr_mult: 1 } param { lr_mult: 2 }
                convolution_param { num_output: 6 kernel_size: 5 stride: 1 } }
        layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
                pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
        layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
                inner_product_param { num_output: 10 } }
        layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }''')
    assert net == expected
    assert not upgrade.net_needs_upgrade(net)
    # The weights Caffe saved for this net name the same layers.
    weights = prototxt.read_net(os.path.join(LENET_V1, "weights.caffemodel"))
    assert [l.name for l in weights.layer if l.blobs] == ["conv1", "ip1"]


def test_v1_params_include_exclude_loss_weight_and_data_transform():
    net = prototxt.read_net(fixture("v1_data.prototxt"))
    train, test = net.layer[0], net.layer[1]
    assert train.type == "Data" and train.include[0].phase == caffe_pb2.TRAIN
    assert train.transform_param.scale == pytest.approx(0.00390625)
    assert train.transform_param.mirror
    assert not train.data_param.HasField("scale") and not train.data_param.HasField("mirror")
    assert train.data_param.backend == caffe_pb2.DataParameter.LMDB
    # Caffe creates the (empty) transform_param of every data layer once the net needs it.
    assert test.HasField("transform_param") and test.transform_param.ListFields() == []
    ip = layer_named(net, "ip")
    assert [(p.name, p.share_mode, p.lr_mult, p.decay_mult) for p in ip.param] == [
        ("shared_w", caffe_pb2.ParamSpec.PERMISSIVE, 1, 1), ("", caffe_pb2.ParamSpec.STRICT, 2, 0)]
    assert not ip.param[1].HasField("share_mode")
    loss = layer_named(net, "loss")
    assert loss.type == "SoftmaxWithLoss" and list(loss.loss_weight) == [2]
    assert loss.exclude[0].phase == caffe_pb2.TEST


def test_v1_every_param_message_is_copied():
    v1 = caffe_pb2.V1LayerParameter(name="x", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    for name in upgrade.V1_PARAM_FIELDS:
        getattr(v1, name).SetInParent()
    assert len(upgrade.V1_PARAM_FIELDS) == 30
    out = upgrade.upgrade_v1_layer(v1)
    assert all(out.HasField(name) for name in upgrade.V1_PARAM_FIELDS)
    assert out.type == "Convolution"


def test_v1_type_names():
    V1 = caffe_pb2.V1LayerParameter
    assert set(upgrade.V1_LAYER_TYPES) == set(V1.LayerType.values())
    assert upgrade.V1_LAYER_TYPES[V1.SOFTMAX_LOSS] == "SoftmaxWithLoss"
    assert upgrade.V1_LAYER_TYPES[V1.TANH] == "TanH"
    assert upgrade.V1_LAYER_TYPES[V1.IM2COL] == "Im2col"


def test_layer_and_layers_together_is_refused():
    net = parse_net('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')
    with pytest.raises(PrototxtError, match="both 'layer' and 'layers'"):
        upgrade.upgrade_net_as_needed(net)


def test_binary_v1_caffemodel_keeps_blobs(tmp_path):
    v1 = caffe_pb2.NetParameter(name="bin")
    layer = v1.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT,
                          bottom=["data"], top=["ip"], blobs_lr=[1, 2])
    weight = layer.blobs.add(num=1, channels=1, height=2, width=3)
    weight.data.extend([1, 2, 3, 4, 5, 6])
    layer.blobs.add(num=1, channels=1, height=1, width=2).data.extend([7, 8])
    v1.input.append("data")  # an old caffemodel: input without dims is just dropped
    path = tmp_path / "v1.caffemodel"
    prototxt.write_binary(v1, path)

    net = prototxt.read_net(str(path))
    assert len(net.layers) == 0 and len(net.input) == 0
    assert [l.name for l in net.layer] == ["ip"]  # no Input layer without a shape
    ip = net.layer[0]
    assert ip.type == "InnerProduct"
    assert list(ip.blobs[0].data) == [1, 2, 3, 4, 5, 6] and ip.blobs[0].width == 3
    assert list(ip.blobs[1].data) == [7, 8]
    assert [p.lr_mult for p in ip.param] == [1, 2]


# ---------------------------------------------------------------------------------- V0 -> V1

def test_v0_padding_layer_folds_into_conv():
    net = prototxt.read_net(fixture("v0_padding.prototxt"))
    assert net.name == "V0Net"
    assert [l.name for l in net.layer] == [
        "input", "conv1", "relu1", "pool1", "norm1", "drop1", "ip1", "prob"]
    conv = layer_named(net, "conv1")
    assert conv.type == "Convolution" and list(conv.bottom) == ["data"]
    cp = conv.convolution_param
    assert (cp.num_output, list(cp.pad), list(cp.kernel_size), list(cp.stride), cp.group) == \
        (4, [2], [3], [1], 1)
    assert cp.HasField("bias_term") and not cp.bias_term
    assert cp.weight_filler.type == "gaussian" and cp.weight_filler.std == pytest.approx(0.01)
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    pool = layer_named(net, "pool1").pooling_param
    assert (pool.pool, pool.kernel_size, pool.stride, pool.pad) == (
        caffe_pb2.PoolingParameter.AVE, 2, 2, 1)
    lrn = layer_named(net, "norm1").lrn_param
    assert (lrn.local_size, lrn.k) == (3, 2) and lrn.alpha == pytest.approx(1e-4)
    assert layer_named(net, "drop1").dropout_param.dropout_ratio == pytest.approx(0.3)
    assert layer_named(net, "ip1").inner_product_param.bias_filler.value == 0.5
    assert layer_named(net, "prob").type == "Softmax"
    assert list(layer_named(net, "input").input_param.shape[0].dim) == [1, 3, 8, 8]


def test_v0_data_fields_and_incompatibility_report():
    net = prototxt.parse_text(prototxt.read_text_file(fixture("v0_data.prototxt")),
                              caffe_pb2.NetParameter(), "v0_data")
    report = upgrade.upgrade_net_as_needed(net, "v0_data")
    assert report.applied == ["V0LayerParameter", "V1LayerParameter"]
    assert report.problems == ["Unknown parameter dropout_ratio for layer type relu"]
    assert not report.success
    data = net.layer[0]
    assert data.type == "Data" and list(data.top) == ["data", "label"]
    assert (data.data_param.source, data.data_param.batch_size, data.data_param.rand_skip) == (
        "train_lmdb", 64, 10)
    tp = data.transform_param
    assert (tp.scale, tp.mean_file, tp.crop_size, tp.mirror) == (
        0.5, "mean.binaryproto", 227, True)
    assert net.layer[1].type == "ReLU" and not net.layer[1].HasField("dropout_param")
    assert net.layer[2].type == "SoftmaxWithLoss"


def test_v0_net_keeps_only_caffes_fields():
    net = parse_net('name: "n" debug_info: true state { phase: TRAIN } force_backward: true '
                    'layers { layer { name: "r" type: "relu" } bottom: "x" top: "x" } '
                    'input: "x" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1')
    assert upgrade.upgrade_v0_net(net)
    assert net.force_backward and not net.HasField("debug_info") and not net.HasField("state")
    assert list(net.input) == ["x"] and list(net.input_dim) == [1, 1, 1, 1]
    assert net.layers[0].type == caffe_pb2.V1LayerParameter.RELU


def test_v0_padding_into_relu_is_an_error():
    net = parse_net('input: "x" '
                    'layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "y" } '
                    'layers { layer { name: "r" type: "relu" } bottom: "y" top: "z" }')
    with pytest.raises(PrototxtError, match="conv or pool"):
        upgrade.upgrade_v0_net(net)


def test_v0_unknown_type_and_unknown_blob():
    with pytest.raises(PrototxtError, match="unknown type 'convolution'"):
        upgrade.upgrade_v0_net(parse_net(
            'input: "x" layers { layer { name: "c" type: "convolution" } bottom: "x" }'))
    with pytest.raises(PrototxtError, match="reads blob 'nowhere'"):
        upgrade.upgrade_v0_net(parse_net(
            'layers { layer { name: "c" type: "conv" } bottom: "nowhere" }'))


def test_v0_binary_blobs_carried(tmp_path):
    net = caffe_pb2.NetParameter(input=["x"])
    conn = net.layers.add(bottom=["x"], top=["y"])
    conn.layer.name, conn.layer.type, conn.layer.num_output = "ip", "innerproduct", 2
    conn.layer.blobs.add().data.extend([0.5, 1.5])
    path = tmp_path / "v0.caffemodel"
    prototxt.write_binary(net, path)
    out = prototxt.read_net(str(path))
    assert list(out.layer[0].blobs[0].data) == [0.5, 1.5]
    assert out.layer[0].inner_product_param.num_output == 2


# ---------------------------------------------------------------------------------- inputs

def test_input_dim_becomes_input_layer_first():
    net = prototxt.read_net(fixture("input_dim.prototxt"))
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data", "label"])
    assert [list(s.dim) for s in first.input_param.shape] == [[2, 3, 4, 5], [2, 1, 1, 1]]
    assert net.layer[1].name == "relu"
    assert not net.input and not net.input_dim and not net.input_shape


def test_input_shape_becomes_input_layer():
    net = prototxt.read_net(fixture("input_shape.prototxt"))
    first = net.layer[0]
    assert list(first.top) == ["data", "im_info"]
    assert [list(s.dim) for s in first.input_param.shape] == [[1, 3, 10, 10], [1, 3]]


def test_input_dims_missing_is_an_error():
    with pytest.raises(PrototxtError, match="4 input_dim values"):
        upgrade.upgrade_net_input(parse_net(
            'input: "a" input: "b" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1'))


# ---------------------------------------------------------------------------------- BatchNorm

def test_batchnorm_three_params_get_zero_multipliers(caplog):
    net = prototxt.read_net(fixture("batchnorm_old.prototxt"))
    bn1 = layer_named(net, "bn1")
    assert [(p.lr_mult, p.decay_mult) for p in bn1.param] == [(0, 0)] * 3
    assert all(p.HasField("decay_mult") for p in bn1.param)
    assert bn1.param[2].name == "bn1_factor"  # names kept for sharing (BVLC master)
    assert len(layer_named(net, "bn2").param) == 0
    assert not upgrade.upgrade_net_batchnorm(parse_net('layer { type: "BatchNorm" param {} }'))


# ---------------------------------------------------------------------------------- solver

def test_solver_type_enum_to_string():
    for enum, name in [("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
                       ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")]:
        solver = prototxt.parse_text(f"solver_type: {enum}", caffe_pb2.SolverParameter())
        assert upgrade.upgrade_solver_type(solver)
        assert solver.type == name and not solver.HasField("solver_type")
    assert not upgrade.upgrade_solver_type(caffe_pb2.SolverParameter(type="Adam"))


def test_solver_type_and_solver_type_both_is_an_error():
    solver = prototxt.parse_text('solver_type: ADAM type: "Adam"', caffe_pb2.SolverParameter())
    with pytest.raises(PrototxtError, match="both"):
        upgrade.upgrade_solver_type(solver)


def test_current_net_needs_nothing():
    net = prototxt.read_net(fixture("quirks.prototxt"))
    before = caffe_pb2.NetParameter()
    before.CopyFrom(net)
    for step in (upgrade.upgrade_v0_net, upgrade.upgrade_net_data_transformation,
                 upgrade.upgrade_v1_net, upgrade.upgrade_net_input, upgrade.upgrade_net_batchnorm):
        assert step(net) is False
    assert net == before


# ---------------------------------------------------------------------------------- tools

def run_tool(name, *args):
    """The executable in tools/, as a user runs it (a fresh interpreter: slow, used sparingly)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, timeout=120)


def call_tool(capsys, name, *args):
    """The tool's main() in this process: (exit code, stderr)."""
    module = importlib.import_module(f"pycaffe_alt.tools.{name}")
    code = module.main(list(args))
    return code, capsys.readouterr().err


def test_tool_executables_are_thin_and_executable():
    for name in ("upgrade_net_proto_text", "upgrade_net_proto_binary", "upgrade_solver_proto_text"):
        path = os.path.join(ROOT, "tools", name)
        assert os.access(path, os.X_OK)
        assert f"from pycaffe_alt.tools.{name} import main" in open(path).read()


def test_tool_upgrade_net_proto_text(tmp_path):
    out = tmp_path / "out.prototxt"
    res = run_tool("upgrade_net_proto_text", os.path.join(LENET_V1, "net.prototxt"), str(out))
    assert res.returncode == 0, res.stderr
    assert "Wrote upgraded NetParameter text proto" in res.stderr
    written = prototxt.parse_text(out.read_text(), caffe_pb2.NetParameter())
    assert written == prototxt.read_net(os.path.join(LENET_V1, "net.prototxt"))


def test_tool_already_current(tmp_path, capsys):
    src = fixture("quirks.prototxt")
    code, err = call_tool(capsys, "upgrade_net_proto_text", src, str(tmp_path / "o.prototxt"))
    assert code == 0 and "File already in latest proto format" in err
    assert prototxt.read_net(str(tmp_path / "o.prototxt")) == prototxt.read_net(src)


def test_tool_text_bad_input_exits_nonzero_without_traceback(tmp_path, capsys):
    res = run_tool("upgrade_net_proto_text", fixture("syntax_error.prototxt"),
                   str(tmp_path / "o.prototxt"))
    assert res.returncode == 2
    assert "syntax_error.prototxt:7:17" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.prototxt").exists()
    code, err = call_tool(capsys, "upgrade_net_proto_text", fixture("unknown_field.prototxt"),
                          str(tmp_path / "o"))
    assert code == 2 and "did you mean 'convolution_param'" in err
    code, err = call_tool(capsys, "upgrade_net_proto_text", str(tmp_path / "missing"),
                          str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err
    code, err = call_tool(capsys, "upgrade_net_proto_text", "only_one_arg")
    assert code == 1 and err.startswith("Usage: upgrade_net_proto_text")


def test_tool_text_upgrade_problems_exit_1_but_write(tmp_path, capsys):
    out = tmp_path / "o.prototxt"
    code, err = call_tool(capsys, "upgrade_net_proto_text", fixture("v0_data.prototxt"), str(out))
    assert code == 1
    assert "Unknown parameter dropout_ratio for layer type relu" in err
    assert prototxt.read_net(str(out)).layer[0].type == "Data"


def test_tool_upgrade_net_proto_binary(tmp_path, capsys):
    v1 = caffe_pb2.NetParameter(name="bin")
    layer = v1.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    layer.blobs.add().data.extend([3.0, 4.0])
    src, dst = tmp_path / "v1.caffemodel", tmp_path / "v2.caffemodel"
    prototxt.write_binary(v1, src)
    code, err = call_tool(capsys, "upgrade_net_proto_binary", str(src), str(dst))
    assert code == 0, err
    out = prototxt.read_binary(dst, caffe_pb2.NetParameter())
    assert out.layer[0].type == "Convolution" and list(out.layer[0].blobs[0].data) == [3, 4]
    src.write_bytes(src.read_bytes()[:-3])
    code, err = call_tool(capsys, "upgrade_net_proto_binary", str(src), str(dst))
    assert code == 2 and "truncated or corrupt" in err


def test_tool_upgrade_solver_proto_text(tmp_path, capsys):
    out = tmp_path / "solver.prototxt"
    code, err = call_tool(capsys, "upgrade_solver_proto_text", fixture("solver_old.prototxt"),
                          str(out))
    assert code == 0, err
    solver = prototxt.parse_text(out.read_text(), caffe_pb2.SolverParameter())
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    assert solver.net == "examples/mnist/lenet_train_test.prototxt"
    assert not solver.HasField("snapshot_prefix")  # Caffe's tool leaves it alone
    both = tmp_path / "both.prototxt"
    both.write_text('solver_type: ADAM\ntype: "Adam"\n')
    code, err = call_tool(capsys, "upgrade_solver_proto_text", str(both), str(tmp_path / "x"))
    assert code == 1 and "both" in err and not (tmp_path / "x").exists()
