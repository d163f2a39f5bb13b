"""``tools/train``: train or fine-tune a model like ``caffe train``.

    train --solver S [--weights W1,W2 | --snapshot STATE] [--gpu N|N,M|all]
          [--sigint_effect stop|snapshot|none] [--sighup_effect stop|snapshot|none]
          [--stage A,B] [--level N] [--allow-python]

Follows caffe.cpp's ``train()``: ``--weights`` (fine-tune) and ``--snapshot`` (resume) exclude each
other; without ``--gpu`` the solver file's ``solver_mode``/``device_id`` choose the device;
``--stage``/``--level`` set the train net's NetState; SIGINT and SIGHUP become solver requests
(defaults: SIGINT stops, SIGHUP snapshots), and a stop ends with exit status 0 as in Caffe.
Every user mistake (a bad solver file, a missing net or dataset, weights that do not fit, an
unwritable snapshot folder) is reported in one paragraph before training starts, without a
traceback. In a terminal a progress bar (iterations/s, ETA) sits below the log lines; when
stderr is a file or a pipe only Caffe's plain log lines are written.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Dict, List, Optional, Sequence

from ..errors import CaffeError, SolverError, WeightsError
from ..host_memory import keep_freed_memory
from ..log import get_logger, setup_logging
from ..proto import caffe_pb2
from .cli import parse_args, run_main
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
    for path in _split(args.weights):
        if not os.path.isfile(path):
            raise WeightsError(f"--weights: file {path!r} does not exist",
                               hint="give a .caffemodel (or .h5) path; several are separated by commas")
    if args.snapshot and not os.path.isfile(args.snapshot):
        raise SolverError(f"--snapshot: file {args.snapshot!r} does not exist",
                          hint="give a .solverstate (or .solverstate.h5) written by a previous run")


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
                        help="GPU id (N); N,M or 'all' run on the first id only (no data-parallel)")
    parser.add_argument("--sigint_effect", "--sigint-effect", choices=EFFECTS, default="stop",
                        help="what SIGINT (Ctrl-C) does (default: stop)")
    parser.add_argument("--sighup_effect", "--sighup-effect", choices=EFFECTS, default="snapshot",
                        help="what SIGHUP does (default: snapshot)")
    parser.add_argument("--stage", default="", help="comma-separated NetState stages of the train net")
    parser.add_argument("--level", type=int, default=None, help="NetState level of the train net")
    parser.add_argument("--allow-python", "--allow_python", action="store_true",
                        help="allow Python layers (they run code named in the prototxt)")
    parser.add_argument("--compile", action="store_true",
                        help="run the nets through torch.compile (see docs/performance.md)")
    args = parse_args(parser, argv)
    check_flags(args)
    setup_logging()
    log = get_logger()
    keep_freed_memory()  # reuse activation memory across iterations, as Caffe does

    from ..prototxt import read_solver

    param = read_solver(args.solver)  # syntax errors name file:line here, before any net is built
    gpu = gpu_flag_for(args.gpu, param)
    device = select_device(gpu)
    if device.type == "cpu":
        log.info("Use CPU.")
    else:
        import torch

        log.info("Using GPUs %s", ", ".join(map(str, gpu_ids(gpu))))
        log.info("GPU %d: %s", device.index, torch.cuda.get_device_name(device))

    from ..solver.solver import get_solver

    stages = _split(args.stage)
    solver = get_solver(args.solver, device=device, weights=tuple(_split(args.weights)),
                        allow_python=args.allow_python, stages=stages or None, level=args.level,
                        compile=args.compile)
    if args.snapshot:
        log.info("Resuming from %s", args.snapshot)
        solver.restore(args.snapshot)
    log.info("Starting Optimization")
    with SignalEffects(solver, args.sigint_effect, args.sighup_effect), training_progress(solver):
        solver.solve()
    log.info("Optimization Done.")
    return 0


if __name__ == "__main__":
    run_main(main)
