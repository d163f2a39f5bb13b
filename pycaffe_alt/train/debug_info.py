"""``debug_info: true``: Caffe's per-layer forward/backward lines.

Caffe (net.cpp) prints, for a train net at display iterations and for test nets at every
forward: after each layer's forward, the mean absolute value of each top blob and each parameter
(``    [Forward] Layer L, top blob B data: X``, ``    [Forward] Layer L, param blob P data: X``,
P being the parameter's name or index); after each layer's backward, in reverse layer order, the
mean absolute diff of each bottom that needs one and of each parameter that learns
(``    [Backward] Layer L, bottom blob B diff: X``, ``    [Backward] Layer L, param blob K
diff: X``); after the whole backward, an ERROR-level line with the L1 and L2 norms of all
parameters and their diffs. (Caffe's UpdateDebugInfo is never called, so no ``[Update]`` lines.)

Autograd keeps no per-blob diffs, so :func:`watch_bottoms` hooks the tensors of a traced pass to
catch each bottom's gradient as the backward pass goes through it. A bottom read by several
layers gets their summed gradient (Caffe's Split layers would give each reader its own copy).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from ..log import format_value, get_logger

logger = get_logger()

# One traced layer: (step, its bottom tensors, its top tensors), see Net.run(trace=...).
TraceEntry = Tuple[object, Sequence[torch.Tensor], Sequence[torch.Tensor]]


def _mean_abs(t: torch.Tensor) -> str:
    t = t.detach()
    return format_value(float(t.abs().float().mean())) if t.numel() else format_value(math.nan)


def param_display_name(layer, k: int) -> str:
    """Caffe's param_display_names_: the ``param { name }`` given, else the blob's index."""
    specs = layer.param.param
    return specs[k].name if k < len(specs) and specs[k].name else str(k)


def log_forward(trace: Sequence[TraceEntry]) -> None:
    """``[Forward]`` lines of a traced pass, layer by layer."""
    for step, _, tops in trace:
        for name, t in zip(step.tops, tops):
            logger.info("    [Forward] Layer %s, top blob %s data: %s", step.name, name,
                        _mean_abs(t))
        for k, p in enumerate(step.layer.blobs):
            logger.info("    [Forward] Layer %s, param blob %s data: %s", step.name,
                        param_display_name(step.layer, k), _mean_abs(p))


def watch_bottoms(trace: Sequence[TraceEntry]) -> Dict[Tuple[int, int], torch.Tensor]:
    """Hook every bottom that will get a gradient; the dict fills in during ``backward``."""
    grads: Dict[Tuple[int, int], torch.Tensor] = {}
    seen: Dict[int, List[Tuple[int, int]]] = {}
    for i, (step, bottoms, _) in enumerate(trace):
        for j, b in enumerate(bottoms):
            if step.detach[j] or not b.requires_grad:
                continue
            keys = seen.get(id(b))
            if keys is None:  # one hook per tensor, reporting to every layer that read it
                keys = seen[id(b)] = []

                def hook(g, keys=keys):
                    for key in keys:
                        grads[key] = g.detach()

                b.register_hook(hook)
            keys.append((i, j))
    return grads


def log_backward(trace: Sequence[TraceEntry], grads: Dict[Tuple[int, int], torch.Tensor],
                 learnable: Sequence[torch.Tensor]) -> None:
    """``[Backward]`` lines in reverse layer order, then the parameter norms (ERROR, as Caffe)."""
    for i in range(len(trace) - 1, -1, -1):
        step, bottoms, _ = trace[i]
        for j, name in enumerate(step.bottoms):
            g = grads.get((i, j))
            if g is not None:
                logger.info("    [Backward] Layer %s, bottom blob %s diff: %s", step.name, name,
                            _mean_abs(g))
        for k, p in enumerate(step.layer.blobs):
            if p.requires_grad:
                diff = p.grad if p.grad is not None else torch.zeros_like(p)
                logger.info("    [Backward] Layer %s, param blob %d diff: %s", step.name, k,
                            _mean_abs(diff))
    l1_data = l1_diff = sq_data = sq_diff = 0.0
    with torch.no_grad():
        for p in learnable:
            d = p.detach().double()
            l1_data += float(d.abs().sum())
            sq_data += float((d * d).sum())
            if p.grad is not None:
                g = p.grad.double()
                l1_diff += float(g.abs().sum())
                sq_diff += float((g * g).sum())
    logger.error("    [Backward] All net params (data, diff): L1 norm = (%s, %s); L2 norm = (%s, %s)",
                 format_value(l1_data), format_value(l1_diff), format_value(math.sqrt(sq_data)),
                 format_value(math.sqrt(sq_diff)))
