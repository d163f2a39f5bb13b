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
        shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape]
        n = len(param.top)
        if len(shapes) not in (0, 1, n):
            raise self.error(f"has {n} tops but {len(shapes)} input shapes",
                             "give one 'shape { }' for all tops or one per top")
        # No shape at all: empty blobs, to be reshaped from Python before use (as in Caffe).
        self.shapes: List[Shape] = [shapes[0]] * n if len(shapes) == 1 else (shapes or [(0,)] * n)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return list(self.shapes)

    def forward(self, *bottoms: torch.Tensor):
        raise RuntimeError("Input layers are fed by the net, not run")
