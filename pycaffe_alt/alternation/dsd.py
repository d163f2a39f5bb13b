"""DSD (Dense-Sparse-Dense, Han et al., ICLR 2017) as a solver, with the paper's support pruning.

A solver file with a ``dsd_param`` is trained by this module whatever its ``type`` (which then
names the update rule: SGD, Nesterov, ...; ``get_solver`` dispatches). Phases by iteration:

* **Dense** ``[0, dense_iter)``: ordinary training (0 when it starts from a trained baseline
  given with ``--weights``, as the shipped ``*_dsd*`` solvers do);
* **Sparse** ``[dense_iter, dense_iter + sparse_iter)``: on entry one keep mask per pruned weight
  blob; the pruned weights are held at exactly zero (gradient masked before the update rule,
  update and history masked after it, weights masked after ``apply_update``);
* **re-Dense** (up to ``max_iter``): masks removed, the pruned weights restart from zero with zero
  history, the learning rate times ``redense_lr_mult``.

``prune_by: MAGNITUDE`` prunes the smallest weights of each layer at a sparsity ratio.
``prune_by: SUPPORT`` (the paper's variant) needs ``alternation_param { mode: BATCH }``: the
Sparse step runs B-alternation (:class:`~pycaffe_alt.alternation.solver.AlternationSolver`, whose
Dense step is its warm-up), and the connections of channels whose eq. 41 support is zero over an
estimation pass at the start of Sparse are pruned (docs/alternation.md, "DSD").

State (phase, the masks in ``<prefix>_iter_N.dsdmask``) goes with every snapshot, so a run
resumed in the middle of Sparse continues exactly.
"""
from __future__ import annotations

import io
import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import SolverError
from ..fileio import atomic_write
from ..log import get_logger
from ..proto import caffe_pb2
from ..solver.rules import UPDATE_RULES, UpdateRule
from ..solver.snapshot import snapshot_companion, snapshot_filename
from ..solver.solver import Solver, SolverSource, format_value
from . import pruning
from .solver import AlternationSolver
from .support_pass import data_states, hard_threshold_layers, load_data_states

logger = get_logger()

_DSD = caffe_pb2.DSDParameter
_AP = caffe_pb2.AlternationParameter
STATE_VERSION = 1
PHASES = ("dense", "sparse", "redense")
PRUNABLE_TYPES = ("Convolution", "InnerProduct")


class _PhaseHook:
    """Switches the DSD phase before an iteration's forward pass."""

    def __init__(self, solver: "DSDSolver"):
        self.solver = solver

    def before_step(self, solver) -> None:
        self.solver._dsd_before_iteration()


class _Pruned:
    """One pruned weight blob: its layer, its index in the solver's parameter list (None when the
    solver does not update it) and the bool mask of its pruned entries."""

    def __init__(self, layer: str, index: Optional[int], weight: torch.Tensor,
                 pruned: torch.Tensor):
        self.layer, self.index, self.weight, self.pruned = layer, index, weight, pruned


class DSDSolver(Solver):
    """Dense -> Sparse -> re-Dense training (``dsd_param``); see the module docstring.

    ``DSDSolver(solver, **kwargs)`` takes :class:`Solver`'s arguments; build it with
    ``get_solver(path)`` (which picks :class:`SupportDSDSolver` for ``prune_by: SUPPORT``).
    Attributes: ``dsd_phase`` (``"dense"``, ``"sparse"``, ``"redense"``), ``dense_end`` and
    ``sparse_end`` (the iterations where Sparse and re-Dense begin), ``prune_layers`` (names),
    ``prune_stats`` (per layer ``(pruned, total)`` of the last pruning), ``masks`` (layer -> bool
    keep mask, only during Sparse), ``last_pruned_nonzero`` (the display-time check: pruned
    weights found non-zero after an update, before they are re-zeroed; 0 when the masking of
    gradients, updates and history holds).
    """

    def __init__(self, solver: SolverSource, **kwargs):
        super().__init__(solver, **kwargs)
        d = self.param.dsd_param
        self.prune_by: str = _DSD.PruneBy.Name(d.prune_by)
        self.dense_end = int(d.dense_iter)
        self.sparse_end = int(d.dense_iter + d.sparse_iter)
        self.base_lr = float(self.param.base_lr)  # re-Dense scales a copy of it
        self.prune_layers: List[str] = self._pick_layers(d)
        self.sparsity: Dict[str, float] = self._layer_sparsity(d)
        self._pruned: List[_Pruned] = []
        self.prune_stats: Dict[str, Tuple[int, int]] = {}
        self.last_pruned_nonzero: Optional[int] = None
        self.dsd_phase = "dense"
        # The update rule, wrapped so that pruned entries of the update and history stay zero.
        self.rule = UpdateRule(self.rule.name, self._masked_rule(self.rule.update),
                               self.rule.history_sets)
        self.hooks.insert(self._hook_position(), _PhaseHook(self))
        logger.info("DSD: dense %d, sparse %d, re-dense %d iterations (sparse from iteration "
                    "%d, re-dense from %d), prune by %s, layers %s, update rule %s, re-dense lr "
                    "x %s", d.dense_iter, d.sparse_iter, d.redense_iter, self.dense_end,
                    self.sparse_end, self.prune_by, ", ".join(self.prune_layers), self.rule.name,
                    format_value(d.redense_lr_mult))

    # ------------------------------------------------------------------ configuration
    def _hook_position(self) -> int:
        return 0

    def _rule_type(self) -> str:
        # Called by Solver.__init__ before the nets are built: check what needs no net here.
        self._check_dsd_param()
        if self.type not in UPDATE_RULES:
            raise SolverError(f'with dsd_param the solver type names the update rule; "{self.type}"'
                              " is not one", self._where("type"),
                              "use one of: " + ", ".join(UPDATE_RULES) + ' (for the paper\'s '
                              'variant: type: "SGD", prune_by: SUPPORT and alternation_param '
                              '{ mode: BATCH })')
        return self.type

    def _check_dsd_param(self) -> None:
        d = self.param.dsd_param
        where = self._where("dsd_param")
        if d.dense_iter < 0 or d.redense_iter < 0:
            raise SolverError("dense_iter and redense_iter must be >= 0", where)
        if d.sparse_iter <= 0:
            raise SolverError(f"sparse_iter must be > 0 (got {d.sparse_iter})", where,
                              "DSD without a Sparse step is plain training: remove dsd_param")
        total = d.dense_iter + d.sparse_iter + d.redense_iter
        if self.param.max_iter != total:
            # max_iter is an int32: a longer schedule cannot be matched by any max_iter, so the
            # hint must not ask for one.
            fix = (f"set max_iter: {total} (or change the phase lengths)" if total < 2**31 else
                   f"shorten the phases: their sum must fit max_iter (at most {2**31 - 1})")
            raise SolverError(f"max_iter is {self.param.max_iter} but dense_iter + sparse_iter + "
                              f"redense_iter = {d.dense_iter} + {d.sparse_iter} + "
                              f"{d.redense_iter} = {total}", where, fix)
        if not d.redense_lr_mult > 0:
            raise SolverError(f"redense_lr_mult must be > 0 (got {d.redense_lr_mult})", where)
        for s in d.sparsity:
            if not 0 <= s < 1:
                raise SolverError(f"sparsity {s} is outside [0, 1)", where,
                                  "a sparsity is the fraction of a layer's weights removed, "
                                  "e.g. sparsity: 0.3")
        if d.prune_by == _DSD.MAGNITUDE:
            if not d.sparsity:
                raise SolverError("prune_by MAGNITUDE needs a sparsity ratio", where,
                                  "e.g. dsd_param { prune_by: MAGNITUDE sparsity: 0.3 }")
            if d.support_min_fraction:
                raise SolverError("support_min_fraction is for prune_by SUPPORT", where)
        else:
            if d.sparsity:
                raise SolverError("prune_by SUPPORT sets no sparsity ratio (the supports decide "
                                  "what is pruned)", where,
                                  "remove sparsity, or use prune_by: MAGNITUDE")
            if not 0 <= d.support_min_fraction < 1:
                raise SolverError(f"support_min_fraction {d.support_min_fraction} is outside "
                                  "[0, 1)", where)
            ap = self.param.alternation_param
            if not self.param.HasField("alternation_param") or ap.mode != _AP.BATCH:
                raise SolverError("prune_by SUPPORT runs B-alternation in the Sparse step",
                                  self._where("alternation_param"),
                                  "add alternation_param { mode: BATCH } (use support_beta "
                                  "there for eq. 41's beta)")
            if ap.warmup_iter or ap.warmup_epochs:
                raise SolverError("alternation_param sets a warm-up; in DSD the Dense step "
                                  "(dense_iter) is the warm-up", self._where("alternation_param"),
                                  "remove warmup_iter/warmup_epochs, set dsd_param.dense_iter")
            if ap.HasField("base_type") and ap.base_type != self.type:
                raise SolverError(f'alternation_param.base_type "{ap.base_type}" differs from '
                                  f'the solver type "{self.type}"', self._where("type"),
                                  "with dsd_param the type names the update rule; drop "
                                  "base_type or make them equal")

    def _pick_layers(self, d) -> List[str]:
        views = self.net.layer_dict
        if not d.layer:
            names = [name for name, v in views.items()
                     if v.module.param.type in PRUNABLE_TYPES and hasattr(v.module, "weight")]
            if not names:
                raise SolverError("the train net has no Convolution or InnerProduct layer to "
                                  "prune", self._where("dsd_param"),
                                  "name the layers with dsd_param { layer: ... }")
            return names
        for name in d.layer:
            if name not in views:
                raise SolverError(f"dsd_param names layer '{name}', which the train net does not "
                                  "have", self._where("dsd_param.layer"),
                                  "layers with weights: " + ", ".join(
                                      n for n, v in views.items() if hasattr(v.module, "weight")))
            if not isinstance(getattr(views[name].module, "weight", None), torch.Tensor):
                raise SolverError(f"dsd_param names layer '{name}' (type "
                                  f"{views[name].module.param.type}), which has no weights to "
                                  "prune", self._where("dsd_param.layer"),
                                  "name Convolution or InnerProduct layers")
        return list(dict.fromkeys(d.layer))

    def _layer_sparsity(self, d) -> Dict[str, float]:
        if not d.sparsity:
            return {}
        values = list(d.sparsity)
        if len(values) == 1:
            values = values * len(self.prune_layers)
        if len(values) != len(self.prune_layers):
            raise SolverError(f"{len(d.sparsity)} sparsity values for {len(self.prune_layers)} "
                              f"pruned layers ({', '.join(self.prune_layers)})",
                              self._where("dsd_param.sparsity"),
                              "give one sparsity for all layers, or one per pruned layer")
        return dict(zip(self.prune_layers, (float(v) for v in values)))

    # ------------------------------------------------------------------ phases
    def phase_at(self, it: int) -> str:
        """The DSD phase of iteration ``it`` (iterations past max_iter stay re-Dense)."""
        if it < self.dense_end:
            return "dense"
        return "sparse" if it < self.sparse_end else "redense"

    def _dsd_before_iteration(self) -> None:
        target = self.phase_at(self.iter)
        if self.dsd_phase == "dense" and target != "dense":
            if target == "redense":
                # Only after a restore without DSD state: pruning now would zero weights that
                # re-Dense has been training.
                logger.warning("Iteration %d, DSD: no Sparse step was run in this solver; "
                               "continuing with re-dense", self.iter)
                self._enter_redense()
                return
            self._enter_sparse()
        if self.dsd_phase == "sparse" and target == "redense":
            self._enter_redense()

    def _enter_sparse(self) -> None:
        self.push_host_writes()
        keep = self.magnitude_masks() if self.prune_by == "MAGNITUDE" else self.support_masks()
        self._install_masks(keep)
        self.dsd_phase = "sparse"
        parts = ", ".join(f"{n} sparsity {100 * p / t:.1f}% ({p}/{t})"
                          for n, (p, t) in self.prune_stats.items())
        pruned = sum(p for p, _ in self.prune_stats.values())
        total = sum(t for _, t in self.prune_stats.values())
        logger.info("Iteration %d, DSD: sparse step (prune by %s), %s; overall %.1f%% (%d/%d)",
                    self.iter, self.prune_by, parts, 100 * pruned / max(total, 1), pruned, total)

    def _enter_redense(self) -> None:
        pruned = sum(int(p.pruned.sum()) for p in self._pruned)
        self._pruned = []
        self.dsd_phase = "redense"
        self.param.base_lr = self.base_lr * self.param.dsd_param.redense_lr_mult
        self._rate_cache = (None, [])
        logger.info("Iteration %d, DSD: re-dense step, masks removed, %d pruned weights restart "
                    "from zero, lr x %s (base_lr %s -> %s)", self.iter, pruned,
                    format_value(self.param.dsd_param.redense_lr_mult),
                    format_value(self.base_lr), format_value(self.param.base_lr))

    # ------------------------------------------------------------------ masks
    def magnitude_masks(self) -> Dict[str, torch.Tensor]:
        """Keep masks by magnitude at each layer's sparsity ratio (current weights)."""
        views = self.net.layer_dict
        return {name: pruning.magnitude_mask(views[name].module.weight, self.sparsity[name])
                for name in self.prune_layers}

    def support_masks(self) -> Dict[str, torch.Tensor]:
        raise SolverError("prune_by SUPPORT needs the support solver", self.source,
                          "build the solver with get_solver(path)")

    def _install_masks(self, keep: Dict[str, torch.Tensor]) -> None:
        views = self.net.layer_dict
        index = {id(p): i for i, p in enumerate(self._params)}
        self._pruned = []
        self.prune_stats = {}
        for name in self.prune_layers:
            weight = views[name].module.weight
            k = keep[name].to(weight.device)
            self._pruned.append(_Pruned(name, index.get(id(weight)), weight, ~k))
            self.prune_stats[name] = pruning.sparsity_counts(k)
        self._zero_state()

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        return {p.layer: ~p.pruned for p in self._pruned}

    def _zero_state(self) -> None:
        """Pruned weights, their gradients and every history set of them to exactly zero."""
        with torch.no_grad():
            pruning.zero_pruned_([p.weight.detach() for p in self._pruned],
                                 [p.pruned for p in self._pruned])
            pruning.zero_pruned_([p.weight.grad for p in self._pruned],
                                 [p.pruned for p in self._pruned])
            self._zero_history()

    def _zero_history(self) -> None:
        n = len(self._params)
        for p in self._pruned:
            if p.index is None:
                continue
            for s in range(self.rule.history_sets):
                self.history[s * n + p.index].masked_fill_(p.pruned, 0.0)

    def _masked_rule(self, update):
        """The update rule with the pruned entries of its input gradient, its output update and
        its history set to zero (during Sparse), so that momentum, Adam's moments or AdaGrad's
        sums of a pruned weight neither move it nor carry anything into re-Dense."""
        def masked(diffs, history, local_rates, hyper, it):
            if not self._pruned:
                return update(diffs, history, local_rates, hyper, it)
            targets = [p for p in self._pruned if p.index is not None]
            pruning.zero_pruned_([diffs[p.index] for p in targets], [p.pruned for p in targets])
            update(diffs, history, local_rates, hyper, it)
            pruning.zero_pruned_([diffs[p.index] for p in targets], [p.pruned for p in targets])
            self._zero_history()
        return masked

    def apply_update(self) -> None:
        """Solver's update; during Sparse the gradients of pruned weights are zeroed before it
        (so gradient clipping does not count them) and the weights after it. At display
        iterations the pruned weights are counted before that last zeroing (logged check)."""
        it = self.iter
        if not self._pruned:
            return super().apply_update()
        with torch.no_grad():
            pruning.zero_pruned_([p.weight.grad for p in self._pruned],
                                 [p.pruned for p in self._pruned])
        super().apply_update()
        with torch.no_grad():
            if self.display_due(it):
                self._check_pruned(it)
            pruning.zero_pruned_([p.weight.detach() for p in self._pruned],
                                 [p.pruned for p in self._pruned])

    def _check_pruned(self, it: int) -> None:
        nonzero = int(pruning.count_nonzero_pruned([p.weight.detach() for p in self._pruned],
                                                   [p.pruned for p in self._pruned]))
        total = sum(int(p.pruned.sum()) for p in self._pruned)
        self.last_pruned_nonzero = nonzero
        if nonzero:
            logger.warning("Iteration %d, DSD: %d of %d pruned weights became non-zero in the "
                           "update (zeroed again)", it, nonzero, total)
        else:
            logger.info("Iteration %d, DSD: sparse step, pruned weights still zero (0 of %d "
                        "non-zero)", it, total)

    # ------------------------------------------------------------------ snapshots
    def _resume_state(self) -> dict:
        state = super()._resume_state()
        masks_path = None
        if self._pruned:
            masks_path = snapshot_filename(self.param.snapshot_prefix, self.iter, ".dsdmask")
            logger.info("Snapshotting the DSD masks to %s", masks_path)
            atomic_write(masks_path, encode_masks(self.masks), SolverError)
        state["dsd"] = {"version": STATE_VERSION, "phase": self.dsd_phase,
                        "prune_by": self.prune_by, "layers": self.prune_layers,
                        "masks": masks_path,
                        "prune_stats": {k: list(v) for k, v in self.prune_stats.items()}}
        return state

    def _apply_resume_state(self, state: dict, state_path: str) -> None:
        super()._apply_resume_state(state, state_path)
        dsd = state.get("dsd")
        self._pruned = []
        self.param.base_lr = self.base_lr
        if dsd is None:
            logger.warning("%s: no DSD state in this snapshot; the DSD phase follows the "
                           "iteration (%d)", state_path, self.iter)
            self.dsd_phase = "dense"
            self._apply_layer_phase()
            return
        if dsd.get("version") != STATE_VERSION or list(dsd.get("layers", [])) != \
                self.prune_layers:
            raise SolverError(f"the snapshot's DSD state prunes layers {dsd.get('layers')}, this "
                              f"solver prunes {self.prune_layers}", state_path,
                              "resume with the solver file the snapshot came from")
        phase = str(dsd["phase"])
        self.prune_stats = {k: tuple(v) for k, v in dsd.get("prune_stats", {}).items()}
        if phase == "sparse":
            path = snapshot_companion(dsd["masks"], state_path, "the pruning masks",
                                      "keep the .dsdmask file of the snapshot with its "
                                      ".solverstate")
            keep = decode_masks(_read(path), path)
            shapes = {n: tuple(self.net.layer_dict[n].module.weight.shape)
                      for n in self.prune_layers}
            got = {n: tuple(m.shape) for n, m in keep.items()}
            if got != shapes:
                raise SolverError(f"the DSD masks hold {got}, the net's pruned weights are "
                                  f"{shapes}", path, "keep the .dsdmask of this snapshot")
            self._install_masks(keep)
        elif phase == "redense":
            self.param.base_lr = self.base_lr * self.param.dsd_param.redense_lr_mult
        self.dsd_phase = phase
        self._rate_cache = (None, [])
        self._apply_layer_phase()
        logger.info("DSD state restored: phase %s%s", phase,
                    f", masks from {dsd['masks']}" if phase == "sparse" else "")

    def _apply_layer_phase(self) -> None:
        """Put the layers in the state the DSD phase implies (after a restore)."""


class SupportDSDSolver(DSDSolver, AlternationSolver):
    """DSD whose Sparse step is B-alternation and prunes by support (``prune_by: SUPPORT``).

    The alternation machinery is :class:`AlternationSolver`'s (mode BATCH) with its warm-up set to
    the Dense step: Dense trains the HardThreshold layers as ReLUs with bias ``-beta``; from
    ``dense_iter`` every train batch gets its eq. 41 support as a fixed support. Entering Sparse,
    :meth:`support_masks` runs one estimation pass over the training set (train net, test mode,
    no gradients; the data cursor is put back) and prunes ``W[o, i, ...]`` when output channel
    ``o`` feeds a HardThreshold channel, or input channel ``i`` comes from one, that was on in no
    more than ``support_min_fraction`` of the pass's batches (0: in no batch). re-Dense drops the
    batch supports: the HardThreshold layers threshold each example (eq. 9) from then on.
    Attribute ``channel_support``: HardThreshold name -> bool per channel, of the last pass.
    """

    reads_blocks = ("alternation_param",)

    def __init__(self, solver: SolverSource, **kwargs):
        self.channel_support: Dict[str, torch.Tensor] = {}
        super().__init__(solver, **kwargs)
        self._epoch_schedule()  # now with the Dense step as the warm-up
        self._restart_schedule()

    def _epoch_schedule(self) -> None:
        super()._epoch_schedule()
        # The Dense step is the alternation warm-up, whatever alternation_param says (also when
        # a data-parallel job rescales the schedule; dense_end is not set during the first call).
        if hasattr(self, "dense_end"):
            self.warmup_iters = self.dense_end

    def _hook_position(self) -> int:
        # After the alternation hook, so that the batch supports are installed when pruning.
        return 1

    def _check_alternation_param(self, ap) -> None:
        if not hard_threshold_layers(self.net):
            raise SolverError("prune_by SUPPORT needs the supports of HardThreshold layers and "
                              "the train net has none", self._where("dsd_param.prune_by"),
                              "convert its ReLUs first: tools/convert_relu IN.prototxt "
                              "OUT.prototxt (then train OUT.prototxt), or use prune_by: "
                              "MAGNITUDE with a sparsity")
        super()._check_alternation_param(ap)

    def support_masks(self) -> Dict[str, torch.Tensor]:
        """Keep masks from the channels' supports over one estimation pass (see the class)."""
        self.channel_support = self.estimate_channel_support()
        steps = self.net.steps
        by_name = {s.name: s for s in steps}
        keep, notes = {}, []
        for name in self.prune_layers:
            step = by_name[name]
            weight = step.layer.weight
            out_ht = pruning.output_threshold(steps, step.index)
            in_ht = pruning.input_threshold(steps, step.index)
            out_sup = self.channel_support.get(out_ht) if out_ht else None
            if out_sup is not None and out_sup.numel() != weight.shape[0]:
                out_sup = None
            in_sup, in_index = None, None
            if in_ht:
                in_sup = self.channel_support[in_ht]
                group = step.layer.param.convolution_param.group \
                    if step.layer.param.type == "Convolution" else 1
                in_index = pruning.input_channel_index(tuple(weight.shape), in_sup.numel(),
                                                       group)
            keep[name] = pruning.connection_mask(tuple(weight.shape), out_sup, in_sup, in_index,
                                                 weight.device)
            notes.append(f"{name} (out {out_ht or '-'}, in {in_ht if in_index is not None else '-'})")
        off = ", ".join(f"{n} {int((~s).sum())}/{s.numel()}" for n, s in
                        self.channel_support.items())
        logger.info("Iteration %d, DSD: eq. 41 supports of %d batches (a channel is in the "
                    "support when on in more than %s%% of them), channels without support: %s; "
                    "pruned via %s", self.iter, self._support_batches,
                    format_value(100 * self.param.dsd_param.support_min_fraction), off,
                    ", ".join(notes))
        return keep

    def estimate_channel_support(self) -> Dict[str, torch.Tensor]:
        """One pass over the training set (``ceil(records / global batch)`` train batches) up to
        the last HardThreshold, with the eq. 41 batch supports that B-alternation applies;
        returns per HardThreshold a bool per channel: in the support or not. The train net's
        data cursor is restored afterwards, so the training batches are those without the pass.

        Data parallelism: each batch's eq. 41 sums are all-reduced (the global batch of
        ``world_size x batch_size`` records), so the ranks together read the training set once,
        every rank counts the same supports and derives the same keep masks, equal to one
        process at the global batch."""
        net = self.net
        names = [n for n, _ in self._train_hts]
        last = max(i for i, s in enumerate(net.steps) if s.name in names)
        batches = max(1, math.ceil(self.records / (self.batch_size * self.world_size)))
        counts: Dict[str, torch.Tensor] = {}
        saved = data_states(net)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                for _ in range(batches):
                    self.last_batch_supports.clear()
                    net.run(end=last, eager=True)  # records each layer's supports
                    for name in names:
                        on = pruning.channel_on(self.last_batch_supports[name]).to(torch.int64)
                        counts[name] = on if name not in counts else counts[name] + on
        finally:
            net.train(was_training)
            load_data_states(net, saved)
        self._support_batches = batches
        frac = float(self.param.dsd_param.support_min_fraction)
        return {n: pruning.supported_channels(c, batches, frac) for n, c in counts.items()}

    def _enter_redense(self) -> None:
        super()._enter_redense()
        self._apply_layer_phase()
        logger.info("Iteration %d, DSD: batch supports removed, HardThreshold layers threshold "
                    "each example (eq. 9)", self.iter)

    def _apply_layer_phase(self) -> None:
        if self.dsd_phase == "redense":
            for _, ht in self._train_hts:
                ht.fixed_support = None


def dsd_solver_class(param: "caffe_pb2.SolverParameter") -> type:
    """The class that trains a solver file with ``dsd_param`` (by ``prune_by``)."""
    return SupportDSDSolver if param.dsd_param.prune_by == _DSD.SUPPORT else DSDSolver


# ---------------------------------------------------------------------------------------------
# The .dsdmask file: an uncompressed npz of bit-packed masks (one bit per weight) and shapes
# ---------------------------------------------------------------------------------------------
def encode_masks(keep: Dict[str, torch.Tensor]) -> bytes:
    """Bytes of a ``.dsdmask`` file: per layer ``<name>/bits`` (``np.packbits`` of the flat keep
    mask) and ``<name>/shape``, plus the layer order."""
    arrays = {"layers": np.array(list(keep), dtype=object).astype(str)}
    for i, (name, m) in enumerate(keep.items()):
        flat = m.detach().cpu().numpy().reshape(-1).astype(bool)
        arrays[f"bits{i}"] = np.packbits(flat)
        arrays[f"shape{i}"] = np.array(m.shape, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_masks(payload: bytes, where: str) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`encode_masks`; a damaged file is a SolverError naming it."""
    try:
        data = np.load(io.BytesIO(payload), allow_pickle=False)
        out = {}
        for i, name in enumerate(data["layers"].tolist()):
            shape = tuple(int(s) for s in data[f"shape{i}"])
            n = int(np.prod(shape)) if shape else 1
            bits = np.unpackbits(data[f"bits{i}"])[:n].astype(bool)
            out[str(name)] = torch.from_numpy(bits.reshape(shape).copy())
        return out
    except (OSError, ValueError, KeyError) as e:
        raise SolverError(f"cannot read the DSD masks ({e})", where,
                          "keep the .dsdmask file of the snapshot with its .solverstate") from None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


__all__ = ["DSDSolver", "SupportDSDSolver", "dsd_solver_class", "encode_masks", "decode_masks",
           "PHASES"]
