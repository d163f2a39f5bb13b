"""pycaffe's process-wide defaults: ``set_mode_cpu/gpu``, ``set_device``, ``set_random_seed``.

These only choose the default device for nets and solvers created afterwards (an explicit
``device=`` argument always wins); nothing reads them while computing.
"""
from __future__ import annotations

import operator
import random

import numpy as np
import torch

from . import caffe_rng
from .cpu_fallback import GPU_AS_CPU_ENV, gpu_requests_run_on_cpu
from .errors import ArgumentTypeError, CaffeError, integer_argument
from .log import get_logger


class _Defaults:
    """Where new nets go: pycaffe's Caffe::mode() and Caffe::device_id (nothing else)."""

    def __init__(self) -> None:
        self.gpu = False
        self.device_id = 0
        self.warned_gpu_as_cpu = False


_defaults = _Defaults()


def set_mode_cpu() -> None:
    """New nets and solvers run on the CPU (pycaffe ``caffe.set_mode_cpu()``)."""
    _defaults.gpu = False


def set_mode_gpu() -> None:
    """New nets and solvers run on the GPU chosen by ``set_device`` (default 0); on the CPU
    when the environment says so (``pycaffe-alt run --cpu``)."""
    if gpu_requests_run_on_cpu():
        if not _defaults.warned_gpu_as_cpu:  # once: programs may call it before every net
            _defaults.warned_gpu_as_cpu = True
            get_logger().warning(
                "set_mode_gpu(): running on the CPU instead (%s=1, pycaffe-alt run --cpu)",
                GPU_AS_CPU_ENV)
        _defaults.gpu = False
        return
    if not torch.cuda.is_available():
        raise CaffeError("set_mode_gpu: no CUDA device is available to PyTorch",
                         hint="install a CUDA build of torch, use set_mode_cpu(), or run an "
                              "unchanged program with pycaffe-alt run --cpu")
    _defaults.gpu = True


def set_device(device_id: int) -> None:
    """Choose the GPU used in GPU mode (pycaffe ``caffe.set_device(i)``)."""
    device_id = integer_argument(device_id, "set_device() device id")
    if device_id < 0:
        raise ArgumentTypeError(f"set_device() takes a GPU number >= 0, got {device_id}")
    _defaults.device_id = device_id


def default_device() -> torch.device:
    """The device a net created now lands on."""
    return torch.device("cuda", _defaults.device_id) if _defaults.gpu else torch.device("cpu")


def set_random_seed(seed: int) -> None:
    """Seed every generator pycaffe_alt draws from (fillers, dropout, data shuffling).

    Caffe's own stream (:mod:`pycaffe_alt.caffe_rng`) restarts too, so the fillers that follow
    it give Caffe's initial weights for the same seed and net.
    """
    try:  # ints, numpy integers, 0-d integer arrays and tensors (what boost.python's int takes)
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value < 2**63:
        raise ArgumentTypeError(f"set_random_seed() takes an integer in [0, 2^63), got {seed!r}")
    seed = value
    caffe_rng.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_device(gpu: "int | str | None") -> torch.device:
    """A device from a CLI-style value: None/'' -> CPU, 0 -> cuda:0, 'cpu' -> CPU."""
    if gpu is None or gpu == "" or str(gpu).lower() == "cpu" or int(gpu) < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CaffeError(f"--gpu {gpu}: no CUDA device is available to PyTorch",
                         hint="run without --gpu to use the CPU, or install a CUDA build of torch")
    return torch.device("cuda", int(gpu))
