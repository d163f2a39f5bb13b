"""The certified global optimum of two-layer ReLU nets by convex programming (solver type
"Convex"; docs/global_optimum.md).

Modules: :mod:`.net_fit` (which nets fit; the program's data from the net and its training set),
:mod:`.patterns` (hyperplane-arrangement patterns, exact or sampled), :mod:`.program` (the convex
program's operators), :mod:`.admm` (Bai et al.'s ADMM), :mod:`.sampled` (the unconstrained
program by FISTA), :mod:`.certificate` (the dual lower bound), :mod:`.recover` (units into the
net), :mod:`.solver` (the ``Solver`` wrapper).
"""
from .net_fit import ConvexProblem, TwoLayerNet, build_problem, check_two_layer, net_objective
from .patterns import arrangement_count, enumerate_patterns, sample_patterns
from .program import ConvexProgram

__all__ = ["ConvexProblem", "TwoLayerNet", "build_problem", "check_two_layer", "net_objective",
           "arrangement_count", "enumerate_patterns", "sample_patterns", "ConvexProgram"]
