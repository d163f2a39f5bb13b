"""Solvers: Caffe's update rules, learning-rate policies, gradient preparation and snapshot files.

- :mod:`.lr_policy` — ``learning_rate(solver_param, it)``, pure closed forms per policy.
- :mod:`.rules` — SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam as pure in-place tensor updates.
- :mod:`.regularize` — clipping, iter_size normalization, L2/L1 weight decay.
- :mod:`.detection_eval` — the SSD fork's ``eval_type: "detection"`` test (mAP by ComputeAP).
- :mod:`.snapshot` — ``.solverstate`` / HDF5 snapshot reading and atomic writing.
- :mod:`.solver` — the :class:`Solver` (pycaffe's ``caffe.SGDSolver``...) over those formulas.
"""
from .lr_policy import LR_POLICIES, current_step, learning_rate, multistep_index
from .regularize import clip_gradients, local_decay, normalize, regularize
from .rules import UPDATE_RULES, RuleHyper, UpdateRule, apply_update, check_hyper, local_rate, update_rule
from .snapshot import (SolverStateData, read_any_solverstate, read_solverstate, read_solverstate_h5,
                       read_weights_h5, snapshot_filename, write_solverstate, write_solverstate_h5,
                       write_weights_h5)
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                     NonFiniteLossError, RMSPropSolver, SGDSolver, Solver, get_solver)

__all__ = [
    "LR_POLICIES", "current_step", "learning_rate", "multistep_index",
    "clip_gradients", "local_decay", "normalize", "regularize",
    "UPDATE_RULES", "RuleHyper", "UpdateRule", "apply_update", "check_hyper", "local_rate",
    "update_rule",
    "SolverStateData", "read_any_solverstate", "read_solverstate", "read_solverstate_h5",
    "read_weights_h5", "snapshot_filename", "write_solverstate", "write_solverstate_h5",
    "write_weights_h5",
    "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
    "AdamSolver", "NonFiniteLossError", "get_solver",
]
