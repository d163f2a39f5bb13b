"""Reading an LMDB through a child process, when this process cannot open it itself.

py-lmdb allows one handle per database file and process (LMDB's locks belong to the process), so
while a program keeps its own ``lmdb.open()`` of a database, a Data layer in the same process
cannot open it. Caffe's reader is liblmdb in C++, which py-lmdb does not count: pycaffe
programs that build a dataset with py-lmdb and then train on it without closing their handle
(a common ``lmdb_build.py`` recipe, a pycaffe tutorial's generator) work there. Here the reader
then asks a small child Python process, which opens the database read-only and answers with
the keys and values; records cross a pipe, so it is slower than a direct read, and used only
then.

Protocol: length-prefixed pickles; requests ``("keys",)``, ``("get", [key, ...])``,
``("close",)``; answers ``("ok", value)`` or ``("error", message)``.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import BinaryIO, List, Optional

from ..errors import DataError

_HEADER = struct.Struct("<Q")


def _send(stream: BinaryIO, message) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: BinaryIO):
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    size = _HEADER.unpack(head)[0]
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError
    return pickle.loads(payload)


def serve(path: str, requests: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: open ``path`` read-only and answer requests until ``close`` or EOF."""
    from .db import open_lmdb_readonly

    import lmdb

    try:
        try:
            # With the reader table: the program beside us may write, and its writes must not
            # reuse the pages of the snapshot this child reads (Caffe's reader takes a slot too).
            env = open_lmdb_readonly(path, lock=True)
        except Exception:  # read-only media: no lock file can be made
            env = open_lmdb_readonly(path)
    except Exception as e:  # reported to the parent, which raises it there
        _send(answers, ("error", str(e)))
        return
    _send(answers, ("ok", None))
    try:
        with env.begin(buffers=False) as txn:
            while True:
                try:
                    request = _receive(requests)
                except EOFError:
                    return
                try:
                    if request[0] == "keys":
                        answer = list(txn.cursor().iternext(keys=True, values=False))
                    elif request[0] == "get":
                        answer = [txn.get(key) for key in request[1]]
                    else:
                        return
                except lmdb.Error as e:
                    _send(answers, ("error", f"LMDB is corrupt ({e})"))
                    continue
                _send(answers, ("ok", answer))
    finally:
        env.close()


class ChildLMDB:
    """A read-only LMDB served by a child process (see the module doc); thread-safe."""

    def __init__(self, path: str):
        self.path = path
        self.owner_pid = os.getpid()  # the process that started the child (and may use it)
        self._lock = threading.RLock()  # _request's failure path closes under it
        # The child imports pycaffe_alt from where this process did (a checkout, a venv).
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        code = ("import sys; from pycaffe_alt.data.lmdb_child import serve; "
                "serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)")
        try:
            # In a session of its own: Ctrl-C at a terminal goes to the foreground process
            # group, and the child (started once the net first reads) printed its own
            # KeyboardInterrupt traceback under the tool's "interrupted". It stops when this
            # process closes its end of the pipe, however this process ends.
            self._proc: Optional[subprocess.Popen] = subprocess.Popen(
                [sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            raise DataError(f"cannot start a reader process for this LMDB ({e})", where=path,
                            hint="close the program's own handle of it (env.close()) before a "
                                 "net reads it") from None
        self._answer()  # the child's open: its error, if any, is raised here

    def _answer(self):
        try:
            status, value = _receive(self._proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            self.close()
            raise DataError("the reader process for this LMDB ended", where=self.path,
                            hint="close the program's own handle of it (env.close()) before a "
                                 "net reads it") from None
        if status != "ok":
            raise DataError(value, where=self.path)
        return value

    def _request(self, *message):
        if self._proc is None or self.owner_pid != os.getpid():
            raise DataError("the reader process for this LMDB has ended", where=self.path,
                            hint="close the program's own handle of it (env.close()) and build "
                                 "the net again")
        with self._lock:
            try:
                _send(self._proc.stdin, message)
            except OSError:
                self.close()
                raise DataError("the reader process for this LMDB ended", where=self.path) from None
            return self._answer()

    def keys(self) -> List[bytes]:
        """Every key, in key order."""
        return self._request("keys")

    def get_many(self, keys: List[bytes]) -> List[Optional[bytes]]:
        """The values of ``keys`` (None where a key is missing)."""
        return self._request("get", list(keys))

    def close(self) -> None:
        """Stop the child (only from the process that started it)."""
        with self._lock:  # not while another thread waits for an answer
            proc, self._proc = self._proc, None
        if proc is None or self.owner_pid != os.getpid():
            return
        try:
            _send(proc.stdin, ("close",))
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
