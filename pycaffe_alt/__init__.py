"""pycaffe_alt: Caffe's model files, tools and training on PyTorch, plus alternation training.

``import pycaffe_alt as caffe`` is a drop-in for pycaffe (``import caffe``): ``caffe.Net``,
``caffe.TRAIN``/``TEST``, ``set_mode_cpu/gpu``, ``set_device``, ``set_random_seed``, the solvers
(``SGDSolver``..., ``get_solver``), ``caffe.Layer`` for Python layers, ``NetSpec``/``layers``/
``params``/``to_proto``, ``Classifier``, ``Detector``, and the ``io``, ``draw`` and ``proto``
modules. See docs/pycaffe.md.

Importing the package is cheap: everything that needs torch (the net, the layers, the solvers)
is imported on first use (PEP 562 ``__getattr__``), so tools that only touch
``pycaffe_alt.data.db`` or ``pycaffe_alt.proto`` do not pay for torch at start-up.
"""
import importlib
import os
import importlib.util
import sys
import time
import types
from typing import List

from .caffe_alias import install_as_caffe, install_finder
from .errors import CaffeError
from .phase import TEST, TRAIN

__version__ = "0.1.0"

# Public name -> (submodule, attribute) imported on first access.
_LAZY = {
    "Net": ("net", "Net"),
    "Solver": ("solver", "Solver"),
    "SGDSolver": ("solver", "SGDSolver"),
    "NesterovSolver": ("solver", "NesterovSolver"),
    "AdaGradSolver": ("solver", "AdaGradSolver"),
    "RMSPropSolver": ("solver", "RMSPropSolver"),
    "AdaDeltaSolver": ("solver", "AdaDeltaSolver"),
    "AdamSolver": ("solver", "AdamSolver"),
    "get_solver": ("solver", "get_solver"),
    "set_mode_cpu": ("mode", "set_mode_cpu"),
    "set_mode_gpu": ("mode", "set_mode_gpu"),
    "set_device": ("mode", "set_device"),
    "set_random_seed": ("mode", "set_random_seed"),
    "Layer": ("layers.python_layer", "PythonLayerBase"),
    "LAYERS": ("layers", "LAYERS"),
    "NetSpec": ("net_spec", "NetSpec"),
    "layers": ("net_spec", "layers"),
    "params": ("net_spec", "params"),
    "to_proto": ("net_spec", "to_proto"),
    "Classifier": ("classifier", "Classifier"),
    "Detector": ("detector", "Detector"),
}
# Submodules that pycaffe users reach as attributes (``caffe.io.load_image``).
_SUBMODULES = ("io", "draw", "proto", "net_spec", "classifier", "detector", "coord_map",
               "pycaffe", "_caffe")


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # Any submodule (``caffe.io``, ``pycaffe_alt.solver``) as an attribute, as an eager
        # package would have it.
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


_HELPERS = {"importlib", "sys", "time", "types", "List", "install_finder"}


def __dir__() -> List[str]:
    return sorted((set(globals()) - _HELPERS) | set(_LAZY) | set(_SUBMODULES))


# pycaffe names that are also names of our submodules: the pycaffe meaning wins.
_PYCAFFE_OVER_SUBMODULE = ("layers", "log")


class _PackageModule(types.ModuleType):
    """The package's module type: keeps ``caffe.layers`` (NetSpec layers) and ``caffe.log`` (a
    function) meaning what they mean in pycaffe.

    Importing the ``pycaffe_alt.layers`` subpackage (the layer implementations) or
    ``pycaffe_alt.log`` would otherwise bind the package attribute of that name to the submodule,
    and ``L = caffe.layers; L.Convolution(...)`` would work or not depending on what was imported
    first. The submodules stay reachable through ``import`` / ``from pycaffe_alt.layers import``
    (sys.modules).
    """

    def __setattr__(self, name, value) -> None:
        if name in _PYCAFFE_OVER_SUBMODULE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PackageModule

# ``caffe.X`` resolves to this package's own ``X`` whenever ``sys.modules['caffe']`` is this
# package (install_as_caffe(), ``pycaffe-alt run``, or a user's one-line alias): see caffe_alias.
install_finder()


def layer_type_list() -> List[str]:
    """Every registered layer type name (pycaffe ``caffe.layer_type_list()``)."""
    from .layers import LAYERS

    return LAYERS.names()


# ---- process-wide pycaffe functions without a PyTorch counterpart ---------------------------

def init_log(level: int = 0, stderr: bool = True) -> None:
    """pycaffe ``caffe.init_log([level[, stderr]])``: show pycaffe_alt's log lines (Caffe's glog
    format) on stderr from glog level ``level`` (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) up.
    ``stderr`` is accepted for compatibility; lines always go to stderr."""
    from .log import GLOG_LEVELS, setup_logging

    setup_logging(level=GLOG_LEVELS.get(int(level), 20))


def log(message: str) -> None:
    """pycaffe ``caffe.log(s)``: one INFO line through the package logger."""
    from .log import get_logger

    get_logger().info("%s", message)


def has_nccl() -> bool:
    """pycaffe ``caffe.has_nccl()``: always False (no multi-GPU data parallelism here)."""
    return False


def solver_count() -> int:
    """pycaffe ``caffe.solver_count()``: 1, training runs in one process on one device."""
    return 1


def solver_rank() -> int:
    """pycaffe ``caffe.solver_rank()``: 0, the only solver."""
    return 0


def _single_solver(what: str, value: int, allowed: int) -> None:
    if int(value) != allowed:
        raise CaffeError(f"{what}({value}): multi-GPU (NCCL) training is not supported",
                         hint="train on one device; use torch.nn.parallel / torch.distributed "
                              "on the Net module for data parallelism")


def set_solver_count(count: int) -> None:
    """pycaffe ``caffe.set_solver_count``: only 1 is accepted."""
    _single_solver("set_solver_count", count, 1)


def set_solver_rank(rank: int) -> None:
    """pycaffe ``caffe.set_solver_rank``: only 0 is accepted."""
    _single_solver("set_solver_rank", rank, 0)


def set_multiprocess(multiprocess: bool) -> None:
    """pycaffe ``caffe.set_multiprocess``: accepted and ignored (it only affects NCCL runs)."""


class NCCL:
    """pycaffe's ``caffe.NCCL(solver, uid)`` for the one process this runs in.

    Caffe's NCCL all-reduces each iteration's gradients over ``solver_count()`` solvers and
    broadcasts the first one's weights (``bcast``). Here the count is always 1, where both are
    the identity, so an NCCL object is accepted wherever pycaffe takes one
    (``solver.add_callback(nccl)``, ``net.after_backward(nccl)``) and changes nothing: BVLC's own
    ``python/train.py`` runs on one device. Data-parallel training over several processes is
    :mod:`pycaffe_alt.distributed` (``tools/train --world-size``).
    """

    def __init__(self, solver, uid) -> None:
        from .solver import Solver

        if not isinstance(solver, Solver):
            raise CaffeError(f"NCCL(solver, uid) needs a solver, got {type(solver).__name__}",
                             hint="nccl = caffe.NCCL(solver, caffe.NCCL.new_uid())")
        self.solver = solver
        self.uid = uid

    @staticmethod
    def new_uid() -> bytes:
        """A session id, as bytes like pycaffe's (one process: any unique value serves)."""
        return os.urandom(16).hex().encode()

    def bcast(self) -> None:
        """Give every solver the first one's weights: with one solver there is nothing to do."""

    def on_start(self) -> None:
        """Solver callback: nothing before an iteration (as Caffe's NCCL)."""

    def on_gradients_ready(self) -> None:
        """Solver callback: the all-reduce of one solver's gradients leaves them as they are."""

    def __call__(self, layer: int) -> None:
        """Net callback (``net.after_backward(nccl)``, layer-wise reduce): nothing to reduce."""


class Timer:
    """pycaffe's ``caffe.Timer`` (Caffe's CPU ``Timer``): ``start()``, ``stop()``, ``ms``.

    As in Caffe, ``start()`` while running is ignored, reading ``ms`` stops a running timer first
    and reads 0 before the timer ever ran. Wall clock: call ``torch.cuda.synchronize()`` before
    ``stop()`` when timing GPU work.
    """

    def __init__(self) -> None:
        self._start = None
        self._elapsed = 0.0

    def start(self) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self._elapsed = time.perf_counter() - self._start
            self._start = None

    @property
    def ms(self) -> float:
        self.stop()
        return self._elapsed * 1000.0


__all__ = ["Net", "TRAIN", "TEST", "CaffeError", "__version__", "install_as_caffe",
           "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "layer_type_list",
           "init_log", "log", "has_nccl", "solver_count", "set_solver_count", "solver_rank",
           "set_solver_rank", "set_multiprocess", "NCCL", "Timer", "Layer",
           "get_solver", "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
           "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
           "NetSpec", "layers", "params", "to_proto", "Classifier", "Detector",
           "io", "draw", "proto"]
