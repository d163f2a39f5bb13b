"""Running a Solver as one rank of a data-parallel job, with Caffe's multi-GPU semantics.

Inside an initialized default process group (:func:`.group.join`, or your own
``torch.distributed.init_process_group``), every rank builds the same solver and wraps it::

    solver = pycaffe_alt.get_solver("solver.prototxt", device=device)
    dp = DataParallel(solver)          # same weights everywhere, TRAIN data sharded
    dp.restore("x_iter_1000.solverstate")   # optional, on every rank
    dp.solve()

What it does, following Caffe's ``caffe train -gpu 0,1`` (P2PSync/NCCL):

- every rank runs the net at the file's ``batch_size``; the effective batch is ``W x batch_size``;
- the TRAIN net's data layers (Data, ImageData, HDF5Data) read record ``k`` of their order on
  rank ``k mod W`` (:mod:`.sharding`), so ``W`` ranks at batch ``B`` read, batch by batch, the
  records one process reads at batch ``W*B``; test nets are not split (rank 0 alone tests);
- rank 0's parameters, history, iteration and data cursors are broadcast at the start, so every
  rank starts from the same weights;
- after the iteration's ``iter_size`` backward passes, gradients are all-reduced and scaled by
  ``1/W`` (:mod:`.reducer`, overlapped with backward) before clipping, normalization,
  regularization and the update, which every rank then applies identically;
- once per iteration the ranks exchange their loss and their pending stop/snapshot requests:
  a request made on any rank (:meth:`DataParallel.request_stop`, SIGINT/SIGHUP through
  tools/train) acts on all at the same iteration; a NaN/inf loss on any rank stops the job,
  naming that rank, before the update;
- rank 0 alone logs Caffe's lines, tests and writes snapshots (the ordinary files); their resume
  state records the global data cursor, so a snapshot resumes exactly on the same number of ranks
  and continues the same record order on any other number;
- BatchNorm statistics stay per rank, as in Caffe (each rank normalizes by its own batch and keeps
  its own running averages; rank 0's are the ones saved), unless ``sync_batchnorm=True`` makes
  them the global batch's;
- the paper's method: eq. 41's batch sums and the alternation schedule's decisions (patience,
  staleness) are summed over the ranks; I-alternation's support pass is split by record, each
  rank computing records ``r, r+W, ...`` and all-gathering the packed rows into every rank's
  (replicated) mask store;
- layers that draw random numbers while training (Dropout, random crops and mirrors) use a
  different stream on every rank, as Caffe seeds each solver with ``random_seed + rank``.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from ..errors import CaffeError, DistributedError
from ..log import get_logger
from ..mode import set_random_seed
from ..signal_requests import CountedRequest
from .failure import FailureBoard, Watchdog, is_communication_error
from .reducer import DEFAULT_BUCKET_BYTES, GradientReducer
from .sharding import RecordSplit

logger = get_logger()


def _shardable(net) -> Dict[str, object]:
    """The TRAIN net's data layers that can read a shard of their records, by name."""
    return {name: m for name, m in net.layer_modules.items()
            if callable(getattr(m, "set_shard", None))}


class DataParallel:
    """One rank of a data-parallel job around ``solver`` (see the module docstring).

    ``group``: the process group (default: the default group). ``overlap``: start the gradient
    all-reduce during backward (else after it). ``board``: a :class:`.failure.FailureBoard` on
    the job's store (from :func:`.group.join`) for failure reports between ranks; without it a
    failed rank still ends the job (the others' collectives fail) but they cannot name it.
    ``quiet``: ranks other than 0 log warnings and errors only. ``sync_batchnorm``: the TRAIN
    net's BatchNorm layers normalize by the statistics of the global batch (a differentiable
    all-reduce of their sums, the layer's ``sum_over_ranks`` hook) instead of Caffe's per-rank
    ones, so a net with BatchNorm also trains as one process at batch ``W*B``.
    """

    def __init__(self, solver, group=None, *, overlap: bool = True,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, board: Optional[FailureBoard] = None,
                 quiet: bool = True, watchdog: bool = True, sync_batchnorm: bool = False):
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("DataParallel needs an initialized process group",
                                   hint="call pycaffe_alt.distributed.join(...) or "
                                        "torch.distributed.init_process_group first")
        if solver.param.lr_policy == "plateau":
            # Every rank reaches this, so the job stops on all of them rather than hanging.
            raise DistributedError(
                'lr_policy "plateau" cannot run data-parallel: the SSD fork drops the rate from '
                "the root solver's smoothed loss alone (its worker solvers apply no update), "
                "while here every rank applies the update with its own loss, so the ranks' "
                "rates, and then their weights, would part", where=f"{solver.source}: lr_policy",
                hint="train on one process, or use lr_policy \"multistep\" with the iterations "
                     "at which the plateau run dropped the rate", rank=0)
        self.solver = solver
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.root = self.rank == 0
        solver.root_solver = self.root
        solver.set_world_size(self.world)  # epochs are world_size x shorter in iterations
        if quiet and not self.root:
            logger.setLevel(max(logger.level, 30))  # WARNING: Caffe's non-root solvers are silent
        # A signal handler may run between any two bytecodes of the exchange (e.g. right after
        # a blocking all_gather returns): counted requests lose none (signal_requests.py).
        self._stop_request = CountedRequest()
        self._snapshot_request = CountedRequest()
        self.exchange_seconds = 0.0  # time spent in the per-iteration exchange (benchmarks)
        self.board = board
        self.watchdog = Watchdog(self.board) if (self.board is not None and watchdog) else None
        if self.watchdog is not None:
            self.watchdog.start()
        self._device = solver.device
        self._synchronize_start()
        # Caffe seeds solver r with random_seed + r: dropout masks differ between ranks.
        if solver.param.random_seed >= 0 and self.rank > 0:
            set_random_seed(solver.param.random_seed + self.rank)
        solver.refresh_params()
        self.reducer = GradientReducer([i.param for i in solver.net.learnable_params], group,
                                       passes=solver.param.iter_size, overlap=overlap,
                                       bucket_bytes=bucket_bytes)
        solver.hooks.insert(0, self)  # averaged gradients before any user callback sees them
        self._install_support_reduction()
        self.sync_batchnorm = sync_batchnorm
        self._synced = [m for m in solver.net.layer_sequence
                        if hasattr(m, "sum_over_ranks")] if sync_batchnorm else []
        for layer in self._synced:
            layer.sum_over_ranks = self._differentiable_sum

    # ------------------------------------------------------------------ start-up
    def _all_tensors(self) -> List[torch.Tensor]:
        seen, out = set(), []
        for module in self.solver.net.layer_sequence:
            for p in module.blobs:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _synchronize_start(self) -> None:
        """Rank 0's weights, history, iteration and data cursors on every rank; then shard."""
        s = self.solver
        s.push_host_writes()
        with torch.no_grad():
            for t in self._all_tensors() + list(s.history):
                dist.broadcast(t.data, 0, group=self.group)
        net = s.net
        layers = _shardable(net)
        meta = [{"iter": s.iter, "current_step": s.current_step,
                 "data": {name: layer.state() for name, layer in layers.items()}}]
        dist.broadcast_object_list(meta, 0, group=self.group)
        s.iter = meta[0]["iter"]
        s.current_step = meta[0]["current_step"]
        for name, layer in layers.items():
            if not self.root:
                layer.load_state(meta[0]["data"][name])
            layer.set_shard(self.rank, self.world)

    def restore(self, state_path: str) -> None:
        """Resume every rank from a snapshot (the files must be readable on every rank's
        machine); the data layers continue the global record order (see :mod:`.sharding`)."""
        self.solver.restore(state_path)
        # The snapshot holds rank 0's generators; the others get their own, deterministically.
        if self.solver.param.random_seed >= 0 and self.rank > 0:
            s = self.solver
            set_random_seed(s.param.random_seed + self.rank + self.world * s.iter)

    def _sum_over_ranks(self, stats: torch.Tensor) -> torch.Tensor:
        """All-reduce (SUM) of eq. 41's per-unit sums and example count: every rank thresholds
        the statistics of the global batch, so its batch support is one process's at W*B."""
        stats = stats.clone()
        try:
            dist.all_reduce(stats, group=self.group)
        except RuntimeError as e:
            raise self._lost(e, self.solver.iter) from None
        return stats

    def _differentiable_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks whose backward sums the gradients over the ranks (BatchNorm's
        global batch statistics): every rank's input gets the gradient of every rank's loss."""
        return dist_nn.all_reduce(t, group=self.group)

    def _gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        """All-gather of a CPU tensor (through the device: NCCL reads device memory)."""
        local = t.to(self._device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        try:
            dist.all_gather(parts, local, group=self.group)
        except RuntimeError as e:
            raise self._lost(e, self.solver.iter) from None
        return [p.cpu() for p in parts]

    def _sum_on_host(self, t: torch.Tensor) -> torch.Tensor:
        return self._sum_over_ranks(t.to(self._device)).cpu()

    def _install_support_reduction(self) -> None:
        """The paper's method over the global batch (TRAIN net only: rank 0 alone tests):
        eq. 41's sums of B-alternation and SupportMask source BATCH, and the alternation
        schedule's patience/staleness counts, through the hooks those take for exactly this;
        I-alternation's support pass split by record (:class:`.sharding.RecordSplit`)."""
        if hasattr(self.solver, "reduce_sums"):  # AlternationSolver's hook
            self.solver.reduce_sums = self._sum_over_ranks
        if hasattr(self.solver, "record_split"):
            self.solver.record_split = RecordSplit(self.rank, self.world, self._gather,
                                                   self._sum_on_host)
        for layer in self.solver.net.layer_sequence:
            if getattr(layer, "source", None) == "BATCH" and hasattr(layer, "reduce_sums"):
                layer.reduce_sums = self._sum_over_ranks

    # ------------------------------------------------------------------ requests (signals)
    def request_stop(self) -> None:
        """Stop every rank after the current iteration (then the final snapshot is written).
        Safe to call from a signal handler."""
        self._stop_request.make()

    def request_snapshot(self) -> None:
        """Snapshot (rank 0) after the current iteration, on behalf of the whole job. Safe to
        call from a signal handler."""
        self._snapshot_request.make()

    # ------------------------------------------------------------------ hooks (train.loop)
    def before_step(self, solver) -> None:
        self.reducer.start_iteration()

    def after_backward(self, solver, smoothed) -> None:
        """Average the gradients, then agree on the loss's finiteness and on requests."""
        it = solver.iter
        try:
            self.reducer.finish()
            # The smoothed loss turns NaN with the first NaN loss, and training stops there.
            stop, snapshot = self._stop_request.take(), self._snapshot_request.take()
            local = torch.tensor([float(smoothed), float(stop), float(snapshot)],
                                 dtype=torch.float64, device=self._device)
            gathered = [torch.empty_like(local) for _ in range(self.world)]
            t0 = time.perf_counter()
            dist.all_gather(gathered, local, group=self.group)
            self.exchange_seconds += time.perf_counter() - t0
        except RuntimeError as e:
            raise self._lost(e, it) from None
        rows = torch.stack(gathered).cpu().tolist()
        bad = [(r, row[0]) for r, row in enumerate(rows) if not math.isfinite(row[0])]
        if bad:
            kept = (f"the last good snapshot is {solver.last_snapshot[1]}" if solver.last_snapshot
                    else "no snapshot was written in this run")
            ranks = ", ".join(f"rank {r} ({v})" for r, v in bad)
            raise DistributedError(
                f"training stopped: the loss became NaN or infinite at iteration {it} on "
                f"{ranks}; the update was not applied; {kept}", where=solver.source,
                hint="lower base_lr, set clip_gradients, or check that rank's data (resume from "
                     "the last good snapshot with --snapshot)", rank=0)
        if any(row[1] for row in rows):
            solver.request_stop()
        if any(row[2] for row in rows):
            solver.request_snapshot()

    def _lost(self, error: BaseException, iteration: int) -> BaseException:
        if self.board is None or not is_communication_error(error):
            return error
        return self.board.diagnose(error, iteration)

    # ------------------------------------------------------------------ running
    def step(self, iters: int) -> float:
        """Data-parallel ``solver.step(iters)`` (every rank must call it with the same count)."""
        return self._guarded(lambda: self.solver.step(iters))

    def solve(self) -> None:
        """Data-parallel ``solver.solve()``: train to max_iter; rank 0 snapshots and tests."""
        self._guarded(self.solver.solve)
        self._guarded(lambda: dist.barrier(group=self.group))  # rank 0 hosts the store: wait

    def _guarded(self, fn):
        it = self.solver.iter
        try:
            return fn()
        except DistributedError:
            raise
        except CaffeError as e:
            if self.board is not None:
                self.board.report(f"{e.what}")
            raise DistributedError(e.what, f"rank {self.rank}: {e.where}" if e.where
                                   else f"rank {self.rank}", e.hint, rank=self.rank) from None
        except RuntimeError as e:
            lost = self._lost(e, self.solver.iter if self.solver.iter else it)
            if lost is e:
                if self.board is not None:
                    self.board.report(f"crashed with {type(e).__name__}: {e}")
                raise
            raise lost from None

    def close(self) -> None:
        """Remove the hooks and stop the watchdog (the process group stays)."""
        self.reducer.close()
        if hasattr(self.solver, "record_split"):  # the solver goes on as one process
            self.solver.record_split = None
            self.solver.reduce_sums = None
        for layer in self._synced:
            layer.sum_over_ranks = None
        if self in self.solver.hooks:
            self.solver.hooks.remove(self)
        if self.board is not None:
            self.board.finished()
        if self.watchdog is not None:
            self.watchdog.stop()
