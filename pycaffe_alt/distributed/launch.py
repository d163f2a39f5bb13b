"""``tools/train --gpu 0,1`` / ``--gpu all``: the tool starts one rank per GPU itself.

Caffe's ``caffe train -gpu 0,1`` runs one solver thread per GPU in one process; here every GPU
gets its own process (the ``torch.distributed.run`` model), started with the launcher environment
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` on a free local port, and
each rank joins the group with NCCL (:mod:`.group`). The parent forwards SIGINT/SIGHUP/SIGTERM to
every rank (the ranks run in their own session, so a terminal's Ctrl-C reaches them once, through
the parent), waits, and when a rank ends with an error it gives the others a few seconds to stop
on their own (they notice the missing peer) before terminating them. The job's exit status is the
first failing rank's; a rank killed by a signal is named with the signal.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

STOP_GRACE_SECONDS = 10.0


def free_port() -> int:
    """A TCP port that is free on this machine now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int, base: Optional[Dict[str, str]] = None,
             addr: str = "127.0.0.1") -> Dict[str, str]:
    """The environment of local rank ``rank``, as torch.distributed.run sets it (one node)."""
    env = dict(os.environ if base is None else base)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", MASTER_ADDR=addr,
               MASTER_PORT=str(port))
    return env


def without_flag(argv: Sequence[str], name: str) -> List[str]:
    """``argv`` without ``--name VALUE`` / ``--name=VALUE`` (in argparse spelling)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == f"--{name}":
            skip = True
            continue
        if arg.startswith(f"--{name}="):
            continue
        out.append(arg)
    return out


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def spawn_ranks(argv: Sequence[str], rank_args: Sequence[Sequence[str]],
                module: str = "pycaffe_alt.tools.train") -> int:
    """Run ``python -m module argv + rank_args[r]`` as rank r of ``len(rank_args)``; returns
    the job's exit status (0 when every rank succeeded)."""
    world = len(rank_args)
    port = free_port()
    procs: List[subprocess.Popen] = []
    forwarded = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP")
                                                   else set())

    def forward(signum, frame=None):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        for r in range(world):
            cmd = [sys.executable, "-m", module, *argv, *rank_args[r]]
            procs.append(subprocess.Popen(cmd, env=rank_env(r, world, port),
                                          start_new_session=True))
        return _wait(procs)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait(procs: List[subprocess.Popen]) -> int:
    first_failure: Optional[int] = None
    failed_at = 0.0
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        for r, c in enumerate(codes):
            if c not in (None, 0) and first_failure is None:
                first_failure, failed_at = r, time.monotonic()
        if first_failure is not None and time.monotonic() - failed_at > STOP_GRACE_SECONDS:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.05)
    if first_failure is None:
        bad = [r for r, c in enumerate(codes) if c]
        first_failure = bad[0] if bad else None
    if first_failure is None:
        return 0
    code = codes[first_failure]
    others_reported = any(c is not None and c > 0 for r, c in enumerate(codes)
                          if r != first_failure)
    if code < 0 and not others_reported:  # killed: nobody else has named it
        print(f"train: error: rank {first_failure} {_describe(code)}; the job stopped "
              "(resume from the last snapshot with --snapshot)", file=sys.stderr, flush=True)
    return 1 if code < 0 else code
