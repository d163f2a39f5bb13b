"""``tools/train``: train or fine-tune a model like ``caffe train``.

    train --solver S [--weights W1,W2 | --snapshot STATE] [--gpu N|N,M|all]
          [--sigint_effect stop|snapshot|none] [--sighup_effect stop|snapshot|none]
          [--stage A,B] [--level N] [--allow-python] [--dist-timeout SECONDS] [--sync-bn]

Follows caffe.cpp's ``train()``: ``--weights`` (fine-tune) and ``--snapshot`` (resume) exclude each
other; without ``--gpu`` the solver file's ``solver_mode``/``device_id`` choose the device;
``--stage``/``--level`` set the train net's NetState; SIGINT and SIGHUP become solver requests
(defaults: SIGINT stops, SIGHUP snapshots), and a stop ends with exit status 0 as in Caffe.
Every user mistake (a bad solver file, a missing net or dataset, weights that do not fit, an
unwritable snapshot folder) is reported in one paragraph before training starts, without a
traceback. Data-parallel training (docs/distributed.md): ``--gpu 0,1`` / ``--gpu all`` start one
rank per GPU; under a torch.distributed launcher (``python3 -m torch.distributed.run
--nproc_per_node N tools/train ...``, torchrun, multi-node) each process joins the job as the
launcher's environment says; ``--sync-bn`` gives BatchNorm the global batch's statistics. In a
terminal a progress bar (iterations/s, ETA) sits below the log lines; when
stderr is a file or a pipe only Caffe's plain log lines are written.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import sys
import threading
from typing import Dict, List, Optional, Sequence

from ..distributed.group import DEFAULT_START_TIMEOUT, LaunchEnv, launch_env
from ..distributed.launch import spawn_ranks, without_flag
from ..errors import CaffeError, DistributedError, SolverError, WeightsError
from ..fileio import check_input_path
from ..host_memory import keep_freed_memory
from ..log import get_logger, setup_tool_logging
from ..proto import caffe_pb2
from .cli import gflags_argv, int32, parse_args, positive_seconds, run_main
from .progress import training_progress
from .test import gpu_ids, select_device

EFFECTS = ("stop", "snapshot", "none")


class SignalEffects:
    """Caffe's SignalHandler: SIGINT/SIGHUP turn into ``request_stop``/``request_snapshot``.

    Used as a context manager around ``solver.solve()``; the previous handlers come back on exit.
    A second SIGINT after a stop was requested aborts at once (KeyboardInterrupt), for a step that
    hangs; Caffe has no such escape, which makes a stuck run hard to end from the terminal.
    """

    def __init__(self, solver, sigint_effect: str = "stop", sighup_effect: str = "snapshot"):
        for flag, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in EFFECTS:
                raise CaffeError(f"--{flag} {effect!r}: invalid signal effect",
                                 hint=f"use one of {', '.join(EFFECTS)}")
        self.solver = solver
        self.effects: Dict[int, str] = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):  # not on Windows
            self.effects[signal.SIGHUP] = sighup_effect
        self._previous: Dict[int, object] = {}
        self.stop_requested = False

    def handle(self, signum: int, frame=None) -> None:
        """Apply the effect configured for ``signum`` (also callable directly, e.g. in tests)."""
        effect = self.effects.get(signum, "none")
        name = signal.Signals(signum).name
        log = get_logger()
        if effect == "stop":
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.info("%s received: stopping after the current iteration%s", name,
                     " (press Ctrl-C again to abort now)" if signum == signal.SIGINT else "")
            self.solver.request_stop()
        elif effect == "snapshot":
            log.info("%s received: snapshotting after the current iteration", name)
            self.solver.request_snapshot()

    def __enter__(self) -> "SignalEffects":
        # Python only lets the main thread install handlers; elsewhere (e.g. an embedding
        # application's worker) the signals keep their current meaning.
        if threading.current_thread() is threading.main_thread():
            for signum in self.effects:
                self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def _split(flag: Optional[str]) -> List[str]:
    return [s for s in (flag or "").split(",") if s]


def check_flags(args: argparse.Namespace) -> None:
    """Caffe's flag checks, plus existence of the files named, before anything is built."""
    if args.snapshot and args.weights:
        raise SolverError("give --snapshot to resume training or --weights to fine-tune, not both",
                          hint="--snapshot continues a run (its weights and solver history); "
                               "--weights starts a new run from trained weights")
    if args.weights and len(_split(args.weights)) != len(args.weights.split(",")):
        # Caffe would try to open the empty name; an empty entry is a typo, not "no weights".
        raise WeightsError(f"--weights {args.weights!r} has an empty entry",
                           hint="give .caffemodel paths separated by single commas")
    for path in _split(args.weights):
        if not os.path.lexists(path):
            raise WeightsError(f"--weights: file {path!r} does not exist",
                               hint="give a .caffemodel (or .h5) path; several are separated by commas")
        check_input_path(path, WeightsError, "weights file")
    if args.snapshot and not os.path.lexists(args.snapshot):
        raise SolverError(f"--snapshot: file {args.snapshot!r} does not exist",
                          hint="give a .solverstate (or .solverstate.h5) written by a previous run")
    if args.snapshot:
        check_input_path(args.snapshot, SolverError, "solver state file")


def later_local_rank(environ: Optional[Dict[str, str]] = None) -> bool:
    """True in a process a launcher started as local rank 1, 2, ... of a job.

    Such a process does not print the mistakes it finds before joining the job in the command
    line or the solver file (it exits with status 1 quietly): every local rank of a machine got
    the same arguments and reads the same files, so local rank 0 finds the same mistake and
    prints it, once per machine (machines may differ, so each reports its own). Rank-specific
    problems (the launcher's environment, the rank's GPU) are reported by the rank itself.
    Not joining first is deliberate: a rank that cannot start must not wait for the others.
    """
    env = os.environ if environ is None else environ
    try:
        return int(env.get("WORLD_SIZE", "1")) > 1 and int(env.get("LOCAL_RANK", "0")) > 0
    except ValueError:
        return False  # launch_env reports the malformed environment on every rank


def gpu_flag_for(args_gpu: str, param) -> str:
    """The ``--gpu`` value in force: the flag, else the solver file's ``solver_mode: GPU``.

    Caffe switches to the GPU named by ``device_id`` (default 0) when the file asks for GPU mode
    and no flag is given. Many published solver files say GPU; on a machine without CUDA we run
    them on the CPU with a warning instead of failing (an explicit ``--gpu`` still fails).
    """
    if args_gpu:
        return args_gpu
    if param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        import torch

        if not torch.cuda.is_available():
            get_logger().warning("the solver asks for solver_mode: GPU but no CUDA device is "
                                 "available to PyTorch; training on the CPU")
            return ""
        return str(param.device_id if param.HasField("device_id") else 0)
    return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="train", description=__doc__.splitlines()[0])
    parser.add_argument("--solver", required=True, help="the solver definition (.prototxt)")
    parser.add_argument("--weights", default="",
                        help="pretrained weights to fine-tune from, comma-separated "
                             "(not with --snapshot)")
    parser.add_argument("--snapshot", default="", help="a .solverstate to resume training from")
    parser.add_argument("--gpu", default="",
                        help="GPU id (N); N,M or 'all' train data-parallel, one process per GPU")
    parser.add_argument("--sigint_effect", "--sigint-effect", choices=EFFECTS, default="stop",
                        help="what SIGINT (Ctrl-C) does (default: stop)")
    parser.add_argument("--sighup_effect", "--sighup-effect", choices=EFFECTS, default="snapshot",
                        help="what SIGHUP does (default: snapshot)")
    parser.add_argument("--stage", default="", help="comma-separated NetState stages of the train net")
    parser.add_argument("--level", type=int32, default=0,
                        help="NetState level of the train net (default 0, as Caffe's, which "
                             "replaces a level the solver file gives)")
    parser.add_argument("--allow-python", "--allow_python", action="store_true",
                        help="allow Python layers (they run code named in the prototxt)")
    parser.add_argument("--dist-timeout", "--dist_timeout", type=positive_seconds,
                        default=DEFAULT_START_TIMEOUT,
                        help="data-parallel: seconds to wait for every rank at start-up "
                             f"(default {DEFAULT_START_TIMEOUT:g})")
    parser.add_argument("--sync-bn", "--sync_bn", action="store_true",
                        help="data-parallel: BatchNorm uses the global batch's statistics "
                             "(default: per rank, as Caffe)")
    parser.add_argument("--compile", action="store_true",
                        help="run the nets through torch.compile (see docs/performance.md)")
    argv = gflags_argv(sys.argv[1:] if argv is None else list(argv))
    quiet = later_local_rank()
    setup_tool_logging()  # outside the redirection below: the log handler keeps the real stderr
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            args = parse_args(parser, argv)
            check_flags(args)
            from ..prototxt import read_solver

            # Syntax errors name file:line here, before any net is built.
            param = read_solver(args.solver)
    except (CaffeError, SystemExit) as e:
        if quiet and not (isinstance(e, SystemExit) and e.code in (0, None)):
            return 1  # local rank 0 reports this mistake of the command line or solver file
        raise
    log = get_logger()
    keep_freed_memory()  # reuse activation memory across iterations, as Caffe does
    job = launch_env()
    if job is not None and job.rank != 0:
        log.setLevel(logging.WARNING)  # rank 0 alone logs Caffe's lines
    ids = gpu_ids(args.gpu)
    if len(ids) > 1 and job is None:
        # Caffe's -gpu 0,1: one rank per GPU, started here.
        for i in ids:
            select_device(str(i))  # no CUDA, or no such device: one message, before any spawn
        log.info("Using GPUs %s: one data-parallel rank each", ", ".join(map(str, ids)))
        return spawn_ranks(without_flag(argv, "gpu"), [["--gpu", str(i)] for i in ids])
    gpu = gpu_flag_for(args.gpu, param)
    if job is not None:
        gpu = rank_gpu(job, ids, gpu)
    device = select_device(gpu)
    if device.type == "cpu":
        log.info("Use CPU.")
    else:
        import torch

        log.info("Using GPUs %s", ", ".join(map(str, gpu_ids(gpu))))
        log.info("GPU %d: %s", device.index, torch.cuda.get_device_name(device))

    if job is not None:
        return train_rank(args, job, device, param)
    if args.sync_bn:
        log.warning("--sync-bn has no effect on one process (its batch is the whole batch)")
    solver = build_solver(args, device, param)
    if args.snapshot:
        log.info("Resuming from %s", args.snapshot)
        solver.restore(args.snapshot)
    log.info("Starting Optimization")
    with SignalEffects(solver, args.sigint_effect, args.sighup_effect), training_progress(solver):
        solver.solve()
    log.info("Optimization Done.")
    return 0


def build_solver(args: argparse.Namespace, device, param: "caffe_pb2.SolverParameter"):
    """The solver the flags ask for, on ``device``, from ``param`` (the solver file as read)."""
    from ..solver.solver import SolverFile, get_solver

    # caffe.cpp train(): --snapshot clears the file's weights (the state's own weights are
    # restored) and --weights replaces them with the flag's list; a file's weights that are
    # missing must not stop either, nor be copied under the flag's (layers the flag's files
    # lack would keep them). The solver's log then shows the weights in force, as Caffe's.
    if args.snapshot or args.weights:
        param = caffe_pb2.SolverParameter.FromString(param.SerializeToString())
        param.ClearField("weights")
        if args.weights:
            param.weights.append(args.weights)

    # caffe.cpp train() sets the train net's NetState level to --level and adds every name of
    # boost::split(--stage, ","), which keeps empty names: without --stage it adds the stage "".
    # The solver's log shows that state (train_state { level: 0 stage: "" }).
    stages = args.stage.split(",")
    return get_solver(SolverFile(param, args.solver), device=device,
                      allow_python=args.allow_python, stages=stages, level=args.level,
                      compile=args.compile, stop_on_nonfinite_loss=True)


def rank_gpu(job: LaunchEnv, ids: List[int], gpu: str) -> str:
    """The device of a launched rank: its LOCAL_RANK-th id of a ``--gpu`` list; with a single
    id or the solver file's GPU mode, that id plus LOCAL_RANK (one GPU per local rank)."""
    if len(ids) > 1:
        if job.local_rank >= len(ids):
            raise DistributedError(f"LOCAL_RANK {job.local_rank} but --gpu lists {len(ids)} "
                                   "devices", hint="list one GPU per local rank, or leave --gpu "
                                   "out and use --nproc_per_node N on N GPUs", rank=job.rank)
        return str(ids[job.local_rank])
    if gpu:
        return str(int(gpu) + job.local_rank)
    return ""


def train_rank(args: argparse.Namespace, job: LaunchEnv, device,
               param: "caffe_pb2.SolverParameter") -> int:
    """One rank of a data-parallel job: join, build, (restore), train; rank 0 logs, tests and
    snapshots. A failure on any rank ends every rank with a non-zero status and one report."""
    from ..distributed import DataParallel, FailureBoard, join, leave

    log = get_logger()
    store = join(job, device, start_timeout=args.dist_timeout)
    board = FailureBoard(store, job.rank, job.world_size, job.endpoint)
    dp = None
    try:
        try:
            solver = build_solver(args, device, param)
        except CaffeError as e:
            board.report(e.what)
            if board.same_failure_on_root(e.what):
                return 1  # every rank read the same files: rank 0's report says it once
            raise DistributedError(e.what, f"rank {job.rank}: {e.where}" if e.where
                                   else f"rank {job.rank}", e.hint, rank=job.rank) from None
        dp = DataParallel(solver, board=board, sync_batchnorm=args.sync_bn)
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
            dp.restore(args.snapshot)
        log.info("Starting Optimization")
        progress = training_progress(solver) if job.rank == 0 else contextlib.nullcontext()
        with SignalEffects(dp, args.sigint_effect, args.sighup_effect), progress:
            dp.solve()
    except DistributedError as e:
        if e.rank is not None and e.rank != job.rank:
            return 1  # another rank reports it: one paragraph for the job
        raise
    finally:
        if dp is not None:
            dp.close()
    leave()
    log.info("Optimization Done.")
    return 0


if __name__ == "__main__":
    run_main(main)
