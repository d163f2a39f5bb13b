"""Atomic file writes: every file pycaffe_alt writes (weights, snapshots, prototxts, mask stores)
either keeps its old content or gets the whole new one, never a part."""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Type

from .errors import CaffeError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, payload: bytes, error: Type[CaffeError] = CaffeError) -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write_chunks`)."""
    atomic_write_chunks(path, (payload,), error)


def atomic_write_chunks(path: str, chunks: Iterable[bytes],
                        error: Type[CaffeError] = CaffeError) -> None:
    """Write the concatenated ``chunks`` to ``path`` through a temporary file in the same folder.

    The temporary file is flushed to disk and renamed over the target (one ``os.replace``), so a
    crash or Ctrl-C at any point leaves the previous file intact and no temporary behind. Chunks
    are written as they come, so a large file is never held in memory whole. A failure to write
    raises ``error`` naming the path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise error(f"cannot write '{path}': folder '{folder}' does not exist",
                    hint="create the folder first")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise error(f"cannot write '{path}': {e.strerror}",
                    hint="check the folder is writable") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 - umask).
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise error(f"cannot write '{path}': {e.strerror}",
                        hint="check the folder is writable and the disk has room") from None
        raise
