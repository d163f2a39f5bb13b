"""``tools/device_query``: what pycaffe_alt can run on, like ``caffe device_query``.

Logs the CPU side (torch version, threads, cores, BLAS/OpenMP backends) and then, for each CUDA
device (all of them, or those named by ``--gpu N[,M]``/``all``), Caffe's properties: name,
compute capability, memory, multiprocessors and the rest that PyTorch exposes. With no GPU it
says so and exits 0 (a CPU-only machine is a valid setup, not an error).
"""
from __future__ import annotations

import argparse
import os
import platform
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import CaffeError
from ..log import get_logger, setup_tool_logging
from .cli import parse_args, run_main

# (torch property attribute, Caffe-style label): the fields caffe's DeviceQuery prints,
# where PyTorch exposes them (older torch builds lack some; those are skipped).
_CUDA_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("total_memory", "Total global memory"),
    ("shared_memory_per_block", "Total shared memory per block"),
    ("regs_per_multiprocessor", "Total registers per multiprocessor"),
    ("warp_size", "Warp size"),
    ("max_threads_per_multi_processor", "Maximum threads per multiprocessor"),
    ("multi_processor_count", "Number of multiprocessors"),
    ("L2_cache_size", "L2 cache size"),
    ("clock_rate", "Clock rate"),
    ("is_integrated", "Integrated"),
    ("is_multi_gpu_board", "Multi-GPU board"),
)


def cpu_info() -> "Dict[str, str]":
    """The CPU side of the environment, as label -> value."""
    info = {
        "torch version": torch.__version__,
        "Python": platform.python_version(),
        "Platform": platform.platform(),
        "Processor": platform.processor() or platform.machine(),
        "CPU cores (os.cpu_count)": str(os.cpu_count()),
        "torch intra-op threads": str(torch.get_num_threads()),
        "torch inter-op threads": str(torch.get_num_interop_threads()),
        "MKL available": str(torch.backends.mkl.is_available()),
        "MKL-DNN (oneDNN) available": str(torch.backends.mkldnn.is_available()),
        "OpenMP available": str(torch.backends.openmp.is_available()),
        "CUDA built": str(torch.version.cuda or "no"),
        "CUDA devices visible": str(torch.cuda.device_count() if torch.cuda.is_available() else 0),
    }
    return info


def cuda_device_info(index: int) -> "Dict[str, str]":
    """Caffe's DeviceQuery fields of CUDA device ``index``, as label -> value."""
    p = torch.cuda.get_device_properties(index)
    info = {
        "Device id": str(index),
        "Name": p.name,
        "Major revision number": str(p.major),
        "Minor revision number": str(p.minor),
        "Compute capability": f"{p.major}.{p.minor}",
    }
    for attr, label in _CUDA_FIELDS:
        if hasattr(p, attr):
            info[label] = str(getattr(p, attr))
    if hasattr(p, "total_memory"):
        info["Total global memory"] = f"{p.total_memory} ({p.total_memory / 2**30:.1f} GiB)"
    try:
        free, total = torch.cuda.mem_get_info(index)
        info["Free memory now"] = f"{free} ({free / 2**30:.1f} GiB)"
    except RuntimeError:  # a device that cannot be initialised still lists its static properties
        pass
    return info


def device_ids(flag: Optional[str]) -> List[int]:
    """CUDA device indices for a ``--gpu`` value: all visible devices when the flag is empty or 'all'."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not flag or flag == "all":
        return list(range(count))
    try:
        ids = [int(s) for s in flag.split(",") if s.strip()]
    except ValueError:
        raise CaffeError(f"--gpu {flag!r}: expected device ids like 0 or 0,1, or 'all'") from None
    for i in ids:
        if not 0 <= i < count:
            raise CaffeError(f"--gpu {flag}: there is no CUDA device {i} ({count} visible)",
                             hint="run device_query without --gpu to list the devices")
    return ids


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="device_query", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="", help="device ids (N, N,M or all); default: all")
    args = parse_args(parser, argv)
    log = get_logger()
    setup_tool_logging()
    log.info("CPU:")
    for k, v in cpu_info().items():
        log.info("%-32s %s", k, v)
    ids = device_ids(args.gpu)
    if not ids:
        log.info("No CUDA device is available to PyTorch; pycaffe_alt runs on the CPU.")
        return 0
    log.info("Querying GPUs %s", ",".join(map(str, ids)))
    for i in ids:
        for k, v in cuda_device_info(i).items():
            log.info("%-36s %s", k, v)
    return 0


if __name__ == "__main__":
    run_main(main)
