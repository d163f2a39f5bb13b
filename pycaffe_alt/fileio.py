"""File plumbing shared by every reader and writer.

- Inputs: :func:`check_input_path` / :func:`read_input_bytes` refuse anything but a regular file
  (or, where a database is expected, a folder) *before* opening it: a FIFO would block the tool
  forever, ``/dev/zero`` would be read until memory runs out, a directory fails with a bare
  IsADirectoryError. Every path a tool opens goes through them.
- Outputs: atomic writes, so every file pycaffe_alt writes (weights, snapshots, prototxts, mask
  stores) either keeps its old content or gets the whole new one, never a part; the temporary
  file's name carries the writer's process id, so that one left by a killed run is recognised and
  removed by :func:`remove_stale_temporaries` at the next start.
"""
from __future__ import annotations

import glob
import os
import re
import stat
import tempfile
from typing import Iterable, List, Type

from .errors import CaffeError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# A path with a NUL cannot name a file (the system call ends the name there); Python's os
# functions raise ValueError("embedded null byte") for it, not OSError.
NUL_HINT = "no file name holds a NUL byte: fix the path (a '\\000' escape in a prototxt string?)"


def with_article(noun: str) -> str:
    """``noun`` after "a" or "an" as it is spoken: "an image file", "an HDF5 weights file" (an
    acronym is read letter by letter), "a weights file"."""
    first_word = noun.split()[0] if noun.split() else noun
    acronym = first_word.isupper() and len(first_word) > 1
    vowel_sound = noun[:1] in ("AEFHILMNORSX" if acronym else "aeiouAEIOU")
    return f"{'an' if vowel_sound else 'a'} {noun}"


def check_input_path(path: "str | os.PathLike[str]", error: Type[CaffeError] = CaffeError,
                     what: str = "file", folder_ok: bool = False) -> str:
    """``path`` as a str when it names a regular file (or a folder, with ``folder_ok``).

    Otherwise ``error`` naming the path and saying what it is instead: missing, a directory, a
    FIFO, a device or a socket. Symbolic links are followed (a link to a file is a file).
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist",
                    hint="check the path; relative paths are taken from the current directory "
                         f"({os.getcwd()}), as in Caffe") from None
    except OSError as e:
        raise error(f"cannot open {what} '{path}': {e.strerror}") from None
    except ValueError:  # os.stat's "embedded null byte"
        raise error(f"{what} path {path!r} contains a NUL character", hint=NUL_HINT) from None
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return path
    if stat.S_ISDIR(mode):
        raise error(f"'{path}' is a directory, not {with_article(what)}",
                    hint=f"give the path of the {what} itself")
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise error(f"'{path}' is {kind}, not {with_article(what)}",
                hint="give a regular file: pipes and devices are refused because reading them "
                     "could wait or run forever")


def read_input_bytes(path: "str | os.PathLike[str]", error: Type[CaffeError] = CaffeError,
                     what: str = "file") -> bytes:
    """The whole content of the regular file ``path`` (checked by :func:`check_input_path`)."""
    path = check_input_path(path, error, what)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as e:
        raise error(f"cannot read {what} '{path}': {e.strerror}") from None
    except MemoryError:
        raise error(f"{what} '{path}' is too large to read into memory") from None


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
    folder = check_output_file(path, error)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temporary_prefix(path), suffix=".tmp")
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


def check_output_file(path: str, error: Type[CaffeError]) -> str:
    """Refuse (``error``) an output that cannot be written as a file (see
    :func:`check_output_path`) or whose folder is missing; returns the folder. Tools with two
    outputs check both before writing either."""
    check_output_path(path, error)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise error(f"cannot write '{path}': folder '{folder}' does not exist",
                    hint="create the folder first")
    return folder


def check_output_path(path: str, error: Type[CaffeError]) -> None:
    """Refuse (``error``) an output path that exists and is not a regular file."""
    # os.replace would put a regular file in place of a device, FIFO or socket (as root, a
    # "/dev/null" or "/dev/zero" given as the output would be destroyed), and a directory
    # cannot be replaced: refuse them. Links are followed: /dev/stdout is a link to a device.
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise error(f"cannot write '{path}': {e.strerror}") from None
    except ValueError:  # os.stat's "embedded null byte"
        raise error(f"cannot write {path!r}: the path contains a NUL character",
                    hint=NUL_HINT) from None
    if stat.S_ISREG(mode):
        return
    kind = "a directory" if stat.S_ISDIR(mode) else \
        next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise error(f"cannot write '{path}': it is {kind}, not a regular file",
                hint="give the path of a file to create or replace")


def _temporary_prefix(path: str) -> str:
    # ".<name>.<pid>." + mkstemp's random part + ".tmp": the pid tells a live writer's
    # temporary from one a killed run left behind.
    return f".{os.path.basename(path)}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(prefix: str) -> List[str]:
    """Delete temporaries that killed writers left next to files named ``<prefix>*``.

    ``prefix`` is a path prefix such as a solver's ``snapshot_prefix`` (``snapshots/lenet``):
    files ``snapshots/.lenet*.<pid>.XXXXXXXX.tmp`` whose process no longer runs are removed
    (a SIGKILL during an atomic write cannot clean up after itself). Temporaries of running
    processes, and files of any other pattern, are left alone. Returns the paths removed.
    """
    folder = os.path.dirname(prefix) or "."
    base = os.path.basename(prefix)
    pattern = re.compile(r"^\." + re.escape(base) + r".*\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    if not os.path.isdir(folder):
        return removed
    for candidate in glob.glob(os.path.join(glob.escape(folder), "." + glob.escape(base) + "*.tmp")):
        match = pattern.match(os.path.basename(candidate))
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        try:
            if stat.S_ISREG(os.lstat(candidate).st_mode):
                os.unlink(candidate)
                removed.append(candidate)
        except OSError:  # already gone, or not ours to delete: leave it
            pass
    return removed


def refuse_external_data(h5file, path: str, error: Type[CaffeError]) -> None:
    """Refuse (``error``) an open HDF5 file whose data lives partly in other files: an external
    link, a dataset with external storage or a virtual dataset. h5py reads the other file when
    the name is read, and one that is a FIFO or device would block or be read (Caffe's files,
    weights, solver states and HDF5Data sources, never hold them)."""
    import h5py

    found: List[str] = []

    seen = set()

    def walk(group, prefix: str) -> None:
        # By hand with get(getlink=True), which every h5py 3 has (visititems_links is 3.11+):
        # links are looked at without being followed; each group is entered once (hard-link
        # cycles), soft links are left to h5py's own checks.
        for key in group.keys():
            name = prefix + key
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                found.append(f"'{name}' links to {link.filename}:{link.path}")
                continue
            if not isinstance(link, h5py.HardLink):
                continue
            obj = group.get(key)
            if isinstance(obj, h5py.Group):
                address = h5py.h5o.get_info(obj.id).addr  # a group reached twice is one object
                if address not in seen:
                    seen.add(address)
                    walk(obj, name + "/")
            elif isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    found.append(f"'{name}' is a virtual dataset of other files")
                elif obj.id.get_create_plist().get_external_count() > 0:
                    found.append(f"'{name}' keeps its data in an external file")

    walk(h5file, "")
    if found:
        raise error(f"HDF5 file keeps data in other files ({found[0]}"
                    f"{f' and {len(found) - 1} more' if len(found) > 1 else ''})", where=path,
                    hint="store the data in the file itself (h5py: copy the datasets in)")
