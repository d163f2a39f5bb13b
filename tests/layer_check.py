"""Helpers for layer tests: build one layer from prototxt text, check gradients in float64."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from google.protobuf import text_format

from pycaffe_alt.layers import LAYERS, TEST, LayerContext
from pycaffe_alt.proto import caffe_pb2


def make_layer(text: str, bottom_shapes: Sequence[Sequence[int]], phase: int = TEST):
    """A layer from a ``layer { ... }`` body in prototxt text, set up for the given bottom shapes."""
    param = caffe_pb2.LayerParameter()
    text_format.Parse(text, param)
    if not param.name:
        param.name = "under_test"
    cls = LAYERS.get(param.type)
    return cls(param, [tuple(s) for s in bottom_shapes], LayerContext(phase=phase))


def gradcheck_layer(layer, inputs: Sequence[torch.Tensor], *, grad_inputs: Optional[Sequence[bool]] = None,
                    params: bool = True, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3,
                    output_fn: Optional[Callable] = None) -> bool:
    """float64 finite-difference check of a layer's backward w.r.t. its inputs and parameter blobs.

    ``grad_inputs`` selects which bottoms are differentiated (labels are not). Inputs should be
    chosen away from kinks (e.g. |x| > eps for ReLU-like layers).
    """
    layer = layer.double()
    xs = [x.detach().double().clone() for x in inputs]
    if grad_inputs is None:
        grad_inputs = [True] * len(xs)
    for x, g in zip(xs, grad_inputs):
        x.requires_grad_(g)
    ps = [p for p in layer.blobs if p.requires_grad] if params else []
    n_x = len(xs)

    # gradcheck perturbs its inputs; parameters are passed as extra inputs and functional-ised.
    def functional(*args):
        xs_ = args[:n_x]
        # Use torch.func to call the layer with replaced parameters.
        names = [n for n, q in layer.named_parameters() if any(q is p for p in ps)]
        from torch.func import functional_call
        mapping = dict(zip(names, args[n_x:]))
        out = functional_call(layer, mapping, xs_)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        out = tuple(o for o in out if o.is_floating_point())
        return tuple(output_fn(o) for o in out) if output_fn else out

    args = list(xs) + [p.detach().double().clone().requires_grad_(True) for p in ps]
    return torch.autograd.gradcheck(functional, args, eps=eps, atol=atol, rtol=rtol)
