"""Blob sizes against the memory of the device that must hold them.

A net whose Input is 2x3x100000x100000 is valid protobuf, but its blob needs 240 GB: torch's
allocator then fails with a C++ ``enforce fail`` (or, with memory overcommit, the kernel kills
the process once the zeros are touched). A blob larger than the device's whole memory can never
be allocated, so the net refuses it when it is built, naming the layer, the blob and the bytes;
an allocation that fails later (memory taken by other blobs or processes) is reported the same
way by :func:`zeros`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import memory_format
from .errors import NetError
from .host_memory import physical_memory

FLOAT_BYTES = 4  # blobs are float32, as Caffe's Dtype float


def blob_bytes(shape: Sequence[int], itemsize: int = FLOAT_BYTES) -> int:
    """Bytes a blob of ``shape`` takes (Python ints: no overflow for absurd shapes)."""
    count = 1
    for d in shape:
        count *= int(d)
    return count * itemsize


def device_memory(device: Optional[torch.device]) -> Optional[int]:
    """Total memory of ``device`` in bytes (physical RAM for the CPU); None when unknown."""
    device = torch.device("cpu") if device is None else torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return physical_memory()
    except (RuntimeError, AssertionError):
        return None
    return None


def human_bytes(n: int) -> str:
    """``240000000000`` -> ``'223.5 GiB'``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def _too_big(shape: Sequence[int], blob: str, where: str, device, needed: int,
             detail: str) -> NetError:
    return NetError(f"blob '{blob}' of shape {tuple(int(d) for d in shape)} needs "
                    f"{human_bytes(needed)} ({needed} bytes), {detail}", where,
                    "lower the batch size, the input dimensions (input_param shape, crop, "
                    "resize) or the layer's num_output")


def check_blob_fits(shape: Sequence[int], device, blob: str, where: str, work: int = 1) -> None:
    """NetError (at ``where``, naming ``blob``) when the blob exceeds the device's memory, or
    ``work`` times the blob does (a layer that needs that much memory while making it)."""
    needed = blob_bytes(shape) * work
    capacity = device_memory(device)
    if capacity is not None and needed > capacity:
        raise _too_big(shape, blob, where, device, needed,
                       f"{'with the layer working memory, ' if work > 1 else ''}more than the "
                       f"{human_bytes(capacity)} of memory on {torch.device(device or 'cpu')}")


def zeros(shape: Sequence[int], device, blob: str, where: str,
          fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A zero blob of ``shape`` on ``device`` stored in ``fmt`` (see memory_format.zeros); an
    allocation failure is a NetError naming the blob."""
    # Checked first, as at net construction: a blob.reshape() comes here directly, and torch
    # reports an impossible size as an overflow rather than an allocation failure.
    check_blob_fits(shape, device, blob, where)
    try:
        return memory_format.zeros(shape, fmt, device)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if isinstance(e, RuntimeError) and "alloc" not in str(e).lower() \
                and "out of memory" not in str(e).lower():
            raise
        raise _too_big(shape, blob, where, device, blob_bytes(shape),
                       f"and {torch.device(device or 'cpu')} could not allocate it") from None
