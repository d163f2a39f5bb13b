"""Net inputs: the ``Input`` layer, whose tops are fed from outside (pycaffe ``net.blobs[...]``)."""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..registry import LAYERS
from .base import Layer, Shape


@LAYERS.register("Input")
class Input(Layer):
    """Declares net inputs with ``input_param { shape {...} }``; one shape for all tops or one each."""

    num_bottoms = (0, 0)
    num_tops = (1, None)
    blob_names = ()
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        # No shape at all: empty blobs, to be reshaped from Python before use (as in Caffe).
        shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape] or [(0,)]
        self.shapes: List[Shape] = self.per_top(shapes, len(param.top), "input shapes",
                                                "shape { }")

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return list(self.shapes)

    def forward(self, *bottoms: torch.Tensor):
        raise RuntimeError("Input layers are fed by the net, not run")
