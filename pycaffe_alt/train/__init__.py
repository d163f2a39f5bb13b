"""Training: the loop (Caffe's Step/Solve with hooks) and the continuation data of snapshots.

- :mod:`.loop` — ``run_steps``, ``solve``, the loss smoother, the non-finite loss guard, hooks.
- :mod:`.resume` — ``capture``/``apply``: data cursors and random generators in a snapshot.
"""
from .loop import CallbackHook, LossSmoother, NonFiniteLossGuard, run_steps, solve
from .resume import apply as apply_resume_state
from .resume import capture as capture_resume_state

__all__ = ["CallbackHook", "LossSmoother", "NonFiniteLossGuard", "run_steps", "solve",
           "apply_resume_state", "capture_resume_state"]
