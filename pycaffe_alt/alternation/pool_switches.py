"""Max-pool switches as bits: which element of its window each pooled unit took.

With the switches fixed, MAX pooling is a gather and therefore linear in its input, which eq. 13
needs (the net is linear in each layer's weights given the supports *and* the switches). A
switch is stored as its offset inside the window, ``(row - row0) * kernel_w + (col - col0)``,
in ``ceil(log2(kernel_h * kernel_w))`` bit planes (2 bits per pooled unit for 2x2 windows), so it
goes into the bit-packed :class:`~pycaffe_alt.alternation.mask_store.MaskStore` next to the
supports. Offsets are exact for overlapping windows too (a mask over the input would not be).

Pure functions of tensors; indices are Caffe's MAX mask (``h * W + w`` in the unpadded plane,
-1 for a window that covers no input, which decodes to the window's first position).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

Pair = Tuple[int, int]


def switch_bits(kernel: Pair) -> int:
    """Bits per pooled unit: enough for every offset in a ``kernel`` window (at least 1)."""
    return max(1, math.ceil(math.log2(kernel[0] * kernel[1])))


def _window_origin(out_hw: Pair, stride: Pair, pad: Pair, device) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(out_hw[0], device=device) * stride[0] - pad[0]
    cols = torch.arange(out_hw[1], device=device) * stride[1] - pad[1]
    return rows.view(-1, 1), cols.view(1, -1)


def encode_switches(idx: torch.Tensor, in_hw: Pair, kernel: Pair, stride: Pair,
                    pad: Pair) -> torch.Tensor:
    """Caffe-mask indices ``(N, C, OH, OW)`` -> bool bit planes ``(N, bits, C, OH, OW)``
    (least significant bit first)."""
    idx = idx.long()
    w = in_hw[1]
    r0, c0 = _window_origin(tuple(idx.shape[-2:]), stride, pad, idx.device)
    row, col = torch.div(idx, w, rounding_mode="floor"), idx % w
    off = (row - r0) * kernel[1] + (col - c0)
    off = torch.where(idx < 0, torch.zeros_like(off), off)
    bits = switch_bits(kernel)
    shifts = torch.arange(bits, device=idx.device).view(1, -1, *([1] * (idx.dim() - 1)))
    return ((off.unsqueeze(1) >> shifts) & 1).bool()


def decode_switches(planes: torch.Tensor, in_hw: Pair, kernel: Pair, stride: Pair,
                    pad: Pair) -> torch.Tensor:
    """Inverse of :func:`encode_switches`: bit planes -> int64 indices ``h * W + w``."""
    bits = planes.shape[1]
    weights = (1 << torch.arange(bits, device=planes.device)).view(1, -1, *([1] * (planes.dim() - 2)))
    off = (planes.long() * weights).sum(dim=1)
    r0, c0 = _window_origin(tuple(off.shape[-2:]), stride, pad, off.device)
    row = (r0 + torch.div(off, kernel[1], rounding_mode="floor")).clamp(0, in_hw[0] - 1)
    col = (c0 + off % kernel[1]).clamp(0, in_hw[1] - 1)
    return row * in_hw[1] + col


__all__ = ["switch_bits", "encode_switches", "decode_switches"]
