"""The value counts of a net's outputs across scoring batches (Solver::Test, caffe test).

Caffe averages every value of every output over the batches: batch 0 makes one slot per
value and each later batch adds its values into the slots by position, running on across the
outputs. An output whose size changes between batches (DetectionOutput's row count, a Python
layer's) then writes past the slots or shifts another output's values into them, so it has no
mean; its scorers refuse it with this module's message instead.
"""
from __future__ import annotations

from typing import Optional, Sequence


def count_change(names: Sequence[str], first: Sequence[int], now: Sequence[int],
                 batch: int) -> Optional[str]:
    """What is wrong when batch ``batch``'s output counts ``now`` are not batch 0's ``first``
    (one count per output in ``names``), or None when they are the same."""
    for name, was, count in zip(names, first, now):
        if was != count:
            return (f"output {name} has {count} values in batch {batch} but had {was} in batch "
                    "0; Caffe averages each output value over the batches, position by "
                    "position, so an output whose size changes has no mean")
    return None

