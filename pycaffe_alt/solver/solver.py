"""The solver: Caffe's ``Solver``/``SGDSolver`` as one thin stateful class over pure formulas.

A :class:`Solver` owns the train net, the test nets (sharing the train net's parameter tensors,
Caffe's ``ShareTrainedLayersWith``), the update rule's history and the iteration counter. The
formulas live elsewhere and are pure: learning rates in :mod:`.lr_policy`, gradient preparation
in :mod:`.regularize`, update rules in :mod:`.rules`, file layouts in :mod:`.snapshot`. The
training loop (Caffe's ``Step``/``Solve``: display, test, snapshot cadence, stop requests, the
non-finite loss guard) lives in :mod:`pycaffe_alt.train.loop`, and what a snapshot records for
exact continuation in :mod:`pycaffe_alt.train.resume`.

One iteration (Caffe's ``Step`` body) is ``forward_backward`` ``iter_size`` times, then
``apply_update``: learning rate, clip on the gradient *summed* over ``iter_size``, then per
parameter normalize, regularize, update value, and finally ``data -= update``.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import (ArgumentTypeError, CaffeError, NetError, NonFiniteLossError, SolverError,
                      integer_argument, located_in, path_argument)
from ..fileio import NUL_HINT, check_input_path, remove_stale_temporaries
from ..layer_callbacks import BackwardSequence
from ..layers import TEST, TRAIN
from ..log import format_value, get_logger, loss_suffix
from ..mode import default_device, set_random_seed
from ..mixed_precision import MixedPrecision
from ..net import Net
from ..output_counts import count_change
from ..proto import caffe_pb2
from ..prototxt import debug_string
from ..signal_requests import CountedRequest
from ..train import debug_info, loop
from ..train.resume import apply as apply_resume_state
from ..train.resume import capture as capture_resume_state
from ..weights import warn_uncovered
from .detection_eval import DetectionTally, check_eval_param
from .lr_policy import PlateauState, current_step, learning_rate, plateau_advance
from .regularize import clip_gradients, local_decay, normalize, regularize, regularizer
from .rules import RuleHyper, apply_update, check_hyper, local_rate, update_rule
from .snapshot import (HDF5_NAME_HINT, check_history, hdf5_name_problem, is_hdf5,
                       read_any_solverstate, snapshot_companion, snapshot_filename,
                       write_solverstate, write_solverstate_h5, write_weights_h5)

logger = get_logger()


class SolverFile(NamedTuple):
    """A solver file already read and upgraded (by :func:`get_solver`), with its path: the
    solver is built from it without reading, upgrading and logging the file a second time."""

    param: "caffe_pb2.SolverParameter"
    path: str


SolverSource = Union[str, os.PathLike, "caffe_pb2.SolverParameter", SolverFile]


def _read_solver_param(solver: SolverSource) -> Tuple["caffe_pb2.SolverParameter", str]:
    from ..prototxt import read_solver
    from ..upgrade import upgrade_solver_as_needed

    if isinstance(solver, SolverFile):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(solver.param)
        return param, solver.path
    if isinstance(solver, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(solver)
        upgrade_solver_as_needed(param, "<solver_param>")
        return param, "<solver_param>"
    # Missing, a folder, a FIFO or a NUL in the path: said as such (a folder was "not found").
    path = check_input_path(path_argument(solver, "Solver()"), SolverError, "solver file")
    return read_solver(path), path


def _split_weights(entries: Iterable[str]) -> List[str]:
    """Caffe's weights lists: every entry may itself be a comma-separated list."""
    out = []
    for entry in entries:
        out.extend(w.strip() for w in str(entry).split(",") if w.strip())
    return out



# SolverParameter float fields an update reads: a non-finite value is refused (clip_gradients
# too: NaN compared false and silently meant no clipping).
# Our SolverParameter blocks -> what makes a solver train by one (Solver.reads_blocks).
# (A dsd_param given to a solver that is not DSD's is refused by _check_param.)
EXTENSION_BLOCKS = {
    "alternation_param": 'set type: "Alternation" to train by alternation (docs/alternation.md)',
    "convex_param": 'set type: "Convex" to train the two-layer net to its global optimum',
}

_FINITE_FIELDS = ("base_lr", "momentum", "momentum2", "weight_decay", "gamma", "power", "delta",
                  "rms_decay", "clip_gradients")

class Solver:
    """Caffe's Solver/SGDSolver: trains a net from a SolverParameter; the update rule is chosen
    by ``param.type`` (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam).

    ``Solver(solver, device=None, weights=(), allow_python=False, stages=None, level=None,
    compile=False, stop_on_nonfinite_loss=False)``: ``solver`` is a solver prototxt path or a
    ``caffe_pb2.SolverParameter``; ``device`` a torch device (default: pycaffe's ``set_mode_*`` /
    ``set_device`` choice; the file's ``solver_mode`` is the caffe tool's business, as in Caffe);
    ``weights`` caffemodels copied into the nets before training (Caffe's ``--weights``);
    ``stages``/``level`` are added to ``train_state`` like ``caffe train -stage/-level``;
    ``stop_on_nonfinite_loss`` raises NonFiniteLossError at a NaN/inf loss and refuses to
    snapshot after it (tools/train), instead of one warning and going on as Caffe's Step does.

    pycaffe surface: ``net``, ``test_nets``, ``iter``, ``param``, ``type``, ``lr``, ``step(n)``,
    ``solve(resume=None)``, ``test(i)``, ``snapshot()``, ``restore(path)``, ``apply_update()``,
    ``add_callback(on_start, on_gradients_ready)``. Training hooks: :meth:`add_hook` (see
    :mod:`pycaffe_alt.train.loop`); stop/snapshot requests (signals): :meth:`request_stop`,
    :meth:`request_snapshot`.
    """

    forced_type: Optional[str] = None  # the pycaffe subclasses (SGDSolver, ...) fix the rule
    # Which of our SolverParameter blocks (EXTENSION_BLOCKS) the class trains by; a block the
    # class does not read is named in a warning instead of being ignored without a word.
    reads_blocks: Tuple[str, ...] = ()

    def __init__(self, solver: SolverSource, *, device: Union[str, torch.device, None] = None,
                 weights: Sequence[str] = (), allow_python: bool = False,
                 stages: Optional[Sequence[str]] = None, level: Optional[int] = None,
                 compile: bool = False,  # noqa: A002 - the issue's name for torch.compile
                 stop_on_nonfinite_loss: bool = False):
        self._compile = compile  # the nets run through torch.compile (pycaffe_alt/compile.py)
        self.param, self.source = _read_solver_param(solver)
        if self.forced_type is not None:
            # get_solver and tools/train build through Caffe's registry (CreateSolver(param)),
            # whose constructor skips CheckType; pycaffe's SGDSolver(path) runs it.
            self._check_type(set_missing=not isinstance(solver, SolverFile))
        self.type: str = self.param.type
        if stages is not None:
            self.param.train_state.stage.extend(stages)
        if level is not None:
            self.param.train_state.level = int(level)
        with located_in(self.source):  # value errors name the solver file first
            self._check_param()
            rule_type = self._rule_type()
            self._rule_name = rule_type  # for the checks of fields set between steps
            self.rule = update_rule(rule_type)
            self._check_rule_param(rule_type)
            self.hyper = RuleHyper.from_solver_param(self.param)
            check_hyper(rule_type, self.hyper)
        self._warn_unread_blocks()
        self.device = self._pick_device(device)
        self.precision = MixedPrecision.from_solver_param(self.param, self.device, self.source)
        self._iter = 0
        self.current_step = 0
        # The SSD fork's plateau bookkeeping (lr_policy "plateau"), snapshotted with current_step.
        fresh = PlateauState()
        self.minimum_loss: float = fresh.minimum_loss
        self.iter_last_event: int = fresh.iter_last_event
        # Solver::Init logs the parameters in force (the file's fields after the upgrade and
        # the command line's train_state), one per line, as log readers and users expect.
        logger.info("Initializing solver from parameters: \n%s", debug_string(self.param))
        self.check_snapshot_folder(required=self.param.snapshot > 0)
        # Caffe seeds before building the nets: fillers, dropout and data streams follow it.
        if self.param.random_seed >= 0:
            set_random_seed(self.param.random_seed)
        self.net: Net = self._build_train_net(allow_python)
        self._check_hdf5_layer_names()
        self.test_nets: List[Net] = self._build_test_nets(allow_python)
        for path in _split_weights(list(self.param.weights) + list(weights)):
            self._load_weights(path)
        # The test nets keep their own (filled or loaded) weights until a test: Caffe's Test
        # shares the train net's into them (ShareTrainedLayersWith) each time it runs, so a
        # test net copy_from()'d or run by a program before that is the test net alone.
        logger.info("Solver scaffolding done.")

        self.history: List[torch.Tensor] = []
        self.refresh_params()
        self.history = self.rule.new_history(self._datas)
        self.smoother = loop.LossSmoother(self.param.average_loss)
        # pycaffe's step() goes on after a NaN loss as Caffe's does; tools/train stops.
        self.guard = loop.NonFiniteLossGuard(stop=stop_on_nonfinite_loss)
        self.hooks: list = []
        self.last_snapshot: Optional[Tuple[str, str]] = None
        self.stopped_early = False
        # Made by signal handlers at any moment: counted, so none is lost (signal_requests.py).
        self._stop_request = CountedRequest()
        self._snapshot_request = CountedRequest()
        # False on data-parallel ranks other than 0 (pycaffe_alt.distributed): like Caffe's
        # non-root solvers they train but neither test nor write snapshots.
        self.root_solver = True
        self.world_size = 1  # ranks of a data-parallel job (set_world_size)

    # ------------------------------------------------------------------ construction
    def _rule_type(self) -> str:
        """The update rule's name; a solver type that wraps a rule (Alternation) overrides it."""
        if self.param.HasField("dsd_param"):
            raise SolverError("a solver file with dsd_param is trained by the DSD solver "
                              f"({DSD_SOLVER.partition(':')[2]}), not by the plain Solver",
                              self._where("dsd_param"),
                              "build it with get_solver(path) (tools/train does)")
        if self.type in SOLVER_CLASSES:
            raise SolverError(f'solver type "{self.type}" is trained by '
                              f'{SOLVER_CLASSES[self.type].partition(":")[2]}, not by the plain '
                              "Solver", self._where("type"),
                              "build it with get_solver(path) (tools/train does)")
        return self.type

    def _check_type(self, set_missing: bool = True) -> None:
        """Caffe's Solver::CheckType for the pycaffe rule classes: a type the file gives (the
        old solver_type enum is upgraded to one before) must be the class's, and, with
        ``set_missing``, a file that gives none takes the class's (so the logged parameters
        show it). Caffe aborts on a mismatch rather than train a rule the file does not name."""
        if self.param.HasField("type") and self.param.type != self.forced_type:
            raise SolverError(f'the solver file says type "{self.param.type}" but '
                              f"caffe.{type(self).__name__} trains {self.forced_type} (Caffe: "
                              "solver type must agree with the instantiated solver class)",
                              self._where("type"),
                              "build the solver with caffe.get_solver(path), which takes the "
                              f"file's type, or remove the type line to train {self.forced_type}")
        if set_missing or self.param.type != self.forced_type:
            self.param.type = self.forced_type

    def _where(self, field: str) -> str:
        return f"{self.source}: {field}"

    def _warn_unread_blocks(self) -> None:
        """One warning per block of ours the file sets but this solver does not train by (an
        ``alternation_param`` under ``type: "SGD"`` trained plain SGD without a word)."""
        for block, hint in EXTENSION_BLOCKS.items():
            if self.param.HasField(block) and block not in self.reads_blocks:
                logger.warning("%s is ignored: a %s solver (type \"%s\") does not read it; %s",
                               self._where(block), type(self).__name__, self.type, hint)

    def _check_param(self) -> None:
        p = self.param
        if p.average_loss < 1:
            raise SolverError(f"average_loss must be >= 1 (got {p.average_loss})",
                              self._where("average_loss"), "1 logs the plain loss")
        if p.iter_size < 1:
            raise SolverError(f"iter_size must be >= 1 (got {p.iter_size})",
                              self._where("iter_size"), "batches accumulated per update")
        if p.snapshot > 0 and not p.HasField("snapshot_prefix"):
            raise SolverError("snapshot is set but snapshot_prefix is not",
                              self._where("snapshot_prefix"),
                              'add snapshot_prefix: "folder/name" to the solver file')
        if p.test_iter and any(n < 0 for n in p.test_iter):
            raise SolverError("test_iter values must be >= 0", self._where("test_iter"))
        # Caffe would run no iteration and report success; that is never what was meant.
        if p.max_iter < 0:
            raise SolverError(f"max_iter must be >= 0 (got {p.max_iter})", self._where("max_iter"),
                              "the number of iterations to train")
        for k in range(1, len(p.stepvalue)):
            if p.stepvalue[k] < p.stepvalue[k - 1]:
                # Caffe accepts it (step k is then taken one iteration after step k-1), so do we.
                logger.warning("%s: the values are not increasing (stepvalue %d is %d, after %d);"
                               " as in Caffe, that step is taken one iteration after the previous "
                               "one", self._where("stepvalue"), k, p.stepvalue[k],
                               p.stepvalue[k - 1])
                break
        self._check_finite_fields()
        # Unknown names and missing policy parameters fail now, not at the first update.
        regularizer(p.regularization_type)
        if p.lr_policy:
            learning_rate(p, 0)

    def _check_finite_fields(self, changed: str = "") -> None:
        """A NaN or infinite hyper-parameter makes every weight NaN at the first update (Caffe
        trains on silently); one of them is never meant. ``changed`` notes a value written into
        ``solver.param`` after the file was checked."""
        p = self.param
        for field in _FINITE_FIELDS:
            value = getattr(p, field)
            if p.HasField(field) and not math.isfinite(value):
                raise SolverError(f"{field} must be a finite number (got {value}{changed})",
                                  self._where(field), "fix or remove the field")

    def _check_rule_param(self, rule_type: str) -> None:
        """Hyper-parameters an update rule cannot run with (Caffe would divide by zero or take
        the root of a negative number at some iteration and train on NaN)."""
        p = self.param
        if rule_type == "Adam":
            for field in ("momentum", "momentum2"):
                value = getattr(p, field)
                if not 0 <= value < 1:
                    raise SolverError(f"Adam needs 0 <= {field} < 1 (got {value:g})",
                                      self._where(field), "Adam's usual values are momentum 0.9 "
                                      "and momentum2 0.999 (beta1, beta2)")
        if rule_type == "AdaDelta" and not 0 <= p.momentum <= 1:
            # The squared-gradient average then goes negative and its root is NaN.
            raise SolverError(f"AdaDelta needs 0 <= momentum <= 1 (got {p.momentum:g})",
                              self._where("momentum"), "AdaDelta's usual value is momentum 0.95")
        if rule_type in ("AdaGrad", "RMSProp", "AdaDelta", "Adam") and not p.delta > 0:
            # delta keeps the root of the gradient history off zero: a gradient entry that is
            # still 0 (a unit no example reached) divides 0 by 0 at the first update.
            raise SolverError(f"{rule_type} needs delta > 0 (got {p.delta:g})",
                              self._where("delta"), "Caffe's default is delta 1e-8; remove the "
                              "field or give a small positive value")

    def _check_hdf5_layer_names(self) -> None:
        """HDF5 snapshots hold a group per layer: a name HDF5 reads as a path is refused when
        the solver is built, not at the first snapshot of a long run."""
        if self.param.snapshot_format != caffe_pb2.SolverParameter.HDF5:
            return
        for view in self.net.layers:
            problem = hdf5_name_problem(view.name)
            if problem is not None:
                raise SolverError(f"snapshot_format HDF5 cannot hold layer {view.name!r} "
                                  f"({problem})", self._where("snapshot_format"), HDF5_NAME_HINT)

    @staticmethod
    def _pick_device(device) -> torch.device:
        # As in Caffe, the Solver class does not read solver_mode/device_id: the caffe tool
        # does (tools/train turns them into ``device``), and pycaffe programs choose with
        # caffe.set_mode_gpu()/set_device(i) (the default device), whatever the file says.
        return torch.device(device) if device is not None else default_device()

    def check_snapshot_folder(self, required: bool = True) -> None:
        """Fail now, not at the first snapshot, when snapshot files cannot be written there
        (Caffe's CheckSnapshotWritePermissions probes with a temporary file the same way)."""
        if "\0" in self.param.snapshot_prefix:  # open() raised ValueError for it
            raise SolverError(f"snapshot_prefix {self.param.snapshot_prefix!r} contains a NUL "
                              "character", self._where("snapshot_prefix"), NUL_HINT)
        if self.param.snapshot_prefix:
            # Temporaries of snapshots a killed run was writing (SIGKILL skips every cleanup).
            for path in remove_stale_temporaries(self.param.snapshot_prefix):
                logger.info("Removed %s, left by an interrupted snapshot", path)
        if not required:
            return
        # The process id keeps ranks of a data-parallel job from removing each other's probe.
        probe = snapshot_filename(self.param.snapshot_prefix, self._iter,
                                  f".{os.getpid()}.tempfile")
        folder = os.path.dirname(probe)
        try:
            if folder and not os.path.isdir(folder):
                # Unlike Caffe, create a missing snapshot folder (fresh clones lack snapshots/).
                os.makedirs(folder, exist_ok=True)
                logger.info("Created snapshot folder %s", folder)
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            # makedirs says "File exists" when a part of the folder's path is a file (or FIFO):
            # name that part instead.
            blocker = folder
            while blocker and not os.path.lexists(blocker):
                blocker = os.path.dirname(blocker)
            reason = (f"'{blocker}' is not a folder" if blocker and not os.path.isdir(blocker)
                      else e.strerror)
            raise SolverError(f"cannot write snapshots with prefix '{self.param.snapshot_prefix}' "
                              f"({reason})", self._where("snapshot_prefix"),
                              "make sure the folder exists and is writable (relative prefixes "
                              f"start at {os.getcwd()})") from None

    def _net_file(self, path: str, field: str) -> str:
        if not os.path.lexists(path):
            raise NetError(f"net file '{path}' not found", self._where(field),
                           f"paths in the solver file are relative to the current directory "
                           f"({os.getcwd()}), as in Caffe")
        with located_in(self._where(field)):  # a FIFO, device or directory: say which
            return check_input_path(path, NetError, "net file")

    def _net_state(self, net_param, phase: int, extra) -> "caffe_pb2.NetState":
        """Caffe's NetState precedence: phase, then the net's own state, then train/test_state."""
        state = caffe_pb2.NetState()
        state.phase = phase
        state.MergeFrom(net_param.state)
        if extra is not None:
            state.MergeFrom(extra)
        state.phase = phase  # train_state/test_state cannot change which net this is
        return state

    def _make_net(self, source, phase: int, extra_state, allow_python: bool) -> Net:
        from ..prototxt import read_net

        inline_def = isinstance(source, caffe_pb2.NetParameter)
        net_param = source if inline_def else read_net(source)
        state = self._net_state(net_param, phase, extra_state)
        # Net(level=0) means "keep the file's level", so a level reset to 0 goes inline too.
        level_reset = state.level == 0 and net_param.state.level != 0
        if inline_def or level_reset:
            inline = caffe_pb2.NetParameter()
            inline.CopyFrom(net_param)
            inline.state.CopyFrom(state)
            return Net(inline, phase=phase, stages=list(state.stage), level=state.level,
                       allow_python=allow_python, device=self.device, compile=self._compile)
        # From the file itself, so that errors name it.
        return Net(source, phase=phase, stages=list(state.stage), level=state.level,
                   allow_python=allow_python, device=self.device, compile=self._compile)

    def _build_train_net(self, allow_python: bool) -> Net:
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(given) != 1:
            raise SolverError(f"the solver must name exactly one train net; it sets "
                              f"{len(given)} of net, net_param, train_net, train_net_param",
                              self.source, 'e.g. net: "train_val.prototxt"')
        field = given[0]
        if field.endswith("_param"):
            source = getattr(p, field)
            logger.info("Creating training net specified in %s.", field)
        else:
            source = self._net_file(getattr(p, field), field)
            logger.info("Creating training net from %s file: %s", field, source)
        return self._make_net(source, TRAIN, p.train_state, allow_python)

    def _build_test_nets(self, allow_python: bool) -> List[Net]:
        p = self.param
        sources: List[Tuple[str, object]] = [("test_net_param", n) for n in p.test_net_param]
        sources += [("test_net file: " + f, self._net_file(f, "test_net")) for f in p.test_net]
        generic = p.HasField("net") or p.HasField("net_param")
        if generic:
            if len(p.test_iter) < len(sources):
                raise SolverError(f"{len(p.test_iter)} test_iter values for {len(sources)} test "
                                  "nets", self._where("test_iter"), "give one test_iter per test net")
            for _ in range(len(p.test_iter) - len(sources)):
                if p.HasField("net_param"):
                    sources.append(("net_param", p.net_param))
                else:
                    sources.append(("net file: " + p.net, p.net))
        elif len(p.test_iter) != len(sources):
            raise SolverError(f"{len(p.test_iter)} test_iter values for {len(sources)} test nets",
                              self._where("test_iter"), "give exactly one test_iter per test net")
        if p.test_state and len(p.test_state) != len(sources):
            raise SolverError(f"{len(p.test_state)} test_state entries for {len(sources)} test "
                              "nets", self._where("test_state"), "give none, or one per test net")
        if sources and p.test_interval <= 0:
            raise SolverError("test nets are defined but test_interval is not > 0",
                              self._where("test_interval"),
                              "set test_interval, or remove test_iter to train without testing")
        if sources:  # the fork checks these when it tests, so only a solver with test nets
            check_eval_param(p.eval_type, p.ap_version, self.source)
        nets = []
        for i, (label, source) in enumerate(sources):
            logger.info("Creating test net (#%d) specified by %s", i, label)
            extra = p.test_state[i] if p.test_state else None
            net = self._make_net(source, TEST, extra, allow_python)
            nets.append(net)
        return nets

    def _load_weights(self, path: str) -> None:
        """Caffe's --weights: copy into the train net and every test net (layers matched by name)."""
        if not os.path.lexists(path):
            raise SolverError(f"weights file '{path}' not found", self._where("weights"),
                              f"check the path (relative paths start at {os.getcwd()})")
        with located_in(self._where("weights")):
            check_input_path(path, SolverError, "weights file")
        logger.info("Finetuning from %s", path)
        for net in [self.net] + self.test_nets:
            net.copy_from(path)

    def refresh_params(self) -> None:
        """Cache the learnable parameters and their per-blob multipliers (Caffe's
        learnable_params_, params_lr_, params_weight_decay_)."""
        infos = self.net.learnable_params
        self._params = [i.param for i in infos]
        self._datas = [p.detach() for p in self._params]
        self._lr_mults = [float(i.lr_mult) for i in infos]
        self._decay_mults = [float(i.decay_mult) for i in infos]
        self._decay_cache: Tuple[Optional[float], List[float]] = (None, [])
        self._zero_diffs = {}
        self._rate_cache: Tuple[Optional[float], List[float]] = (None, [])
        # A weights file may have reshaped a blob since the history was made (a BN of
        # yjxiong/caffe stores (1, C) where the net built (1, C, 1, 1): Layer.adopt_stored_shape);
        # the history follows, as Caffe's would have had the file's shape from the start.
        shapes = self.rule.history_shapes([tuple(d.shape) for d in self._datas])
        if len(self.history) == len(shapes):
            self.history = [h.view(shape) if tuple(h.shape) != shape and h.numel() == math.prod(shape)
                            else h for h, shape in zip(self.history, shapes)]

    # ------------------------------------------------------------------ pycaffe surface
    @property
    def iter(self) -> int:  # noqa: A003 - pycaffe name
        return self._iter

    @iter.setter
    def iter(self, value: int) -> None:  # noqa: A003
        # pycaffe's iter is read-only; ours can be set (a resumed count), to a count >= 0.
        value = integer_argument(value, "solver.iter")
        if not 0 <= value < 2 ** 31:  # Caffe's iter_ is an int (the solverstate's int32)
            raise ArgumentTypeError(f"solver.iter must be in 0..2147483647, got {value}")
        self._iter = value

    @property
    def lr(self) -> float:
        """The learning rate of the current iteration (pycaffe ``SGDSolver.lr``). For
        ``plateau`` it is the rate at the held step: whether this iteration drops it depends on
        its loss, not yet computed."""
        step = current_step(self.param, self._iter, self.current_step)
        return learning_rate(self.param, self._iter, self.current_step if step is None else step)

    @property
    def nets(self) -> List[Net]:
        return [self.net] + self.test_nets

    def add_hook(self, hook) -> None:
        """Call ``hook``'s optional ``before_step(solver)``, ``after_backward(solver, loss)``,
        ``after_step(solver, loss)``, ``on_test(solver, net_id, results)`` and
        ``on_snapshot(solver, paths)`` during training (see :mod:`pycaffe_alt.train.loop`)."""
        self.hooks.append(hook)

    def add_callback(self, on_start, on_gradients_ready=None) -> None:
        """pycaffe's ``add_callback``: two callables, run before each iteration's forward pass
        and after its gradients are ready (before the update); or one object with both as
        methods (pycaffe's ``add_callback(nccl)``, a Caffe ``Solver::Callback``)."""
        if on_gradients_ready is None and hasattr(on_start, "on_gradients_ready"):
            on_start, on_gradients_ready = getattr(on_start, "on_start", None), \
                on_start.on_gradients_ready
        for name, fn in (("on_start", on_start), ("on_gradients_ready", on_gradients_ready)):
            if not callable(fn):  # it would fail only at the next step, far from here
                raise ArgumentTypeError(f"add_callback(): {name} must be callable, got "
                                        f"{type(fn).__name__}")
        self.add_hook(loop.CallbackHook(on_start, on_gradients_ready))

    def set_world_size(self, world: int) -> None:
        """Train as one of ``world`` data-parallel ranks (pycaffe_alt.distributed): each rank runs
        the file's batch, so the job reads ``world`` batches per iteration and an epoch takes
        ``world`` times fewer iterations. Plain solvers count iterations only; solvers whose
        schedule is set in epochs (alternation) override this to rescale it."""
        self.world_size = int(world)

    def request_stop(self) -> None:
        """Stop at the next iteration boundary (Caffe's SolverAction::STOP, e.g. on SIGINT)."""
        self._stop_request.make()

    def request_snapshot(self) -> None:
        """Snapshot at the next iteration boundary and go on (SolverAction::SNAPSHOT, SIGHUP)."""
        self._snapshot_request.make()

    def take_requests(self) -> Tuple[bool, bool]:
        """(snapshot, stop) requested since the last call; both are consumed."""
        return self._snapshot_request.take(), self._stop_request.take()

    def step(self, iters: int) -> float:
        """Run ``iters`` iterations (Caffe's Solver::Step, with its display/test/snapshot cadence);
        returns the last smoothed loss."""
        iters = integer_argument(iters, "step() iters")
        # pycaffe's Step(int) takes a C int, and Caffe's iteration counter is one too.
        if not -2**31 <= iters < 2**31 or self.iter + iters >= 2**31:
            raise SolverError(f"step({iters}) from iteration {self.iter} passes Caffe's largest "
                              "iteration number, 2^31 - 1", self.source,
                              "take fewer iterations per call")
        return loop.run_steps(self, iters)

    def solve(self, resume: Optional[str] = None) -> None:
        """Caffe's Solve: restore ``resume`` if given, train to ``max_iter``, snapshot at the end
        (``snapshot_after_train``), then one display forward and one test at ``max_iter``."""
        loop.solve(self, resume)

    def test_all(self) -> List["OrderedDict[str, float]"]:
        """Test every test net (stops early when a stop was requested during testing); a
        non-root data-parallel rank does not test."""
        results = []
        if not self.root_solver:
            return results
        for i in range(len(self.test_nets)):
            if self.stopped_early:
                break
            results.append(self.test(i))
        return results

    # ------------------------------------------------------------------ one iteration
    def clear_param_diffs(self) -> None:
        """Caffe's ClearParamDiffs: gradients start from nothing every iteration."""
        for p in self._params:
            p.grad = None

    def push_host_writes(self) -> None:
        """Bring numpy writes made through pycaffe views on GPU nets to the device tensors."""
        for net in self.nets:
            net._push_host_writes()

    def forward_backward(self, debug: bool = False) -> torch.Tensor:
        """``iter_size`` forward/backward passes, gradients accumulated in ``param.grad``;
        returns the loss averaged over the passes as a device tensor (no host sync).
        ``debug`` logs Caffe's debug_info lines for each pass."""
        total = None
        callbacks = self.net.layer_callbacks
        if self.param.iter_size < 1:
            # solver.param is writable between steps; the file's value was checked at load, and
            # no pass at all left no loss to return (an AttributeError on None).
            raise SolverError(f"iter_size must be >= 1 (got {self.param.iter_size}, set after "
                              "the solver was made)", self._where("iter_size"),
                              "set solver.param.iter_size to the number of batches accumulated "
                              "per update (1: none)")
        for _ in range(self.param.iter_size):
            # The layers' outputs, for debug_info's lines or the net's backward callbacks.
            trace = [] if debug or callbacks.on_backward else None
            with self.precision.autocast():
                values = self.net.run(trace=trace)
                if debug:
                    grads = debug_info.watch_bottoms(trace)
                    debug_info.log_forward(trace)
                loss = self.net.loss(values)
            sequence = None
            if callbacks.on_backward:
                sequence = BackwardSequence(callbacks, 0, len(self.net.steps) - 1)
                for step, _, tops in trace:
                    sequence.watch(step.index, tops)
            # Caffe's Net::Backward aborts at a layer without one (Threshold) that needs it.
            self.net.check_backward()
            with sequence if sequence is not None else contextlib.nullcontext():
                if loss.requires_grad:
                    self.precision.scaled(loss).backward()
            if debug:
                debug_info.log_backward(trace, grads, self._params)
            loss = loss.detach()
            total = loss if total is None else total + loss
        # Caffe: loss /= iter_size, in float32.
        return total / self.param.iter_size if self.param.iter_size > 1 else total

    def _diffs(self) -> List[torch.Tensor]:
        """The gradient of every learnable parameter; parameters that got none (lr_mult 0,
        nothing below a loss) use a zeroed buffer so the update formulas see Caffe's zero diff."""
        diffs = []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                g = self._zero_diffs.get(i)
                if g is None:
                    g = self._zero_diffs[i] = torch.zeros_like(self._datas[i])
                else:
                    g.zero_()
            diffs.append(g)
        return diffs

    def _local_decays(self) -> List[float]:
        # solver.param is live (docs/pycaffe.md): weight_decay set between steps applies.
        cached, decays = self._decay_cache
        if cached != self.param.weight_decay:
            decays = [local_decay(self.param.weight_decay, m) for m in self._decay_mults]
            self._decay_cache = (self.param.weight_decay, decays)
        return decays

    def _rule_hyper(self) -> RuleHyper:
        """The update rule's fields as solver.param holds them now (momentum, momentum2, delta,
        rms_decay set between steps apply, as base_lr does), with Caffe's checks."""
        hyper = RuleHyper.from_solver_param(self.param)
        if hyper != self.hyper:
            with located_in(self.source):
                check_hyper(self._rule_name, hyper)
            self.hyper = hyper
        return hyper

    def _local_rates(self, rate: float) -> List[float]:
        cached_rate, rates = self._rate_cache
        if cached_rate != rate:
            rates = [local_rate(rate, m) for m in self._lr_mults]
            self._rate_cache = (rate, rates)
        return rates

    def display_due(self, it: Optional[int] = None) -> bool:
        it = self._iter if it is None else it
        return bool(self.param.display) and it % self.param.display == 0

    def apply_update(self) -> None:
        """Caffe's SGDSolver::ApplyUpdate for the current iteration, then ``iter += 1``."""
        it = self._iter
        # solver.param is writable between steps (docs/pycaffe.md): a value written there
        # since the file was checked gets the same check before it reaches the weights.
        self._check_finite_fields(", set after the solver was made")
        with located_in(self.source):  # e.g. no lr_policy at all: a solver-file error
            step = (self._advance_plateau(it) if self.param.lr_policy == "plateau"
                    else current_step(self.param, it, self.current_step))
            rate = learning_rate(self.param, it, step)
        if step is not None:
            if self.param.lr_policy == "multistep" and step != self.current_step:
                logger.info("MultiStep Status: Iteration %d, step = %d", it, step)
            self.current_step = step
        if self.display_due(it):
            logger.info("Iteration %d, lr = %s", it, format_value(rate))
        with torch.no_grad():
            diffs = self._diffs()
            if not diffs:  # nothing learnable: Caffe's ApplyUpdate loops over no parameters
                self._iter += 1
                return
            if not self.precision.unscale_and_check(diffs):  # FP16 overflow: skip this step
                self._iter += 1
                return
            clipped = clip_gradients(diffs, self.param.clip_gradients)
            if clipped is not None:
                logger.info("%s", clipped.message())
            normalize(diffs, self.param.iter_size)
            regularize(self._datas, diffs, self._local_decays(), self.param.regularization_type)
            self.rule.update(diffs, self.history, self._local_rates(rate), self._rule_hyper(), it)
            apply_update(self._datas, diffs)
        self._iter += 1

    def _plateau_state(self) -> PlateauState:
        return PlateauState(self.minimum_loss, self.iter_last_event, self.current_step)

    def _advance_plateau(self, it: int) -> int:
        """The SSD fork's plateau bookkeeping for iteration ``it`` (``plateau_advance`` on the
        held state), with its two log lines; returns the step counter for this iteration's rate.

        The fork reads ``smoothed_loss_`` in ``GetLearningRate``, called first thing in
        ``ApplyUpdate``: after ``Step`` smoothed this iteration's loss (and displayed it), so the
        smoother's current value. Reading it is a host sync on a GPU, once per iteration."""
        held = self._plateau_state()
        new = plateau_advance(self.param.plateau_winsize, held, self.smoother.value(), it)
        self.minimum_loss, self.iter_last_event = new.minimum_loss, new.iter_last_event
        if new.current_step != held.current_step:
            logger.info("Plateau Status: Iteration %d, step = %d", it, new.current_step)
        # The fork reports the minimum at display iterations when an event (a new minimum or a
        # drop) happened since the previous display.
        if self.display_due(it) and new.iter_last_event > it - self.param.display:
            logger.info("Plateau Status: Iteration %d, current minimum_loss = %s", it,
                        format_value(new.minimum_loss))
        return new.current_step

    # ------------------------------------------------------------------ testing
    def test(self, test_net_id: int = 0) -> "OrderedDict[str, float]":
        """Caffe's Test(): average the test net's outputs over ``test_iter`` batches and log them.

        Keys are the output blob names; an output with several values gives ``name`` for the
        first and ``name[k]`` for the others. Empty when a stop request interrupted the test.
        """
        results = self.evaluate(test_net_id)
        for hook in self.hooks:
            if hasattr(hook, "on_test"):
                hook.on_test(self, test_net_id, results)
        return results

    def evaluate(self, test_net_id: int = 0, tag: str = "") -> "OrderedDict[str, float]":
        """The body of :meth:`test` without the ``on_test`` hooks. ``tag`` (e.g. ``" (MaskT)"``)
        is written after ``Test net output #k`` and ``Test loss`` in the log lines, so that a
        second evaluation of the same net under other conditions is told apart (and is not read
        as Caffe's own output lines by log parsers); with a tag the ``Testing net`` line is not
        repeated."""
        if not 0 <= test_net_id < len(self.test_nets):
            raise SolverError(f"no test net #{test_net_id} (the solver has "
                              f"{len(self.test_nets)})", self.source)
        if not tag:
            logger.info("Iteration %d, Testing net (#%d)", self._iter, test_net_id)
        self.push_host_writes()
        net = self.test_nets[test_net_id]
        net.share_with(self.net)  # Caffe's Test: test_net->ShareTrainedLayersWith(net_)
        n_iter = self.param.test_iter[test_net_id]
        scores = loss = first_counts = None
        # The SSD fork's TestDetection: the outputs are detection rows, scored as mAP.
        tally = DetectionTally() if self.param.eval_type == "detection" else None
        with torch.no_grad():
            for batch_index in range(n_iter):
                # Caffe polls for signals at every test batch.
                snap, stop = self.take_requests()
                if snap:
                    self.snapshot()
                if stop:
                    self.stopped_early = True
                    logger.info("Test interrupted.")
                    return OrderedDict()
                trace = [] if self.param.debug_info else None  # Caffe: test nets always
                values = net.run(trace=trace)
                if trace is not None:
                    debug_info.log_forward(trace)
                if tally is not None:
                    with located_in(self._where(f"eval_type (test net #{test_net_id})")):
                        tally.add([(n, values[n].detach().cpu().numpy()) for n in net.outputs])
                else:
                    counts = [values[n].numel() for n in net.outputs]
                    first_counts = first_counts or counts
                    change = count_change(net.outputs, first_counts, counts, batch_index)
                    if change is not None:
                        raise SolverError(change, self._where(f"test net #{test_net_id}"),
                                          "score a detector's detections with DetectionEvaluate "
                                          'outputs and eval_type: "detection", or end the test '
                                          "net in outputs of a fixed size")
                    batch = torch.cat([values[n].detach().reshape(-1).float()
                                       for n in net.outputs]) \
                        if net.outputs else torch.zeros(0, device=net.device)
                    scores = batch.clone() if scores is None else scores + batch
                if self.param.test_compute_loss:
                    iter_loss = net.loss(values).detach().float()
                    loss = iter_loss if loss is None else loss + iter_loss
        results: "OrderedDict[str, float]" = OrderedDict()
        if self.param.test_compute_loss and loss is not None:
            logger.info("Test loss%s: %s", tag, format_value(float((loss / n_iter).cpu())))
        if tally is not None:
            with located_in(self._where(f"eval_type (test net #{test_net_id})")):
                maps = tally.mean_aps(self.param.ap_version, self.param.show_per_class_result)
            for i, value in enumerate(maps):
                # No loss suffix: the fork's detection lines never carry one.
                logger.info("    Test net output #%d%s: %s = %s", i, tag, net.outputs[i],
                            format_value(value))
                results[net.outputs[i]] = value
            return results
        if scores is None:
            return results
        means = (scores / n_iter).cpu().numpy() if n_iter else scores.cpu().numpy()
        weights = net.blob_loss_weights
        index = 0
        for name in net.outputs:
            count = values[name].numel()
            for k in range(count):
                value = float(means[index])
                logger.info("    Test net output #%d%s: %s = %s%s", index, tag, name,
                            format_value(value), loss_suffix(weights[name], value))
                results[name if k == 0 else f"{name}[{k}]"] = value
                index += 1
        return results

    # ------------------------------------------------------------------ snapshots
    def _owned_blobs(self, diffs: bool = False) -> List[Tuple[str, List[Optional[np.ndarray]]]]:
        """Every layer (an empty list for one without blobs: Caffe's ToHDF5 makes a group for
        each layer) with its blobs' data, None where the blob is shared from another layer
        (Caffe saves owners only); or, with ``diffs``, every blob's diff, shared ones included
        (they show their owner's, as Caffe writes diffs regardless of sharing)."""
        owners = {(i.layer, i.index) for i in self.net.learnable_params}
        diff_of = self._param_diffs() if diffs else None
        layers = []
        for view in self.net.layers:  # every layer, in order: names may repeat
            name = view.name
            arrays: List[Optional[np.ndarray]] = []
            for j, p in enumerate(view.module.blobs):
                if diff_of is not None:
                    arrays.append(diff_of.get(id(p), np.zeros(p.shape, np.float32)))
                elif (name, j) not in owners:
                    arrays.append(None)
                else:
                    arrays.append(p.detach().cpu().numpy())
            layers.append((name, arrays))
        return layers

    def _layer_diffs(self) -> List[List[np.ndarray]]:
        """Each layer's blob diffs, in layer order (a shared blob shows its owner's diff; by
        position, as layer names may repeat)."""
        diff_of = self._param_diffs()
        return [[diff_of.get(id(p), np.zeros(p.shape, np.float32)) for p in layer.blobs]
                for layer in self.net.layer_sequence]

    def _param_diffs(self) -> Dict[int, np.ndarray]:
        """id(parameter) -> its diff as Caffe holds it after an update (the update value;
        zeros before the first iteration)."""
        out = {}
        for i, p in enumerate(self._params):
            g = p.grad if p.grad is not None else self._zero_diffs.get(i)
            out[id(p)] = g.detach().cpu().numpy() if g is not None else np.zeros(p.shape, np.float32)
        return out

    def snapshot(self) -> Tuple[str, str]:
        """Write ``<prefix>_iter_<N>.caffemodel`` (or ``.caffemodel.h5``) and the matching
        ``.solverstate`` atomically; returns both paths. Refuses (NonFiniteLossError) when the
        loss has become NaN/inf, so that the last snapshot on disk stays a good one."""
        self.guard.check(self)
        if self.guard.stop:  # pycaffe solvers write what they have, as Caffe's do
            self._check_finite_weights()
        if not self.root_solver:  # data-parallel: rank 0 writes the job's snapshots
            return self.last_snapshot
        hdf5 = self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5
        prefix = self.param.snapshot_prefix
        if hdf5:
            model = snapshot_filename(prefix, self._iter, ".caffemodel.h5")
            logger.info("Snapshotting to HDF5 file %s", model)
            write_weights_h5(self._owned_blobs(), model,
                             self._owned_blobs(diffs=True) if self.param.snapshot_diff else None)
        else:
            model = snapshot_filename(prefix, self._iter, ".caffemodel")
            logger.info("Snapshotting to binary proto file %s", model)
            self.net.save(model, self._layer_diffs() if self.param.snapshot_diff else None)
        history = [h.detach().cpu().numpy() for h in self.history]
        resume_state = self._resume_state()
        # The fork writes its plateau fields whatever the policy (iter_last_event then holds
        # whatever it held); we write them where they mean something, so other policies' files
        # stay BVLC Caffe's. Its restore reads them unconditionally (see restore).
        plateau = self._plateau_state() if self.param.lr_policy == "plateau" else None
        if hdf5:
            state = snapshot_filename(prefix, self._iter, ".solverstate.h5")
            logger.info("Snapshotting solver state to HDF5 file %s", state)
            write_solverstate_h5(state, self._iter, self.current_step, model, history, resume_state,
                                 plateau)
        else:
            state = snapshot_filename(prefix, self._iter, ".solverstate")
            logger.info("Snapshotting solver state to binary proto file %s", state)
            write_solverstate(state, self._iter, self.current_step, model, history, resume_state,
                              plateau)
        self.last_snapshot = (model, state)
        for hook in self.hooks:
            if hasattr(hook, "on_snapshot"):
                hook.on_snapshot(self, self.last_snapshot)
        return self.last_snapshot

    def _check_finite_weights(self) -> None:
        # A huge step can overflow the weights before the loss shows it; such a state must not
        # replace the last good snapshot either.
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(d).all() for d in self._datas]).all() \
                if self._datas else torch.tensor(True)
        if not bool(finite):
            kept = (f"the last good snapshot is {self.last_snapshot[1]}" if self.last_snapshot
                    else "no snapshot was written in this run")
            raise NonFiniteLossError(
                f"training stopped: the weights became NaN or infinite by iteration {self._iter}; "
                f"{kept}", where=self.source,
                hint="lower base_lr, set clip_gradients, or check the data (resume from the last "
                     "good snapshot with --snapshot)")

    def restore(self, state_path: str) -> None:
        """Caffe's Restore from a ``.solverstate`` (or ``.solverstate.h5``): iteration,
        current_step (and the SSD fork's plateau minimum_loss, iter_last_event), history and the
        weights of ``learned_net``; with our continuation data also the data cursors and random
        generators (otherwise the data restarts where it is, as in Caffe)."""
        state_path = path_argument(state_path, "restore()")
        data = read_any_solverstate(state_path)
        shapes = self.rule.history_shapes([tuple(d.shape) for d in self._datas])
        check_history(data.history, shapes, state_path)
        if data.learned_net:
            weights = snapshot_companion(data.learned_net, state_path, "the weights",
                                         "keep the .caffemodel of the snapshot with its "
                                         ".solverstate")
            try:
                copied = self.net.copy_from(weights)
            except CaffeError as e:
                raise SolverError(f"cannot restore its weights: {e.what}", where=weights,
                                  hint=e.hint) from None
            # A snapshot's own weights cover every learnable layer; one cut short (or of another
            # net) left layers at their initial values while their history was restored.
            warn_uncovered([weights], copied, self.net.params)
        # SGDSolver::RestoreSolverStateFromBinaryProto prints this literally, whichever solver
        # type runs; the HDF5 restore prints nothing.
        if not is_hdf5(state_path):
            logger.info("SGDSolver: restoring history")
        with torch.no_grad():
            for h, arr in zip(self.history, data.history):
                h.copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(h.shape).to(h.device, h.dtype))
        self._iter = int(data.iter)
        self.current_step = int(data.current_step)
        # As the fork, whatever the policy: a file without them gives the proto defaults.
        self.minimum_loss, self.iter_last_event = data.minimum_loss, int(data.iter_last_event)
        if data.resume_state is not None:
            try:
                self._apply_resume_state(data.resume_state, state_path)
            except SolverError:
                raise
            except (CaffeError, KeyError, TypeError, ValueError, RuntimeError, OverflowError,
                    AttributeError, IndexError) as e:
                # The file's framing decoded, but a value inside is damaged or does not fit.
                what = e.what if isinstance(e, CaffeError) else f"{type(e).__name__}: {e}"
                raise SolverError(f"its resume data (data cursors, random generators) is damaged "
                                  f"or does not fit this net ({what})", where=state_path,
                                  hint="resume from an earlier snapshot, or delete the file's "
                                       "resume data to restart like Caffe (data cursor at the "
                                       "first record)") from None

    def _resume_state(self) -> dict:
        """The continuation data written into the solverstate (see :mod:`pycaffe_alt.train.resume`);
        a solver with more state (Alternation) extends the dict. Called while snapshotting, after
        the weights are written and before the solverstate."""
        return capture_resume_state(self)

    def _apply_resume_state(self, state: dict, state_path: str) -> None:
        """Inverse of :meth:`_resume_state`, called by :meth:`restore` after the weights and the
        history are back."""
        apply_resume_state(self, state, state_path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} type={self.type} iter={self._iter} net={self.net!r}>"

    # ---- pycaffe extras ----
    def share_weights(self, net: Net) -> None:
        """pycaffe ``solver.share_weights(net)``: ``net`` uses the train net's parameter tensors
        for layers of the same name (Caffe's ShareTrainedLayersWith)."""
        if not isinstance(net, Net):
            raise ArgumentTypeError(f"share_weights() takes a Net, got {type(net).__name__}")
        net.share_with(self.net)
    # ---- end of pycaffe extras ----


def _typed(name: str, doc: str, base: type = Solver) -> type:
    return type(f"{name}Solver", (base,), {"forced_type": name, "__doc__": doc,
                                           "__module__": __name__})


SGDSolver = _typed("SGD", "pycaffe's ``caffe.SGDSolver``: a Solver that always uses the SGD rule.")
# pycaffe registers the other rules with SGDSolver as their base (python/caffe/_caffe.cpp, as in
# Caffe's C++), so isinstance(caffe.AdamSolver(path), caffe.SGDSolver) holds there too.
NesterovSolver = _typed("Nesterov", "pycaffe's ``caffe.NesterovSolver`` (Nesterov momentum).",
                        SGDSolver)
AdaGradSolver = _typed("AdaGrad", "pycaffe's ``caffe.AdaGradSolver``.", SGDSolver)
RMSPropSolver = _typed("RMSProp", "pycaffe's ``caffe.RMSPropSolver``.", SGDSolver)
AdaDeltaSolver = _typed("AdaDelta", "pycaffe's ``caffe.AdaDeltaSolver``.", SGDSolver)
AdamSolver = _typed("Adam", "pycaffe's ``caffe.AdamSolver``.", SGDSolver)

# The pycaffe class of each built-in update rule, by Caffe ``type`` string. pycaffe's get_solver
# hands back the solver as its dynamic C++ class (Boost.Python looks up the registered class of
# the object's runtime type), so a file of type "Adam" gives an AdamSolver there.
RULE_SOLVERS = {cls.forced_type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver,
                                                 RMSPropSolver, AdaDeltaSolver, AdamSolver)}


# Solver types that are more than an update rule, by Caffe ``type`` string: the class that trains
# them, as "module:Class" (imported when first used; the modules import this one).
SOLVER_CLASSES = {"Alternation": "pycaffe_alt.alternation.solver:AlternationSolver",
                  "Convex": "pycaffe_alt.convex.solver:ConvexSolver"}
# A solver file with a dsd_param is trained by DSD whatever its type (the type then names the
# update rule); this function picks the DSD class from the file's parameters.
DSD_SOLVER = "pycaffe_alt.alternation.dsd:dsd_solver_class"


def solver_class(type_name: str) -> type:
    """The class :func:`get_solver` builds for a solver ``type``: pycaffe's class of a built-in
    update rule (AdamSolver for "Adam"), Solver for any other rule name."""
    import importlib

    target = SOLVER_CLASSES.get(type_name)
    if target is None:
        return RULE_SOLVERS.get(type_name, Solver)
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def get_solver(solver: SolverSource, **kwargs) -> Solver:
    """pycaffe's ``caffe.get_solver(path)``: the solver of the type the file names (DSD when
    the file has a ``dsd_param``). ``solver`` may also be a :class:`SolverFile` already read
    (tools/train reads the file once, as caffe.cpp's train() does)."""
    import importlib

    if isinstance(solver, SolverFile):
        param = solver.param
    elif isinstance(solver, caffe_pb2.SolverParameter):
        param = solver
    else:
        from ..prototxt import read_solver

        # None or a number: one ArgumentTypeError, as Net(None) gives (os.fspath's TypeError).
        path = path_argument(solver, "get_solver()")
        if os.path.isfile(path):
            # Read once, as pycaffe's get_solver reads the file once and builds the solver
            # from the parameters (each upgrade note, e.g. the derived snapshot_prefix, was
            # logged twice when the solver read the file again).
            param = read_solver(path)
            solver = SolverFile(param, path)
        else:  # the solver's own reading says what is wrong with the path
            param = caffe_pb2.SolverParameter(type="")
    if param.HasField("dsd_param"):
        module, _, name = DSD_SOLVER.partition(":")
        return getattr(importlib.import_module(module), name)(param)(solver, **kwargs)
    return solver_class(param.type)(solver, **kwargs)
