"""How stale the stored supports of an I-alternation weight step are, measured from the tensors
the weight step already has (docs/alternation.md, "Staleness").

During a weight step every HardThreshold applies the support stored at the last support step,
``m``, to its input ``q``. The *staleness* of that layer on the batch is the share of the stored
bits that eq. 12 would now set differently: ``mean(m != (q > beta))``. ``q`` is the input the
masked net delivers (the layers below apply their stored supports too), so for the first layer
it is exactly the thresholded net's input and for deeper layers it is the signal the weight step
trains on; no extra forward pass is needed, only one comparison per unit.

:func:`stale_bits` is the formula; :class:`StalenessMeter` wraps the weight step's
``fixed_support`` providers to apply it to every batch, keeping device tensors (no host sync
until :meth:`StalenessMeter.read`).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .rules import Number, threshold_support

SupportFn = Callable[[torch.Tensor], torch.Tensor]


def stale_bits(stored: torch.Tensor, q: torch.Tensor,
               beta: Union[torch.Tensor, Number]) -> Tuple[torch.Tensor, int]:
    """``(differing, total)``: how many bits of the stored support ``stored`` differ from eq. 12
    on ``q`` (``q > beta``, beta per channel or scalar), and how many bits were compared.

    ``stored`` has ``q``'s shape or broadcasts to it (a batch-shared mask counts once per
    example). ``differing`` is a 0-d int64 tensor on ``q``'s device (no host sync).
    """
    current = threshold_support(q, beta)
    stored = stored.detach().to(device=current.device, dtype=torch.bool)
    differ = torch.ne(stored, current)
    return differ.sum(dtype=torch.int64), differ.numel()


def staleness(stored: torch.Tensor, q: torch.Tensor, beta: Union[torch.Tensor, Number]) -> float:
    """The share of ``stored`` support bits that differ from eq. 12 on ``q`` (0..1)."""
    differing, total = stale_bits(stored, q, beta)
    return float(differing) / total if total else 0.0


class StalenessMeter:
    """Counts, per layer, the stale bits of the last batch the wrapped providers served.

    ``meter.wrap(name, layer, provider)`` returns a ``fixed_support`` callable that returns what
    ``provider`` returns and records :func:`stale_bits` of it against ``q`` and ``layer.beta``.
    :meth:`read` gives ``{"per_layer": {name: share}, "overall": share}`` (overall weighted by
    the bits of each layer), or None before the first batch.
    """

    def __init__(self) -> None:
        self._wrapped: Dict[str, "MeteredSupport"] = {}

    def wrap(self, name: str, layer, provider: SupportFn) -> "MeteredSupport":
        """The metered ``fixed_support`` of layer ``name`` (replaces an earlier one of it)."""
        metered = self._wrapped[name] = MeteredSupport(name, layer, provider)
        return metered

    @property
    def counts(self) -> Dict[str, Tuple[torch.Tensor, int]]:
        """``{name: (differing, total)}`` of the layers that served a batch since :meth:`reset`."""
        return {n: w.counts for n, w in self._wrapped.items() if w.counts is not None}

    def reset(self) -> None:
        for w in self._wrapped.values():
            w.counts = None

    def set_enabled(self, enabled: bool) -> None:
        """Count stale bits in the coming passes or not (the comparison costs about a tenth of
        a LeNet weight-step iteration on the CPU; the solver needs it only on the iterations
        it reads the meter)."""
        for w in self._wrapped.values():
            w.enabled = bool(enabled)

    def read(self) -> Optional[Dict[str, object]]:
        if not self.counts:
            return None
        per_layer = {n: (float(d) / t if t else 0.0) for n, (d, t) in self.counts.items()}
        total = sum(t for _, t in self.counts.values())
        overall = sum(float(d) for d, _ in self.counts.values()) / total if total else 0.0
        return {"per_layer": per_layer, "overall": overall}


class MeteredSupport:
    """A ``fixed_support`` that returns ``provider``'s mask and keeps its :func:`stale_bits` in
    ``counts``; the provider's ``prepare`` (host work before a compiled pass) is passed on.

    ``counts`` is an attribute that is only ever written inside a pass, never read there, so a
    compiled graph does not depend on it (a dict filled in the pass would be guarded on)."""

    def __init__(self, name: str, layer, provider: SupportFn):
        self.name, self.layer, self.provider = name, layer, provider
        self.counts: Optional[Tuple[torch.Tensor, int]] = None
        self.enabled = True

    def prepare(self) -> None:
        prepare = getattr(self.provider, "prepare", None)
        if prepare is not None:
            prepare()

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        m = self.provider(q)
        if self.enabled:
            self.counts = stale_bits(m, q, self.layer.beta)
        return m


def threshold_gap(thresholded_loss: Number, masked_loss: Number) -> Dict[str, float]:
    """The thresholded-minus-masked loss, absolute and relative to the masked loss: how much the
    objective the weight step minimises (fixed supports) understates the net's own loss."""
    gap = float(thresholded_loss) - float(masked_loss)
    rel = gap / float(masked_loss) if float(masked_loss) else float("nan")
    return {"thresholded": float(thresholded_loss), "masked": float(masked_loss),
            "gap": gap, "relative": rel}


__all__ = ["stale_bits", "staleness", "StalenessMeter", "MeteredSupport", "threshold_gap"]
