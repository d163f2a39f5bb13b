"""Reading and writing prototxt / binary protobuf files, and the errors users see."""
import logging
import os
import shutil
import stat

import pytest

from pycaffe_alt import prototxt
from pycaffe_alt.errors import PrototxtError
from pycaffe_alt.proto import caffe_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "prototxt")
LENET_V1 = os.path.join(HERE, "fixtures", "golden", "nets", "legacy_v1_lenet")


def fixture(name):
    return os.path.join(FIX, name)


def test_caffe_text_quirks_comments_repeats_single_quotes():
    net = prototxt.read_net(fixture("quirks.prototxt"))
    assert net.name == "Quirks"
    layer = net.layer[0]
    assert layer.name == "data"
    assert list(layer.top) == ["a", "b"]
    assert [list(s.dim) for s in layer.input_param.shape] == [[1, 2], [3]]


def test_read_net_accepts_text():
    net = prototxt.read_net('name: "T"\nlayer { name: "r" type: "ReLU" bottom: "x" top: "x" }')
    assert net.name == "T" and net.layer[0].type == "ReLU"


def test_read_net_current_format_logs_no_warning(caplog):
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        prototxt.read_net(fixture("quirks.prototxt"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_read_net_v1_logs_upgrade_warning(caplog):
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        net = prototxt.read_net(os.path.join(LENET_V1, "net.prototxt"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("will not support V1LayerParameter" in w for w in warnings)
    assert any("only support input layers" in w for w in warnings)
    assert [layer.type for layer in net.layer] == [
        "Input", "Convolution", "Pooling", "ReLU", "InnerProduct", "Softmax"]


def test_read_net_reads_binary_caffemodel():
    net = prototxt.read_net(os.path.join(LENET_V1, "weights.caffemodel"))
    conv = [layer for layer in net.layer if layer.name == "conv1"][0]
    assert list(conv.blobs[0].shape.dim) == [6, 1, 5, 5]
    assert len(conv.blobs[0].data) == 150


def test_syntax_error_has_line_and_column():
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(fixture("syntax_error.prototxt"))
    err = info.value
    assert err.where == fixture("syntax_error.prototxt") + ":7:17"
    assert 'expected ":"' in err.what
    assert err.hint


def test_unknown_field_suggests_close_name():
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(fixture("unknown_field.prototxt"))
    err = info.value
    assert err.where.endswith("unknown_field.prototxt:5:3")
    assert err.what == "layer 'conv1' (type Convolution): LayerParameter has no field 'convolution_parm'"
    assert err.hint == "did you mean 'convolution_param'?"
    assert "Traceback" not in str(err)


def test_unknown_enum_lists_valid_values():
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(fixture("bad_enum.prototxt"))
    err = info.value
    assert err.where.endswith("bad_enum.prototxt:5:25")
    assert "PoolingParameter.PoolMethod has no value 'MAXIMUM'" in err.what
    assert "MAX, AVE, STOCHASTIC" in err.hint
    assert "did you mean 'MAX'" in err.hint


def test_a_forks_v1_layer_type_says_what_to_do():
    # DeepLab v1's train.prototxt: layers { type: IMAGE_SEG_DATA } (a value the fork added to the
    # V1 enum); the hint says it is a fork's type and what to do, not only the nearest value.
    text = 'layers {\n  name: "data"\n  type: IMAGE_SEG_DATA\n  top: "data"\n}\n'
    with pytest.raises(PrototxtError) as info:
        prototxt.parse_text(text, caffe_pb2.NetParameter(), "deeplab.prototxt")
    err = info.value
    assert err.where == "deeplab.prototxt:3:9"
    assert "layer 'data' (type IMAGE_SEG_DATA)" in err.what
    assert "a layer type that a Caffe fork added to the V1 enum" in err.hint
    assert "remove or replace that layer" in err.hint
    assert "IMAGE_DATA" in err.hint  # the valid values still follow


def test_a_field_of_an_unimplemented_forks_layer_says_the_type_is_unsupported_too():
    # C3D v1.1's train_simple.prototxt: its VideoData (source, new_length...) is not the SSD
    # fork's VideoDataParameter that caffe.proto holds, and no VideoData layer is implemented.
    text = ('layer {\n  name: "data"\n  type: "VideoData"\n  top: "data"\n'
            '  video_data_param {\n    source: "train_01.lst"\n    new_length: 16\n  }\n}\n')
    with pytest.raises(PrototxtError) as info:
        prototxt.parse_text(text, caffe_pb2.NetParameter(), "c3d.prototxt")
    err = info.value
    assert err.where == "c3d.prototxt:6:5"
    assert err.what == "layer 'data' (type VideoData): VideoDataParameter has no field 'source'"
    assert "video_file" in err.hint  # the fields caffe.proto does hold
    assert "the type VideoData is not implemented here either" in err.hint
    assert "Input layer" in err.hint
    # A supported type with a misspelt field keeps the plain answer.
    with pytest.raises(PrototxtError) as info:
        prototxt.parse_text('layer { name: "p" type: "Pooling" pooling_param { kernel: 2 } }',
                            caffe_pb2.NetParameter(), "p.prototxt")
    assert "not implemented" not in (info.value.hint or "")


def test_enum_number_out_of_range():
    with pytest.raises(PrototxtError) as info:
        prototxt.parse_text("layer { pooling_param { pool: 7 } }", caffe_pb2.NetParameter(), "n")
    assert info.value.where == "n:1:31"
    assert "has no value '7'" in info.value.what


def test_singular_field_twice_is_an_error_as_in_caffe():
    with pytest.raises(PrototxtError) as info:
        prototxt.parse_text('layer {\n name: "a"\n name: "b"\n}', caffe_pb2.NetParameter(), "f")
    assert info.value.where.startswith("f:3:")
    assert "'name' is given more than once" in info.value.what


def test_v1_enum_type_in_new_layer_gets_hint():
    with pytest.raises(PrototxtError) as info:
        prototxt.parse_text("layer { type: CONVOLUTION }", caffe_pb2.NetParameter(), "f")
    assert 'type: "Convolution"' in info.value.hint


def test_net_given_as_solver_is_explained():
    with pytest.raises(PrototxtError) as info:
        prototxt.read_solver(os.path.join(LENET_V1, "net.prototxt"))
    assert "SolverParameter has no field 'name'" in info.value.what
    assert "net prototxt" in info.value.hint


def test_missing_file():
    missing = os.path.join(FIX, "no_such_net.prototxt")
    for reader in (prototxt.read_net, prototxt.read_solver,
                   lambda p: prototxt.read_binary(p, caffe_pb2.NetParameter())):
        with pytest.raises(PrototxtError) as info:
            reader(missing)
        assert missing in str(info.value) and "does not exist" in str(info.value)


def test_corrupt_binary(tmp_path):
    raw = open(os.path.join(LENET_V1, "weights.caffemodel"), "rb").read()
    broken = tmp_path / "broken.caffemodel"
    broken.write_bytes(raw[: len(raw) // 2])
    for read in (prototxt.read_net, lambda p: prototxt.read_binary(p, caffe_pb2.NetParameter())):
        with pytest.raises(PrototxtError) as info:
            read(str(broken))
        assert "not a valid NetParameter (truncated or corrupt)" in info.value.what
        assert info.value.where == str(broken)


def test_non_utf8_text_names_position(tmp_path):
    bad = tmp_path / "latin1.prototxt"
    bad.write_bytes(b'name: "x"\n# caf\xe9\n')
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(str(bad))
    assert info.value.where == f"{bad}:2:6"


def test_solver_keeps_relative_net_path(tmp_path, monkeypatch):
    shutil.copy(fixture("solver_old.prototxt"), tmp_path / "solver.prototxt")
    monkeypatch.chdir(tmp_path)
    solver = prototxt.read_solver("solver.prototxt")
    assert solver.net == "examples/mnist/lenet_train_test.prototxt"
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    # Caffe's UpgradeSnapshotPrefixProperty: unset prefix -> solver path minus extension.
    assert solver.snapshot_prefix == "solver"


def test_solver_snapshot_prefix_directory(tmp_path, monkeypatch):
    (tmp_path / "snaps").mkdir()
    (tmp_path / "s.prototxt").write_text('base_lr: 0.1\nsnapshot_prefix: "snaps"\n')
    monkeypatch.chdir(tmp_path)
    assert prototxt.read_solver("s.prototxt").snapshot_prefix == os.path.join("snaps", "s")
    (tmp_path / "t.prototxt").write_text('base_lr: 0.1\nsnapshot_prefix: "out/lenet"\n')
    assert prototxt.read_solver("t.prototxt").snapshot_prefix == "out/lenet"


def test_write_text_roundtrip_and_atomic(tmp_path):
    net = prototxt.read_net(fixture("v1_data.prototxt"))
    out = tmp_path / "net.prototxt"
    out.write_text("old contents")
    prototxt.write_text(net, str(out))
    assert prototxt.read_net(str(out)) == net
    assert os.listdir(tmp_path) == ["net.prototxt"]  # no temporary file left behind
    umask = os.umask(0o022)
    os.umask(umask)
    # the mode a plain open() gives, not mkstemp's 0600
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask


def test_write_binary_roundtrip(tmp_path):
    net = prototxt.read_net(os.path.join(LENET_V1, "weights.caffemodel"))
    out = tmp_path / "w.caffemodel"
    prototxt.write_binary(net, out)
    assert prototxt.read_binary(out, caffe_pb2.NetParameter()) == net
    assert os.listdir(tmp_path) == ["w.caffemodel"]


def test_write_into_missing_directory(tmp_path):
    with pytest.raises(PrototxtError, match="does not exist"):
        prototxt.write_text(caffe_pb2.NetParameter(), str(tmp_path / "nope" / "x.prototxt"))


FORK_LAYERS = [  # fork layer types whose parameter block caffe.proto does not have
    ("PSROIPooling", "psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 }"),
    ("Reorg", "reorg_param { stride: 2 }"),
]

SUPPORTED_FORK_BLOCKS = [
    ("ROIPooling", "roi_pooling_param { pooled_w: 6 pooled_h: 6 }"),
    ("SmoothL1Loss", "smooth_l1_loss_param { sigma: 3 }"),
    ("BN", "bn_param { slope_filler { type: \"constant\" value: 1 } frozen: true }"),
    ("Interp", "interp_param { zoom_factor: 2 }"),
    ("Upsample", "upsample_param { scale: 2 }"),
]


@pytest.mark.parametrize("kind,block", SUPPORTED_FORK_BLOCKS)
def test_the_parameter_blocks_of_supported_fork_layers_are_read(tmp_path, kind, block):
    path = tmp_path / "fork.prototxt"
    path.write_text(f'layer {{ name: "forked" type: "{kind}" {block} }}\n')
    layer = prototxt.read_net(str(path)).layer[0]
    assert layer.HasField(block.split()[0])


@pytest.mark.parametrize("kind,block", FORK_LAYERS)
def test_a_fork_layers_parameter_block_names_the_layer_and_the_fork(tmp_path, kind, block):
    # protobuf stops at the unknown block; the message names the layer and says the type is a
    # fork's (the closest BVLC field, e.g. pooling_param for roi_pooling_param, would mislead).
    path = tmp_path / "fork.prototxt"
    path.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
                    'layer {\n  name: "forked"\n  bottom: "x"\n  top: "y"\n'
                    f'  {block}\n  type: "{kind}"\n}}\n')
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(str(path))
    err = info.value
    assert err.where.endswith("fork.prototxt:6:3")
    assert err.what.startswith(f"layer 'forked' (type {kind}): LayerParameter has no field")
    assert "Caffe fork" in err.hint and "did you mean" not in err.hint


def test_a_typo_in_a_known_layers_block_still_suggests_the_field(tmp_path):
    path = tmp_path / "typo.prototxt"
    path.write_text('layer { name: "p" type: "Pooling" pooling_parma { pool: MAX } }\n')
    with pytest.raises(PrototxtError, match="did you mean 'pooling_param'"):
        prototxt.read_net(str(path))


def test_ceil_mode_from_a_fork_is_read(tmp_path):
    path = tmp_path / "ceil.prototxt"
    path.write_text('layer { name: "p" type: "Pooling" pooling_param { pool: MAX ceil_mode: false } }\n')
    assert prototxt.read_net(str(path)).layer[0].pooling_param.ceil_mode is False


ENCLOSING_CASES = [
    # (text, the layer a message must name, or None outside any layer)
    ('layer { name: "a" type: "ReLU" } layer { name: "b" type: "Power" bogus: 1 }\n', ("b", "Power")),
    ('layer { name: "a" type: "ReLU" } bogus_top: 1\n', None),
    ('layer { param { name: "shared_w" } name: "ip" type: "InnerProduct"\n  bogus: 1 }\n',
     ("ip", "InnerProduct")),
    ('layer { weight_filler { type: "bilinear" } name: "d" type: "Deconvolution"\n  bogus: 1 }\n',
     ("d", "Deconvolution")),
    ('layer { # type: "Convolution" {\n  name: "r" type: "ReLU"\n  bogus: 1 }\n', ("r", "ReLU")),
    ("layer { name: 'r{' type: 'ReLU' }\nlayer { name: \"x\\\"{\" type: \"TanH\"\n  bogus: 1 }\n",
     ('x\\"{', "TanH")),
    ('layers {\r\n  name: "v1"\r\n  type: RELU\r\n  bogus: 1\r\n}\r\n', ("v1", "RELU")),
]


@pytest.mark.parametrize("text,want", ENCLOSING_CASES)
def test_parse_errors_name_the_enclosing_layer_or_none(tmp_path, text, want):
    path = tmp_path / "net.prototxt"
    path.write_bytes(text.encode())
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(str(path))
    what = info.value.what
    if want is None:
        assert not what.startswith("layer '")
    else:
        assert what.startswith(f"layer '{want[0]}' (type {want[1]}): ")


def test_deeplab_v1_hole_is_pointed_to_dilation(tmp_path):
    path = tmp_path / "deeplab.prototxt"
    path.write_text('layer { name: "fc6" type: "Convolution" bottom: "x" top: "y"\n'
                    '  convolution_param { num_output: 8 kernel_size: 3 hole: 12 } }\n')
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(str(path))
    assert "'fc6'" in info.value.what and "dilation: N" in info.value.hint
