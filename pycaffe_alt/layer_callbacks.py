"""pycaffe master's per-layer callbacks: ``net.before_forward(f)``, ``net.after_forward(f)``,
``net.before_backward(f)``, ``net.after_backward(f)``.

Caffe's ``Net::ForwardFromTo`` calls every ``before_forward`` callback with the layer's index
before each layer's Forward and every ``after_forward`` one after it; ``BackwardFromTo`` does the
same around each layer's Backward, from the range's top layer down, for every layer of the range
(also those that need no backward). pycaffe's ``NetCallback`` calls the Python object with the
index. BVLC's ``python/train.py --timing`` times each layer this way.

Forward: the net calls them around each layer (``Net.run_steps``), in training passes too (the
solver's net runs them, as Caffe's does). Backward runs as one autograd pass, not layer by
layer; :class:`BackwardSequence` keeps Caffe's order exactly (``before(i)``, ``after(i)``, for
``i`` from the range's top down) and places each layer's pair as close to its backward as the
engine allows: ``before(i)`` when the gradient of layer ``i``'s output is ready (its backward
starts), ``after(i)`` when a lower layer's begins or the pass ends.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .errors import ArgumentTypeError

Callback = Callable[[int], Any]
KINDS = ("before_forward", "after_forward", "before_backward", "after_backward")


class LayerCallbacks:
    """The callbacks registered on one net, by kind (see the module notes)."""

    def __init__(self) -> None:
        self._lists: Dict[str, List[Callback]] = {kind: [] for kind in KINDS}
        # (kind, layer index) while callbacks run: the net refuses a backward they start (see
        # Net.backward), which the pass around them would take apart.
        self.calling: Optional[Tuple[str, int]] = None

    def add(self, kind: str, callback: Callback, where: str = "") -> None:
        """Register ``callback`` (called with a layer index) for ``kind``."""
        if not callable(callback):
            # pycaffe accepts any object and fails inside the pass when it calls it.
            raise ArgumentTypeError(f"net.{kind}() needs a callable taking the layer index, got "
                                    f"{type(callback).__name__}", where,
                                    f"e.g. net.{kind}(lambda layer: timers[layer].start())")
        self._lists[kind].append(callback)

    @property
    def on_forward(self) -> bool:
        """Whether a forward pass has callbacks to call."""
        return bool(self._lists["before_forward"] or self._lists["after_forward"])

    @property
    def on_backward(self) -> bool:
        """Whether a backward pass has callbacks to call."""
        return bool(self._lists["before_backward"] or self._lists["after_backward"])

    def call(self, kind: str, index: int, in_pass: bool = True) -> None:
        """Call every ``kind`` callback with layer ``index``, in registration order;
        ``in_pass``: while the pass's graph is being made or consumed (not after its backward)."""
        outer, self.calling = self.calling, (kind, index) if in_pass else self.calling
        try:
            for callback in self._lists[kind]:
                callback(index)
        finally:
            self.calling = outer


class BackwardSequence:
    """Caffe's backward callback order for layers ``lo..hi`` around one autograd backward.

    Usage: :meth:`watch` each layer's output tensors after the forward, then run the backward
    inside ``with sequence:``. Leaving the block normally is :meth:`finish` (which also calls
    the callbacks of layers the gradient never reached, as Caffe calls them for layers that
    need no backward); leaving it by an exception only removes the hooks (:meth:`release`).
    """

    def __init__(self, callbacks: LayerCallbacks, lo: int, hi: int):
        self._callbacks = callbacks
        self._lo = lo
        self._next = hi  # the highest layer whose after_backward is still due
        self._started = False  # whether before_backward(self._next) was called
        self._handles: List[Any] = []

    def watch(self, index: int, tops: Iterable[torch.Tensor]) -> None:
        """Start layer ``index``'s backward when the gradient of one of ``tops`` is ready."""
        if not self._lo <= index <= self._next:
            return
        for t in tops:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                self._handles.append(t.register_hook(lambda grad, i=index: self._reached(i)))

    def _reached(self, index: int) -> None:
        # A layer above the last one started has had its turn already (a branch the engine
        # ran later than Caffe's order would): the sequence never goes back up.
        if index <= self._next:
            self._close_down_to(index + 1)
            if not self._started:
                self._callbacks.call("before_backward", index)
                self._started = True

    def _close_down_to(self, stop: int, in_pass: bool = True) -> None:
        """Finish layers ``self._next`` down to ``stop`` (before_backward where still due);
        ``in_pass`` as in :meth:`LayerCallbacks.call`."""
        while self._next >= stop:
            if not self._started:
                self._callbacks.call("before_backward", self._next, in_pass)
            self._callbacks.call("after_backward", self._next, in_pass)
            self._next -= 1
            self._started = False

    def finish(self) -> None:
        """After the backward: the remaining layers' callbacks, in order; hooks removed."""
        self.release()
        self._close_down_to(self._lo, in_pass=False)  # the autograd pass is over

    def __enter__(self) -> "BackwardSequence":
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        # A failed backward: its hooks must not outlive it, and no more callbacks are due.
        if kind is None:
            self.finish()
        else:
            self.release()

    def release(self) -> None:
        """Remove the gradient hooks (also when the backward failed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
