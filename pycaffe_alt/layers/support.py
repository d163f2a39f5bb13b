"""The paper's layers: positive hard-thresholding (``HardThreshold``) and fixed supports
(``SupportMask``).

Neither exists in BVLC Caffe; their parameters are ``hard_threshold_param`` (5201) and
``support_mask_param`` (5202) in our caffe.proto. docs/alternation.md gives the reasons for each
choice made here.

A trainer drives the layers through plain attributes, never global flags:

* ``HardThreshold.fixed_support``: ``None`` (threshold normally) or a callable ``f(q) -> bool mask``
  of ``q``'s shape; the layer then outputs ``m * q`` (or ``m * (q - beta)``) with ``m`` a constant,
  so the net is linear in each layer's weights (eq. 13); ``HardThreshold.learn_beta_fixed``
  gives beta the ReLU surrogate's gradient under a fixed support with output KEEP;
* ``HardThreshold.record_support`` / ``SupportMask.record_support``: ``None`` or a callable that
  forward calls with the support it computed (bool, detached), so a pass can store supports;
* ``SupportMask.support_provider``: the per-instance mask for source STORE, ``(q) -> mask``;
* ``SupportMask.reduce_sums``: for source BATCH, ``None`` or a callable applied to eq. 41's
  per-unit sums before thresholding (a distributed trainer all-reduces them there).

A ``fixed_support`` or ``support_provider`` that must do host work per batch (look the batch's
records up in a store) may have a ``prepare()`` method: the layer's :meth:`Layer.prepare_pass`
calls it before a compiled pass, so that the call inside the graph only returns tensors. Called
in an eager pass, the provider does that work itself.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..alternation.rules import (batch_support, batch_support_sums, channel_view,
                                 threshold_support)
from ..proto import caffe_pb2
from ..registry import LAYERS
from .base import Layer

SupportFn = Callable[[torch.Tensor], torch.Tensor]
RecordFn = Callable[[torch.Tensor], None]

_HT = caffe_pb2.HardThresholdParameter
_SM = caffe_pb2.SupportMaskParameter


class _ThresholdFn(torch.autograd.Function):
    """``z = m * q`` (KEEP) or ``m * (q - beta)`` (SHIFT) with ``m = (q > beta)``.

    Backward: ``dz/dq = m``; ``dz/dbeta = -m`` in both outputs. For SHIFT that is the exact
    derivative; for KEEP the exact one is zero almost everywhere (beta only moves the support),
    so we use the ReLU surrogate -m, which lets beta keep learning as it did during the ReLU
    warm-up (lr_mult 0 freezes it). Only the bool mask is saved, not ``q``.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, beta: torch.Tensor, shift: bool) -> torch.Tensor:
        m = q > beta
        ctx.save_for_backward(m)
        ctx.beta_shape = beta.shape
        return (q - beta) * m if shift else q * m

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (m,) = ctx.saved_tensors
        g = grad * m
        g_beta = None
        if ctx.needs_input_grad[1]:
            g_beta = -_sum_to(g, ctx.beta_shape)
        return g if ctx.needs_input_grad[0] else None, g_beta, None


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``g`` over the axes that ``shape`` broadcast (the gradient of a broadcast parameter)."""
    if len(shape) == 0:
        return g.sum()
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dim=dims, keepdim=True) if dims else g


def _prepare(provider: Optional[Callable]) -> None:
    prepare = getattr(provider, "prepare", None)
    if prepare is not None:
        prepare()


def _constant_mask(layer: Layer, m: torch.Tensor, q: torch.Tensor, what: str) -> torch.Tensor:
    """A support given from outside, checked against ``q`` and made a constant of ``q``'s dtype."""
    if not isinstance(m, torch.Tensor):
        raise layer.error(f"{what} returned {type(m).__name__}, not a tensor",
                          "return a bool tensor of the bottom's shape")
    try:
        torch.broadcast_shapes(tuple(m.shape), tuple(q.shape))
    except RuntimeError:
        raise layer.error(f"{what} gave a mask of shape {tuple(m.shape)} for a bottom of shape "
                          f"{tuple(q.shape)}", "the mask must have (or broadcast to) the "
                          "bottom's shape") from None
    if m.dim() > q.dim():
        raise layer.error(f"{what} gave a {m.dim()}-axis mask for a {q.dim()}-axis bottom")
    # A constant: no gradient flows into whatever produced the support.
    return m.detach().to(device=q.device, dtype=q.dtype)


@LAYERS.register("HardThreshold")
class HardThreshold(Layer):
    """Positive hard-thresholding ``eta*(q; beta) = q if q > beta else 0`` (eq. 9).

    ``beta`` is a parameter blob with one value per channel (axis 1), or one shared value
    (``channel_shared``: a 0-axis blob). Modes (``hard_threshold_param.mode``):

    * ``RELU_BIAS``: ``max(q - beta, 0)``, a ReLU after a bias of ``-beta`` (the warm-up; regular
      SGD then initialises beta as in the paper);
    * ``THRESHOLD``: ``q * (q > beta)`` (output KEEP, eq. 9) or ``(q - beta) * (q > beta)``
      (output SHIFT, eq. 2).

    Gradient w.r.t. beta: ``-(q > beta)`` in every mode (the ReLU surrogate for KEEP). Switch modes
    at run time with :meth:`set_mode`; fix the support with ``fixed_support`` (see module doc).
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ("beta",)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.hard_threshold_param
        shape = tuple(bottom_shapes[0])
        self.channel_shared = bool(p.channel_shared)
        if not self.channel_shared and len(shape) < 2:
            raise self.error(f"needs a bottom with at least 2 axes (N, C, ...) for a per-channel "
                             f"beta, got shape {shape}",
                             "set hard_threshold_param { channel_shared: true } or reshape")
        self.channels = 1 if self.channel_shared else int(shape[1])
        self.mode = _HT.Mode.Name(p.mode)
        self.output = _HT.Output.Name(p.output)
        # beta_filler unset = constant 0: a converted ReLU net then computes the same function.
        self.add_blob(() if self.channel_shared else (self.channels,),
                      p.beta_filler if p.HasField("beta_filler") else None)
        self.fixed_support: Optional[SupportFn] = None
        self.record_support: Optional[RecordFn] = None
        # With a fixed support and output KEEP: give beta the ReLU surrogate's gradient.
        self.learn_beta_fixed = False

    def top_shapes(self, bottom_shapes):
        # Element-wise: no fake run (it would call the trainer's hooks on fake tensors).
        return [tuple(bottom_shapes[0])]

    def prepare_pass(self) -> None:
        _prepare(self.fixed_support)

    def set_mode(self, mode: str) -> None:
        """Switch between ``"THRESHOLD"`` and ``"RELU_BIAS"`` (e.g. at the end of the warm-up)."""
        if mode not in _HT.Mode.keys():
            raise self.error(f"unknown HardThreshold mode {mode!r}",
                             f"use one of {', '.join(_HT.Mode.keys())}")
        self.mode = mode

    def _beta_for(self, q: torch.Tensor) -> torch.Tensor:
        if not self.channel_shared and (q.dim() < 2 or q.shape[1] != self.channels):
            raise self.error(f"has {self.channels} thresholds but the bottom has shape "
                             f"{tuple(q.shape)}", "the channel count (axis 1) must not change "
                             "after setup")
        return channel_view(self.beta, q)

    def support(self, q: torch.Tensor) -> torch.Tensor:
        """Eq. 12: the bool support ``q > beta`` (beta broadcast per channel), no gradient."""
        self._beta_for(q)  # shape check
        return threshold_support(q, self.beta)

    @property
    def replays_exactly(self) -> bool:
        return self.record_support is None  # a recorded pass stores the batch's supports

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        beta = self._beta_for(q)
        shift = self.mode == "RELU_BIAS" or self.output == "SHIFT"
        if self.record_support is not None:
            self.record_support(threshold_support(q, self.beta))
        if self.fixed_support is not None:
            m = _constant_mask(self, self.fixed_support(q), q, "fixed_support")
            # q first: an element-wise product takes its first operand's memory format, and a
            # stored mask is NCHW while q may be channels-last (pycaffe_alt.memory_format); the
            # other order turned the rest of the net NCHW (max pooling 4x slower on the CPU).
            if shift:
                return (q - beta) * m
            if self.learn_beta_fixed:
                # KEEP output does not depend on beta; the ReLU(q - beta) surrogate gives beta
                # the gradient -(q > beta) (as _ThresholdFn does without fixed supports). The
                # added term is exactly zero in value.
                live = threshold_support(q, self.beta).to(q.dtype)
                return q * m - live * (beta - beta.detach())
            return q * m
        if self.mode == "RELU_BIAS":
            # Exactly Caffe's ReLU of (q - beta): gradient 0 at the kink, as Caffe's ReLU.
            return torch.relu(q - beta)
        return _ThresholdFn.apply(q, beta.to(q.dtype), self.output == "SHIFT")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, output={self.output}"


@LAYERS.register("SupportMask")
class SupportMask(Layer):
    """``z = m (.) q`` with a binary support ``m`` that is a constant (no gradient through m).

    ``support_mask_param.source``:

    * ``BOTTOM``: ``m = (bottom[1] != 0)``; the mask bottom has ``q``'s shape or broadcasts to it;
    * ``BATCH``: eq. 41, ``m_i = (sum_n q_i^(n)^2 > beta)`` over the batch axis, one mask for the
      whole batch, recomputed at every forward (``reduce_sums`` hook for all-reduce);
    * ``STORE``: the per-instance masks of the current batch, from ``support_provider(q)``, which
      the alternation solver sets (it looks the batch's record indices up in the mask store).
    """

    num_bottoms = (1, 2)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.support_mask_param
        self.source = _SM.Source.Name(p.source)
        self.beta = float(p.beta)
        self.key = p.key or self.name
        want = 2 if self.source == "BOTTOM" else 1
        if len(bottom_shapes) != want:
            raise self.error(f"source {self.source} takes {want} bottom(s), "
                             f"got {len(bottom_shapes)}",
                             "BOTTOM needs the input and the mask; BATCH and STORE only the input")
        if self.source == "BOTTOM":
            q_shape, m_shape = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
            try:
                ok = torch.broadcast_shapes(m_shape, q_shape) == torch.Size(q_shape)
            except RuntimeError:
                ok = False
            if not ok or len(m_shape) > len(q_shape):
                raise self.error(f"mask bottom of shape {m_shape} does not broadcast to the input "
                                 f"shape {q_shape}", "give the mask the input's shape (or 1s on "
                                 "the axes it shares)")
        if self.source == "BATCH" and self.beta < 0:
            raise self.error(f"beta must be >= 0 for source BATCH (a sum of squares), "
                             f"got {self.beta}", "set support_mask_param { beta: ... } >= 0")
        self.support_provider: Optional[SupportFn] = None
        self.reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.record_support: Optional[RecordFn] = None

    def top_shapes(self, bottom_shapes):
        # Element-wise; a fake run would need a STORE provider, which exists only while training.
        return [tuple(bottom_shapes[0])]

    def prepare_pass(self) -> None:
        if self.source == "STORE":
            _prepare(self.support_provider)

    def allow_force_backward(self, bottom_index: int) -> bool:
        # The mask bottom is a constant, like a label.
        return bottom_index == 0

    def mask(self, q: torch.Tensor, m_bottom: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The support this layer applies to ``q`` (bool or 0/1, constant)."""
        if self.source == "BOTTOM":
            return m_bottom.detach() != 0
        if self.source == "BATCH":
            sums = batch_support_sums(q)
            if self.reduce_sums is not None:
                sums = self.reduce_sums(sums)
            return batch_support(sums, self.beta).unsqueeze(0)
        if self.support_provider is None:
            raise self.error("source STORE has no mask store attached",
                             "STORE masks come from the alternation solver (solver type "
                             "\"Alternation\"); outside it use source BOTTOM with the mask as a "
                             "second bottom, or source BATCH")
        return self.support_provider(q)

    @property
    def replays_exactly(self) -> bool:
        return self.record_support is None  # a recorded pass stores the batch's supports

    def forward(self, q: torch.Tensor, m_bottom: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = _constant_mask(self, self.mask(q, m_bottom), q, f"the {self.source} support")
        if self.record_support is not None:
            self.record_support(m.bool())
        return q * m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, source={self.source}, key={self.key!r}"
