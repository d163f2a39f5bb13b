"""Joining the process group of a data-parallel job, from a launcher's environment.

Every torch.distributed launcher (``torch.distributed.run``/``torchrun``, single- or multi-node,
and :mod:`.launch` behind ``tools/train --gpu 0,1``) tells each process who it is through the
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. :func:`join`
reads them, meets the other ranks through torch's ``env://`` rendezvous store and creates the
default process group: NCCL when the rank trains on a CUDA device, gloo on the CPU.

Start-up is bounded by ``start_timeout`` seconds (short by default): a rank that never arrives
ends the job with a message saying how many ranks came, instead of a hang. Collectives during
training use the longer ``timeout`` (a rank may test or snapshot meanwhile).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from ..errors import DistributedError, first_line
from ..log import get_logger

DEFAULT_START_TIMEOUT = 60.0
DEFAULT_TIMEOUT = 1800.0
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher set it in the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    restart: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: keys of earlier attempts differ

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


def launch_env(environ: Optional[Mapping[str, str]] = None) -> Optional[LaunchEnv]:
    """The launcher's settings, or None when this process was not started as a rank (no
    ``WORLD_SIZE``, or a world of one). Incomplete or malformed settings raise."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    missing = [k for k in _ENV if not env.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE is set but {', '.join(missing)} is not",
                               "the launcher's environment",
                               "start ranks with python3 -m torch.distributed.run (torchrun) or "
                               "tools/train --gpu 0,1, or set all of RANK, WORLD_SIZE, "
                               "MASTER_ADDR, MASTER_PORT")
    try:
        info = LaunchEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                         local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                         master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]),
                         restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
    except ValueError as e:
        raise DistributedError(f"malformed launcher environment ({e})",
                               "RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT",
                               "they must be integers") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise DistributedError(f"RANK {info.rank} is not in [0, WORLD_SIZE={info.world_size})",
                               "the launcher's environment")
    return info if info.world_size > 1 else None


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise (the CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join(info: LaunchEnv, device: torch.device, *, start_timeout: float = DEFAULT_START_TIMEOUT,
         timeout: float = DEFAULT_TIMEOUT) -> "dist.Store":
    """Meet the other ranks and create the default process group; returns the job's key-value
    store (rank 0's, or the launcher agent's), which :mod:`.failure` uses for its reports."""
    log = get_logger()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = f"rendezvous at {info.endpoint}"
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=info.world_size,
                                           timeout=timedelta(seconds=start_timeout)))
    except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
        first = first_line(e)
        who = "the other ranks" if info.rank == 0 else "rank 0"
        raise DistributedError(
            f"rank {info.rank} of {info.world_size}: {who} did not arrive within "
            f"{start_timeout:g} s ({first})", where,
            "start every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE (a free "
            "port), or allow more time with --dist-timeout", rank=info.rank) from None
    store = dist.PrefixStore(f"pycaffe_alt/{info.restart}/", store)
    _arrival_barrier(store, info, start_timeout, where)
    store.set_timeout(timedelta(seconds=timeout))
    dist.init_process_group(backend_for(device), store=store, rank=info.rank,
                            world_size=info.world_size, timeout=timedelta(seconds=timeout))
    log.info("Rank %d of %d joined (%s, %s)", info.rank, info.world_size,
             backend_for(device), info.endpoint)
    return store


def _arrival_barrier(store, info: LaunchEnv, start_timeout: float, where: str) -> None:
    """Wait until all ranks have reached the store (rank 0 hosting it may start before them)."""
    deadline = time.monotonic() + start_timeout
    arrived = store.add("arrived", 1)
    while arrived < info.world_size:
        if time.monotonic() > deadline:
            raise DistributedError(
                f"only {arrived} of {info.world_size} ranks arrived within {start_timeout:g} s",
                where, "start the missing ranks (same MASTER_ADDR, MASTER_PORT, WORLD_SIZE), or "
                "allow more time with --dist-timeout", rank=info.rank)
        time.sleep(0.05)
        arrived = store.add("arrived", 0)


def leave() -> None:
    """Destroy the default process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
