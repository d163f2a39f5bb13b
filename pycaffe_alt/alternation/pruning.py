"""DSD pruning as pure functions: which weights a Sparse step removes, and holding them at zero.

A *keep mask* is a bool tensor of a weight blob's shape, True where the connection stays. Two
ways to get one (docs/alternation.md, "DSD"):

* by magnitude (Han et al., ICLR 2017): per layer, the ``round(sparsity * n)`` weights of
  smallest ``|w|`` go; ties are broken by the flat (C-order) index, the lower index going first,
  so the mask is a function of the weights alone;
* by support (the paper's Sec. 4.2): a weight ``W[o, i, ...]`` of a Convolution/InnerProduct
  connects input channel/unit ``i`` to output channel/unit ``o``; it goes when output channel
  ``o`` feeds a HardThreshold whose support is zero, or when input channel ``i`` comes from a
  HardThreshold whose support is zero. "Support zero" is decided from eq. 41 batch supports
  counted over an estimation pass (:func:`channel_on`, :func:`supported_channels`).

The net-structure helpers (:func:`output_threshold`, :func:`input_threshold`) read a net's step
list only; nothing here changes a net or keeps state.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch

# Layers that keep channel c of their output a function of channel c of their input(s) only:
# a weight row W[o] reaches the HardThreshold's channel o and nothing else through them.
CHANNELWISE_FORWARD = frozenset({"BatchNorm", "Scale", "Bias", "Dropout", "Eltwise", "Split"})
# Layers that keep channels in place AND map an all-zero channel to an all-zero channel: an input
# channel that is off above them is off below them (BatchNorm/Scale/Bias add offsets: not here).
ZERO_PRESERVING = frozenset({"Pooling", "Dropout", "ReLU", "Split", "Flatten", "LRN",
                             "HardThreshold"})


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity ratio removes: the nearest integer (halves up)."""
    return min(numel, int(sparsity * numel + 0.5))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask that removes the ``round(sparsity * n)`` smallest ``|w|`` of one layer.

    Ties are resolved by position: a stable sort of ``|w|`` in C order, so among equal
    magnitudes the lower flat index is pruned first (deterministic on every device).
    """
    flat = weight.detach().reshape(-1).abs()
    k = pruned_count(flat.numel(), float(sparsity))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=weight.device)
    if k:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = False
    return keep.reshape(weight.shape)


def channel_on(unit_support: torch.Tensor) -> torch.Tensor:
    """Per channel (axis 0 of a unit-shaped support ``(C, ...)``): was any of its units on."""
    return unit_support.reshape(unit_support.shape[0], -1).any(dim=1)


def supported_channels(on_batches: torch.Tensor, batches: int, min_fraction: float = 0.0
                       ) -> torch.Tensor:
    """Channels in the support: on in more than ``min_fraction`` of ``batches`` batches
    (``min_fraction`` 0: on in at least one batch). ``on_batches`` counts per channel."""
    return on_batches.to(torch.float64) > float(min_fraction) * batches


def input_channel_index(weight_shape: Sequence[int], channels: int, group: int = 1
                        ) -> Optional[torch.Tensor]:
    """For every ``(o, j)`` of a weight ``(O, J, ...)``, the input channel (of ``channels``)
    that ``W[o, j, ...]`` reads; None when the layout does not map onto ``channels``.

    Convolution: ``J = C / group`` and output ``o`` of group ``g = o // (O / group)`` reads
    channel ``g * J + j``. InnerProduct (2-D weight, ``group`` 1): the input is the flattened
    ``(C, H, W)`` blob, channel-major, so unit ``j`` belongs to channel ``j // (J / C)``.
    """
    out, cols = int(weight_shape[0]), int(weight_shape[1])
    if len(weight_shape) > 2:  # convolution
        if cols * group != channels or out % group:
            return None
        g = torch.arange(out) // (out // group)
        return g[:, None] * cols + torch.arange(cols)[None, :]
    if channels <= 0 or cols % channels:
        return None
    per = cols // channels
    return (torch.arange(cols) // per)[None, :].expand(out, cols)


def connection_mask(weight_shape: Sequence[int], out_support: Optional[torch.Tensor],
                    in_support: Optional[torch.Tensor], in_index: Optional[torch.Tensor],
                    device=None) -> torch.Tensor:
    """Keep mask of a weight ``(O, J, ...)``: ``W[o, j, ...]`` stays iff output ``o`` is in
    ``out_support`` (bool ``(O,)``, None: all) and the input channel ``in_index[o, j]`` is in
    ``in_support`` (bool ``(C,)``, None: all)."""
    out, cols = int(weight_shape[0]), int(weight_shape[1])
    keep = torch.ones(out, cols, dtype=torch.bool)
    if out_support is not None:
        keep &= out_support.detach().cpu().bool()[:, None]
    if in_support is not None and in_index is not None:
        keep &= in_support.detach().cpu().bool()[in_index]
    shape = (out, cols) + (1,) * (len(weight_shape) - 2)
    return keep.reshape(shape).expand(tuple(weight_shape)).contiguous().to(device)


def sparsity_counts(keep: torch.Tensor) -> Tuple[int, int]:
    """(pruned, total) of a keep mask."""
    total = keep.numel()
    return total - int(keep.sum()), total


def zero_pruned_(tensors: Iterable[torch.Tensor], pruned: Iterable[torch.Tensor]) -> None:
    """Set the pruned entries (bool masks, True = pruned) of each tensor to exactly +0.0, in place.

    ``masked_fill_`` rather than a multiply: ``0 * nan`` and ``0 * -x`` would leave NaN or -0.0.
    """
    for t, p in zip(tensors, pruned):
        if t is not None:
            t.masked_fill_(p, 0.0)


def count_nonzero_pruned(tensors: Sequence[torch.Tensor], pruned: Sequence[torch.Tensor]
                         ) -> torch.Tensor:
    """How many pruned entries are not zero, over all tensors (a device scalar, no host sync)."""
    total = None
    for t, p in zip(tensors, pruned):
        c = ((t != 0) & p).sum()
        total = c if total is None else total + c
    return total if total is not None else torch.zeros((), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Which HardThreshold a layer's outputs and inputs meet (from the net's step list)
# ---------------------------------------------------------------------------------------------
def _type(step) -> str:
    return step.layer.param.type


def readers(steps: List, index: int, blob: str) -> List:
    """Steps after ``index`` that read the version of ``blob`` present after step ``index``
    (up to and including the first step that rewrites it, e.g. an in-place layer)."""
    out = []
    for s in steps[index + 1:]:
        if blob in s.bottoms:
            out.append(s)
        if blob in s.tops:
            break
    return out


def writer(steps: List, index: int, blob: str):
    """The last step before ``index`` that wrote ``blob`` (None for a net input)."""
    for s in reversed(steps[:index]):
        if blob in s.tops:
            return s
    return None


def output_threshold(steps: List, index: int) -> Optional[str]:
    """The HardThreshold that the channels of step ``index``'s top reach, one to one: the top's
    only reader, through channel-wise layers (BatchNorm, Scale, Bias, Dropout, Eltwise, Split);
    None when the output branches or meets any other layer first."""
    step = steps[index]
    blob, at = step.tops[0], index
    for _ in range(len(steps)):
        found = readers(steps, at, blob)
        if len(found) != 1:
            return None
        nxt = found[0]
        if _type(nxt) == "HardThreshold":
            return nxt.name
        if _type(nxt) not in CHANNELWISE_FORWARD or len(nxt.tops) != 1:
            return None
        blob, at = nxt.tops[0], nxt.index
    return None


def input_threshold(steps: List, index: int) -> Optional[str]:
    """The HardThreshold whose output step ``index`` reads, through layers that keep channels
    and zeros (Pooling, Dropout, ReLU, Split, Flatten, LRN); None otherwise (data, BatchNorm,
    Concat, Eltwise, ...)."""
    blob, at = steps[index].bottoms[0], index
    for _ in range(len(steps)):
        w = writer(steps, at, blob)
        if w is None:
            return None
        if _type(w) == "HardThreshold":
            return w.name
        if _type(w) not in ZERO_PRESERVING or not w.bottoms:
            return None
        blob, at = w.bottoms[0], w.index
    return None


__all__ = ["magnitude_mask", "pruned_count", "channel_on", "supported_channels",
           "input_channel_index", "connection_mask", "sparsity_counts", "zero_pruned_",
           "count_nonzero_pruned", "output_threshold", "input_threshold", "readers", "writer"]
