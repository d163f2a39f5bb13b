"""The alternation solver: training by alternating weights and multi-layer supports.

``type: "Alternation"`` in a solver prototxt (``get_solver``/``tools/train`` pick this class) with
an ``alternation_param``; every other field means what it means for Caffe's solvers, and the
update rule is ``alternation_param.base_type`` (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam).

Schedule (docs/alternation.md, "Alternation solver"):

* **warm-up** (``warmup_iter``, or ``warmup_epochs``): regular training, every HardThreshold in
  RELU_BIAS mode (a ReLU after a bias of -beta), so beta is learned as a bias; at its end the
  layers switch to THRESHOLD mode;
* **mode INSTANCE** (I-alternation): a *support step* (one pass over the training set, each
  record's support stored in a :class:`MaskStore` under its record index), then a *weight step*
  (training with those supports fixed) for ``gap_iter`` / ``gap_epochs`` or until the training
  loss stops improving for ``patience`` windows; repeat until ``max_iter``;
* **mode BATCH** (B-alternation): each training batch gets eq. 41's support (or the calibrated /
  majority-vote variant, ``batch_rule``, ``support_target_on``), computed in the same forward
  pass, applied as a fixed support; no store;
* **weight_step LEAST_SQUARES / CONVEX** (exact weight steps, docs/exact_steps.md): after the
  warm-up every iteration is one support step (supports of HardThreshold *and ReLU* layers, plus
  the max-pool switches) and one sweep of exact layer solves (:mod:`.exact_step`); no gap.

Staleness (``staleness_threshold``, ``reset_momentum``, ``learn_beta``, ``log_threshold_gap``):
the weight step measures how far its stored supports are from eq. 12 on each batch
(:mod:`.staleness`), can call the next support step when they are too stale, and at display
iterations logs the thresholded-minus-masked loss.

State that a snapshot must carry (phase, counters, patience, the mask store file) goes into the
solverstate's ``resume_state`` under ``"alternation"``; the store itself is written next to the
snapshot as ``<prefix>_iter_N.masks``.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import torch

from ..blob_memory import blob_bytes, device_memory, human_bytes
from ..distributed.sharding import RecordSplit
from ..errors import SolverError
from ..log import get_logger
from ..memory_format import activation_format
from ..proto import caffe_pb2
from ..solver.rules import UPDATE_RULES
from ..solver.snapshot import snapshot_companion, snapshot_filename
from ..solver.solver import Solver, SolverSource, format_value
from .exact_step import ExactWeightStep
from .mask_store import MaskStore
from .staleness import MeteredSupport, StalenessMeter, threshold_gap
from .support_pass import (BatchSupport, StoredSupports, batch_size_of, capture_rng,
                           data_states, data_steps, first_data_layer, fraction_text,
                           hard_threshold_layers, load_data_states, record_count,
                           run_support_pass, store_supportmask_layers, support_layout,
                           thresholded_loss)

logger = get_logger()

_AP = caffe_pb2.AlternationParameter
STATE_VERSION = 1
PHASES = ("warmup", "support", "weights")


class _ScheduleHook:
    """Drives the schedule from the training loop: phase switches before an iteration's forward
    pass, loss bookkeeping for ``patience`` after its update."""

    def __init__(self, solver: "AlternationSolver"):
        self.solver = solver

    def before_step(self, solver) -> None:
        self.solver._before_iteration()

    def after_step(self, solver, smoothed) -> None:
        self.solver._after_iteration()


class AlternationSolver(Solver):
    """A :class:`Solver` that alternates between weights and supports (``type: "Alternation"``).

    ``AlternationSolver(solver, **kwargs)`` takes the same arguments as :class:`Solver`.
    Attributes: ``phase`` (``"warmup"``, ``"support"`` — a support step is due — or
    ``"weights"``), ``mode`` (``"INSTANCE"`` or ``"BATCH"``), ``store`` (the :class:`MaskStore`
    of I-alternation, None before the first support step and in BATCH mode), ``records`` (training
    set size), ``iters_per_epoch``, ``support_steps`` (count), ``last_support_stats``,
    ``last_batch_supports`` (BATCH: the last eq. 41 mask per layer), ``reduce_sums`` (the
    all-reduce hook of data-parallel training: eq. 41's sums, see
    :class:`~pycaffe_alt.alternation.support_pass.BatchSupport`, and the patience and staleness
    counts, so every rank takes the schedule's decisions on the global batch), ``record_split``
    (INSTANCE, data-parallel: a :class:`~pycaffe_alt.distributed.sharding.RecordSplit` that
    splits the support pass by record over the ranks),
    ``last_batch_betas`` (BATCH, calibrated: the per-example threshold per layer),
    ``last_staleness`` (I: ``{"per_layer", "overall"}`` of the last measured batch),
    ``last_threshold_gap`` (the last thresholded-minus-masked loss, see :mod:`.staleness`).
    Methods: :meth:`support_step`, :meth:`test` (``masked=True`` for MaskT), plus Solver's.
    """

    reads_blocks = ("alternation_param",)

    def __init__(self, solver: SolverSource, **kwargs):
        super().__init__(solver, **kwargs)
        ap = self.param.alternation_param
        self.mode: str = _AP.Mode.Name(ap.mode)
        self.support_rule: str = _AP.SupportRule.Name(ap.support_rule)
        self.support_beta = float(ap.support_beta)
        self.batch_rule: str = _AP.BatchRule.Name(ap.batch_rule)
        self.support_target_on = float(ap.support_target_on)
        self.staleness_threshold = float(ap.staleness_threshold)
        self.last_batch_betas: Dict[str, torch.Tensor] = {}
        self.last_staleness: Optional[Dict[str, Any]] = None
        self.last_threshold_gap: Optional[Dict[str, float]] = None
        self._meter = StalenessMeter()
        self.weight_step: str = _AP.WeightStep.Name(ap.weight_step)
        self.exact: Optional[ExactWeightStep] = None
        self.last_exact_stats: Optional[Dict[str, Any]] = None
        self._exact_ran = False
        self.reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.record_split: Optional[RecordSplit] = None
        self.last_batch_supports: Dict[str, torch.Tensor] = {}
        self.last_support_stats: Optional[Dict[str, Any]] = None
        self._check_alternation_param(ap)

        self._train_hts = hard_threshold_layers(self.net)
        if not self._train_hts and self.weight_step == "SGD":
            raise SolverError(f"the train net {self._net_file_name()} has no HardThreshold layer; "
                              "the alternation solver trains weights and supports of "
                              "HardThreshold layers", self._where("type"),
                              "convert its ReLUs first: tools/convert_relu IN.prototxt "
                              "OUT.prototxt (then train OUT.prototxt), or use type: \"SGD\"")
        stored = store_supportmask_layers(self.net)
        if stored:
            raise SolverError(f"SupportMask layer(s) {', '.join(stored)} with source STORE are "
                              "not driven by the alternation solver", self._where("type"),
                              "the solver stores the supports of HardThreshold layers; use "
                              "HardThreshold instead (or SupportMask source BATCH/BOTTOM)")
        for _, ht in self._train_hts:
            ht.learn_beta_fixed = bool(ap.learn_beta)
        self._test_hts = [hard_threshold_layers(n) for n in self.test_nets]
        self.layout = support_layout(self.net)
        self._data_layer = first_data_layer(self.net)
        records = record_count(self._data_layer) if self._data_layer is not None else None
        if records is None:
            raise SolverError(f"the train net {self._net_file_name()} has no data layer with a "
                              "known number of records", self._where("alternation_param"),
                              "epochs and the per-record supports need a Data, ImageData or "
                              "HDF5Data layer")
        self.records = int(records)
        self.batch_size = batch_size_of(self._data_layer)
        self._check_pass_batches(ap)
        self._epoch_schedule()

        # Schedule state (all of it goes into snapshots).
        self.phase: str = "warmup" if self.warmup_iters > 0 else \
            ("support" if self.mode == "INSTANCE" else "weights")
        self.support_steps = 0
        self.last_support_iter: Optional[int] = None
        self.best_loss: Optional[float] = None
        self.bad_windows = 0
        self._window_sum: Optional[torch.Tensor] = None
        self._window_count = 0
        self._last_loss: Optional[torch.Tensor] = None
        self.store: Optional[MaskStore] = None
        self._stored: Optional[StoredSupports] = None
        self._stored_providers: Dict[str, MeteredSupport] = {}

        if self.weight_step != "SGD":
            self.exact = self._make_exact_step(ap)
        self._set_modes("RELU_BIAS" if self.phase == "warmup" else "THRESHOLD")
        if self.phase == "weights":  # BATCH without warm-up
            self._install_batch_supports()
        self.hooks.insert(0, _ScheduleHook(self))
        logger.info("Alternation: mode %s (%s-alternation), update rule %s, %d HardThreshold "
                    "layer(s) (%s), %d records, %.4g iterations per epoch, warm-up %d "
                    "iterations, support step every %s", self.mode, self.mode[0],
                    ap.base_type, len(self._train_hts), ", ".join(n for n, _ in self._train_hts),
                    self.records, self.iters_per_epoch, self.warmup_iters,
                    self._gap_text())

    # ------------------------------------------------------------------ configuration
    def _rule_type(self) -> str:
        base = self.param.alternation_param.base_type
        if base not in UPDATE_RULES:
            raise SolverError(f'alternation_param.base_type "{base}" is not a known update rule',
                              self._where("alternation_param.base_type"),
                              "use one of: " + ", ".join(UPDATE_RULES))
        return base

    def _check_alternation_param(self, ap) -> None:
        if not self.param.HasField("alternation_param"):
            logger.warning("%s: type \"Alternation\" without alternation_param: using its "
                           "defaults (I-alternation, SGD, no warm-up, a support step every epoch)",
                           self.source)
        # Written as "not x >= 0" so that NaN fails too; the epoch counts and beta must also be
        # finite (an infinite warm-up cannot be rounded to iterations; beta = inf turns off
        # every unit).
        checks = [(ap.warmup_iter < 0 or not 0 <= ap.warmup_epochs < math.inf,
                   "warm-up must be >= 0 and finite"),
                  (ap.gap_iter < 0 or not 0 <= ap.gap_epochs < math.inf,
                   "the gap must be >= 0 and finite"),
                  (ap.patience < 0, "patience must be >= 0"),
                  (not 0 <= ap.support_beta < math.inf,
                   "support_beta must be >= 0 and finite (it bounds squares)"),
                  (not 0 <= ap.min_improvement < math.inf,
                   "min_improvement must be >= 0 and finite"),
                  (ap.support_batch_size < 0, "support_batch_size must be >= 0"),
                  (not 0 <= ap.staleness_threshold < 1,
                   "staleness_threshold must be in [0, 1) (a share of support bits; 0 = off)"),
                  (not 0 <= ap.support_target_on <= 1,
                   "support_target_on must be in [0, 1] (a share of units; 0 = off)"),
                  (ap.support_target_on > 0 and ap.batch_rule == _AP.MAJORITY,
                   "support_target_on calibrates eq. 41 (batch_rule EQ41); the majority vote "
                   "has no threshold to calibrate")]
        for bad, what in checks:
            if bad:
                raise SolverError(what, self._where("alternation_param"))
        if ap.weight_step != _AP.SGD and ap.mode != _AP.INSTANCE:
            raise SolverError(f"weight_step {_AP.WeightStep.Name(ap.weight_step)} solves with "
                              "per-record supports; mode BATCH has none",
                              self._where("alternation_param"), "use mode: INSTANCE")
        if ap.weight_step != _AP.SGD and (ap.lbfgs_iter <= 0 or ap.cg_iter < 0 or
                                          ap.exact_batch_size < 0 or ap.max_dense_unknowns < 0):
            raise SolverError("lbfgs_iter must be > 0, cg_iter, exact_batch_size and "
                              "max_dense_unknowns >= 0", self._where("alternation_param"))
        if ap.mode == _AP.INSTANCE and ap.weight_step == _AP.SGD and ap.gap_iter <= 0 and \
                ap.gap_epochs <= 0 and ap.patience <= 0 and ap.staleness_threshold <= 0:
            raise SolverError("I-alternation needs a gap (gap_iter or gap_epochs), patience or "
                              "a staleness_threshold to end a weight step",
                              self._where("alternation_param"),
                              "e.g. alternation_param { gap_epochs: 4 }")

    def _check_pass_batches(self, ap) -> None:
        """Refuse a support or exact pass batch whose input blob alone exceeds the device's
        memory: the pass reads that many records into one batch (wrapping around the dataset),
        and support_batch_size 2000000000 filled memory for minutes instead of failing."""
        top = data_steps(self.net)[0].tops[0]
        record_shape = tuple(self.net.blobs[top].shape)[1:]
        capacity = device_memory(self.device)
        for field in ("support_batch_size", "exact_batch_size"):
            size = int(getattr(ap, field))
            needed = blob_bytes((size,) + record_shape)
            if size > 0 and capacity is not None and needed > capacity:
                raise SolverError(f"{field} {size} makes the pass's '{top}' batch "
                                  f"{human_bytes(needed)}, more than the {human_bytes(capacity)} "
                                  f"of memory on {self.device}", self._where("alternation_param"),
                                  f"leave it 0 (the train batch, {self.batch_size}) or give a "
                                  "smaller batch")

    def _make_exact_step(self, ap) -> ExactWeightStep:
        work = self._store_work_path()
        return ExactWeightStep(
            self.net, self.weight_step, self.records, float(self.param.weight_decay),
            regularization=self.param.regularization_type,
            batch_size=int(ap.exact_batch_size), order=_AP.SolveOrder.Name(ap.solve_order),
            lbfgs_iter=int(ap.lbfgs_iter), max_dense=int(ap.max_dense_unknowns),
            cg_iter=int(ap.cg_iter), only=tuple(ap.exact_layer),
            rule=self.support_rule, beta=self.support_beta,
            where=self._where("alternation_param.weight_step"),
            store_path=work[:-len("_masks.bin")] + "_exact_masks.bin" if work else None,
            max_ram_bytes=int(ap.mask_store_max_ram))

    def _epoch_schedule(self) -> None:
        """Iterations per epoch and the schedule set in epochs. A data-parallel job reads
        world_size x batch_size records per iteration (Caffe's multi-GPU rule), so its epochs
        are that many times shorter in iterations, as for one process at the global batch."""
        ap = self.param.alternation_param
        global_batch = self.batch_size * self.param.iter_size * self.world_size
        self.iters_per_epoch = self.records / global_batch
        self.warmup_iters = int(ap.warmup_iter) if ap.warmup_iter > 0 else \
            int(round(ap.warmup_epochs * self.iters_per_epoch))
        self.gap_iters = int(ap.gap_iter) if ap.gap_iter > 0 else \
            int(round(ap.gap_epochs * self.iters_per_epoch))
        # Patience windows: the display interval, or one epoch when nothing is displayed.
        self.window = int(self.param.display) or max(1, int(round(self.iters_per_epoch)))

    def set_world_size(self, world: int) -> None:
        super().set_world_size(world)
        self._epoch_schedule()
        if self.iter == 0 and self.support_steps == 0:
            # The rescaled warm-up may end sooner (or round to nothing): phase and layer modes
            # (thresholds, batch supports) as a fresh solver with this schedule has them.
            self._restart_schedule()

    def _net_file_name(self) -> str:
        p = self.param
        for field in ("net", "train_net"):
            if p.HasField(field):
                return getattr(p, field)
        return f"({self.net.source})"

    def _gap_text(self) -> str:
        if self.mode == "BATCH":
            if self.batch_rule == "MAJORITY":
                return "batch (majority vote)"
            if self.support_target_on > 0:
                return f"batch (eq. 41, {100 * self.support_target_on:g}% of units on)"
            return "batch (eq. 41)"
        parts = []
        if self.gap_iters > 0:
            parts.append(f"{self.gap_iters} iterations")
        if self.staleness_threshold > 0:
            parts.append(f"or when over {100 * self.staleness_threshold:g}% of the stored "
                         "support bits are stale")
        if self.param.alternation_param.patience > 0:
            parts.append(f"or after {self.param.alternation_param.patience} windows of "
                         f"{self.window} iterations without improvement")
        return " ".join(parts)

    # ------------------------------------------------------------------ layer control
    def _all_hts(self):
        yield from self._train_hts
        for hts in self._test_hts:
            yield from hts

    def _set_modes(self, mode: str) -> None:
        for _, ht in self._all_hts():
            ht.set_mode(mode)

    def _batch_support(self, ht, name: str, sink=None, beta_sink=None) -> BatchSupport:
        return BatchSupport(ht, name, self.support_beta, self._reduce, sink,
                            rule=self.batch_rule, target_on=self.support_target_on,
                            beta_sink=beta_sink)

    def _install_batch_supports(self) -> None:
        for name, ht in self._train_hts:
            ht.fixed_support = self._batch_support(ht, name, self.last_batch_supports,
                                                   self.last_batch_betas)

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        # The single place where eq. 41's statistics would be all-reduced (see BatchSupport).
        return stats if self.reduce_sums is None else self.reduce_sums(stats)

    def _install_stored_supports(self) -> None:
        # The providers are made once per store and reused by every weight step: a compiled
        # training graph that calls them then stays valid across support steps.
        if self._stored is None or self._stored.store is not self.store:
            net = self.net
            self._stored = StoredSupports(
                self.store, self._data_layer, self.device,
                lambda: activation_format(net.memory_format, net.compiled))
            self._stored_providers = {
                name: self._meter.wrap(name, ht, self._stored.for_layer(name))
                for name, ht in self._train_hts}
        self._stored.forget()
        self._meter.reset()
        for name, ht in self._train_hts:
            ht.fixed_support = self._stored_providers[name]

    def _end_warmup(self) -> None:
        self._set_modes("THRESHOLD")
        logger.info("Iteration %d, alternation: warm-up done, HardThreshold layers switched to "
                    "THRESHOLD mode (%s)", self.iter, ", ".join(n for n, _ in self._train_hts))
        if self.mode == "BATCH":
            self._install_batch_supports()
            self.phase = "weights"
            logger.info("Iteration %d, alternation: B-alternation, batch supports (eq. 41) "
                        "fixed per batch from now on", self.iter)
        else:
            self.phase = "support"

    # ------------------------------------------------------------------ the mask store
    def _store_work_path(self) -> Optional[str]:
        p = self.param
        ap = p.alternation_param
        prefix = p.snapshot_prefix if p.HasField("snapshot_prefix") else ""
        if ap.mask_store:
            return os.path.join(ap.mask_store, os.path.basename(prefix or "alternation") +
                                "_masks.bin")
        return prefix + "_masks.bin" if prefix else None

    def _new_store(self) -> MaskStore:
        path = self._store_work_path()  # its folder is made if a working file is needed
        return MaskStore(self.layout, self.records, path=path,
                         max_ram_bytes=int(self.param.alternation_param.mask_store_max_ram))

    # ------------------------------------------------------------------ support step
    def support_step(self) -> Dict[str, Any]:
        """Run I-alternation's support step now: one pass over the training set with the current
        weights, every record's support stored; the weight step that follows uses them.

        Returns the pass statistics (``seconds``, ``changed_fraction`` per layer,
        ``changed_overall``, ``on_fraction``, ``store_bytes``, ...; see
        :func:`~pycaffe_alt.alternation.support_pass.run_support_pass`). In a data-parallel job
        (``record_split`` set) every rank must call it: each computes its share of the records
        and the ranks exchange them.
        """
        if self.mode != "INSTANCE":
            raise SolverError("support_step() is I-alternation's (mode INSTANCE); B-alternation "
                              "computes the supports of every batch on the fly", self.source)
        if self.phase == "warmup":
            self._end_warmup()
        self.phase = "support"
        self.push_host_writes()
        if self.store is None:
            self.store = self._new_store()
        # The pass thresholds normally (no stored supports in the way).
        for _, ht in self._train_hts:
            ht.fixed_support = None
        stats = run_support_pass(self.net, self.store, self.support_rule, self.support_beta,
                                 int(self.param.alternation_param.support_batch_size),
                                 split=self.record_split)
        if self.param.alternation_param.reset_momentum:
            # The history was built against the previous supports' objective: start afresh.
            with torch.no_grad():
                for h in self.history:
                    h.zero_()
        self.support_steps += 1
        self.last_support_iter = self.iter
        self.last_support_stats = stats
        if stats["first"]:
            change = (f"first supports, {100 * stats['on_overall']:.2f}% of units on "
                      f"({', '.join(f'{n} {100 * f:.2f}%' for n, f in stats['on_fraction'].items())})")
        else:
            change = "support bits changed " + fraction_text(stats["changed_fraction"],
                                                             stats["changed_overall"])
        split = "" if self.record_split is None else \
            f" ({self.record_split.world} ranks, exchange {stats['gather_seconds']:.2f} s)"
        logger.info("Iteration %d, alternation: support step %d (I), %.1f s%s, %s; mask store "
                    "%.1f MiB%s", self.iter, self.support_steps, stats["seconds"], split, change,
                    stats["store_bytes"] / 2**20,
                    "; update history zeroed" if self.param.alternation_param.reset_momentum
                    else "")
        self._start_weight_step()
        return stats

    def _start_weight_step(self) -> None:
        self._install_stored_supports()
        self.phase = "weights"
        self.best_loss = None
        self.bad_windows = 0
        self._window_sum, self._window_count = None, 0
        logger.info("Iteration %d, alternation: weight step with fixed supports", self.iter)

    # ------------------------------------------------------------------ schedule
    def _before_iteration(self) -> None:
        if self.phase == "warmup" and self.iter >= self.warmup_iters:
            self._end_warmup()
        if self.mode != "INSTANCE" or self.exact is not None:
            return
        if self.phase == "support":
            self.support_step()
        elif self.phase == "weights" and self.gap_iters > 0 and \
                self.iter - self.last_support_iter >= self.gap_iters:
            self.support_step()

    def _gap_due(self) -> bool:
        return self.phase == "weights" and self.param.alternation_param.log_threshold_gap and \
            self.display_due()

    def forward_backward(self, debug: bool = False) -> torch.Tensor:
        if self.exact is not None and self.phase != "warmup":
            # Exact steps recompute every support each iteration: nothing goes stale.
            loss = self.exact_iteration()
            self._last_loss = loss
            return loss
        gap_due = self._gap_due()
        rng = capture_rng(self.device) if gap_due else None
        metered = self.mode == "INSTANCE" and self.phase == "weights" and \
            (self.staleness_threshold > 0 or self.display_due())
        self._meter.set_enabled(metered)
        loss = super().forward_backward(debug)
        self._last_loss = loss
        if metered:
            self.last_staleness = self._meter.read()
            if self.display_due() and self.last_staleness is not None:
                logger.info("Iteration %d, alternation: stale support bits %s", self.iter,
                            fraction_text(self.last_staleness["per_layer"],
                                          self.last_staleness["overall"]))
        if gap_due:
            # One more forward of this batch, thresholding (docs/alternation.md, "Staleness").
            thr, masked = thresholded_loss(self.net, self._train_hts, rng)
            self.last_threshold_gap = threshold_gap(thr, masked)
            g = self.last_threshold_gap
            logger.info("Iteration %d, alternation: thresholded loss %s, masked loss %s, "
                        "gap %s (%.1f%%)", self.iter, format_value(g["thresholded"]),
                        format_value(g["masked"]), format_value(g["gap"]),
                        100 * g["relative"])
        return loss

    def exact_iteration(self) -> torch.Tensor:
        """One alternation with an exact weight step (support step + a sweep of layer solves);
        returns the training loss at the weights before it (as an SGD iteration's forward
        does). :meth:`apply_update` then only counts the iteration."""
        self.push_host_writes()
        # Data-parallel: each rank streams its share of the records, the sums are reduced.
        self.exact.split = self.record_split
        stats = self.exact.iterate()
        self.support_steps += 1
        self.last_support_iter = self.iter
        self.last_exact_stats = stats
        self._exact_ran = True
        changed = "first supports" if stats["changed"] is None else \
            f"{100 * stats['changed']:.3f}% of support/switch bits changed"
        solved = ", ".join(f"{n} ({how}, {sec:.2f} s)" for n, how, sec in stats["layers"]) \
            or "nothing"
        split = "" if self.record_split is None else \
            f" ({stats['records_computed']} of {self.records} records on this rank)"
        logger.info("Iteration %d, alternation: exact weight step (%s): loss %s before it, %s; "
                    "solved %s; %.2f s%s", self.iter, self.weight_step,
                    format_value(stats["loss"]), changed, solved, stats["seconds"], split)
        return torch.tensor(stats["loss"], dtype=torch.float32, device=self.device)

    def apply_update(self) -> None:
        if not self._exact_ran:
            super().apply_update()
            return
        self._exact_ran = False  # the weights were solved for: no gradient update
        self._iter += 1

    def _sum_over_ranks(self, *values: torch.Tensor) -> torch.Tensor:
        """``values`` (0-d) summed over the ranks of a data-parallel job (through
        ``reduce_sums``), float64, on the device; themselves on one process."""
        stats = torch.stack([v.detach().to(self.device, torch.float64) for v in values])
        return stats if self.reduce_sums is None else self.reduce_sums(stats)

    def _stale_share(self) -> float:
        """The share of stale support bits of the last batch, over all ranks' batches (so every
        rank of a job calls the support step at the same iteration, as one process at W*B)."""
        if self.reduce_sums is None:
            return float(self.last_staleness["overall"])
        counts = self._meter.counts.values()
        stale, total = self._sum_over_ranks(
            torch.as_tensor(sum(float(d) for d, _ in counts)),
            torch.as_tensor(float(sum(t for _, t in counts)))).tolist()
        return stale / total if total else 0.0

    def _after_iteration(self) -> None:
        if self.staleness_threshold > 0 and self.mode == "INSTANCE" and \
                self.phase == "weights" and self.last_staleness is not None:
            stale = self._stale_share()
            if stale > self.staleness_threshold:
                logger.info("Iteration %d, alternation: %.2f%% of the stored support bits are "
                            "stale (threshold %.2f%%); support step next", self.iter,
                            100 * stale, 100 * self.staleness_threshold)
                self.phase = "support"
                return
        patience = self.param.alternation_param.patience
        if self.mode != "INSTANCE" or self.phase != "weights" or patience <= 0 or \
                self._last_loss is None:
            return
        # The window mean of the raw losses (not Caffe's smoothed loss, which restarts at every
        # step() call): a resumed run then takes the same decisions. Data-parallel: the mean
        # over the ranks of their batch losses, i.e. the global batch's loss, summed every
        # iteration so that every rank (and the snapshot rank 0 writes) holds the same window.
        loss = self._last_loss.detach().double()
        if self.reduce_sums is not None:
            loss = self._sum_over_ranks(loss)[0] / self.world_size
        self._window_sum = loss if self._window_sum is None else self._window_sum + loss
        self._window_count += 1
        if self._window_count < self.window:
            return
        mean = float(self._window_sum) / self._window_count
        self._window_sum, self._window_count = None, 0
        gain = self.param.alternation_param.min_improvement
        if self.best_loss is None or mean < self.best_loss - gain:
            self.best_loss = mean
            self.bad_windows = 0
            return
        self.bad_windows += 1
        if self.bad_windows >= patience:
            logger.info("Iteration %d, alternation: training loss %s has not improved on %s "
                        "for %d windows; support step next", self.iter, format_value(mean),
                        format_value(self.best_loss), self.bad_windows)
            self.phase = "support"

    # ------------------------------------------------------------------ testing (MaskT)
    def test(self, test_net_id: int = 0, masked: Optional[bool] = None
             ) -> "OrderedDict[str, float]":
        """Test like Caffe; ``masked=True`` evaluates with masks instead of thresholds only
        (MaskT), ``masked=None`` adds the MaskT evaluation when ``test_with_masks`` is set.

        MaskT: every HardThreshold of the test net applies the batch-wise support (eq. 41 with
        ``support_beta``) of the test batch, as B-alternation does in training. The MaskT
        evaluation reads the same test batches as the normal one (the test net's data cursor is
        put back), and logs ``Test net output #k (MaskT): name = value``. Combined results carry
        the MaskT values under ``"name (MaskT)"``.
        """
        if masked is None:
            masked = self.param.alternation_param.test_with_masks
            both = masked
        else:
            both = False
        if not masked:
            return super().test(test_net_id)
        net = self.test_nets[test_net_id] if 0 <= test_net_id < len(self.test_nets) else None
        results: "OrderedDict[str, float]" = OrderedDict()
        if both:
            before = data_states(net)
            results = self.evaluate(test_net_id)
            if self.stopped_early:
                return results
            after = data_states(net)
            load_data_states(net, before)
        masked_results = self._evaluate_masked(test_net_id)
        if both:
            load_data_states(net, after)
            for k, v in masked_results.items():
                results[f"{k} (MaskT)"] = v
        else:
            results = masked_results
        for hook in self.hooks:
            if hasattr(hook, "on_test"):
                hook.on_test(self, test_net_id, results)
        return results

    def _evaluate_masked(self, test_net_id: int) -> "OrderedDict[str, float]":
        if not 0 <= test_net_id < len(self.test_nets):
            return self.evaluate(test_net_id)  # raises the usual error
        hts = self._test_hts[test_net_id]
        saved = [(ht, ht.fixed_support) for _, ht in hts]
        for name, ht in hts:
            ht.fixed_support = self._batch_support(ht, name)
        try:
            return self.evaluate(test_net_id, tag=" (MaskT)")
        finally:
            for ht, fs in saved:
                ht.fixed_support = fs

    # ------------------------------------------------------------------ snapshots
    def _resume_state(self) -> dict:
        state = super()._resume_state()
        masks_path = None
        if self.store is not None and bool(self.store.filled.any()):
            masks_path = snapshot_filename(self.param.snapshot_prefix, self.iter, ".masks")
            logger.info("Snapshotting the mask store to %s", masks_path)
            self.store.save(masks_path)
        window = None if self._window_sum is None else float(self._window_sum)
        state["alternation"] = {
            "version": STATE_VERSION, "mode": self.mode, "phase": self.phase,
            "support_steps": self.support_steps, "last_support_iter": self.last_support_iter,
            "best_loss": self.best_loss, "bad_windows": self.bad_windows,
            "window_sum": window, "window_count": self._window_count,
            "masks": masks_path, "records": self.records}
        return state

    def _apply_resume_state(self, state: dict, state_path: str) -> None:
        super()._apply_resume_state(state, state_path)
        alt = state.get("alternation")
        if alt is None:
            logger.warning("%s: no alternation state in this snapshot (not written by the "
                           "alternation solver); the schedule starts from iteration %d",
                           state_path, self.iter)
            self._restart_schedule()
            return
        if alt.get("version") != STATE_VERSION or alt.get("mode") != self.mode:
            raise SolverError(f"the snapshot's alternation state is mode {alt.get('mode')} "
                              f"(version {alt.get('version')}), this solver is mode {self.mode}",
                              state_path, "resume with the solver file the snapshot came from")
        self.phase = str(alt["phase"])
        self.support_steps = int(alt["support_steps"])
        self.last_support_iter = alt["last_support_iter"]
        self.best_loss = alt["best_loss"]
        self.bad_windows = int(alt["bad_windows"])
        ws = alt["window_sum"]
        self._window_sum = None if ws is None else torch.tensor(ws, dtype=torch.float64,
                                                                device=self.device)
        self._window_count = int(alt["window_count"])
        self.store, self._stored = None, None
        if alt.get("masks"):
            path = snapshot_companion(alt["masks"], state_path, "the mask store",
                                      "keep the .masks file of the snapshot with its .solverstate")
            work = self._store_work_path()
            self.store = MaskStore.load(
                path, expect_layout=self.layout, expect_records=self.records,
                work_path=work, max_ram_bytes=int(self.param.alternation_param.mask_store_max_ram))
        self._apply_phase()
        logger.info("Alternation state restored: phase %s, %d support step(s)%s", self.phase,
                    self.support_steps, f", masks from {path}" if alt.get("masks") else "")

    def _restart_schedule(self) -> None:
        self.phase = "warmup" if self.iter < self.warmup_iters else \
            ("support" if self.mode == "INSTANCE" else "weights")
        self._apply_phase()

    def _apply_phase(self) -> None:
        """Put the layers in the state the phase implies (after a restore)."""
        for _, ht in self._train_hts:
            ht.fixed_support = None
        if self.phase == "warmup":
            self._set_modes("RELU_BIAS")
            return
        self._set_modes("THRESHOLD")
        if self.mode == "BATCH":
            self._install_batch_supports()
        elif self.phase == "weights":
            if self.store is None:
                self.phase = "support"  # no masks to continue with: recompute them first
            else:
                self._install_stored_supports()

__all__ = ["AlternationSolver", "PHASES"]
