"""The Convex solver: ``type: "Convex"`` trains a two-layer ReLU net to its certified global
optimum by convex programming (docs/global_optimum.md).

A thin wrapper over the pure pieces: :mod:`.net_fit` (does the net fit; the program's data),
:mod:`.patterns` (arrangement patterns), :mod:`.admm` / :mod:`.sampled` (the solvers),
:mod:`.certificate` (the dual lower bound), :mod:`.recover` (units into the net). The solver
file's fields keep their Caffe meaning where they have one: ``max_iter`` = ADMM (or FISTA)
iterations, ``display`` = log interval (each display line also computes the certificate),
``weight_decay``/``regularization_type`` define the objective, ``random_seed`` seeds sampled
patterns, ``snapshot_prefix``/``snapshot_format``/``snapshot_after_train`` the result file
``<prefix>_iter_N.caffemodel`` (N = iterations run), test nets are tested at the end. The
objective and bound are reported in Caffe's units: the EuclideanLoss over the whole training
set plus ``weight_decay/2 x decay_mult x ||W||^2``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..errors import SolverError
from ..log import get_logger
from ..proto import caffe_pb2
from ..solver.solver import Solver, SolverSource
from .admm import ADMM
from .certificate import lower_bound
from .net_fit import ConvexProblem, build_problem, check_two_layer, decay_mults
from .patterns import enumerate_patterns, sample_patterns
from .program import ConvexProgram
from .polish import polish
from .recover import active_blocks, fewest_units, pruned, recover_units, write_into_net
from .sampled import fista, gated_objective, split_into_cones

logger = get_logger()
_CP = caffe_pb2.ConvexParameter
# A certified relative gap above this is reported as a warning with what to change: the net
# written may then be far from the optimum (the zero net had a 95% gap, and only a gap line).
LARGE_GAP = 0.01


@dataclass
class ConvexResult:
    """What a solve found, in Caffe's units (objective = the net's Caffe objective).

    ``objective`` of the written net, ``lower_bound`` (None without a certificate), ``gap``
    relative (``(objective - lower_bound) / objective``), ``iterations``, ``seconds`` (solver
    iterations only), ``setup_seconds`` (reading, patterns, factoring), ``patterns``, ``exact``
    (every pattern enumerated), ``units`` (hidden units used), ``history`` (one dict per display:
    iter, seconds, objective, program, primal, dual, lower_bound, gap).
    """

    objective: float
    lower_bound: Optional[float]
    gap: Optional[float]
    iterations: int
    seconds: float
    setup_seconds: float
    patterns: int
    exact: bool
    units: int
    method: str
    program_objective: float
    history: List[dict] = field(default_factory=list)


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else "%.9g" % x


class ConvexSolver(Solver):
    """``type: "Convex"``: the global optimum of a two-layer ReLU net (see module doc).

    ``ConvexSolver(solver, **kwargs)`` takes :class:`Solver`'s arguments. :meth:`solve` runs the
    whole computation and sets ``result`` (:class:`ConvexResult`), ``problem``
    (:class:`~.net_fit.ConvexProblem`) and ``program``; ``step`` and ``restore`` are refused.
    """

    reads_blocks = ("convex_param",)

    def __init__(self, solver: SolverSource, **kwargs):
        # Read by _check_param, which the base constructor runs before it loads any weights.
        self._start_weights = tuple(kwargs.get("weights", ()))
        super().__init__(solver, **kwargs)
        self.convex = self.param.convex_param
        self._check_convex_param()
        self.roles = check_two_layer(self.net)
        decay_mults(self.net, self.roles)
        self.result: Optional[ConvexResult] = None
        self.problem: Optional[ConvexProblem] = None
        self.program: Optional[ConvexProgram] = None
        self.result_history: List[dict] = []
        self._gated_value = 0.0
        self._final_rho = float(self.convex.rho)
        logger.info("Convex: method %s, %s patterns, layers %s -> %s -> %s%s -> %s -> %s",
                    _CP.Method.Name(self.convex.method),
                    "all" if self.convex.num_patterns == 0 else f"{self.convex.num_patterns} "
                    "sampled", self.roles.data, self.roles.first, self.roles.relu,
                    f" -> {self.roles.pool}" if self.roles.pool else "", self.roles.last,
                    self.roles.loss)

    # ------------------------------------------------------------------ configuration
    def _rule_type(self) -> str:
        return "SGD"  # no update rule runs; the base class keeps an (unused) SGD history

    def _check_param(self) -> None:
        super()._check_param()
        # Starting weights are refused rather than ignored: the program's optimum and its
        # certificate depend on the training set alone, and a net's units give ADMM no
        # meaningful start (its scaled duals, which carry the progress, would start at zero).
        given = [w for w in list(self.param.weights) + list(self._start_weights) if w]
        if given:
            raise SolverError(f"starting weights {', '.join(given)}: the Convex solver computes "
                              "the global optimum from the training set alone, and a start "
                              "would be ignored", self._where("weights") + " / --weights",
                              "remove --weights and the solver file's weights field; to "
                              "fine-tune the Convex result, give its .caffemodel as --weights "
                              "to an update-rule solver (type \"SGD\", ...)")

    def _check_convex_param(self) -> None:
        c, p = self.convex, self.param
        if not p.HasField("convex_param"):
            logger.warning("%s: type \"Convex\" without convex_param: ADMM over every "
                           "arrangement pattern", self.source)
        checks = [(c.num_patterns < 0, f"num_patterns must be >= 0 (0 = every pattern), got "
                   f"{c.num_patterns}"),
                  # Before the comparison below, which a negative limit made say "num_patterns
                  # 0 is more than max_exact_patterns (-5)".
                  (c.max_exact_patterns <= 0,
                   f"max_exact_patterns must be > 0, got {c.max_exact_patterns}"),
                  (c.num_patterns > c.max_exact_patterns,
                   f"num_patterns {c.num_patterns} is more than max_exact_patterns "
                   f"({c.max_exact_patterns}), the most patterns one problem may hold"),
                  (not 0 < c.rho < math.inf, f"rho must be finite and > 0, got {c.rho}"),
                  (not 0 < c.relaxation < 2, f"relaxation must be in (0, 2), got "
                   f"{c.relaxation}"),
                  (not 0 <= c.abs_tol < math.inf, f"abs_tol must be finite and >= 0, got {c.abs_tol}"),
                  (not 0 <= c.rel_tol < math.inf, f"rel_tol must be finite and >= 0, got {c.rel_tol}"),
                  (not 0 <= c.gap_tol < math.inf, f"gap_tol must be finite and >= 0, got {c.gap_tol}"),
                  (c.polish_iter < 0, f"polish_iter must be >= 0, got {c.polish_iter}"),
                  (c.adapt_interval < 0, f"adapt_interval must be >= 0, got "
                   f"{c.adapt_interval}"),
                  (p.max_iter <= 0, f"max_iter (the solver's iterations) must be > 0, got "
                   f"{p.max_iter}")]
        for bad, what in checks:
            if bad:
                raise SolverError(what, self._where("convex_param"),
                                  "see docs/global_optimum.md for the fields and their ranges")
        if p.regularization_type != "L2":
            raise SolverError(f'regularization_type "{p.regularization_type}": the convex program '
                              "is the one of L2 weight decay", self._where("regularization_type"),
                              'use regularization_type: "L2"')
        if not 0 < p.weight_decay < math.inf:
            raise SolverError(f"weight_decay {p.weight_decay}: the convex equivalence needs "
                              "weight decay > 0 (beta = N x weight_decay)",
                              self._where("weight_decay"), "set weight_decay > 0")

    # ------------------------------------------------------------------ refused surface
    def step(self, iters: int) -> float:
        raise SolverError("the Convex solver runs to its optimum in one solve(); step() is for "
                          "update-rule solvers", self.source, "call solver.solve()")

    def restore(self, state_path: str) -> None:
        raise SolverError("the Convex solver has no state to resume (it computes the optimum "
                          "from scratch)", state_path, "run solve() without --snapshot; to "
                          "fine-tune its result with SGD, pass the .caffemodel as --weights")

    # ------------------------------------------------------------------ solving
    def _patterns(self, problem: ConvexProblem):
        c = self.convex
        if c.num_patterns == 0:
            D, H = enumerate_patterns(problem.Z, int(c.max_exact_patterns),
                                      self._where("convex_param"))
            logger.info("Convex: %d arrangement patterns of %d feature rows, every one "
                        "enumerated (count 2 sum_k<d C(m-1,k) checked)", D.shape[0],
                        int(problem.Z.shape[0] * problem.Z.shape[1]))
            return D, H, True
        seed = int(self.param.random_seed)
        if seed < 0:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
            logger.info("Convex: random_seed not set; sampling patterns with seed %d", seed)
        D, H = sample_patterns(problem.Z, int(c.num_patterns), seed)
        logger.info("Convex: %d distinct patterns from %d Gaussian directions (seed %d)",
                    D.shape[0], c.num_patterns, seed)
        return D, H, False

    def _record(self, it: int, seconds: float, V: torch.Tensor, program_value: float,
                primal: Optional[float], dual: Optional[float], exact: bool,
                certify: bool, more_outputs: Sequence[torch.Tensor] = ()) -> dict:
        prog, scale = self.program, self.problem.scale
        objective = prog.net_objective(V) * scale
        lb = None
        if certify:
            # Any residual gives a valid bound: keep the best (more_outputs: earlier points).
            lb = max(lower_bound(prog, g, cones=True)
                     for g in [prog.relu_output(V), *more_outputs]) * scale
        gap = None if lb is None else (objective - lb) / max(abs(objective), 1e-300)
        entry = {"iter": it, "seconds": seconds, "objective": objective,
                 "program": program_value * scale, "primal": primal, "dual": dual,
                 "lower_bound": lb, "gap": gap}
        self.result_history.append(entry)
        bound_text = ("lower bound = %s, gap = %s" % (_fmt(lb), _fmt(gap)) if certify else
                      "lower bound = n/a (sampled patterns: no certificate for the net)"
                      if not exact else "lower bound = n/a")
        res = "" if primal is None else \
            ", primal residual = %.3g, dual residual = %.3g" % (primal, dual)
        logger.info("Iteration %d, objective = %s (program %s)%s, %s", it, _fmt(objective),
                    _fmt(program_value * scale), res, bound_text)
        return entry

    def solve(self, resume: Optional[str] = None) -> None:
        """Compute the optimum, write it into the net, snapshot, test (see module doc)."""
        if resume:
            self.restore(resume)
        p, c = self.param, self.convex
        self.check_snapshot_folder(required=p.snapshot_after_train)
        logger.info("Solving %s", self.net.net_param.name)
        start = time.perf_counter()
        problem = build_problem(self.net, self.roles, float(p.weight_decay),
                                p.regularization_type)
        self.problem = problem
        n, K, d = problem.Z.shape
        logger.info("Convex: %d training examples, %d patch(es) of %d features each, %d "
                    "output(s), beta = %.6g (N x weight_decay%s)", n, K, d, problem.y.shape[1],
                    problem.beta, " x decay_mult scaling" if problem.unit_scale != 1 else "")
        if problem.y.shape[1] > 1:
            logger.warning("Convex: %d outputs are solved as %d scalar programs whose units "
                           "are stacked (each unit feeds one output): the objective and the "
                           "lower bound are those of such nets; a net whose units feed several "
                           "outputs can go lower (docs/global_optimum.md: the same program at "
                           "weight_decay / sqrt(C) bounds it)", problem.y.shape[1],
                           problem.y.shape[1])
        D, H, exact = self._patterns(problem)
        self.program = ConvexProgram(problem.Z, D, problem.y, problem.beta,
                                     problem.out_bias_ridge, device=self.device)
        self.result_history = []
        if c.method == _CP.ADMM:
            V, iters, seconds, setup = self._run_admm(exact, start)
        else:
            V, iters, seconds, setup = self._run_sampled(H, exact, start)
        self._finish(V, iters, seconds, setup, exact)

    def _display_due(self, it: int, last: bool) -> bool:
        return last or (self.param.display > 0 and it % self.param.display == 0)

    def _run_admm(self, exact: bool, start: float):
        c, prog = self.convex, self.program
        admm = ADMM(prog, c.rho, c.abs_tol, c.rel_tol, c.relaxation, c.adapt_interval)
        setup = time.perf_counter() - start
        logger.info("Convex: ADMM, rho = %g (%s), relaxation %g, linear system factored in "
                    "%.3g s (setup)", c.rho, "fixed: adapt_interval 0" if not c.adapt_interval
                    else f"residual balancing every {c.adapt_interval} iterations",
                    c.relaxation, setup)
        seconds, it = 0.0, 0
        for it in range(1, self.param.max_iter + 1):
            t0 = time.perf_counter()
            stats = admm.step()
            seconds += time.perf_counter() - t0
            _, stop = self.take_requests()
            last = stats.converged or it == self.param.max_iter or stop
            if self._display_due(it, last):
                entry = self._record(it, seconds, admm.V, prog.objective(admm.V), stats.primal,
                                     stats.dual, exact, certify=exact)
                if c.gap_tol > 0 and entry["gap"] is not None and entry["gap"] <= c.gap_tol:
                    logger.info("Convex: certified gap %.3g <= gap_tol %g", entry["gap"],
                                c.gap_tol)
                    break
            if stop:
                self.stopped_early = True
                logger.info("Convex: stop requested; writing the current point")
                break
            if stats.converged:
                logger.info("Convex: ADMM converged at iteration %d (primal %.3g <= %.3g, "
                            "dual %.3g <= %.3g)", it, stats.primal, stats.eps_primal,
                            stats.dual, stats.eps_dual)
                break
        if admm.refactors:
            logger.info("Convex: rho adapted %d time(s), now %g", admm.refactors, admm.rho)
        self._final_rho = admm.rho
        return admm.V, it, seconds, setup

    def _warn_large_gap(self, iters: int) -> None:
        """Say when the certified gap leaves the written net possibly far from the optimum, and
        which fields change that (the log's numbers alone did not make a zero net stand out)."""
        r, c = self.result, self.convex
        if r.gap is None or not r.gap > LARGE_GAP:
            return
        zero = " (the zero net: no unit survived)" if r.units == 0 else ""
        if c.method == _CP.ADMM:
            rho = (f"rho {c.rho} (fixed: adapt_interval 0; remove it to let residual balancing "
                   "adapt rho, or try rho x10 / x0.1)" if not c.adapt_interval else
                   f"rho {c.rho} (adapted to {self._final_rho:g} by the end; try a start "
                   "nearer that, or rho x10 / x0.1)")
            what = f"raise max_iter ({iters} iterations run) or change {rho}"
        else:
            what = f"raise max_iter ({iters} iterations run)"
        logger.warning("Convex: the certified relative gap %.3g is above %g: the net written%s "
                       "may be up to that far above the global optimum (objective %s, lower "
                       "bound %s); %s", r.gap, LARGE_GAP, zero, _fmt(r.objective),
                       _fmt(r.lower_bound), what)

    def _run_sampled(self, H: torch.Tensor, exact: bool, start: float):
        prog = self.program
        setup = time.perf_counter() - start
        clock = {"seconds": 0.0, "t0": time.perf_counter(), "it": 0}

        def callback(it: int, W: torch.Tensor, value: float) -> bool:
            clock["seconds"] += time.perf_counter() - clock["t0"]
            clock["it"] = it
            _, stop = self.take_requests()
            if self._display_due(it, it == self.param.max_iter):
                V = split_into_cones(prog, W, H)
                self._record(it, clock["seconds"], V, value, None, None, exact, certify=False)
            clock["t0"] = time.perf_counter()
            return stop

        W = fista(prog, self.param.max_iter, self.convex.rel_tol, callback)
        V = split_into_cones(prog, W, H)
        gated = gated_objective(prog, W)
        logger.info("Convex: gated program objective %s; as ReLU units (split into cones) %s",
                    _fmt(gated * self.problem.scale),
                    _fmt(prog.net_objective(V) * self.problem.scale))
        self._gated_value = gated
        return V, clock["it"], clock["seconds"], setup

    def _finish(self, V: torch.Tensor, iters: int, seconds: float, setup: float,
                exact: bool) -> None:
        prog, problem = self.program, self.problem
        is_admm = self.convex.method == _CP.ADMM
        kept = pruned(V)
        program_value = prog.objective(kept) if is_admm else self._gated_value
        final = polish(prog, kept, int(self.convex.polish_iter))
        if final is not kept:
            final = pruned(final)   # units the polish shrank to almost nothing
            logger.info("Convex: units polished by L-BFGS (%d iterations at most): objective "
                        "%s -> %s", self.convex.polish_iter,
                        _fmt(prog.net_objective(kept) * problem.scale),
                        _fmt(prog.net_objective(final) * problem.scale))
        used = len(active_blocks(final, rel=0.0))
        if used > problem.roles.hidden:
            # More blocks than hidden units: an optimum needs at most n per output (the
            # papers' pruning), so first remove the linearly dependent ones.
            before_value = prog.net_objective(final) * problem.scale
            final = fewest_units(prog, final)
            logger.info("Convex: %d units found, more than num_output %d of layer '%s': reduced "
                        "to %d linearly independent ones, objective %s -> %s", used,
                        problem.roles.hidden, problem.roles.first,
                        len(active_blocks(final, rel=0.0)), _fmt(before_value),
                        _fmt(prog.net_objective(final) * problem.scale))
        # The final line describes the net that is written (tiny blocks dropped, polished).
        before = [prog.relu_output(kept), prog.F(kept)] if final is not kept else []
        last = self._record(iters, seconds, final, program_value, None, None, exact,
                            certify=exact, more_outputs=before)
        V = final
        units = recover_units(prog, problem, V)
        logger.info("Convex: %d hidden unit(s) used of %d (layer '%s')", units.count,
                    problem.roles.hidden, problem.roles.first)
        write_into_net(self.net, problem, units)
        self.result = ConvexResult(
            objective=last["objective"], lower_bound=last["lower_bound"], gap=last["gap"],
            iterations=iters, seconds=seconds, setup_seconds=setup, patterns=int(prog.D.shape[0]),
            exact=exact, units=units.count, method=_CP.Method.Name(self.convex.method),
            program_objective=last["program"], history=list(self.result_history))
        logger.info("Convex: objective %s, certified lower bound %s, relative gap %s; %d "
                    "iterations in %.3g s (+ %.3g s setup)", _fmt(self.result.objective),
                    _fmt(self.result.lower_bound), _fmt(self.result.gap), iters, seconds, setup)
        self._warn_large_gap(iters)
        self._iter = iters
        if self.param.snapshot_after_train:
            self.snapshot()
        if self.test_nets:
            self.test_all()
        logger.info("Optimization Done.")


__all__ = ["ConvexSolver", "ConvexResult"]
