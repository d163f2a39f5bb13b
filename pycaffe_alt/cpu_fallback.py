"""The environment's request that GPU mode run on the CPU (``pycaffe-alt run --cpu``).

Unchanged pycaffe programs often call ``caffe.set_mode_gpu(); caffe.set_device(0)`` whatever the
machine; on one without CUDA, Caffe (and pycaffe_alt by default) stops at that call. With
``PYCAFFE_ALT_GPU_AS_CPU=1`` :func:`pycaffe_alt.mode.set_mode_gpu` keeps the CPU instead and
warns once. Kept apart from :mod:`pycaffe_alt.mode` so that the launcher can set it without
importing torch (as :mod:`pycaffe_alt.python_opt_in`).
"""
from .env_switch import switch_is_on

# Inherited by child processes, as the program's own workers ask for the GPU too.
GPU_AS_CPU_ENV = "PYCAFFE_ALT_GPU_AS_CPU"


def gpu_requests_run_on_cpu() -> bool:
    """Whether the environment asks for GPU mode to mean the CPU (1, true, yes or on)."""
    return switch_is_on(GPU_AS_CPU_ENV)
