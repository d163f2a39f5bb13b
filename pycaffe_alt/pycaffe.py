"""pycaffe's ``caffe.pycaffe``: the module where BVLC defines the Python side of ``Net`` (forward,
backward, forward_all, blobs, params...) and re-exports the solvers.

Our :class:`~pycaffe_alt.net.Net` has those methods itself; this module gives the same names at
the same place for programs that import them from here (``from caffe.pycaffe import Net``).
"""
from . import NCCL, Timer
from .net import Net
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver)

__all__ = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
           "AdaDeltaSolver", "AdamSolver", "NCCL", "Timer"]
