"""The training loop: Caffe's ``Solver::Step`` and ``Solver::Solve``, with hooks.

One iteration, top to bottom (the order of Caffe's ``Step``, which log parsers rely on)::

    clear the parameter gradients
    test every test net       when iter % test_interval == 0 (and iter > 0 or test_initialization)
    hooks.before_step
    forward + backward        iter_size times; the loss is their mean
    smooth the loss           over the last average_loss iterations (Caffe's UpdateSmoothedLoss)
    display                   "Iteration N, loss = X" + "Train net output #k: ..." lines
    hooks.after_backward      (pycaffe's on_gradients_ready)
    apply the update          logs "Iteration N, lr = X"; iter += 1
    non-finite loss guard     NaN/inf loss stops training (NonFiniteLossError)
    hooks.after_step
    snapshot                  every `snapshot` iterations, or when requested (SIGHUP)
    stop                      when requested (SIGINT)

A hook is any object with some of ``before_step(solver)``, ``after_backward(solver, loss)``,
``after_step(solver, loss)``, ``on_test(solver, net_id, results)``,
``on_snapshot(solver, paths)``; ``loss`` is the smoothed loss as a 0-d device tensor (call
``float()`` only when needed: each read is a host sync on a GPU).

The loop drives any object with the solver's public training surface: ``iter``, ``param``,
``net``/``nets``/``test_nets``, ``hooks``, ``smoother``, ``guard``, ``stopped_early``,
``refresh_params()``, ``push_host_writes()``, ``clear_param_diffs()``, ``display_due()``,
``forward_backward(debug)``, ``apply_update()``, ``test_all()``, ``take_requests()``,
``snapshot()``, ``check_snapshot_folder()`` and ``restore()``. It imports nothing from
:mod:`pycaffe_alt.solver` (the solver imports it); Caffe's number formatting comes from
:mod:`pycaffe_alt.log` and NonFiniteLossError from :mod:`pycaffe_alt.errors`.

Host syncs: the loss stays on the device. It is read at display iterations (to print it), by the
non-finite guard (every iteration on the CPU where reading is free; on a GPU at display
iterations, before every snapshot and at the end of ``step``), once when ``step`` returns, and, with
the SSD fork's ``lr_policy: "plateau"``, by the update of every iteration (its rate depends on it).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, List, Optional

import torch

from ..errors import NonFiniteLossError
from ..layers.data import PipelinedDataLayer
from ..log import format_value, get_logger, loss_suffix
from . import debug_info

logger = get_logger()


class LossSmoother:
    """Caffe's UpdateSmoothedLoss: the mean of the last ``average_loss`` iteration losses.

    Kept as float32 device tensors in Caffe's arithmetic order, so no host sync is needed.
    ``reset`` is called at the start of every ``step`` call, as Caffe clears ``losses_`` there.
    """

    def __init__(self, average_loss: int):
        self.average_loss = max(1, int(average_loss))
        self.reset(0)

    def reset(self, start_iter: int) -> None:
        self.start_iter = start_iter
        self.losses: List[torch.Tensor] = []
        self.smoothed: Optional[torch.Tensor] = None

    def update(self, loss: torch.Tensor, it: int) -> torch.Tensor:
        loss = loss.detach().float()
        if self.smoothed is None:
            self.smoothed = torch.zeros_like(loss)
        if len(self.losses) < self.average_loss:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed = (self.smoothed * (size - 1) + loss) / size
        else:
            idx = (it - self.start_iter) % self.average_loss
            self.smoothed = self.smoothed + (loss - self.losses[idx]) / self.average_loss
            self.losses[idx] = loss
        return self.smoothed

    def value(self) -> float:
        return 0.0 if self.smoothed is None else float(self.smoothed)


class NonFiniteLossGuard:
    """Notices when the loss becomes NaN or infinite, naming the first such iteration.

    ``observe`` records each iteration's loss without a host sync on GPUs (a device-side "first
    bad iteration" counter); ``check`` reads it. With ``stop`` (tools/train) it raises
    NonFiniteLossError, and since snapshots call ``check`` first, a diverged state is never
    written over the last good snapshot. Without (pycaffe solvers, as Caffe's Solver::Step,
    which only logs ``loss = nan``) it logs one warning and training goes on: programs check
    the loss themselves and lower the rate or reload.
    """

    def __init__(self, stop: bool = True) -> None:
        self.stop = stop
        self._warned = False
        self._first_bad: Optional[torch.Tensor] = None
        self._bad_value: Optional[torch.Tensor] = None

    def observe(self, loss: torch.Tensor, it: int) -> None:
        loss = loss.detach()
        if loss.device.type == "cpu":
            value = float(loss)
            if not math.isfinite(value) and self._first_bad is None:
                self._first_bad = torch.tensor(it)
                self._bad_value = torch.tensor(value)
            return
        bad = ~torch.isfinite(loss)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), dtype=loss.dtype, device=loss.device)
        fresh = bad & (self._first_bad < 0)
        self._first_bad = torch.where(fresh, torch.full_like(self._first_bad, it), self._first_bad)
        self._bad_value = torch.where(fresh, loss, self._bad_value)

    def failed_at(self) -> Optional[int]:
        if self._first_bad is None:
            return None
        it = int(self._first_bad)
        return it if it >= 0 else None

    def check(self, solver) -> None:
        it = self.failed_at()
        if it is None or (self._warned and not self.stop):
            return
        value = float(self._bad_value)
        if not self.stop:
            self._warned = True
            logger.warning("the loss became %s at iteration %d; training goes on (as Caffe's "
                           "does); tools/train would stop here", value, it)
            return
        kept = (f"the last good snapshot is {solver.last_snapshot[1]}" if solver.last_snapshot
                else "no snapshot was written in this run")
        raise NonFiniteLossError(
            f"training stopped: the loss became {value} at iteration {it}; {kept}",
            where=solver.source,
            hint="lower base_lr, set clip_gradients, or check the data (resume from the last "
                 "good snapshot with --snapshot)")


class CallbackHook:
    """pycaffe's ``solver.add_callback(on_start, on_gradients_ready)`` as a hook."""

    def __init__(self, on_start, on_gradients_ready):
        self.on_start = on_start
        self.on_gradients_ready = on_gradients_ready

    def before_step(self, solver) -> None:
        self.on_start()

    def after_backward(self, solver, loss) -> None:
        self.on_gradients_ready()


def _call(hooks, method: str, *args) -> None:
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is not None:
            fn(*args)


def _test_due(solver) -> bool:
    p = solver.param
    return bool(p.test_interval) and bool(solver.test_nets) and solver.iter % p.test_interval == 0 \
        and (solver.iter > 0 or p.test_initialization)


def display(solver, smoothed: torch.Tensor) -> None:
    """Caffe's display block: the smoothed loss, then every element of every net output."""
    logger.info("Iteration %d, loss = %s", solver.iter, format_value(float(smoothed)))
    net = solver.net
    weights = net.blob_loss_weights
    index = 0
    for name in net.outputs:
        flat = net.blob_value(name).detach().reshape(-1).float().cpu().tolist()
        for v in flat:
            logger.info("    Train net output #%d: %s = %s%s", index, name, format_value(v),
                        loss_suffix(weights[name], v))
            index += 1


def run_steps(solver, iters: int) -> float:
    """Caffe's Solver::Step(iters); returns the last smoothed loss."""
    start_iter = solver.iter
    stop_iter = start_iter + iters
    solver.smoother.reset(start_iter)
    solver.stopped_early = False
    solver.push_host_writes()
    solver.refresh_params()
    with datasets_held(solver.nets):
        _iterate(solver, stop_iter)
    solver.guard.check(solver)
    return solver.smoother.value()


@contextlib.contextmanager
def datasets_held(nets: Iterable[Any]) -> Iterator[None]:
    """Keep every data layer's database open between batches while training runs (outside
    training each batch closes it, so that other code in the process can open it)."""
    with contextlib.ExitStack() as stack:
        for net in nets:
            for layer in net.layer_sequence:
                if isinstance(layer, PipelinedDataLayer):
                    stack.enter_context(layer.hold())
        yield


def _iterate(solver, stop_iter: int) -> None:
    hooks = solver.hooks
    while solver.iter < stop_iter:
        solver.clear_param_diffs()
        if _test_due(solver):
            solver.test_all()
            if solver.stopped_early:  # a stop was requested while testing
                break
        _call(hooks, "before_step", solver)
        shown = solver.display_due()
        # Caffe's debug_info lines come with display iterations only (Step sets it per pass).
        loss = solver.forward_backward(debug=shown and solver.param.debug_info)
        smoothed = solver.smoother.update(loss, solver.iter)
        if shown:
            display(solver, smoothed)
        _call(hooks, "after_backward", solver, smoothed)
        solver.apply_update()
        # The guard sees every loss; on a GPU it reads it (a sync) only at display iterations.
        solver.guard.observe(loss, solver.iter - 1)
        if shown or loss.device.type == "cpu":
            solver.guard.check(solver)
        _call(hooks, "after_step", solver, smoothed)
        snapshot_requested, stop_requested = solver.take_requests()
        if (solver.param.snapshot and solver.iter % solver.param.snapshot == 0) \
                or snapshot_requested:
            solver.snapshot()
        if stop_requested:
            solver.stopped_early = True
            break


def solve(solver, resume: Optional[str] = None) -> None:
    """Caffe's Solver::Solve."""
    logger.info("Solving %s", solver.net.net_param.name)
    logger.info("Learning Rate Policy: %s", solver.param.lr_policy)
    solver.stopped_early = False
    if resume:
        logger.info("Restoring previous solver status from %s", resume)
        solver.restore(resume)
    p = solver.param
    # The final snapshot must not be the first moment we learn the folder is unwritable.
    solver.check_snapshot_folder(required=p.snapshot > 0 or p.snapshot_after_train)
    start = solver.iter
    run_steps(solver, p.max_iter - solver.iter)
    if p.snapshot_after_train and (not p.snapshot or solver.iter % p.snapshot != 0):
        solver.snapshot()
    if solver.stopped_early:
        logger.info("Optimization stopped early.")
        return
    # One more forward pass to show the loss and outputs of the final weights (no update).
    if solver.display_due():
        # Caffe's Step leaves the net's debug_info flag as the last iteration set it, so this
        # pass logs its [Forward] lines when that iteration was a display one.
        trace = [] if p.debug_info and solver.iter > start and solver.display_due(solver.iter - 1) \
            else None
        with torch.no_grad():
            values = solver.net.run(trace=trace)
            if trace is not None:
                debug_info.log_forward(trace)
            loss = solver.net.loss(values)
        smoothed = solver.smoother.update(loss, solver.iter)
        solver.guard.observe(loss, solver.iter)
        solver.guard.check(solver)
        logger.info("Iteration %d, loss = %s", solver.iter, format_value(float(smoothed)))
    if p.test_interval and solver.iter % p.test_interval == 0:
        solver.test_all()
    logger.info("Optimization Done.")
