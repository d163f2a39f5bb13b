"""Gradient averaging across ranks, overlapped with the backward pass.

Caffe's NCCL solver sums every learnable parameter's diff over the ranks and scales the sum by
``1 / solver_count`` once the iteration's ``iter_size`` backward passes are done, before
``ApplyUpdate`` clips, normalizes, regularizes and updates. :class:`GradientReducer` gives the
same numbers, but starts communicating while backward still runs (as torch's DDP does): the
parameters are grouped into buckets in reverse order of the net (the order backward reaches
them); a parameter's post-accumulate hook counts its passes, and when every parameter of a bucket
has its final gradient of the iteration, the bucket's all-reduce is started asynchronously.
:meth:`GradientReducer.finish` starts what is left (parameters that got no gradient count as
zeros, Caffe's cleared diffs), waits, scales by ``1/W`` and hands every parameter its averaged
gradient. With ``overlap=False`` everything is reduced in :meth:`finish` (the comparison point of
benchmarks/scaling.py).
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 4 << 20


class _Bucket:
    def __init__(self, params: List[torch.nn.Parameter]):
        self.params = params
        self.remaining = len(params)
        self.buffer: Optional[torch.Tensor] = None
        self.work = None


class GradientReducer:
    """Averages the gradients of ``params`` over the ranks of ``group`` (sum x 1/world).

    Call :meth:`start_iteration` before the iteration's first forward pass and :meth:`finish`
    after its last backward pass; ``passes`` is the number of backward passes per iteration
    (the solver's ``iter_size``).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], group=None, *, passes: int = 1,
                 overlap: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group = group
        self.world = dist.get_world_size(group)
        self.passes = max(1, int(passes))
        self.overlap = overlap
        learnable = [p for p in params if p.requires_grad]
        self.buckets: List[_Bucket] = []
        current: List[torch.nn.Parameter] = []
        size = 0
        for p in reversed(learnable):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._counts = {id(p): 0 for p in learnable}
        self._handles = []
        self.comm_seconds_waited = 0.0  # time finish() spent waiting (benchmarks)
        if overlap:
            self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in learnable]
        self.start_iteration()

    def start_iteration(self) -> None:
        for key in self._counts:
            self._counts[key] = 0
        for b in self.buckets:
            b.remaining = len(b.params)
            b.buffer = b.work = None

    def _ready(self, p: torch.nn.Parameter) -> None:
        key = id(p)
        self._counts[key] += 1
        if self._counts[key] != self.passes:
            return
        bucket = self._bucket_of[key]
        bucket.remaining -= 1
        if bucket.remaining == 0:
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in bucket.params]
        bucket.buffer = torch.cat(flat) if len(flat) > 1 else flat[0].clone()
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        """Complete every bucket's all-reduce and set each gradient to the ranks' mean."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        t0 = time.perf_counter()
        for b in self.buckets:
            b.work.wait()
        self.comm_seconds_waited += time.perf_counter() - t0
        scale = 1.0 / self.world
        with torch.no_grad():
            for b in self.buckets:
                b.buffer.mul_(scale)  # Caffe: caffe_gpu_scal(1 / solver_count) after the sum
                offset = 0
                for p in b.params:
                    n = p.numel()
                    p.grad = b.buffer[offset:offset + n].view_as(p)
                    offset += n
                b.work = None

    def close(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
