"""pycaffe's ``caffe._caffe``: the names BVLC's compiled extension (``_caffe.cpp``) exports, for
programs that import them from there (``from caffe._caffe import Net``).

Everything here is pycaffe_alt's own object, the same one ``caffe.<name>`` gives; the extension's
vector wrapper types map to what we use (``BlobVec`` is the type of ``net.params[name]``, and a
Python layer's ``self.blobs`` is its growable subclass; the others are plain lists).
"""
from . import (NCCL, TEST, TRAIN, Timer, __version__, has_nccl, init_log, layer_type_list, log,
               set_multiprocess, set_solver_count, set_solver_rank, solver_count, solver_rank)
from .blob import Blob, BlobVec
from .layers.python_layer import PythonLayerBase as Layer
from .mode import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .net import Net
from .proto.caffe_pb2 import LayerParameter, SolverParameter
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver, Solver, get_solver)

# The extension's std::vector wrappers; our objects use Python lists.
RawBlobVec = LayerVec = StringVec = IntVec = DtypeVec = NetVec = BoolVec = list

__all__ = ["__version__", "init_log", "log", "has_nccl", "set_mode_cpu", "set_mode_gpu",
           "set_random_seed", "set_device", "solver_count", "set_solver_count", "solver_rank",
           "set_solver_rank", "set_multiprocess", "layer_type_list", "Net", "Blob", "Layer",
           "SolverParameter", "LayerParameter", "Solver", "SGDSolver", "NesterovSolver",
           "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "get_solver",
           "BlobVec", "RawBlobVec", "LayerVec", "StringVec", "IntVec", "DtypeVec", "NetVec",
           "BoolVec", "NCCL", "Timer", "TRAIN", "TEST"]
