"""``torch.compile`` for a Net: the layers after the data layers as one graph, eager fallback.

A Net's forward pass is a Python loop over its layers. Dynamo unrolls that loop into a single
graph (the layers' Python is written to trace without breaks: no generators in shape helpers, no
host reads of tensor values), Inductor fuses it, and AOTAutograd compiles the backward too.

What stays eager, and why:
- the leading source layers (Data, ImageData, HDF5Data, MemoryData, ...): they read files and
  run Python threads; they produce the batch, the graph consumes it;
- passes that record per-layer values: pycaffe's ``net.forward()`` keeps each blob's first value
  for ``net.backward()``'s blob diffs (a gradient with respect to a compiled graph's
  intermediate output would not flow back through the graph), and ``debug_info`` traces;
- nets with a layer whose Caffe backward reads its in-place blob's final value (ReLU followed by
  another in-place layer on the same blob, see ``Net._mark_buffer_readers``): that backward
  reads a value set after the pass, which a traced graph cannot.

A compiled pass brings out only the net's outputs, its loss tops and the blobs asked for by
name (``net(data=x, blobs=[...])``, :meth:`CompiledNet.want`): the other activations live and die
inside the graph, which frees them early and spares the graph one output per blob. (Returning
every blob also met an Inductor fault on this torch build: LeNet in NCHW layout got zero
gradients below its in-place ReLU; the eager and aot_eager backends were right. Kept as
experiments in docs/performance.md.) So with compiling on, ``net.blobs[...]`` of an
intermediate blob is not refreshed by ``net(...)``/training passes; pycaffe's ``net.forward()``
runs eagerly and refreshes every blob.

Host work a layer does per batch (the alternation's lookup of the batch's stored supports by
record index) would break the graph; such layers do it in :meth:`Layer.prepare_pass`, which the
runner calls between the data layers and the graph, so the graph only reads the result.

Data-dependent checks (e.g. class labels in range) are skipped inside a graph
(``torch.compiler.is_compiling()``); when a compiled pass fails, the same layers run again
eagerly: bad input then raises the layer's own error, and if the eager pass succeeds the fault
was the compiler's, so the net logs one line and stays eager from then on.
"""
from __future__ import annotations

import types
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from .errors import CaffeError, first_line
from .layers.base import Layer
from .log import get_logger

if TYPE_CHECKING:  # pragma: no cover - type names only
    from .net import Net, Step

logger = get_logger()
Values = Dict[str, torch.Tensor]


def leading_sources(steps: Sequence["Step"]) -> int:
    """How many steps at the start of the net take no bottoms (Input and data layers)."""
    n = 0
    for step in steps:
        if step.bottoms:
            break
        n += 1
    return n


def why_not_compilable(steps: Sequence["Step"]) -> Optional[str]:
    """A reason the net must stay eager, or None."""
    for step in steps:
        if step.reads_final:
            return (f"layer '{step.name}' ({step.layer.type}) runs Caffe's in-place backward on "
                    "a blob that later in-place layers overwrite")
    return None


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts them
    against its recompile limit (8), per code object: with one ``_graph`` code for every net,
    the ninth net variant of a process (a solver has a train net, test nets, and each runs with
    and without gradients, before and after the alternation's warm-up) silently ran eagerly."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


class CompiledNet:
    """The compiled forward pass of one Net (made by :meth:`for_net`; see the module notes)."""

    def __init__(self, net: "Net", sources: int, keep: Iterable[str],
                 compiler: Callable[[Callable], Callable] = torch.compile):
        self._net = net
        self._sources = sources
        self._keep: Tuple[str, ...] = tuple(dict.fromkeys(keep))
        self._fn = compiler(types.MethodType(_own_copy(CompiledNet._graph), self))
        self.active = True
        # Layers with host work before a compiled pass (Layer.prepare_pass), by step index.
        self._preparers: Tuple[Tuple[int, Layer], ...] = tuple(
            (i, s.layer) for i, s in enumerate(net.steps)
            if type(s.layer).prepare_pass is not Layer.prepare_pass)

    def want(self, names: Iterable[str]) -> None:
        """Also bring blobs ``names`` out of the graph (a new set compiles once more)."""
        new = tuple(n for n in names if n not in self._keep)
        if new:
            self._keep += new

    @classmethod
    def for_net(cls, net: "Net") -> Optional["CompiledNet"]:
        """A compiled runner for ``net``, or None (with one log line) when it must stay eager."""
        reason = why_not_compilable(net.steps)
        if reason is not None:
            logger.warning("torch.compile is off for net %s: %s; running eagerly",
                           net.net_param.name or net.source, reason)
            return None
        return cls(net, leading_sources(net.steps), net.outputs + net.loss_tops)

    def _graph(self, values: Values, start: int, last: int) -> Values:
        values = dict(values)  # the traced function returns new values, mutates nothing
        self._net.run_steps(values, start, last)
        return {name: values[name] for name in self._keep if name in values}

    def run(self, values: Values, start: int, last: int) -> Values:
        """Layers ``start..last`` on ``values`` (updated in place and returned)."""
        eager_last = min(last, self._sources - 1)
        if start <= eager_last:
            self._net.run_steps(values, start, eager_last)
            start = eager_last + 1
        if start > last:
            return values
        if not self.active:
            self._net.run_steps(values, start, last)
            return values
        for i, layer in self._preparers:
            if start <= i <= last:
                layer.prepare_pass()
        try:
            out = self._fn(values, start, last)
        except Exception as e:  # compiler fault, or a check the graph skipped: see the notes
            self._net.run_steps(values, start, last)  # raises the layer's error on bad input
            self.disable(e)
            return values
        values.update(out)
        return values

    def disable(self, error: BaseException) -> None:
        """Stop compiling after ``error`` (one log line) and run eagerly from now on."""
        self.active = False
        what = first_line(error, default="")
        if isinstance(error, CaffeError):
            what = error.args[0] if error.args else what
        logger.warning("torch.compile failed for net %s (%s: %s); running eagerly",
                       self._net.net_param.name or self._net.source, type(error).__name__,
                       what[:200])
