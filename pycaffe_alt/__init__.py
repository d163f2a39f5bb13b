"""pycaffe_alt: Caffe's model files, tools and training on PyTorch, plus alternation training.

``import pycaffe_alt as caffe`` gives pycaffe's surface: ``caffe.Net``, ``caffe.TRAIN``/``TEST``,
``set_mode_cpu/gpu``, ``set_device``, ``set_random_seed``, ``layer_type_list``, ``caffe.io``,
and the solvers.
"""
from .errors import CaffeError
from .layers import LAYERS, TEST, TRAIN
from .mode import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .net import Net
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver, Solver, get_solver)

__version__ = "0.1.0"


def layer_type_list() -> list:
    """Every registered layer type name (pycaffe ``caffe.layer_type_list()``)."""
    return LAYERS.names()


__all__ = ["Net", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device",
           "set_random_seed", "layer_type_list", "CaffeError",
           "get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
           "AdaDeltaSolver", "AdamSolver", "Solver"]
