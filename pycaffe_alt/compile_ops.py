"""Operations that ``torch.compile`` should call as whole ATen kernels instead of lowering.

Inductor lowers 2-D max pooling into generated loops: the forward stores each window's argmax as
an int8 offset, and the backward turns the offsets back into indices and scatter-adds the
gradient. On the CPU those loops are several times slower than ATen's own max-pooling kernels
(LeNet's training step, batch 64, 2 threads: the backward graph's generated code took 4.5 ms of
a 10 ms compiled step, against 0.7 ms for ATen's pooling forward, backward and zero fill in the
6.6 ms eager step). A custom operator is opaque to Inductor, which then calls it as an extern
kernel like a convolution and still fuses everything around it. Tagged ``flexible_layout``, it
takes its input in whatever layout Inductor chose (channels-last on the CPU) instead of forcing
a copy to the traced one. On CUDA, Inductor's lowering is the intended fast path (it saves
memory), so only CPU tensors take these operators.

The operators are registered once, under the ``pycaffe_alt`` namespace, when this module is
imported; they compute exactly what ``F.max_pool2d(..., return_indices=True)`` and its gradient
compute (ties to the first maximum), so results do not change.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

_aten = torch.ops.aten
_NO_DILATION = [1, 1]


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _like(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


@torch.library.custom_op("pycaffe_alt::max_pool2d", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,))
def _max_pool2d(x: torch.Tensor, kernel: List[int], stride: List[int], pad: List[int],
                ceil: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _aten.max_pool2d_with_indices(x, kernel, stride, pad, _NO_DILATION, ceil)


@_max_pool2d.register_fake
def _max_pool2d_fake(x, kernel, stride, pad, ceil):
    # Shapes and strides from the meta kernel, which lays outputs out as ATen's CPU kernel does
    # (by the input's suggested memory format): Inductor must know them to lay out what follows.
    y, idx = _aten.max_pool2d_with_indices(_on_meta(x), kernel, stride, pad, _NO_DILATION, ceil)
    return _like(y, x.device), _like(idx, x.device)


@torch.library.custom_op("pycaffe_alt::max_pool2d_backward", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,))
def _max_pool2d_backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                         kernel: List[int], stride: List[int], pad: List[int],
                         ceil: bool) -> torch.Tensor:
    return _aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, pad, _NO_DILATION,
                                                  ceil, indices)


@_max_pool2d_backward.register_fake
def _max_pool2d_backward_fake(grad, x, indices, kernel, stride, pad, ceil):
    g = _aten.max_pool2d_with_indices_backward(_on_meta(grad), _on_meta(x), kernel, stride, pad,
                                               _NO_DILATION, ceil, _on_meta(indices))
    return _like(g, x.device)


def _save(ctx, inputs, output) -> None:
    x, kernel, stride, pad, ceil = inputs
    ctx.save_for_backward(x, output[1])
    ctx.geometry = (kernel, stride, pad, ceil)


def _backward(ctx, grad, _grad_indices):
    x, indices = ctx.saved_tensors
    return _max_pool2d_backward(grad, x, indices, *ctx.geometry), None, None, None, None


_max_pool2d.register_autograd(_backward, setup_context=_save)


def max_pool2d_with_indices(x: torch.Tensor, kernel: Tuple[int, int], stride: Tuple[int, int],
                            pad: Tuple[int, int], ceil: bool
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d(x, ..., return_indices=True)`` as one opaque operator (see the module
    notes); differentiable in ``x``."""
    return _max_pool2d(x, list(kernel), list(stride), list(pad), ceil)


def keeps_max_pool_whole(x: torch.Tensor) -> bool:
    """Whether a max pooling of ``x`` should go through :func:`max_pool2d_with_indices`: while
    ``torch.compile`` traces a pass that will run backward, for CPU tensors. (Without a
    backward, Inductor's forward lowering needs no argmax and is left alone; ``torch.export``
    gets the standard op, so exported programs and ONNX files need nothing of ours.)"""
    return x.device.type == "cpu" and x.requires_grad and torch.compiler.is_compiling() \
        and not torch.compiler.is_exporting()
