"""Layer types of well-known Caffe forks.

* ``Axpy`` (SENet, hujie-frank/SENet ``axpy_layer.cpp``): ``top = a * x + y`` with ``a`` of shape
  (N, C) or (N, C, 1, 1) scaling each channel of ``x``; it closes every SE block of SE-ResNet and
  SE-ResNeXt.
* ``ConvolutionDepthwise`` (ShuffleNet/MobileNet forks) and ``DepthwiseConvolution``: a
  ``Convolution`` with one group per input channel, read from ``convolution_param`` whatever its
  ``group`` says (the forks' prototxts leave it at 1); weight (num_output, 1, kh, kw) as the
  forks store it.
* ``ShuffleChannel`` (ShuffleNet v1/v2, farmingyard/ShuffleNet ``shuffle_channel_layer.cpp``;
  ``shuffle_channel_param`` is field 164 there and in our caffe.proto): the C channels, seen as a
  ``group`` x C/group grid, are read out column by column.

Fork types whose parameter block is not in our caffe.proto (ROIPooling's ``roi_pooling_param``,
BN, Interp, Upsample) are not here; the parser names them as a fork's (see prototxt.py).
"""
from __future__ import annotations

import torch

from ..registry import LAYERS
from .base import Layer
from .vision import Convolution


@LAYERS.register("Axpy")
class Axpy(Layer):
    """SENet's Axpy: bottoms (a, x, y) -> a * x + y, ``a`` one scale per sample and channel."""

    num_bottoms = (3, 3)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        a, x, y = (tuple(s) for s in bottom_shapes)
        # The fork's Reshape checks: a matches x in (N, C) and is 1x1 spatially; x and y agree.
        if len(x) < 2 or len(a) < 2 or a[:2] != x[:2] or any(d != 1 for d in a[2:]):
            raise self.error(f"bottom 0 (the scale) has shape {a}; it must be (N, C) or "
                             f"(N, C, 1, 1) of bottom 1's {x}", "feed the SE block's sigmoid output")
        if x != y:
            raise self.error(f"bottom 1 has shape {x} but bottom 2 has {y}",
                             "x and y must have the same shape")

    def forward(self, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = a.reshape(tuple(a.shape[:2]) + (1,) * (x.dim() - 2))
        return torch.addcmul(y, scale, x)


@LAYERS.register("ConvolutionDepthwise", "DepthwiseConvolution")
class ConvolutionDepthwise(Convolution):
    """A Convolution with ``group`` = the input channels (the depthwise forks' layer)."""

    def __init__(self, param, bottom_shapes, ctx):
        shape = tuple(bottom_shapes[0]) if bottom_shapes else ()
        axis = int(param.convolution_param.axis)
        if -len(shape) <= axis < len(shape):  # otherwise Convolution names the bad axis
            depthwise = type(param)()
            depthwise.CopyFrom(param)
            depthwise.convolution_param.group = int(shape[axis])
            param = depthwise
        super().__init__(param, bottom_shapes, ctx)


@LAYERS.register("ShuffleChannel")
class ShuffleChannel(Layer):
    """ShuffleNet's channel shuffle: (N, g * k, ...) -> channel ``j * g + i`` takes ``i * k + j``."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.group = int(param.shuffle_channel_param.group)
        shape = tuple(bottom_shapes[0])
        if self.group <= 0:  # the fork's CHECK_GT(group_, 0)
            raise self.error(f"group {self.group} must be at least 1", "set shuffle_channel_param { group: G }")
        if len(shape) < 2 or shape[1] % self.group:  # the fork's "Wrong group size." check
            raise self.error(f"group {self.group} does not divide the {shape[1] if len(shape) > 1 else 0} "
                             "channels of the bottom", "choose a group that divides the channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        rest = tuple(x.shape[2:])
        grid = x.reshape((n, self.group, c // self.group) + rest)
        return grid.transpose(1, 2).reshape(tuple(x.shape))
