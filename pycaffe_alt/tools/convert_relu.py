"""convert_relu: rewrite a ReLU net (and its caffemodel) into the paper's hard-threshold form.

    convert_relu IN.prototxt OUT.prototxt [--weights IN.caffemodel --out-weights OUT.caffemodel]
                 [--fold-bias] [--mode RELU_BIAS|THRESHOLD] [--output KEEP|SHIFT]

Every ``ReLU`` with ``negative_slope`` 0 becomes a ``HardThreshold`` (leaky ReLUs are kept, with a
warning: they have no hard-threshold form). With the default ``--mode RELU_BIAS`` and beta = 0 the
converted net computes exactly the original function, and trains exactly like it: beta is frozen
(lr_mult 0) because the preceding layer's bias already plays its role.

``--fold-bias`` moves the bias of the Convolution/InnerProduct/Deconvolution right before a ReLU
into beta (beta = -bias: ``max(Wx + b, 0) = max(Wx - beta, 0)``), zeroes that bias and freezes it
(lr_mult 0), and gives beta the bias's lr_mult/decay_mult. That is the paper's parameterisation
(eq. 3/13: the layers are linear, beta only sets the threshold). A bias is folded only when the
ReLU reads the layer's output directly and nothing else reads that (pre-activation) value.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import prototxt
from ..errors import CaffeError, NetError
from ..fileio import check_output_file
from ..log import setup_tool_logging
from ..proto import caffe_pb2
from ..weights import array_to_blob, blob_to_array
from .cli import parse_args

logger = logging.getLogger("pycaffe_alt")

_FOLDABLE = ("Convolution", "InnerProduct", "Deconvolution")
_HT = caffe_pb2.HardThresholdParameter


@dataclass
class Conversion:
    """One ReLU turned HardThreshold: its name, and the layer whose bias was folded (or None)."""

    relu: str
    producer: Optional[str]      # the layer computing the ReLU's bottom, when known
    folded: bool                 # beta = -producer bias (and that bias zeroed)
    channels: Optional[int]      # beta's length when known from the producer's num_output


def _num_output(layer) -> Optional[int]:
    if layer.type in ("Convolution", "Deconvolution"):
        return int(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return int(layer.inner_product_param.num_output)
    return None


def _rules(layer) -> str:
    return f"{layer.include}|{layer.exclude}"


def _producer(layers, j: int, blob: str) -> Optional[int]:
    """Index of the layer before ``j`` that last wrote ``blob`` (None when unknown or ambiguous).

    A writer with include/exclude rules other than the ReLU's may not run in every phase the ReLU
    runs in (another layer then produces the blob): such a case is treated as ambiguous.
    """
    writers = [i for i in range(j) if blob in layers[i].top]
    if not writers:
        return None
    i = writers[-1]
    has_rules = len(layers[i].include) or len(layers[i].exclude)
    if has_rules and _rules(layers[i]) != _rules(layers[j]):
        return None
    return i


def _other_readers(layers, i: int, j: int, blob: str) -> List[str]:
    """Layers other than ``j`` that read the value ``layers[i]`` wrote into ``blob``."""
    readers = []
    for k in range(i + 1, len(layers)):
        if k != j and blob in layers[k].bottom:
            readers.append(layers[k].name)
        if blob in layers[k].top:  # rewritten (in place): later readers see the new value
            break
    return readers


def _foldable(layers, i: int, j: int, blob: str) -> Tuple[bool, str]:
    p = layers[i]
    if p.type not in _FOLDABLE:
        return False, f"its bottom comes from a {p.type} layer, not a Convolution/InnerProduct"
    if p.type == "InnerProduct" and p.inner_product_param.axis not in (1,):
        return False, "the InnerProduct's axis is not 1 (beta is per channel on axis 1)"
    bias_term = p.inner_product_param.bias_term if p.type == "InnerProduct" \
        else p.convolution_param.bias_term
    if not bias_term:
        return False, f"'{p.name}' has no bias"
    if len(p.param) > 1 and p.param[1].name:
        return False, f"'{p.name}' shares its bias (param name '{p.param[1].name}')"
    others = _other_readers(layers, i, j, blob)
    if others:
        return False, f"'{blob}' before the ReLU is also read by {', '.join(others)}"
    return True, ""


def convert_net(net: "caffe_pb2.NetParameter", mode: str = "RELU_BIAS", output: str = "KEEP",
                fold_bias: bool = False) -> Tuple["caffe_pb2.NetParameter", List[Conversion]]:
    """The hard-threshold form of ``net`` and the list of conversions made (input untouched)."""
    if mode not in _HT.Mode.keys():
        raise NetError(f"unknown HardThreshold mode {mode!r}",
                       hint=f"use {' or '.join(_HT.Mode.keys())}")
    if output not in _HT.Output.keys():
        raise NetError(f"unknown HardThreshold output {output!r}",
                       hint=f"use {' or '.join(_HT.Output.keys())}")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    layers = out.layer
    plan: List[Conversion] = []
    for j, layer in enumerate(layers):
        if layer.type != "ReLU":
            continue
        if layer.relu_param.negative_slope != 0:
            logger.warning("convert_relu: layer '%s' is a leaky ReLU (negative_slope %g); kept as "
                           "ReLU", layer.name, layer.relu_param.negative_slope)
            continue
        if len(layer.bottom) != 1:
            continue  # a malformed ReLU: leave it for the net builder to report
        blob = layer.bottom[0]
        i = _producer(layers, j, blob)
        folded = False
        if fold_bias and i is not None:
            folded, why = _foldable(layers, i, j, blob)
            if not folded:
                logger.warning("convert_relu: layer '%s': bias not folded: %s", layer.name, why)
        elif fold_bias:
            logger.warning("convert_relu: layer '%s': bias not folded: no unique producer of '%s'",
                           layer.name, blob)
        layer.type = "HardThreshold"
        layer.ClearField("relu_param")
        ht = layer.hard_threshold_param
        ht.mode = _HT.Mode.Value(mode)
        ht.output = _HT.Output.Value(output)
        del layer.param[:]
        beta = layer.param.add()
        if folded:
            producer = layers[i]
            while len(producer.param) < 2:
                producer.param.add()
            bias = producer.param[1]
            # beta learns as the bias did; the (zero) bias is frozen.
            beta.lr_mult = bias.lr_mult if bias.HasField("lr_mult") else 1.0
            beta.decay_mult = bias.decay_mult if bias.HasField("decay_mult") else 1.0
            bias.lr_mult = 0.0
            bias.decay_mult = 0.0
        else:
            # The producer's bias keeps the role of -beta; a trainable beta would double it.
            beta.lr_mult = 0.0
            beta.decay_mult = 0.0
        plan.append(Conversion(layer.name, layers[i].name if i is not None else None, folded,
                               _num_output(layers[i]) if i is not None else None))
    return out, plan


def _beta_lengths_from_net(out_net: "caffe_pb2.NetParameter") -> Dict[str, int]:
    """Beta sizes of the converted net by building it (shape inference); {} when it cannot build."""
    from ..net import Net
    from ..layers.base import TEST

    try:
        net = Net(out_net, phase=TEST)
    except CaffeError:
        return {}
    return {name: int(m.beta.numel()) for name, m in net.layer_modules.items()
            if m.type == "HardThreshold"}


def convert_weights(weights: "caffe_pb2.NetParameter", out_net: "caffe_pb2.NetParameter",
                    plan: Sequence[Conversion]) -> "caffe_pb2.NetParameter":
    """The caffemodel of the converted net: beta blobs added, folded biases moved into beta."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(weights)
    by_name = {layer.name: layer for layer in out.layer}
    defs = {layer.name: layer for layer in out_net.layer}
    need_shapes = [c for c in plan if not c.folded and c.channels is None]
    built = _beta_lengths_from_net(out_net) if need_shapes else {}
    for c in plan:
        if c.folded:
            prod = by_name.get(c.producer)
            if prod is None or len(prod.blobs) < 2:
                raise NetError(f"the weights have no bias for layer '{c.producer}', needed to fold "
                               f"it into '{c.relu}'", hint="convert without --fold-bias, or give "
                               "the caffemodel that matches the prototxt")
            bias = blob_to_array(prod.blobs[1]).reshape(-1).astype(np.float32)
            beta = -bias
            prod.blobs[1].CopyFrom(array_to_blob(np.zeros_like(blob_to_array(prod.blobs[1]))))
        else:
            n = c.channels if c.channels is not None else built.get(c.relu)
            if n is None:
                logger.warning("convert_relu: beta of '%s' left out of the weights (its channel "
                               "count is unknown); it starts at its filler value 0", c.relu)
                continue
            beta = np.zeros(n, dtype=np.float32)
        layer = by_name.get(c.relu)
        if layer is None:
            layer = out.layer.add()
            by_name[c.relu] = layer
        layer.CopyFrom(defs[c.relu])
        del layer.blobs[:]
        layer.blobs.append(array_to_blob(beta))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_relu",
        description="Rewrite a ReLU net (and optionally its caffemodel) into HardThreshold form.")
    p.add_argument("input", metavar="IN.prototxt")
    p.add_argument("output", metavar="OUT.prototxt")
    p.add_argument("--weights", help="caffemodel of IN to convert as well")
    p.add_argument("--out-weights", dest="out_weights",
                   help="where to write the converted caffemodel")
    p.add_argument("--fold-bias", dest="fold_bias", action="store_true",
                   help="move the bias of the Convolution/InnerProduct before each ReLU into beta "
                        "(beta = -bias; the paper's form)")
    p.add_argument("--mode", default="RELU_BIAS", choices=list(_HT.Mode.keys()),
                   help="HardThreshold mode (RELU_BIAS: same function as the ReLU net)")
    p.add_argument("--output", dest="ht_output", default="KEEP", choices=list(_HT.Output.keys()),
                   help="THRESHOLD output: KEEP (eq. 9) or SHIFT (eq. 2)")
    args = parse_args(p, argv)
    setup_tool_logging()
    if bool(args.weights) != bool(args.out_weights):
        p.error("--weights and --out-weights go together")
    # Both outputs are checked before either is written (docs/bad_input.md).
    for out_path in (args.output, args.out_weights):
        if out_path:
            check_output_file(out_path, CaffeError)
    if args.out_weights and (os.path.abspath(args.out_weights) == os.path.abspath(args.output) or (
            os.path.exists(args.output) and os.path.exists(args.out_weights)
            and os.path.samefile(args.output, args.out_weights))):
        # The weights were written over the converted prototxt just written, without a word.
        raise CaffeError(f"OUT.prototxt and --out-weights are the same file ({args.output})",
                         hint="give the converted weights their own name, e.g. OUT.caffemodel")
    net = prototxt.read_net(args.input)
    out, plan = convert_net(net, args.mode, args.ht_output, args.fold_bias)
    converted = None
    if args.weights:
        # Read and convert the weights before writing anything: a corrupt caffemodel must not
        # leave a converted prototxt behind as if the run had succeeded.
        weights = prototxt.read_binary(args.weights, caffe_pb2.NetParameter())
        from ..upgrade import net_needs_upgrade, upgrade_net_as_needed

        if net_needs_upgrade(weights):
            upgrade_net_as_needed(weights, args.weights)
        converted = convert_weights(weights, out, plan)
    prototxt.write_text(out, args.output)
    folded = sum(c.folded for c in plan)
    print(f"convert_relu: {len(plan)} ReLU layer(s) -> HardThreshold ({args.mode}, "
          f"{args.ht_output}); "
          f"{folded} bias(es) folded into beta; wrote {args.output}")
    if converted is not None:
        prototxt.write_binary(converted, args.out_weights)
        print(f"convert_relu: wrote {args.out_weights}")
    return 0
