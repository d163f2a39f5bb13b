"""Upgrades of legacy Caffe net and solver definitions to the current format.

Follows BVLC Caffe's ``src/caffe/util/upgrade_proto.cpp`` (commit 9b89154) step by step:

* V0 nets (``layers { layer { type: "conv" ... } }``, padding layers) -> V1 ``layers {}``;
* V1 data layers with transformation fields inside their data params -> ``transform_param``;
* V1 nets (``layers { type: CONVOLUTION blobs_lr: 1 }``) -> ``layer { type: "Convolution" }``;
* ``input:`` / ``input_dim`` / ``input_shape`` -> one ``Input`` layer named "input";
* BatchNorm layers that declare three ``param`` blocks -> their lr_mult/decay_mult set to 0;
* solvers with the ``solver_type`` enum -> the ``type`` string; a missing or directory
  ``snapshot_prefix`` -> derived from the solver file name.

Each step works in place on a protobuf message and returns whether it changed it. Where Caffe
logs an error and carries on ("not fully compatible"), the step appends a sentence to the
optional ``problems`` list; where Caffe aborts (LOG(FATAL)/CHECK), the step raises
:class:`~pycaffe_alt.errors.PrototxtError`. :func:`upgrade_net_as_needed` and
:func:`upgrade_solver_as_needed` run the steps in Caffe's order and log as Caffe does.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional

from .errors import PrototxtError
from .proto import caffe_pb2

logger = logging.getLogger("pycaffe_alt")

_V1 = caffe_pb2.V1LayerParameter
Problems = Optional[List[str]]


@dataclass
class UpgradeReport:
    """What :func:`upgrade_net_as_needed` / :func:`upgrade_solver_as_needed` did.

    ``applied`` names the upgrade steps that ran; ``problems`` holds the incompatibilities Caffe
    would log as errors (the result is still usable, as in Caffe, but may be incomplete).
    """

    applied: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.applied)

    @property
    def success(self) -> bool:
        return not self.problems


def _note(problems: Problems, text: str) -> None:
    logger.error(text)
    if problems is not None:
        problems.append(text)


# --------------------------------------------------------------------------------------------
# V0 -> V1
# --------------------------------------------------------------------------------------------

# V0 lower-case type names and their V1 enum values (Caffe's UpgradeV0LayerType).
V0_LAYER_TYPES = {
    "accuracy": _V1.ACCURACY,
    "bnll": _V1.BNLL,
    "concat": _V1.CONCAT,
    "conv": _V1.CONVOLUTION,
    "data": _V1.DATA,
    "dropout": _V1.DROPOUT,
    "euclidean_loss": _V1.EUCLIDEAN_LOSS,
    "flatten": _V1.FLATTEN,
    "hdf5_data": _V1.HDF5_DATA,
    "hdf5_output": _V1.HDF5_OUTPUT,
    "im2col": _V1.IM2COL,
    "images": _V1.IMAGE_DATA,
    "infogain_loss": _V1.INFOGAIN_LOSS,
    "innerproduct": _V1.INNER_PRODUCT,
    "lrn": _V1.LRN,
    "multinomial_logistic_loss": _V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": _V1.POOLING,
    "relu": _V1.RELU,
    "sigmoid": _V1.SIGMOID,
    "softmax": _V1.SOFTMAX,
    "softmax_loss": _V1.SOFTMAX_LOSS,
    "split": _V1.SPLIT,
    "tanh": _V1.TANH,
    "window_data": _V1.WINDOW_DATA,
}

# Where each V0 field goes, by V0 layer type: (V0 field, {v0 type: (V1 sub-message, field)}).
# A V0 field set on a layer type not listed is an incompatibility (Caffe logs it and goes on).
# Repeated targets (conv pad/kernel_size/stride) are appended, singular ones assigned.
_V0_FIELD_TARGETS = [
    ("num_output", {"conv": ("convolution_param", "num_output"),
                    "innerproduct": ("inner_product_param", "num_output")}),
    ("biasterm", {"conv": ("convolution_param", "bias_term"),
                  "innerproduct": ("inner_product_param", "bias_term")}),
    ("weight_filler", {"conv": ("convolution_param", "weight_filler"),
                       "innerproduct": ("inner_product_param", "weight_filler")}),
    ("bias_filler", {"conv": ("convolution_param", "bias_filler"),
                     "innerproduct": ("inner_product_param", "bias_filler")}),
    ("pad", {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")}),
    ("kernelsize", {"conv": ("convolution_param", "kernel_size"),
                    "pool": ("pooling_param", "kernel_size")}),
    ("group", {"conv": ("convolution_param", "group")}),
    ("stride", {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")}),
    ("pool", {"pool": ("pooling_param", "pool")}),
    ("dropout_ratio", {"dropout": ("dropout_param", "dropout_ratio")}),
    ("local_size", {"lrn": ("lrn_param", "local_size")}),
    ("alpha", {"lrn": ("lrn_param", "alpha")}),
    ("beta", {"lrn": ("lrn_param", "beta")}),
    ("k", {"lrn": ("lrn_param", "k")}),
    ("source", {"data": ("data_param", "source"),
                "hdf5_data": ("hdf5_data_param", "source"),
                "images": ("image_data_param", "source"),
                "window_data": ("window_data_param", "source"),
                "infogain_loss": ("infogain_loss_param", "source")}),
    ("batchsize", {"data": ("data_param", "batch_size"),
                   "hdf5_data": ("hdf5_data_param", "batch_size"),
                   "images": ("image_data_param", "batch_size"),
                   "window_data": ("window_data_param", "batch_size")}),
    ("rand_skip", {"data": ("data_param", "rand_skip"),
                   "images": ("image_data_param", "rand_skip")}),
    ("shuffle_images", {"images": ("image_data_param", "shuffle")}),
    ("new_height", {"images": ("image_data_param", "new_height")}),
    ("new_width", {"images": ("image_data_param", "new_width")}),
    ("concat_dim", {"concat": ("concat_param", "concat_dim")}),
    ("det_fg_threshold", {"window_data": ("window_data_param", "fg_threshold")}),
    ("det_bg_threshold", {"window_data": ("window_data_param", "bg_threshold")}),
    ("det_fg_fraction", {"window_data": ("window_data_param", "fg_fraction")}),
    ("det_context_pad", {"window_data": ("window_data_param", "context_pad")}),
    ("det_crop_mode", {"window_data": ("window_data_param", "crop_mode")}),
    ("hdf5_output_param", {"hdf5_output": ("hdf5_output_param", None)}),
]

# V0 transformation fields go to transform_param whatever the layer type, as in Caffe.
_V0_TRANSFORM_FIELDS = [("scale", "scale"), ("meanfile", "mean_file"),
                        ("cropsize", "crop_size"), ("mirror", "mirror")]


def net_needs_v0_to_v1_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when some ``layers {}`` entry carries a nested V0 ``layer {}``."""
    return any(layer.HasField("layer") for layer in net.layers)


def _fold_padding_layers(net: caffe_pb2.NetParameter) -> List[caffe_pb2.V1LayerParameter]:
    """The V0 layers without their "padding" layers, whose pad moves into the conv/pool fed.

    Caffe (UpgradeV0PaddingLayers) tracks the last layer that wrote each blob; a layer reading a
    padding layer's output takes the padding layer's input instead, and its pad.
    """
    last_writer = {name: -1 for name in net.input}
    kept: List[caffe_pb2.V1LayerParameter] = []
    for i, connection in enumerate(net.layers):
        v0 = connection.layer
        if v0.type != "padding":
            copy = caffe_pb2.V1LayerParameter()
            copy.CopyFrom(connection)
            kept.append(copy)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_writer:
                raise PrototxtError(
                    f"V0 layer '{v0.name}' reads blob '{blob}', which no earlier layer or "
                    f"input produces", hint="list the layer after the one producing its bottom")
            source_index = last_writer[blob]
            if source_index == -1:
                continue
            source = net.layers[source_index]
            if source.layer.type != "padding":
                continue
            # Caffe CHECKs these; anything else is undefined there.
            if v0.type not in ("conv", "pool"):
                raise PrototxtError(
                    f"V0 padding layer '{source.layer.name}' feeds layer '{v0.name}' of type "
                    f"'{v0.type}'", hint="a padding layer may only feed a conv or pool layer")
            if len(connection.bottom) != 1 or len(source.bottom) != 1 or len(source.top) != 1:
                raise PrototxtError(
                    f"V0 padding layer '{source.layer.name}' and layer '{v0.name}' must each "
                    f"have one bottom (and the padding layer one top) to be merged")
            target = kept[-1]
            target.layer.pad = source.layer.pad
            target.bottom[j] = source.bottom[0]
        for blob in connection.top:
            last_writer[blob] = i
    return kept


def upgrade_v0_layer(v0_connection: caffe_pb2.V1LayerParameter,
                     problems: Problems = None) -> caffe_pb2.V1LayerParameter:
    """The V1 layer for one V0 ``layers { layer {...} bottom top }`` entry (UpgradeV0LayerParameter).

    Only bottoms and tops survive from the outer message, as in Caffe.
    """
    out = caffe_pb2.V1LayerParameter()
    out.bottom.extend(v0_connection.bottom)
    out.top.extend(v0_connection.top)
    if not v0_connection.HasField("layer"):
        return out
    v0 = v0_connection.layer
    if v0.HasField("name"):
        out.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in V0_LAYER_TYPES:
            raise PrototxtError(f"V0 layer '{v0.name}' has unknown type '{kind}'",
                                hint="known V0 types: " + ", ".join(sorted(V0_LAYER_TYPES)))
        out.type = V0_LAYER_TYPES[kind]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for v0_field, targets in _V0_FIELD_TARGETS:
        if not v0.HasField(v0_field):
            continue
        if kind not in targets:
            _note(problems, f"Unknown parameter {v0_field} for layer type {kind}")
            continue
        sub_name, target_field = targets[kind]
        sub = getattr(out, sub_name)
        value = getattr(v0, v0_field)
        if target_field is None:
            sub.CopyFrom(value)
        elif v0_field == "pool":
            # V0 and V1 pool enums share names (MAX, AVE, STOCHASTIC), not a Python type.
            name = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
            sub.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(name)
        else:
            descriptor = sub.DESCRIPTOR.fields_by_name[target_field]
            if descriptor.type == descriptor.TYPE_MESSAGE:
                getattr(sub, target_field).CopyFrom(value)
            elif _is_repeated(descriptor):
                getattr(sub, target_field).append(value)
            else:
                setattr(sub, target_field, value)
    for v0_field, target_field in _V0_TRANSFORM_FIELDS:
        if v0.HasField(v0_field):
            setattr(out.transform_param, target_field, getattr(v0, v0_field))
    return out


def upgrade_v0_net(net: caffe_pb2.NetParameter, problems: Problems = None) -> bool:
    """V0 net -> V1 net in place (Caffe's UpgradeV0Net). Returns whether it changed the net.

    As in Caffe, only name, layers, input, input_dim and force_backward are kept.
    """
    if not net_needs_v0_to_v1_upgrade(net):
        return False
    kept = _fold_padding_layers(net)
    upgraded = caffe_pb2.NetParameter()
    if net.HasField("name"):
        upgraded.name = net.name
    for layer in kept:
        upgraded.layers.append(upgrade_v0_layer(layer, problems))
    upgraded.input.extend(net.input)
    upgraded.input_dim.extend(net.input_dim)
    if net.HasField("force_backward"):
        upgraded.force_backward = net.force_backward
    net.CopyFrom(upgraded)
    return True


# --------------------------------------------------------------------------------------------
# V1 data transformation fields -> transform_param
# --------------------------------------------------------------------------------------------

_DATA_LAYER_PARAMS = {_V1.DATA: "data_param", _V1.IMAGE_DATA: "image_data_param",
                      _V1.WINDOW_DATA: "window_data_param"}
_LEGACY_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def net_needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when a V1 data layer sets scale/mean_file/crop_size/mirror in its data param."""
    for layer in net.layers:
        param_name = _DATA_LAYER_PARAMS.get(layer.type)
        if param_name is None:
            continue
        sub = getattr(layer, param_name)
        if any(sub.HasField(name) for name in _LEGACY_TRANSFORM_FIELDS):
            return True
    return False


def upgrade_net_data_transformation(net: caffe_pb2.NetParameter) -> bool:
    """Move transformation fields of V1 data layers into transform_param (in place).

    Caffe touches (and so creates, possibly empty) the data param and transform_param of every
    DATA/IMAGE_DATA/WINDOW_DATA layer once the net needs this upgrade; we do the same so the
    upgraded text matches Caffe's.
    """
    if not net_needs_data_upgrade(net):
        return False
    for layer in net.layers:
        param_name = _DATA_LAYER_PARAMS.get(layer.type)
        if param_name is None:
            continue
        sub = getattr(layer, param_name)
        sub.SetInParent()
        layer.transform_param.SetInParent()
        for name in _LEGACY_TRANSFORM_FIELDS:
            if sub.HasField(name):
                setattr(layer.transform_param, name, getattr(sub, name))
                sub.ClearField(name)
    return True


# --------------------------------------------------------------------------------------------
# V1 -> V2
# --------------------------------------------------------------------------------------------

# V1 enum -> current type string (Caffe's UpgradeV1LayerType).
V1_LAYER_TYPES = {
    _V1.NONE: "", _V1.ABSVAL: "AbsVal", _V1.ACCURACY: "Accuracy", _V1.ARGMAX: "ArgMax",
    _V1.BNLL: "BNLL", _V1.CONCAT: "Concat", _V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    _V1.CONVOLUTION: "Convolution", _V1.DECONVOLUTION: "Deconvolution", _V1.DATA: "Data",
    _V1.DROPOUT: "Dropout", _V1.DUMMY_DATA: "DummyData", _V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    _V1.ELTWISE: "Eltwise", _V1.EXP: "Exp", _V1.FLATTEN: "Flatten", _V1.HDF5_DATA: "HDF5Data",
    _V1.HDF5_OUTPUT: "HDF5Output", _V1.HINGE_LOSS: "HingeLoss", _V1.IM2COL: "Im2col",
    _V1.IMAGE_DATA: "ImageData", _V1.INFOGAIN_LOSS: "InfogainLoss",
    _V1.INNER_PRODUCT: "InnerProduct", _V1.LRN: "LRN", _V1.MEMORY_DATA: "MemoryData",
    _V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", _V1.MVN: "MVN",
    _V1.POOLING: "Pooling", _V1.POWER: "Power", _V1.RELU: "ReLU", _V1.SIGMOID: "Sigmoid",
    _V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", _V1.SILENCE: "Silence",
    _V1.SOFTMAX: "Softmax", _V1.SOFTMAX_LOSS: "SoftmaxWithLoss", _V1.SPLIT: "Split",
    _V1.SLICE: "Slice", _V1.TANH: "TanH", _V1.WINDOW_DATA: "WindowData",
    _V1.THRESHOLD: "Threshold",
}

# Every *_param sub-message of V1LayerParameter has a namesake in LayerParameter; Caffe copies
# each one that is set.
V1_PARAM_FIELDS = tuple(f.name for f in _V1.DESCRIPTOR.fields if f.name.endswith("_param"))


def net_needs_v1_to_v2_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when the net still uses ``layers {}`` (V1) entries."""
    return len(net.layers) > 0


def upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter,
                     problems: Problems = None) -> caffe_pb2.LayerParameter:
    """The current LayerParameter for a V1 layer (Caffe's UpgradeV1LayerParameter).

    blobs_lr / weight_decay / param names / blob_share_mode become ``param {}`` entries (one per
    blob, created as far as the longest list reaches); parameter blobs are carried over, so
    binary models keep their weights.
    """
    out = caffe_pb2.LayerParameter()
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    out.include.extend(v1.include)
    out.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        if v1.type not in V1_LAYER_TYPES:
            raise PrototxtError(f"V1 layer '{v1.name}' has unknown type number {v1.type}")
        out.type = V1_LAYER_TYPES[v1.type]
    out.blobs.extend(v1.blobs)

    def param_at(i: int) -> caffe_pb2.ParamSpec:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        param_at(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        param_at(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(
            _V1.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        param_at(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param_at(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for name in V1_PARAM_FIELDS:
        if v1.HasField(name):
            getattr(out, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        _note(problems, "Input NetParameter has V0 layer -- ignoring.")
    return out


def upgrade_v1_net(net: caffe_pb2.NetParameter, problems: Problems = None) -> bool:
    """V1 ``layers {}`` -> ``layer {}`` in place (Caffe's UpgradeV1Net); other fields are kept."""
    if not net_needs_v1_to_v2_upgrade(net):
        return False
    if len(net.layer) > 0:
        raise PrototxtError(
            "the net defines both 'layer' and 'layers' entries; refusing to upgrade",
            hint="the current format is layer { type: \"Convolution\" ... }; rewrite the old "
                 "layers { type: CONVOLUTION ... } entries in that form")
    old_layers = list(net.layers)
    net.ClearField("layers")
    for i, v1 in enumerate(old_layers):
        layer_problems: List[str] = []
        net.layer.append(upgrade_v1_layer(v1, layer_problems))
        if layer_problems:
            if problems is not None:
                problems.extend(layer_problems)
            _note(problems, f"Upgrade of input layer {i} failed.")
    return True


# --------------------------------------------------------------------------------------------
# input fields -> Input layer
# --------------------------------------------------------------------------------------------

def net_needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when the net declares ``input:`` fields."""
    return len(net.input) > 0


def upgrade_net_input(net: caffe_pb2.NetParameter) -> bool:
    """``input`` + ``input_shape``/``input_dim`` -> a first layer ``Input`` named "input".

    As in Caffe's UpgradeNetInput: shapes win over dims, dims are read four per input, and
    inputs without any shape (old caffemodels) are simply dropped.
    """
    if not net_needs_input_upgrade(net):
        return False
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        count = len(net.input)
        # Caffe indexes past the end here (undefined); we say what is missing instead.
        if has_shape and len(net.input_shape) < count:
            raise PrototxtError(
                f"the net declares {count} inputs but only {len(net.input_shape)} input_shape",
                hint="give one input_shape { dim: ... } per input")
        if not has_shape and len(net.input_dim) < 4 * count:
            raise PrototxtError(
                f"the net declares {count} inputs but {len(net.input_dim)} input_dim values",
                hint="give four input_dim values (N, C, H, W) per input, or use input_shape")
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layer.input_param.SetInParent()
        existing = list(net.layer)
        net.ClearField("layer")
        net.layer.append(layer)
        net.layer.extend(existing)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
    return True


# --------------------------------------------------------------------------------------------
# BatchNorm with three param {} entries
# --------------------------------------------------------------------------------------------

def net_needs_batchnorm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when a BatchNorm layer declares exactly three ``param`` entries (the old style)."""
    return any(layer.type == "BatchNorm" and len(layer.param) == 3 for layer in net.layer)


def upgrade_net_batchnorm(net: caffe_pb2.NetParameter) -> bool:
    """Set lr_mult and decay_mult to 0 in old-style BatchNorm params (Caffe's UpgradeNetBatchNorm).

    The BVLC master keeps the param entries (and their names, so sharing still works) and only
    zeroes the multipliers; the statistics are not learned by gradient descent.
    """
    changed = False
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
            changed = True
    return changed


# --------------------------------------------------------------------------------------------
# the whole net
# --------------------------------------------------------------------------------------------

def net_needs_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when any of the net upgrades applies (Caffe's NetNeedsUpgrade)."""
    return (net_needs_v0_to_v1_upgrade(net) or net_needs_v1_to_v2_upgrade(net)
            or net_needs_data_upgrade(net) or net_needs_input_upgrade(net)
            or net_needs_batchnorm_upgrade(net))


class _NetUpgrade(NamedTuple):
    """One step of Caffe's UpgradeNetAsNeeded: when it applies, what it upgrades, how."""

    needed: Callable[[caffe_pb2.NetParameter], bool]
    apply: Callable[[caffe_pb2.NetParameter, Problems], object]
    name: str  # recorded in UpgradeReport.applied
    what: str  # "... specified using deprecated <what>"
    problem_line: Optional[str]  # logged when the step reported problems
    note: Optional[str]  # Caffe's warning after the step
    done: str  # Caffe's INFO line when the step reported no problems


_LEGACY_NOTE = ("Note that future Caffe releases will not support {}; use upgrade_net_proto_text "
                "for prototxt and upgrade_net_proto_binary for model weights to upgrade this and "
                "any other net protos to the new format.")

# Caffe's order. The V1 note is a warning although BVLC master only logs it at INFO (older
# Caffe warned, and a warning is what tells users their file is legacy).
_NET_UPGRADES = (
    _NetUpgrade(net_needs_v0_to_v1_upgrade, upgrade_v0_net, "V0LayerParameter",
                "V0LayerParameter",
                "Warning: had one or more problems upgrading V0NetParameter to NetParameter "
                "(see above); continuing anyway.", _LEGACY_NOTE.format("V0NetParameter"),
                "Successfully upgraded file specified using deprecated V0LayerParameter"),
    _NetUpgrade(net_needs_data_upgrade, lambda net, _: upgrade_net_data_transformation(net),
                "data transformation", "transformation parameters", None,
                "Note that future Caffe releases will only support transform_param messages "
                "for transformation fields.",
                "Successfully upgraded file specified using deprecated data transformation "
                "parameters."),
    _NetUpgrade(net_needs_v1_to_v2_upgrade, upgrade_v1_net, "V1LayerParameter",
                "V1LayerParameter",
                "Warning: had one or more problems upgrading V1LayerParameter (see above); "
                "continuing anyway.", _LEGACY_NOTE.format("V1LayerParameter"),
                "Successfully upgraded file specified using deprecated V1LayerParameter"),
    _NetUpgrade(net_needs_input_upgrade, lambda net, _: upgrade_net_input(net), "input fields",
                "input fields", None,
                "Note that future Caffe releases will only support input layers and not input "
                "fields.",
                "Successfully upgraded file specified using deprecated input fields."),
    _NetUpgrade(net_needs_batchnorm_upgrade, lambda net, _: upgrade_net_batchnorm(net),
                "BatchNorm params", None, None, None,
                "Successfully upgraded batch norm layers using deprecated params."),
)


def upgrade_net_as_needed(net: caffe_pb2.NetParameter, source: str = "<net>") -> UpgradeReport:
    """Apply every needed net upgrade in Caffe's order, logging as Caffe's UpgradeNetAsNeeded."""
    report = UpgradeReport()
    for step in _NET_UPGRADES:
        if not step.needed(net):
            continue
        if step.what is None:
            logger.info("Attempting to upgrade batch norm layers using deprecated params: %s",
                        source)
        else:
            logger.info("Attempting to upgrade input file specified using deprecated %s: %s",
                        step.what, source)
        before = len(report.problems)
        step.apply(net, report.problems)
        report.applied.append(step.name)
        if step.problem_line and len(report.problems) > before:
            logger.error(step.problem_line)
        else:
            logger.info(step.done)
        if step.note:
            logger.warning(step.note)
    return report


# --------------------------------------------------------------------------------------------
# solver
# --------------------------------------------------------------------------------------------

_SOLVER_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}


def solver_needs_type_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    """True when the solver sets the old ``solver_type`` enum."""
    return solver.HasField("solver_type")


def upgrade_solver_type(solver: caffe_pb2.SolverParameter) -> bool:
    """``solver_type: NESTEROV`` -> ``type: "Nesterov"`` in place (Caffe's UpgradeSolverType)."""
    if not solver_needs_type_upgrade(solver):
        return False
    if solver.HasField("type"):
        raise PrototxtError(
            "the solver sets both the old 'solver_type' (enum) and the new 'type' (string)",
            hint=f"keep only type: \"{_SOLVER_TYPES.get(solver.solver_type, 'SGD')}\"")
    solver.type = _SOLVER_TYPES[solver.solver_type]
    solver.ClearField("solver_type")
    return True


def upgrade_snapshot_prefix(solver: caffe_pb2.SolverParameter, param_file: str,
                            is_directory: Callable[[str], bool] = os.path.isdir) -> bool:
    """Derive snapshot_prefix from the solver file name (Caffe's UpgradeSnapshotPrefixProperty).

    Unset -> the solver path without its extension; a directory -> that directory joined with
    the solver file's stem. Relative paths stay relative to the current directory, as in Caffe.
    """
    stem_path = os.path.splitext(param_file)[0]
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = stem_path
        logger.info("snapshot_prefix was not specified and is set to %s", solver.snapshot_prefix)
        return True
    if is_directory(solver.snapshot_prefix):
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix,
                                              os.path.basename(stem_path))
        logger.info("snapshot_prefix was a directory and is replaced to %s",
                    solver.snapshot_prefix)
        return True
    return False


def upgrade_solver_as_needed(solver: caffe_pb2.SolverParameter,
                             source: str = "<solver>") -> UpgradeReport:
    """Apply the solver type upgrade, logging as Caffe's UpgradeSolverAsNeeded."""
    report = UpgradeReport()
    if solver_needs_type_upgrade(solver):
        logger.info("Attempting to upgrade input file specified using deprecated "
                    "'solver_type' field (enum)': %s", source)
        upgrade_solver_type(solver)
        report.applied.append("solver_type")
        logger.info("Successfully upgraded file specified using deprecated 'solver_type' field "
                    "(enum) to 'type' field (string).")
        logger.warning("Note that future Caffe releases will only support 'type' field "
                       "(string) for a solver's type.")
    return report


def _is_repeated(descriptor) -> bool:
    # FieldDescriptor.label is deprecated in new protobuf releases; is_repeated replaces it.
    repeated = getattr(descriptor, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return descriptor.label == descriptor.LABEL_REPEATED
