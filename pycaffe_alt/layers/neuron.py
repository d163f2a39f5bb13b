"""Neuron layers: element-wise maps of one bottom to one top of the same shape (Caffe's NeuronLayer).

Every neuron layer may run in place (``top == bottom`` in the prototxt); the net keeps the final
value in the blob, so the layers here always return a new tensor and never write into their input.
Backward comes from autograd; the formulas are written so that autograd's gradient equals Caffe's
``Backward_cpu`` at the points where Caffe makes a choice (kinks: ReLU/PReLU at 0 take the negative
side, Clip passes the gradient at both bounds, AbsVal has gradient 0 at 0).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import caffe_rng
from ..proto import caffe_pb2
from ..registry import LAYERS
from .base import Layer, Shape


class NeuronLayer(Layer):
    """One bottom, one top of the same shape, no parameters unless a subclass adds them.

    In-place chains: Caffe's backward of most neuron layers reads the bottom/top *blob*, which later
    in-place layers have overwritten (e.g. ReLU then an in-place Scale: Caffe's ReLU mask comes from
    the scaled values). The net then calls ``inplace_backward(top_diff, buffer)`` (see base.py).
    It is defined only where Caffe's formula on the layer's own output is the true gradient (ReLU,
    ELU, Sigmoid, TanH, Exp). Power, Log, BNLL and Clip read their bottom, which in place already
    holds their output, so Caffe's in-place gradient is wrong even alone; we keep the true
    gradient for them rather than copy that defect.
    AbsVal refuses to run in place, as Caffe's. Swish would need its saved input as well.
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()


# -- pure formulas ------------------------------------------------------------------------------
def leaky_relu(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """Caffe's ReLU: ``x`` where ``x > 0`` else ``negative_slope * x`` (gradient at 0 = slope)."""
    if negative_slope == 0.0:
        return torch.relu(x)
    return F.leaky_relu(x, negative_slope)


def caffe_power(x: torch.Tensor, power: float, scale: float, shift: float) -> torch.Tensor:
    """``(shift + scale * x) ** power`` with Caffe's shortcuts.

    Caffe's PowerLayer outputs a constant when ``power * scale == 0`` (1 if power is 0, else
    ``shift ** power``) and then propagates a zero gradient; a constant tensor gives exactly that.
    Elsewhere Caffe's backward is the exact derivative (it divides the output by the base, which
    only differs at a zero base, where Caffe produces 0/0).
    """
    if power * scale == 0.0:
        return torch.full_like(x, 1.0 if power == 0.0 else _c_pow(shift, power))
    y = x
    if scale != 1.0:
        y = y * scale
    if shift != 0.0:
        y = y + shift
    if power == 2.0:
        return y * y
    if power != 1.0:
        y = torch.pow(y, power)
    return y if y is not x else x.clone()


def _c_pow(base: float, exponent: float) -> float:
    """C's ``pow``: NaN (not an exception) for a negative base with a fractional exponent."""
    try:
        return math.pow(base, exponent)
    except (ValueError, OverflowError):
        return float("nan") if base < 0 else float("inf")


def log_base_scale(layer: Layer, base: float) -> float:
    """``ln(base)`` for Exp/Log (base -1 means e); Caffe requires a positive base other than 1 for Log."""
    if base == -1.0:
        return 1.0
    if not base > 0:
        raise layer.error(f"base must be strictly positive (or -1 for e), got {base}",
                          "set a positive base, or leave it unset for the natural base e")
    return math.log(base)


# -- layers -------------------------------------------------------------------------------------
@LAYERS.register("ReLU")
class ReLU(NeuronLayer):
    """``max(x, 0) + negative_slope * min(x, 0)``.

    ``fixed_support``: ``None``, or a callable ``f(x) -> bool mask`` the alternation solver sets
    to fix the support (a ReLU is a HardThreshold with beta 0); the layer then outputs
    ``x`` where the mask is on and ``negative_slope * x`` elsewhere, linear in ``x`` (eq. 13).
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.negative_slope = float(param.relu_param.negative_slope)
        self.fixed_support: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_support is not None:
            m = self.fixed_support(x).detach().to(device=x.device, dtype=torch.bool)
            return torch.where(m, x, x * self.negative_slope)
        return leaky_relu(x, self.negative_slope)

    def inplace_backward(self, top_diff: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return torch.where(final > 0, top_diff, top_diff * self.negative_slope)


@LAYERS.register("PReLU")
class PReLU(NeuronLayer):
    """ReLU with a learned negative slope per channel (axis 1) or one shared by all channels."""

    blob_names = ("slope",)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.prelu_param
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise self.error(f"needs a bottom with at least 2 axes (N, C, ...), got shape {shape}",
                             "put the channels on axis 1, e.g. with a Reshape layer")
        self.channel_shared = bool(p.channel_shared)
        self.channels = int(shape[1])
        # Caffe's default slope filler: constant 0.25.
        filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(type="constant",
                                                                                 value=0.25)
        # Caffe stores the shared slope as a 0-axis blob (count 1), else one value per channel.
        self.add_blob(() if self.channel_shared else (self.channels,), filler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.slope
        if self.channel_shared:
            slope = slope.reshape(1)
        elif x.dim() < 2 or x.shape[1] != self.channels:
            raise self.error(f"has {self.channels} slopes but the bottom has shape {tuple(x.shape)}",
                             "the channel count (axis 1) must not change after setup")
        # F.prelu's gradient matches Caffe's: the slope term for x <= 0, identity for x > 0.
        return F.prelu(x, slope)


@LAYERS.register("ELU")
class ELU(NeuronLayer):
    """``x`` for ``x > 0``, ``alpha * (exp(x) - 1)`` otherwise."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.alpha = float(param.elu_param.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x, self.alpha)

    def inplace_backward(self, top_diff: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return top_diff * torch.where(final > 0, torch.ones_like(final), final + self.alpha)


@LAYERS.register("Sigmoid")
class Sigmoid(NeuronLayer):
    """Logistic function ``1 / (1 + exp(-x))``."""

    backward_reads_top = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def inplace_backward(self, top_diff: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return top_diff * final * (1 - final)


@LAYERS.register("TanH")
class TanH(NeuronLayer):
    """Hyperbolic tangent."""

    backward_reads_top = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    def inplace_backward(self, top_diff: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return top_diff * (1 - final * final)


@LAYERS.register("AbsVal")
class AbsVal(NeuronLayer):
    """``|x|``; the gradient is ``sign(x)``, 0 at 0, as in Caffe."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        # AbsValLayer::LayerSetUp: CHECK_NE(top[0], bottom[0]): Caffe refuses to run it in
        # place (its backward reads the bottom, which in place would hold |x|). The net has
        # already refused an in-place blob with other readers, so the names decide it.
        if len(param.top) and len(param.bottom) and param.top[0] == param.bottom[0]:
            raise self.error(f"cannot run in place (top and bottom are both '{param.top[0]}'); "
                             "Caffe's AbsVal layer does not allow in-place computation",
                             "give the layer a top of its own")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


@LAYERS.register("Power")
class Power(NeuronLayer):
    """``(shift + scale * x) ** power``."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_power(x, self.power, self.scale, self.shift)


@LAYERS.register("Exp")
class Exp(NeuronLayer):
    """``base ** (shift + scale * x)``; base -1 (the default) means e."""

    backward_reads_top = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.exp_param
        log_base = log_base_scale(self, float(p.base))
        # Caffe folds the constants: y = outer * exp(inner * x).
        self.inner_scale = log_base * float(p.scale)
        # math.exp raises past double's range; Caffe's exp gives inf.
        exponent = log_base * float(p.shift)
        self.outer_scale = 1.0 if p.shift == 0 else (math.exp(exponent) if exponent < 709.0
                                                      else math.inf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp(x * self.inner_scale if self.inner_scale != 1.0 else x)
        return y * self.outer_scale if self.outer_scale != 1.0 else y

    def inplace_backward(self, top_diff: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return top_diff * final * self.inner_scale


@LAYERS.register("Log")
class Log(NeuronLayer):
    """``log_base(shift + scale * x)``; base -1 (the default) means e."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.log_param
        log_base = log_base_scale(self, float(p.base))
        if log_base == 0.0:
            raise self.error("base 1 has no logarithm", "use a positive base other than 1")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(p.scale), float(p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale if self.scale != 1.0 else x
        y = y + self.shift if self.shift != 0.0 else y
        y = torch.log(y)
        return y * self.base_scale if self.base_scale != 1.0 else y


@LAYERS.register("BNLL")
class BNLL(NeuronLayer):
    """Binomial normal log likelihood ``log(1 + exp(x))``, computed without overflow.

    Caffe evaluates ``x + log(1 + exp(-x))`` for ``x > 0`` and ``log(1 + exp(x))`` otherwise, and
    its gradient is ``sigmoid(min(x, 50))``; ``F.softplus`` (linear beyond x = 20, where float
    rounding already makes both equal to x) has the same values and gradient.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


@LAYERS.register("Threshold")
class Threshold(NeuronLayer):
    """1 where ``x > threshold`` else 0. Caffe implements no backward (its Backward_cpu is
    NOT_IMPLEMENTED): where the net's backward runs this layer it is refused, see
    ``has_backward``; elsewhere no gradient flows."""

    has_backward = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.threshold = float(param.threshold_param.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


@LAYERS.register("Dropout")
class Dropout(NeuronLayer):
    """TRAIN: zero each unit with probability ``dropout_ratio``, scale survivors by 1/(1-ratio).

    TEST: identity (Caffe's inverted dropout scales at train time only; BVLC's DropoutParameter
    has no ``scale_train`` switch). The phase is read at forward time from ``self.training``.
    Fork fields: py-faster-rcnn's ``scale_train: false`` (scale at TEST instead) and Bayesian
    SegNet's ``sample_weights_test: true`` (drop at TEST as at TRAIN).
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.ratio = float(param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {self.ratio}",
                             "set dropout_ratio to the probability of dropping a unit, e.g. 0.5")
        # DropoutLayer: threshold_ is the float ratio; scale_ = 1 / (1 - threshold_) in double,
        # stored as a float; units are kept with probability 1. - threshold_ (a double).
        self.keep = 1.0 - float(np.float32(self.ratio))
        self.scale = float(np.float32(1.0 / self.keep))
        # caffe-fast-rcnn's scale_train: false moves the scaling to TEST, where the fork
        # multiplies by 1 / scale_ (in double, stored as a float).
        self.scale_train = bool(param.dropout_param.scale_train)
        self.test_scale = float(np.float32(1.0 / self.scale))
        # caffe-segnet's sample_weights_test: TEST drops units too (Bayesian SegNet's Monte
        # Carlo samples), exactly as TRAIN does.
        self.sample_test = bool(param.dropout_param.sample_weights_test)

    @property
    def replays_exactly(self) -> bool:
        return not (self.training or self.sample_test)  # otherwise each pass draws a new mask

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        # The top has the bottom's shape (NeuronLayer::Reshape). Not the default fake forward:
        # that would draw a mask from Caffe's stream, which DropoutLayer::Reshape never does, so
        # the first real forward would get the seed's second mask instead of its first.
        return [tuple(bottom_shapes[0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not self.sample_test:
            return x.clone() if self.scale_train else x * self.test_scale
        scale = self.scale if self.scale_train else 1.0
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            y = F.dropout(x, self.ratio, training=True)  # survivors scaled by 1 / (1 - ratio)
            return y if self.scale_train else y * self.keep
        # Caffe's Forward_cpu: caffe_rng_bernoulli(count, 1. - threshold_, mask) from Caffe's
        # stream, one draw per unit in (N, C, H, W) order, then top = bottom * mask * scale_.
        keep = caffe_rng.stream().bernoulli(x.numel(), self.keep)
        mask = torch.from_numpy(keep).view(x.shape).to(x.dtype)
        return x * (mask * scale if scale != 1.0 else mask)


@LAYERS.register("Clip")
class Clip(NeuronLayer):
    """``min(max(x, min), max)``; the gradient passes where ``min <= x <= max`` (bounds included)."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("needs clip_param { min: ... max: ... }", "give both bounds")
        self.min, self.max = float(p.min), float(p.max)
        if math.isnan(self.min) or math.isnan(self.max):
            raise self.error(f"clip_param min {self.min} / max {self.max} must be numbers, not NaN",
                             "give numeric bounds (inf is allowed)")
        if self.min > self.max:
            raise self.error(f"clip_param min ({self.min}) is greater than max ({self.max})",
                             "swap the bounds")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.min, self.max)


@LAYERS.register("Swish")
class Swish(NeuronLayer):
    """``x * sigmoid(beta * x)``."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.beta = float(param.swish_param.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x * self.beta if self.beta != 1.0 else x)

