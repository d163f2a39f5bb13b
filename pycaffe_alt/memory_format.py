"""Which memory format a net's 4-D tensors use, and putting a net in it.

A 4-D convolution net runs faster with its weights and activations stored channels-last (NHWC
in memory, still NCHW in shape): oneDNN on the CPU and cuDNN on tensor-core GPUs compute
convolutions and pooling natively in that layout, where the NCHW layout makes them reorder
every tensor on the way in and out. Measured on this project's CPU (docs/performance.md):
LeNet forward+backward 20-22 ms NCHW vs 13-14 ms channels-last, All-CNN-C 660 vs 555 ms.

The choice is a rule, not a timing probe, so that two builds of the same net on the same
device always agree (a probe on a loaded machine could flip between runs and then exact
resume across runs would compare different kernels):

- ``"auto"`` (the default): channels-last when the net has a 2-D Convolution, Deconvolution
  or Pooling layer on a 4-D bottom, and the device is the CPU or a CUDA GPU of compute
  capability 7.0 or newer (tensor cores; older GPUs' cuDNN kernels favour NCHW);
- ``"channels_last"`` / ``"contiguous"`` force one format.

Only the layout changes: every tensor keeps its NCHW shape, every torch op its meaning, so
layers that need a plain NCHW buffer (``view``, ``Permute``) get one from their own
``reshape``/``contiguous`` call. pycaffe's ``.data``/``.diff`` numpy arrays of activations are
views with NHWC strides: they read and write through like before. Weights stay in C order
(see :func:`apply_to_parameters`).
"""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import NetError
from .nchw_request import nchw_requested

FORMATS = ("auto", "channels_last", "contiguous")
FormatRequest = Union[str, torch.memory_format, None]
# Layer types whose kernels have a channels-last implementation that wins (oneDNN/cuDNN).
_SPATIAL_TYPES = frozenset({"Convolution", "Deconvolution", "Pooling"})


def device_prefers_channels_last(device: torch.device) -> bool:
    """The device rule: the CPU (oneDNN) and CUDA GPUs with tensor cores (capability >= 7.0)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 7
    return False


def net_prefers_channels_last(layers: Iterable[Sequence]) -> bool:
    """The net rule: some 2-D Convolution/Deconvolution/Pooling layer reads a 4-D bottom.

    ``layers``: ``(type, bottom shapes)`` pairs in execution order.
    """
    return any(t in _SPATIAL_TYPES and shapes and len(shapes[0]) == 4 for t, shapes in layers)


def choose(requested: FormatRequest, device: torch.device, layers: Iterable[Sequence],
           where: str = "<net>", compiled: bool = False) -> torch.memory_format:
    """The memory format a net built on ``device`` from ``layers`` uses (see the module rule).

    ``compiled``: the net runs through ``torch.compile``, whose Inductor picks convolution
    layouts itself (its layout optimisation converts to channels-last inside the graph);
    channels-last parameters given to it cost extra layout copies in the compiled backward
    (LeNet: compiled NCHW 1.8x faster than eager NCHW, compiled channels-last no faster than
    eager channels-last), so "auto" keeps the plain layout there.
    """
    if isinstance(requested, torch.memory_format):
        requested = {torch.channels_last: "channels_last",
                     torch.contiguous_format: "contiguous"}.get(requested, str(requested))
    requested = requested or "auto"
    if requested not in FORMATS:
        raise NetError(f"unknown memory_format {requested!r}", where,
                       f"use one of {', '.join(FORMATS)}")
    if requested == "channels_last":
        return torch.channels_last
    if requested == "contiguous":
        return torch.contiguous_format
    if not compiled and not nchw_requested() and device_prefers_channels_last(device) and \
            net_prefers_channels_last(layers):
        return torch.channels_last
    return torch.contiguous_format


def activation_format(net_format: torch.memory_format, compiled: bool) -> torch.memory_format:
    """The layout of a net's 4-D activations in a pass: the net's own format, or channels-last
    in a compiled pass (Inductor lays convolution outputs out channels-last: seen on this CPU,
    and its layout optimisation does so on CUDA for convolution nets). Tensors fed into the
    pass to be combined with those activations (the alternation's stored masks) should use it:
    a mismatch costs a transpose of each of them inside the graph."""
    return torch.channels_last if compiled else net_format


def has_format(t: torch.Tensor, fmt: torch.memory_format) -> bool:
    """Whether ``t``'s strides are exactly ``fmt``'s.

    ``Tensor.is_contiguous(memory_format=...)`` is not enough: with one channel (LeNet's
    first weight, a grey image) both layouts count as contiguous, and torch's kernels then pick
    the layout from the exact stride order, which decides the format of everything downstream.
    """
    if fmt is not torch.channels_last or t.dim() != 4:
        return True
    return t.stride() == channels_last_strides(t.shape)


def channels_last_strides(shape: Sequence[int]) -> Tuple[int, int, int, int]:
    """The strides torch gives a channels-last tensor of 4-D ``shape`` (worked out here: this
    runs on every pass, where making a meta tensor to ask torch cost more than the check)."""
    if 0 in tuple(shape):  # torch's own rule for empty tensors
        return tuple(torch.empty(tuple(shape), memory_format=torch.channels_last,
                                 device="meta").stride())
    _, c, h, w = (int(d) for d in shape)
    return (h * w * c, 1, w * c, c)


def in_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` laid out in ``fmt`` when it is 4-D (other ranks have no channels-last layout); a
    tensor whose memory is already that layout (one channel, a 1 x 1 plane) is restrided, not
    copied."""
    if has_format(t, fmt):
        return t
    if fmt is torch.channels_last and c_order_in(tuple(t.shape), fmt) and t.is_contiguous():
        return t.as_strided(t.shape, channels_last_strides(t.shape))
    return torch.empty_like(t, memory_format=fmt).copy_(t)


def zeros(shape: Sequence[int], fmt: torch.memory_format, device: torch.device) -> torch.Tensor:
    """A zero blob of ``shape`` stored in ``fmt`` (4-D) or plainly (other ranks)."""
    shape = tuple(shape)
    if fmt is torch.channels_last and len(shape) == 4:
        return torch.empty(shape, memory_format=fmt, device=device).zero_()
    return torch.zeros(shape, device=device)


def c_order_in(shape: Sequence[int], fmt: torch.memory_format) -> bool:
    """Whether a tensor of ``shape`` stored in ``fmt`` is also in C order, as numpy sees it
    (it ignores the strides of axes of size 1): channels-last with one channel, or a 1 x 1
    plane (LeNet's first weight, 1 x 1 convolution weights), or any plain tensor."""
    if fmt is not torch.channels_last or len(shape) != 4:
        return True
    return shape[1] == 1 or (shape[2] == 1 and shape[3] == 1) or 0 in shape


def apply_to_parameters(module: nn.Module, fmt: torch.memory_format) -> None:
    """Store the 4-D parameters of ``module`` in ``fmt`` where that keeps them in C order,
    keeping the Parameter objects (the solver, pycaffe views and shared ``param { name }``
    blobs hold on to them).

    The others stay NCHW: pycaffe's ``net.params[...][i].data`` must be a C-order array (net
    surgery and pruning scripts set ``w.shape = (n, -1)`` or write through ``w.reshape(...)``,
    which on a channels-last view fail or write into a copy), and a weight's layout does not
    decide the convolution's: with a channels-last input oneDNN computes channels-last either
    way (the weight and its gradient are reordered each step: about 1% of a LeNet step at batch
    64, nothing for All-CNN-C; docs/performance.md). The first weight with one input channel
    still gets channels-last strides
    exactly (see :func:`has_format`): with a one-channel input, its strides decide the layout
    of everything downstream.
    """
    with torch.no_grad():
        for p in module.parameters():
            if c_order_in(tuple(p.shape), fmt):
                if not has_format(p, fmt):
                    p.data = in_format(p.data, fmt)
                    if p.grad is not None:
                        p.grad = in_format(p.grad, fmt)
            elif not p.is_contiguous():
                p.data = p.data.contiguous()
                if p.grad is not None:
                    p.grad = p.grad.contiguous()


def format_name(fmt: torch.memory_format) -> str:
    return "channels_last" if fmt is torch.channels_last else "contiguous"
