"""Which records of a TRAIN data layer a data-parallel rank reads: Caffe's skip rule.

Caffe's ``DataLayer::Skip`` keeps record ``k`` of the reading order on rank ``k mod
solver_count`` (TEST phases are not split). Rank ``r`` of ``W`` therefore serves, as its local
sample ``j``, the global sample ``j * W + r``; with a per-rank batch of ``B``, local batch ``b`` of
all ranks together holds global samples ``b*W*B .. (b+1)*W*B - 1``, exactly the records of batch
``b`` of one process reading at batch ``W*B``.

``start`` is the global sample where the shard's local counting begins: 0 for a fresh run, the
recorded global cursor when a snapshot taken with another number of ranks is resumed (the local
batch count then restarts at 0 and the global order carries on where it stopped).

Pure and picklable: the worker processes of the input pipeline carry it.

:class:`RecordSplit` is the same rule for passes that visit every record once (I-alternation's
support pass): rank ``r`` takes records ``k = r, r + W, r + 2W, ...`` of the key order, plus the
collectives that merge the ranks' results. It names no ``torch.distributed`` function, so the
alternation code that uses it stays free of them; :class:`~.parallel.DataParallel` builds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch


# The most samples a reading position may count (2^34, 1.7e10: a hundred times an ImageNet run
# of 450k iterations of 256). A larger one in a resume state is damage; honouring it would
# overflow the int64 sample numbers or spend hours skipping a transformer stream ahead
# (about 2 ns a draw).
MAX_SAMPLES = 2 ** 34


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` reads global samples ``start + j*world + rank`` (j = 0, 1, ...)."""

    rank: int = 0
    world: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    def positions(self, first: int, count: int) -> np.ndarray:
        """Global sample numbers (int64) of local samples ``first .. first+count-1``."""
        local = first + np.arange(count, dtype=np.int64)
        return self.start + local * self.world + self.rank

    def cursor(self, served: int) -> int:
        """The global data cursor once every rank has served ``served`` local samples."""
        return self.start + served * self.world

    def state(self, served: int) -> Dict[str, int]:
        """What a snapshot records: the shard geometry and the global cursor."""
        return {"world_size": self.world, "shard_start": self.start,
                "global_cursor": self.cursor(served)}

    def resumed(self, state: Mapping[str, object], served: int) -> Tuple["Shard", int]:
        """This rank's shard and local served count continuing from a :meth:`state` taken by
        any rank of a run that had served ``served`` local samples per rank.

        The same number of ranks continues the local counting unchanged (so per-batch random
        draws repeat exactly); another number starts counting afresh at the global cursor."""
        world = int(state.get("world_size", 1))
        start = int(state.get("shard_start", 0))
        if world < 1 or not 0 <= start <= MAX_SAMPLES or not 0 <= served <= MAX_SAMPLES:
            raise ValueError(f"world_size {world}, shard_start {start} and served {served} must "
                             f"be >= 1, in [0, 2^34] and in [0, 2^34]")
        # The global cursor bounds every position either branch reads (a huge world_size passed
        # the checks above and overflowed the int64 sample numbers at the first batch).
        cursor = start + served * world
        if cursor > MAX_SAMPLES:
            raise ValueError(f"world_size {world}, shard_start {start} and served {served} put "
                             f"the global cursor at {cursor}, beyond 2^34 samples")
        if world == self.world:
            return Shard(self.rank, self.world, start), served
        return Shard(self.rank, self.world, cursor), 0

    def regrouped(self, rank: int, world: int, served: int) -> Tuple["Shard", int]:
        """The shard of ``rank`` of ``world`` continuing from this one after ``served`` local
        samples (the local count is kept when the number of ranks does not change)."""
        if world == self.world:
            return Shard(rank, world, self.start), served
        return Shard(rank, world, self.cursor(served)), 0


UNSHARDED = Shard()


@dataclass(frozen=True)
class RecordSplit:
    """Rank ``rank`` of ``world`` takes records ``rank, rank + world, ...`` of a one-pass visit.

    ``gather(t)``: all-gather of a CPU tensor of the same shape and dtype on every rank; returns
    the ``world`` tensors (CPU), rank order. ``reduce(t)``: all-reduce (SUM) of a CPU float64
    tensor, returned on the CPU. Every rank must call them the same number of times with the
    same shapes (they are collectives).
    """

    rank: int
    world: int
    gather: Callable[[torch.Tensor], List[torch.Tensor]]
    reduce: Callable[[torch.Tensor], torch.Tensor]

    @property
    def shard(self) -> Shard:
        """The reading rule of the pass (local sample j is record ``j * world + rank``)."""
        return Shard(self.rank, self.world)

    def records(self, num_records: int, rank: int = -1) -> np.ndarray:
        """Record indices (int64) that ``rank`` (default: this rank) takes of ``num_records``."""
        r = self.rank if rank < 0 else rank
        return np.arange(r, num_records, self.world, dtype=np.int64)

    def rows_per_rank(self, num_records: int) -> int:
        """The most records any rank takes (rank 0's): the padded height of a gather."""
        return -(-num_records // self.world)


def records_taken(split: Optional[RecordSplit], num_records: int) -> int:
    """How many of ``num_records`` records a one-pass visit gives this rank (all of them
    without a split)."""
    return len(split.records(num_records)) if split is not None else num_records
