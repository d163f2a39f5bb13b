"""Data-parallel training on torch.distributed with Caffe's multi-GPU semantics.

- :mod:`.group` — the launcher's environment (``RANK``, ``WORLD_SIZE``, ...) and joining the
  process group (NCCL on CUDA, gloo on the CPU) with a bounded start-up.
- :mod:`.sharding` — Caffe's DataLayer skip rule: record k goes to rank k mod W (also for
  I-alternation's support pass, :class:`.sharding.RecordSplit`).
- :mod:`.reducer` — gradients summed over the ranks and scaled by 1/W, overlapped with backward.
- :mod:`.parallel` — :class:`DataParallel`: a Solver as one rank of a job (start-up broadcast,
  rank 0 logs/tests/snapshots, requests and NaN agreed by all ranks).
- :mod:`.failure` — a failed, killed or missing rank ends the whole job with one report.
- :mod:`.launch` — ``tools/train --gpu 0,1``: one process per GPU.

See docs/distributed.md.
"""
from .failure import FailureBoard
from .group import LaunchEnv, backend_for, join, launch_env, leave
from .parallel import DataParallel
from .reducer import GradientReducer
from .sharding import RecordSplit, Shard

__all__ = ["FailureBoard", "LaunchEnv", "backend_for", "join", "launch_env", "leave", "DataParallel",
           "GradientReducer", "RecordSplit", "Shard"]
