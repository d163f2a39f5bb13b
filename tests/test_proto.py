"""Tests for pycaffe_alt/proto: caffe.proto schema and its generated module.

The strongest checks compare our schema field by field with BVLC Caffe's
caffe.proto (and the SSD fork's), through facts about those schemas shipped in
tests/fixtures/upstream_proto (field tables, BVLC's compiled descriptor, hashes
of its comment lines; make_fixtures.py there rebuilds them from the upstream
files), so they run everywhere without the upstream sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2, text_format
from google.protobuf.descriptor import FieldDescriptor as FD

from pycaffe_alt.proto import caffe_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROTO_DIR = os.path.join(REPO, "pycaffe_alt", "proto")
PROTO_FILE = os.path.join(PROTO_DIR, "caffe.proto")
PB2_FILE = os.path.join(PROTO_DIR, "caffe_pb2.py")
FIXTURES = os.path.join(HERE, "fixtures", "golden")

UPSTREAM = os.path.join(HERE, "fixtures", "upstream_proto")

try:
    from grpc_tools import protoc as _protoc  # noqa: F401

    HAVE_GRPC_TOOLS = True
except ImportError:  # pragma: no cover - environment dependent
    HAVE_GRPC_TOOLS = False

needs_grpc_tools = pytest.mark.skipif(
    not HAVE_GRPC_TOOLS,
    reason="grpc_tools not importable (pip install grpcio-tools) - cannot run protoc",
)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _pool_message(name):
    return caffe_pb2.DESCRIPTOR.message_types_by_name.get(name) or _find_nested(name)


def _find_nested(dotted):
    parts = dotted.split(".")
    desc = caffe_pb2.DESCRIPTOR.message_types_by_name.get(parts[0])
    for p in parts[1:]:
        if desc is None:
            return None
        desc = desc.nested_types_by_name.get(p)
    return desc


def _is_repeated(field):
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FD.LABEL_REPEATED


def _is_required(field):
    if hasattr(field, "is_required"):
        return field.is_required
    return field.label == FD.LABEL_REQUIRED


def _is_packed(field):
    if hasattr(field, "is_packed"):
        return bool(field.is_packed)
    return bool(field.GetOptions().packed)


def _upstream_facts(name):
    """(fields, enum_values) of an upstream schema, as parse_proto_facts gives them."""
    with open(os.path.join(UPSTREAM, name), encoding="utf-8") as f:
        facts = json.load(f)
    return facts["fields"], [tuple(v) for v in facts["enum_values"]]


_SCALARS = {
    "double": FD.TYPE_DOUBLE,
    "float": FD.TYPE_FLOAT,
    "int32": FD.TYPE_INT32,
    "int64": FD.TYPE_INT64,
    "uint32": FD.TYPE_UINT32,
    "uint64": FD.TYPE_UINT64,
    "sint32": FD.TYPE_SINT32,
    "sint64": FD.TYPE_SINT64,
    "fixed32": FD.TYPE_FIXED32,
    "fixed64": FD.TYPE_FIXED64,
    "sfixed32": FD.TYPE_SFIXED32,
    "sfixed64": FD.TYPE_SFIXED64,
    "bool": FD.TYPE_BOOL,
    "string": FD.TYPE_STRING,
    "bytes": FD.TYPE_BYTES,
}

_FIELD_RE = re.compile(
    r"^(optional|required|repeated)\s+([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*(\[[^\]]*\])?\s*;"
)
_ENUM_VALUE_RE = re.compile(r"^(\w+)\s*=\s*(-?\d+)\s*;")
_OPEN_RE = re.compile(r"^(message|enum)\s+(\w+)\s*\{")


def parse_proto_facts(text):
    """Extract wire facts from a proto2 file with simple line parsing.

    Returns (fields, enum_values):
      fields: list of dicts {message, label, type, name, number, default, packed}
      enum_values: list of (enum full name, value name, number)
    Message names are dotted paths of nested messages (e.g. "A.B").
    """
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    fields, enum_values = [], []
    stack = []  # [(kind, name)]
    for raw in text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        m = _OPEN_RE.match(line)
        if m:
            stack.append((m.group(1), m.group(2)))
            line = line[m.end():].strip()
            if not line:
                continue
        if line.startswith("}"):
            stack.pop()
            continue
        if not stack:
            continue
        kind = stack[-1][0]
        path = ".".join(n for _, n in stack)
        if kind == "message":
            fm = _FIELD_RE.match(line)
            if fm:
                opts = fm.group(5) or ""
                dm = re.search(r"default\s*=\s*(\"[^\"]*\"|'[^']*'|[^,\]\s]+)", opts)
                fields.append(
                    dict(
                        message=path,
                        label=fm.group(1),
                        type=fm.group(2),
                        name=fm.group(3),
                        number=int(fm.group(4)),
                        default=dm.group(1) if dm else None,
                        packed=bool(re.search(r"packed\s*=\s*true", opts)),
                    )
                )
        elif kind == "enum":
            em = _ENUM_VALUE_RE.match(line)
            if em:
                enum_values.append((path, em.group(1), int(em.group(2))))
    return fields, enum_values


def _type_matches(field, type_name):
    if type_name in _SCALARS:
        return field.type == _SCALARS[type_name]
    target = field.message_type or field.enum_type
    if target is None:
        return False
    return target.full_name == "caffe." + type_name or target.full_name.endswith(
        "." + type_name
    )


def _default_matches(field, literal):
    value = field.default_value
    if literal[0] in "\"'":
        return value == literal[1:-1]
    if field.type == FD.TYPE_BOOL:
        return value is (literal == "true")
    if field.type == FD.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name == literal
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        expected = float(literal)
        return abs(value - expected) <= 1e-6 * max(1.0, abs(expected))
    return value == int(literal)


def _enum_desc(path):
    parts = path.split(".")
    if len(parts) == 1:
        return caffe_pb2.DESCRIPTOR.enum_types_by_name.get(parts[0])
    owner = _find_nested(".".join(parts[:-1]))
    return owner.enum_types_by_name.get(parts[-1]) if owner else None


def check_against(facts, skip_numbers=()):
    """All mismatches between an upstream schema's (fields, enum_values) and our descriptor."""
    fields, enum_values = facts
    problems = []
    for f in fields:
        if (f["message"], f["number"]) in skip_numbers:
            continue
        msg = _find_nested(f["message"])
        where = "%s.%s = %d" % (f["message"], f["name"], f["number"])
        if msg is None:
            problems.append("missing message " + f["message"])
            continue
        ours = msg.fields_by_number.get(f["number"])
        if ours is None:
            problems.append("missing field " + where)
            continue
        if ours.name != f["name"]:
            problems.append("%s: our name is %s" % (where, ours.name))
        if not _type_matches(ours, f["type"]):
            problems.append("%s: type differs (want %s)" % (where, f["type"]))
        if (f["label"] == "repeated") != _is_repeated(ours) or (
            f["label"] == "required"
        ) != _is_required(ours):
            problems.append("%s: label differs (want %s)" % (where, f["label"]))
        if f["default"] is not None:
            if not ours.has_default_value or not _default_matches(ours, f["default"]):
                problems.append(
                    "%s: default %r, want %s" % (where, ours.default_value, f["default"])
                )
        elif ours.has_default_value:
            problems.append("%s: we set a default, upstream has none" % where)
        if f["packed"] != _is_packed(ours):
            problems.append("%s: packed differs" % where)
    for enum_path, value_name, number in enum_values:
        desc = _enum_desc(enum_path)
        if desc is None:
            problems.append("missing enum " + enum_path)
            continue
        ours = desc.values_by_name.get(value_name)
        if ours is None or ours.number != number:
            problems.append("enum %s.%s = %d differs" % (enum_path, value_name, number))
    return fields, problems


def _embedded_descriptor():
    """The FileDescriptorProto exactly as protoc embedded it in caffe_pb2.py.

    (The runtime's DESCRIPTOR.serialized_pb may re-render float defaults at
    float32 precision, so read the literal from the source instead.)
    """
    import ast

    with open(PB2_FILE, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "AddSerializedFile"
        ):
            return descriptor_pb2.FileDescriptorProto.FromString(
                ast.literal_eval(node.args[0])
            )
    raise AssertionError("no AddSerializedFile call in caffe_pb2.py")


def _run_protoc(args):
    from grpc_tools import protoc

    return protoc.main(["grpc_tools.protoc"] + args)


# ---------------------------------------------------------------------------
# (1) the committed generated module is up to date
# ---------------------------------------------------------------------------


def _version_line(text):
    m = re.search(r"^# Protobuf Python Version: (\S+)", text, flags=re.M)
    return m.group(1) if m else None


@needs_grpc_tools
def test_generated_module_is_current(tmp_path):
    from pycaffe_alt.proto.generate import generate

    fresh_path = generate(str(tmp_path))
    with open(fresh_path, encoding="utf-8") as f:
        fresh = f.read()
    with open(PB2_FILE, encoding="utf-8") as f:
        committed = f.read()
    if _version_line(fresh) != _version_line(committed):
        pytest.skip(
            "installed grpc_tools emits protobuf gencode %s but caffe_pb2.py was "
            "generated with %s; byte comparison is only meaningful with the same "
            "protoc (test_descriptor_matches_proto still checks the schema)"
            % (_version_line(fresh), _version_line(committed))
        )
    assert fresh == committed, (
        "pycaffe_alt/proto/caffe_pb2.py is stale; run "
        "`python3 -m pycaffe_alt.proto.generate`"
    )


@needs_grpc_tools
def test_descriptor_matches_proto(tmp_path):
    """Version-independent: the module's schema equals a fresh compile."""
    out = tmp_path / "caffe.desc"
    rc = _run_protoc(["-I" + PROTO_DIR, "--descriptor_set_out=" + str(out), "caffe.proto"])
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    (fresh,) = fds.file
    # The python generator drops json_name; so do we before comparing.
    def strip_json(messages):
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip_json(m.nested_type)

    strip_json(fresh.message_type)
    assert _embedded_descriptor() == fresh


def test_package_and_syntax():
    assert caffe_pb2.DESCRIPTOR.package == "caffe"
    assert caffe_pb2.DESCRIPTOR.name == "caffe.proto"
    proto = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(proto)
    assert proto.syntax in ("", "proto2")


# ---------------------------------------------------------------------------
# (2) a real Caffe .caffemodel parses
# ---------------------------------------------------------------------------

CONV_BASIC = os.path.join(FIXTURES, "layers", "conv_basic")


def test_caffemodel_parses():
    with open(os.path.join(CONV_BASIC, "weights.caffemodel"), "rb") as f:
        raw = f.read()
    net = caffe_pb2.NetParameter()
    net.ParseFromString(raw)
    assert net.name == "conv_basic"
    assert len(net.layers) == 0
    layers = {l.name: l for l in net.layer}
    conv = layers["conv"]
    assert conv.type == "Convolution"
    assert conv.convolution_param.num_output == 4
    assert list(conv.convolution_param.kernel_size) == [3]
    assert [list(b.shape.dim) for b in conv.blobs] == [[4, 3, 3, 3], [4]]
    assert len(conv.blobs[0].data) == 4 * 3 * 3 * 3
    assert len(conv.blobs[1].data) == 4
    assert all(abs(v) < 10 for v in conv.blobs[0].data)
    # Re-serialising gives back Caffe's bytes, even with unknown fields
    # dropped: every field Caffe wrote is known to our schema.
    assert net.SerializeToString() == raw
    known_only = caffe_pb2.NetParameter()
    known_only.CopyFrom(net)
    known_only.DiscardUnknownFields()
    assert known_only.SerializeToString() == raw


def test_prototxt_fixture_parses():
    with open(os.path.join(CONV_BASIC, "net.prototxt"), encoding="utf-8") as f:
        net = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    assert net.force_backward
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 3, 9, 9]
    wf = net.layer[1].convolution_param.weight_filler
    assert wf.type == "gaussian" and abs(wf.std - 0.1) < 1e-7


# ---------------------------------------------------------------------------
# (3) text format: legacy V1 layers and SSD layers
# ---------------------------------------------------------------------------

V1_NET = """
name: "v1net"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 8 kernel_size: 3 }
}
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "old" layer { name: "old" type: "conv" kernelsize: 3 biasterm: false } }
"""


def test_text_format_v1_layers():
    net = text_format.Parse(V1_NET, caffe_pb2.NetParameter())
    assert len(net.layers) == 3 and len(net.layer) == 0
    conv = net.layers[0]
    assert conv.type == caffe_pb2.V1LayerParameter.CONVOLUTION == 4
    assert list(conv.blobs_lr) == [1.0, 2.0]
    assert list(conv.weight_decay) == [1.0, 0.0]
    assert conv.convolution_param.num_output == 8
    assert net.layers[1].type == caffe_pb2.V1LayerParameter.RELU
    assert net.layers[2].layer.kernelsize == 3 and not net.layers[2].layer.biasterm
    assert list(net.input_dim) == [1, 3, 8, 8]


SSD_NET = """
name: "ssd_head"
layer {
  name: "conv4_3_norm" type: "Normalize" bottom: "conv4_3" top: "conv4_3_norm"
  norm_param {
    across_spatial: false
    scale_filler { type: "constant" value: 20 }
    channel_shared: false
  }
}
layer {
  name: "conv4_3_norm_mbox_loc_perm" type: "Permute"
  bottom: "conv4_3_norm_mbox_loc" top: "conv4_3_norm_mbox_loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 }
}
layer {
  name: "conv4_3_norm_mbox_priorbox" type: "PriorBox"
  bottom: "conv4_3_norm" bottom: "data" top: "conv4_3_norm_mbox_priorbox"
  prior_box_param {
    min_size: 30.0 max_size: 60.0 aspect_ratio: 2
    flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2
    step: 8 offset: 0.5
  }
}
layer {
  name: "detection_out" type: "DetectionOutput"
  bottom: "mbox_loc" bottom: "mbox_conf_flatten" bottom: "mbox_priorbox"
  top: "detection_out"
  include { phase: TEST }
  detection_output_param {
    num_classes: 21 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 400 }
    save_output_param { label_map_file: "labelmap_voc.prototxt" }
    code_type: CENTER_SIZE
    keep_top_k: 200
    confidence_threshold: 0.01
  }
}
layer {
  name: "data" type: "AnnotatedData" top: "data" top: "label"
  transform_param {
    mirror: true mean_value: 104 mean_value: 117 mean_value: 123
    resize_param { prob: 1 resize_mode: WARP height: 300 width: 300
                   interp_mode: LINEAR interp_mode: AREA }
    emit_constraint { emit_type: CENTER }
    distort_param { brightness_prob: 0.5 brightness_delta: 32 }
    expand_param { prob: 0.5 max_expand_ratio: 4.0 }
  }
  annotated_data_param {
    batch_sampler { sampler { min_scale: 0.3 max_scale: 1.0 }
                    sample_constraint { min_jaccard_overlap: 0.1 }
                    max_sample: 1 max_trials: 50 }
    label_map_file: "labelmap_voc.prototxt"
  }
}
layer {
  name: "mbox_loss" type: "MultiBoxLoss"
  multibox_loss_param {
    loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1.0
    num_classes: 21 share_location: true match_type: PER_PREDICTION
    overlap_threshold: 0.5 use_prior_for_matching: true
    background_label_id: 0 use_difficult_gt: true neg_pos_ratio: 3.0
    neg_overlap: 0.5 code_type: CENTER_SIZE ignore_cross_boundary_bbox: false
    mining_type: MAX_NEGATIVE
  }
  loss_param { normalization: VALID }
}
"""


def test_text_format_ssd_layers():
    net = text_format.Parse(SSD_NET, caffe_pb2.NetParameter())
    norm, perm, prior, det, data, loss = net.layer
    assert not norm.norm_param.across_spatial
    assert norm.norm_param.scale_filler.value == 20
    assert list(perm.permute_param.order) == [0, 2, 3, 1]
    pb = prior.prior_box_param
    assert list(pb.min_size) == [30.0] and list(pb.max_size) == [60.0]
    assert pb.flip and not pb.clip and len(pb.variance) == 4
    dop = det.detection_output_param
    assert dop.num_classes == 21
    assert abs(dop.nms_param.nms_threshold - 0.45) < 1e-7
    assert dop.nms_param.top_k == 400
    assert dop.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE == 2
    assert dop.keep_top_k == 200
    tp = data.transform_param
    assert tp.resize_param.height == 300
    assert list(tp.resize_param.interp_mode) == [
        caffe_pb2.ResizeParameter.LINEAR,
        caffe_pb2.ResizeParameter.AREA,
    ]
    assert tp.expand_param.max_expand_ratio == 4.0
    assert data.annotated_data_param.batch_sampler[0].max_trials == 50
    mb = loss.multibox_loss_param
    assert mb.mining_type == caffe_pb2.MultiBoxLossParameter.MAX_NEGATIVE
    # Defaults follow the SSD fork.
    assert caffe_pb2.DetectionOutputParameter().code_type == caffe_pb2.PriorBoxParameter.CORNER
    assert abs(caffe_pb2.NonMaximumSuppressionParameter().nms_threshold - 0.3) < 1e-7
    # Text round trip.
    again = text_format.Parse(text_format.MessageToString(net), caffe_pb2.NetParameter())
    assert again == net


def test_pycaffe_alt_fields():
    text = """
    layer { name: "ht1" type: "HardThreshold"
            hard_threshold_param { mode: RELU_BIAS output: SHIFT channel_shared: true } }
    layer { name: "m1" type: "SupportMask" support_mask_param { source: STORE key: "conv1" } }
    """
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    ht = net.layer[0].hard_threshold_param
    assert ht.mode == caffe_pb2.HardThresholdParameter.RELU_BIAS
    assert ht.output == caffe_pb2.HardThresholdParameter.SHIFT
    assert caffe_pb2.HardThresholdParameter().mode == caffe_pb2.HardThresholdParameter.THRESHOLD
    assert caffe_pb2.HardThresholdParameter().output == caffe_pb2.HardThresholdParameter.KEEP
    assert net.layer[1].support_mask_param.source == caffe_pb2.SupportMaskParameter.STORE
    solver = text_format.Parse(
        'base_lr: 0.01 alternation_param { mode: BATCH gap_epochs: 2 support_rule: EQ38 } '
        "dsd_param { prune_by: MAGNITUDE sparsity: 0.5 }",
        caffe_pb2.SolverParameter(),
    )
    alt = solver.alternation_param
    assert alt.mode == caffe_pb2.AlternationParameter.BATCH
    assert alt.base_type == "SGD" and alt.mask_store_max_ram == 1 << 30
    assert solver.dsd_param.prune_by == caffe_pb2.DSDParameter.MAGNITUDE
    assert caffe_pb2.DSDParameter().prune_by == caffe_pb2.DSDParameter.SUPPORT
    assert abs(caffe_pb2.DSDParameter().redense_lr_mult - 0.1) < 1e-7
    state = caffe_pb2.SolverState(iter=5, resume_state=b"\x00\x01")
    assert caffe_pb2.SolverState.FromString(state.SerializeToString()) == state


# ---------------------------------------------------------------------------
# (4) field numbers: fixed wire fact table, then automatic upstream check
# ---------------------------------------------------------------------------

WIRE_FACTS = [
    # (message, field, number)
    ("BlobShape", "dim", 1),
    ("BlobProto", "shape", 7),
    ("BlobProto", "data", 5),
    ("BlobProto", "diff", 6),
    ("BlobProto", "double_data", 8),
    ("BlobProto", "num", 1),
    ("BlobProtoVector", "blobs", 1),
    ("Datum", "data", 4),
    ("Datum", "float_data", 6),
    ("Datum", "encoded", 7),
    ("FillerParameter", "variance_norm", 8),
    ("NetParameter", "layer", 100),
    ("NetParameter", "layers", 2),
    ("NetParameter", "input_shape", 8),
    ("NetParameter", "state", 6),
    ("SolverParameter", "type", 40),
    ("SolverParameter", "net", 24),
    ("SolverParameter", "solver_type", 30),
    ("SolverParameter", "weights", 42),
    ("SolverParameter", "layer_wise_reduce", 41),
    ("SolverState", "history", 3),
    ("SolverState", "current_step", 4),
    ("LayerParameter", "blobs", 7),
    ("LayerParameter", "transform_param", 100),
    ("LayerParameter", "loss_param", 101),
    ("LayerParameter", "convolution_param", 106),
    ("LayerParameter", "inner_product_param", 117),
    ("LayerParameter", "batch_norm_param", 139),
    ("LayerParameter", "clip_param", 148),
    ("LayerParameter", "swish_param", 147),
    ("LayerParameter", "annotated_data_param", 200),
    ("LayerParameter", "multibox_loss_param", 201),
    ("LayerParameter", "permute_param", 202),
    ("LayerParameter", "prior_box_param", 203),
    ("LayerParameter", "detection_output_param", 204),
    ("LayerParameter", "detection_evaluate_param", 205),
    ("LayerParameter", "norm_param", 206),
    ("LayerParameter", "video_data_param", 207),
    ("LayerParameter", "hard_threshold_param", 5201),
    ("LayerParameter", "support_mask_param", 5202),
    ("SolverParameter", "alternation_param", 5211),
    ("SolverParameter", "dsd_param", 5212),
    ("SolverState", "resume_state", 5221),
    ("TransformationParameter", "resize_param", 8),
    ("TransformationParameter", "expand_param", 14),
    ("V1LayerParameter", "param", 1001),
    ("V1LayerParameter", "blobs_lr", 7),
    ("V1LayerParameter", "layer", 1),
    ("V0LayerParameter", "hdf5_output_param", 1001),
    ("DetectionOutputParameter", "code_type", 6),
]


@pytest.mark.parametrize("message,field,number", WIRE_FACTS)
def test_wire_fact_table(message, field, number):
    desc = _pool_message(message)
    assert desc is not None, message
    assert desc.fields_by_name[field].number == number


def test_packed_fields():
    for msg, name in [
        ("BlobShape", "dim"),
        ("BlobProto", "data"),
        ("BlobProto", "diff"),
        ("BlobProto", "double_data"),
        ("BlobProto", "double_diff"),
    ]:
        assert _is_packed(_pool_message(msg).fields_by_name[name]), (msg, name)
    # Unpacked repeated scalars stay unpacked (Caffe writes them unpacked).
    assert not _is_packed(caffe_pb2.Datum.DESCRIPTOR.fields_by_name["float_data"])


def test_enum_values():
    assert caffe_pb2.TRAIN == 0 and caffe_pb2.TEST == 1
    V1 = caffe_pb2.V1LayerParameter
    assert (V1.NONE, V1.ABSVAL, V1.DECONVOLUTION, V1.THRESHOLD) == (0, 35, 39, 31)
    S = caffe_pb2.SolverParameter
    assert (S.SGD, S.NESTEROV, S.ADAGRAD, S.RMSPROP, S.ADADELTA, S.ADAM) == tuple(range(6))
    assert caffe_pb2.HingeLossParameter.L1 == 1


def test_our_numbers_in_our_range():
    """Fields outside BVLC/SSD numbering belong to 5200-5299."""
    ours = {
        ("LayerParameter", "hard_threshold_param"),
        ("LayerParameter", "support_mask_param"),
        ("SolverParameter", "alternation_param"),
        ("SolverParameter", "dsd_param"),
        ("SolverState", "resume_state"),
        ("SolverParameter", "eval_type"),  # SSD's 41/42, taken by BVLC
        ("SolverParameter", "ap_version"),
    }
    for msg, name in ours:
        assert 5200 <= _pool_message(msg).fields_by_name[name].number <= 5299


def test_matches_bvlc_caffe_proto():
    fields, problems = check_against(_upstream_facts("bvlc_facts.json"))
    assert len(fields) > 400, "parser found too few fields: %d" % len(fields)
    messages = {f["message"] for f in fields}
    for name in messages:
        assert _find_nested(name) is not None, name
    assert not problems, "\n".join(problems)


# SSD fork fields whose numbers BVLC later gave to other fields; BVLC wins.
SSD_COLLISIONS = {
    ("SolverParameter", 41),  # SSD eval_type vs BVLC layer_wise_reduce
    ("SolverParameter", 42),  # SSD ap_version vs BVLC weights
}


def test_matches_ssd_caffe_proto():
    fields, problems = check_against(_upstream_facts("ssd_facts.json"),
                                     skip_numbers=SSD_COLLISIONS)
    assert len(fields) > 400
    assert not problems, "\n".join(problems)


def test_matches_bvlc_descriptor_exactly():
    """BVLC's proto as protoc compiled it: compare every field and enum value."""
    fds = descriptor_pb2.FileDescriptorSet()
    with open(os.path.join(UPSTREAM, "bvlc_caffe.desc"), "rb") as f:
        fds.ParseFromString(f.read())
    (theirs,) = fds.file
    ours = _embedded_descriptor()
    assert theirs.package == ours.package == "caffe"

    def index(file_proto):
        msgs, enums = {}, {}

        def walk(prefix, message):
            name = prefix + message.name
            msgs[name] = {f.number: f for f in message.field}
            for e in message.enum_type:
                enums[name + "." + e.name] = {v.name: v.number for v in e.value}
            for n in message.nested_type:
                walk(name + ".", n)

        for m in file_proto.message_type:
            walk("", m)
        for e in file_proto.enum_type:
            enums[e.name] = {v.name: v.number for v in e.value}
        return msgs, enums

    their_msgs, their_enums = index(theirs)
    our_msgs, our_enums = index(ours)
    problems = []
    for mname, tfields in their_msgs.items():
        if mname not in our_msgs:
            problems.append("missing message %s" % mname)
            continue
        for number, tf in tfields.items():
            of = our_msgs[mname].get(number)
            if of is None:
                problems.append("missing %s.%s = %d" % (mname, tf.name, number))
                continue
            for attr in ("name", "label", "type", "type_name", "default_value"):
                if getattr(of, attr) != getattr(tf, attr):
                    problems.append(
                        "%s.%s: %s %r != %r"
                        % (mname, tf.name, attr, getattr(of, attr), getattr(tf, attr))
                    )
            if of.options.packed != tf.options.packed:
                problems.append("%s.%s: packed differs" % (mname, tf.name))
    for ename, tvalues in their_enums.items():
        if our_enums.get(ename) is None:
            problems.append("missing enum %s" % ename)
        elif any(our_enums[ename].get(k) != v for k, v in tvalues.items()):
            problems.append("enum %s values differ" % ename)
    assert not problems, "\n".join(problems)


def test_no_copied_upstream_comments():
    """Our .proto is written in our own words: no long upstream comment lines (compared by
    their SHA-256, the fixture holds no upstream text)."""
    with open(os.path.join(UPSTREAM, "bvlc_comment_sha256.txt"), encoding="utf-8") as f:
        upstream = set(f.read().split())
    assert len(upstream) > 100
    with open(PROTO_FILE, encoding="utf-8") as f:
        ours = {c.strip() for c in re.findall(r"//(.*)", f.read())}
    hashes = {hashlib.sha256(c.encode("utf-8")).hexdigest(): c for c in ours}
    assert not [hashes[h] for h in upstream & set(hashes)]


def test_generate_module_runs_as_script(tmp_path):
    if not HAVE_GRPC_TOOLS:
        pytest.skip("grpc_tools not importable (pip install grpcio-tools)")
    r = subprocess.run(
        [sys.executable, "-m", "pycaffe_alt.proto.generate", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "caffe_pb2.py").exists()


def test_ssd_solver_fields_parse_as_text():
    # Every solver SSD's ssd_*.py scripts write sets these; their SSD numbers are BVLC's 41/42.
    from pycaffe_alt.prototxt import parse_text
    p = parse_text('base_lr: 0.001 eval_type: "detection" ap_version: "11point" '
                   'show_per_class_result: true', caffe_pb2.SolverParameter())
    assert (p.eval_type, p.ap_version, p.show_per_class_result) == ("detection", "11point", True)
    assert caffe_pb2.SolverParameter().ap_version == "Integral"
