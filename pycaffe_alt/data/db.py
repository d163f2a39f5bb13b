"""Key-value databases of Caffe records: LMDB (default) and LevelDB (optional ``plyvel``).

Readers give random access by position in key order (the order Caffe's cursor walks), so a data
pipeline can address record ``i`` directly and a worker process can read any slice.

Fork safety: an LMDB environment must not be used in a process other than the one that opened it.
``LMDBReader`` lists the keys once in its constructor (a plain Python list, safe to inherit), closes
that handle, and opens the environment lazily in whichever process first reads a value; after a
fork the child notices the new process id, drops the inherited handle and opens its own, so a
reader may be created before workers are forked (or pickled to spawned workers).

Writers batch puts into transactions (1000 records each, like Caffe's tools) and grow the LMDB map
whenever it fills, so they never fail with MDB_MAP_FULL.
"""
from __future__ import annotations

import os
import shutil
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from ..errors import DataError
from ..fileio import check_input_path

# Which command makes a database, by the name Caffe's examples give it (for "missing" hints).
_CREATORS = (
    ("mnist5k", "it is created on first use by pycaffe_alt.data.mnist5k.ensure_mnist5k_lmdb()"),
    ("mnist", "create it with data/mnist/get_mnist (download) or tools/convert_mnist (IDX files)"),
    ("cifar100", "create it with data/cifar100/get_cifar100 or tools/convert_cifar"),
    ("cifar", "create it with data/cifar10/get_cifar10 or tools/convert_cifar"),
)
_GENERIC_CREATOR = ("create it with tools/convert_imageset ROOT/ LISTFILE DB (images), "
                    "tools/convert_mnist (MNIST IDX files) or data/mnist/get_mnist")

_COMMIT_EVERY = 1000          # Caffe's tools commit every 1000 records
_INITIAL_MAP_SIZE = 64 << 20  # grown by doubling as needed (the file itself only grows as written)


def _missing_hint(path: str) -> str:
    name = os.path.basename(os.path.normpath(path)).lower()
    for token, hint in _CREATORS:
        if token in name:
            return hint
    return _GENERIC_CREATOR


def _as_bytes(key: Union[bytes, str]) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def _check_exists(path: str, backend: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{backend} database does not exist", where=path, hint=_missing_hint(path))
    # A database is a folder (or LMDB's single-file layout); a FIFO or device would block or
    # be read forever.
    check_input_path(path, DataError, "database", folder_ok=True)


def check_lmdb_size(env, path: str) -> None:
    """Refuse an LMDB whose data file is shorter than its own meta page says.

    LMDB memory-maps data.mdb and trusts the meta page's last page number: reading a page past
    the end of a truncated file is a SIGBUS that kills the process with no message. py-lmdb's
    ``env.info()['last_pgno']`` and ``env.stat()['psize']`` give the size the file must have.
    """
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    try:
        actual = os.path.getsize(data_file)
    except OSError as e:
        raise DataError(f"cannot read the LMDB data file ({e.strerror})", where=data_file) from None
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    if actual < needed:
        raise DataError(f"data.mdb is truncated ({actual} of {needed} bytes): re-create the "
                        "database", where=path,
                        hint="the copy or download was cut short, or the disk filled up while "
                             "it was written")


class _Reader:
    """Shared reader behaviour; subclasses provide ``_list_keys`` and ``_get``."""

    backend = ""

    def __init__(self, path: str):
        self.path = str(path)
        _check_exists(self.path, self.backend)
        self._keys: List[bytes] = self._list_keys()
        if not self._keys:
            raise DataError(f"{self.backend} database is empty (no records)", where=self.path,
                            hint="re-create it; the tool that wrote it may have skipped every input")

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, i: int) -> bytes:
        """Key of the ``i``-th record in key order."""
        return self._keys[i]

    def value(self, i: int) -> bytes:
        """Serialized record ``i`` (a Datum for Caffe's tools)."""
        key = self._keys[i]
        value = self._get(key)
        if value is None:
            raise DataError(f"record {key.decode('utf-8', 'replace')!r} disappeared while reading",
                            where=self.path, hint="do not modify a database while it is read")
        return value

    def where(self, i: int) -> str:
        """Human-readable location of record ``i`` for error messages: path and key."""
        return f"{self.path} key '{self._keys[i].decode('utf-8', 'replace')}'"

    def values(self, indices: Sequence[int]) -> List[bytes]:
        """Serialized records ``indices`` (a batch), in that order."""
        return [self.value(int(i)) for i in indices]

    def datum(self, i: int):
        """Record ``i`` parsed as a Datum (errors name the database and key)."""
        from ..proto import caffe_pb2
        from .datum import parse_datum

        value = self.value(i)
        datum = caffe_pb2.Datum()
        try:  # the message (with the key) is only built when parsing fails: this is a hot path
            datum.ParseFromString(value)
            return datum
        except Exception:
            return parse_datum(value, self.where(i))

    def __iter__(self) -> Iterator[Tuple[bytes, bytes]]:
        for i in range(len(self._keys)):
            yield self._keys[i], self.value(i)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _list_keys(self) -> List[bytes]:
        raise NotImplementedError

    def _get(self, key: bytes) -> Optional[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Give back, between batches, what would stop other code in this process from opening
        the database (the next read reopens it); by default that is everything, as close()."""
        self.close()


# One LMDB environment per database per process: py-lmdb (like LMDB itself) refuses to open the
# same files twice in a process, yet several readers (a TRAIN and a TEST net, worker threads) may
# read one database. Entries: realpath -> [environment, owning pid, reader count].
_ENVS: Dict[str, list] = {}
# Re-entrant: opening an environment allocates, the allocation may run the garbage collector,
# and a collected reader's __del__ gives its environment back under this lock in the same
# thread (with a plain Lock that thread waited for itself forever).
_ENVS_LOCK = threading.RLock()
# Databases this process reads through a child process (see LMDBReader._child_reader).
_SERVED_BY_CHILD: Set[str] = set()


class LMDBOpenInProcess(DataError):
    """The program itself holds this LMDB open through py-lmdb, which then refuses another
    handle in the process (the reader falls back to :mod:`pycaffe_alt.data.lmdb_child`)."""


def open_lmdb_readonly(path: str, lock: bool = False):
    """A read-only py-lmdb environment of the database at ``path`` (a folder with ``data.mdb``,
    or that file), checked for truncation; DataError (LMDBOpenInProcess when the process
    already has it open) otherwise. ``lock``: take a slot in LMDB's reader table, so that a
    writer keeps the pages a long read still uses (the child reader beside a program that may
    write, see lmdb_child.py)."""
    import lmdb

    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    # A FIFO or device in the database's place would block the open forever.
    check_input_path(data_file, DataError, "database file (an LMDB data.mdb)")
    try:
        # A directory is Caffe's layout (data.mdb inside); a bare file is MDB_NOSUBDIR. No lock file
        # (lock=False), so databases on read-only media open too; do not read a database while
        # another process writes it.
        env = lmdb.open(path, readonly=True, lock=lock, readahead=False,
                        subdir=os.path.isdir(path), max_readers=1024)
    except lmdb.Error as e:
        if "already open in this process" in str(e):
            # py-lmdb allows one handle per database file and process; the program's own
            # lmdb.open() of it holds that one (Caffe's C++ reader is not counted by py-lmdb).
            raise LMDBOpenInProcess("the program itself has this LMDB open (py-lmdb allows "
                                    "one handle per database and process)", where=path,
                                    hint="close the program's handle (env.close()) before a net "
                                         "reads the database") from None
        raise DataError(f"cannot open as an LMDB ({e})", where=path,
                        hint="the path must be a database written by convert_imageset/"
                             "convert_mnist (a folder holding data.mdb)") from None
    try:
        check_lmdb_size(env, path)
    except BaseException:
        env.close()
        raise
    return env


def _acquire_env(path: str):
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None and entry[1] != os.getpid():
            # Inherited through fork: close this process's copy (it only unmaps and closes our
            # duplicate descriptors; without a lock file nothing is shared with the parent).
            entry[0].close()
            entry = None
        if entry is None:
            entry = _ENVS[key] = [open_lmdb_readonly(path), os.getpid(), 0]
        entry[2] += 1
        return entry[0]


def _release_env(path: str) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None and entry[1] == os.getpid():
            entry[2] -= 1
            if entry[2] <= 0:
                entry[0].close()
                del _ENVS[key]


class LMDBReader(_Reader):
    """Read-only LMDB of records, random access by position in key order; fork-safe (see module doc).

    Each thread reads through its own read transaction; readers of the same database in one process
    share one LMDB environment.
    """

    backend = "LMDB"

    def __init__(self, path: str):
        self._local = threading.local()
        self._env_pid: Optional[int] = None  # process in which this reader holds an environment
        # Set when the program holds the database open itself: a child process reads it.
        self._child = None
        super().__init__(path)

    def _child_reader(self):
        """The child-process reader of this database, started on first need in this process."""
        from ..log import get_logger
        from .lmdb_child import ChildLMDB

        with _ENVS_LOCK:  # one child per reader, also when threads ask at once
            child = self._child
            if child is not None and child.owner_pid == os.getpid():
                return child
            first = self.path not in _SERVED_BY_CHILD
            _SERVED_BY_CHILD.add(self.path)
            if first:  # once per database: a Data layer opens several readers
                get_logger().warning("%s: the program itself holds this LMDB open through py-lmdb, "
                                     "which allows one handle per process; reading it through a "
                                     "child process (slower; close the program's handle before "
                                     "the net reads it to avoid this)", self.path)
            child = self._child = ChildLMDB(self.path)
        return child

    def _list_keys(self) -> List[bytes]:
        import lmdb

        try:
            env = _acquire_env(self.path)
        except LMDBOpenInProcess:
            return self._child_reader().keys()
        try:
            with env.begin(buffers=False) as txn:
                return list(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as e:
            raise DataError(f"LMDB is corrupt ({e})", where=self.path,
                            hint="re-create the database") from None
        finally:
            _release_env(self.path)

    def _txn(self):
        pid = os.getpid()
        local = self._local
        if getattr(local, "pid", None) != pid:
            if self._env_pid != pid:
                self._env_pid = None  # a handle inherited through fork is not ours
                env = _acquire_env(self.path)
                self._env_pid = pid
            else:
                env = _ENVS[os.path.realpath(self.path)][0]
            local.txn, local.pid = env.begin(buffers=False), pid
        return local.txn

    def _txn_or_child(self):
        """This thread's read transaction, or None when a child process reads for us."""
        if self._child is not None:
            return None
        try:
            return self._txn()
        except LMDBOpenInProcess:
            return None

    def _get(self, key: bytes) -> Optional[bytes]:
        import lmdb

        txn = self._txn_or_child()
        if txn is None:
            return self._child_reader().get_many([key])[0]
        try:
            return txn.get(key)
        except lmdb.Error as e:
            raise DataError(f"LMDB is corrupt ({e})",
                            where=f"{self.path} key '{key.decode('utf-8', 'replace')}'",
                            hint="re-create the database") from None

    def values(self, indices: Sequence[int]) -> List[bytes]:
        # One transaction lookup for the whole batch; any problem is reported record by record
        # through value(), which names the key.
        import lmdb

        txn = self._txn_or_child()
        if txn is None:
            out = self._child_reader().get_many([self._keys[i] for i in indices])
            return super().values(indices) if None in out else out
        keys, get = self._keys, txn.get
        try:
            out = [get(keys[i]) for i in indices]
        except lmdb.Error:
            return super().values(indices)
        return super().values(indices) if None in out else out

    def __del__(self) -> None:
        # A reader dropped without close() still gives back its share of the environment, so
        # other code in the process (a Data layer, a plain lmdb.open) can open the database.
        try:
            self.close()
        except Exception:  # half-built reader, or interpreter shutdown: nothing to give back
            pass

    def close(self) -> None:
        """Release this process's handle and stop a child reader (the reader reopens on the
        next read)."""
        child, self._child = self._child, None
        if child is not None:
            child.close()
        self.release()

    def release(self) -> None:
        """Release this process's handle; a child reader keeps running. It holds nothing in
        this process, and stopping it after each batch started a Python process per batch
        (0.13 s a LeNet batch instead of 0.3 ms) while the program held the database open."""
        if self._env_pid == os.getpid():
            if getattr(self._local, "pid", None) == self._env_pid:
                self._local.txn.abort()
            _release_env(self.path)  # the last reader closes the environment (and its txns)
        self._local = threading.local()
        self._env_pid = None

    def __getstate__(self):
        # Picklable for spawn-started workers: only the path and the key list travel.
        state = self.__dict__.copy()
        del state["_local"]
        state["_env_pid"] = None
        state["_child"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


def _make_folder(path: str) -> None:
    # Missing parent folders are created too (Caffe's mkdir would fail); one that cannot be
    # made (a parent is a file, read-only, /proc...) is reported, not a bare OSError.
    try:
        os.makedirs(path)
    except OSError as e:
        raise DataError(f"cannot create the database folder ({e.strerror})", where=path,
                        hint="check that the parent folder exists, is a folder and is "
                             "writable") from None


class LMDBWriter:
    """Write a new LMDB (Caffe refuses an existing path, and so do we); use as a context manager.

    ``put`` buffers records, committed 1000 at a time; the map size doubles on MDB_MAP_FULL and the
    transaction is retried, so a database of any size can be written.
    """

    def __init__(self, path: str, commit_every: int = _COMMIT_EVERY):
        import lmdb

        self.path = str(path)
        if os.path.exists(self.path):
            raise DataError("output database already exists", where=self.path,
                            hint="remove it or choose another name (Caffe's tools refuse to "
                                 "overwrite too)")
        _make_folder(self.path)
        try:
            self._env = lmdb.open(self.path, map_size=_INITIAL_MAP_SIZE, subdir=True)
        except lmdb.Error as e:
            shutil.rmtree(self.path, ignore_errors=True)
            raise DataError(f"cannot create LMDB ({e})", where=self.path) from None
        self._pending: List[Tuple[bytes, bytes]] = []
        self._commit_every = commit_every
        self.count = 0

    def put(self, key: Union[bytes, str], value: bytes) -> None:
        """Queue one record; a full batch is committed."""
        self._pending.append((_as_bytes(key), bytes(value)))
        self.count += 1
        if len(self._pending) >= self._commit_every:
            self.commit()

    def commit(self) -> None:
        """Write all queued records in one transaction, growing the map until they fit."""
        import lmdb

        if not self._pending:
            return
        while True:
            txn = self._env.begin(write=True)
            try:
                for key, value in self._pending:
                    txn.put(key, value)
                txn.commit()
                break
            except lmdb.MapFullError:
                txn.abort()
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as e:
                txn.abort()
                raise DataError(f"cannot write LMDB ({e})", where=self.path) from None
        self._pending.clear()

    def close(self) -> None:
        """Commit what is queued and close the database."""
        if self._env is not None:
            self.commit()
            self._env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # A failed or interrupted conversion leaves no half database behind: the next run
            # would be refused with "already exists" (the writer made the folder, so it is ours).
            self._pending.clear()
            self.close()
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.close()


def _plyvel():
    try:
        import plyvel
    except ImportError:
        raise DataError("backend LEVELDB needs the optional LevelDB binding 'plyvel', which is not "
                        "installed", hint="pip install plyvel  (or convert the data to LMDB, "
                                          "Caffe's default backend)") from None
    return plyvel


class LevelDBReader(_Reader):
    """Read-only LevelDB (needs ``pip install plyvel``); same interface as :class:`LMDBReader`."""

    backend = "LevelDB"

    def __init__(self, path: str):
        self._db = None
        self._pid: Optional[int] = None
        _plyvel()
        super().__init__(path)

    def _open(self):
        plyvel = _plyvel()
        try:
            return plyvel.DB(self.path, create_if_missing=False)
        except plyvel.Error as e:
            raise DataError(f"cannot open as a LevelDB ({e})", where=self.path) from None

    def _list_keys(self) -> List[bytes]:
        db = self._open()
        try:
            return list(db.iterator(include_value=False))
        finally:
            db.close()

    def _get(self, key: bytes) -> Optional[bytes]:
        if self._db is None or self._pid != os.getpid():
            self._db, self._pid = self._open(), os.getpid()
        return self._db.get(key)

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_db=None, _pid=None)
        return state


class LevelDBWriter:
    """Write a new LevelDB (needs ``pip install plyvel``); same interface as :class:`LMDBWriter`."""

    def __init__(self, path: str, commit_every: int = _COMMIT_EVERY):
        plyvel = _plyvel()
        self.path = str(path)
        if os.path.exists(self.path):
            raise DataError("output database already exists", where=self.path,
                            hint="remove it or choose another name")
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            _make_folder(parent)
        # Caffe's LevelDB options: 64 KiB blocks, 256 MiB write buffer.
        try:
            self._db = plyvel.DB(self.path, create_if_missing=True, error_if_exists=True,
                                 block_size=65536, write_buffer_size=268435456)
        except plyvel.Error as e:
            raise DataError(f"cannot create LevelDB ({e})", where=self.path) from None
        self._batch = self._db.write_batch()
        self._queued = 0
        self._commit_every = commit_every
        self.count = 0

    def put(self, key: Union[bytes, str], value: bytes) -> None:
        self._batch.put(_as_bytes(key), bytes(value))
        self._queued += 1
        self.count += 1
        if self._queued >= self._commit_every:
            self.commit()

    def commit(self) -> None:
        self._batch.write()
        self._batch = self._db.write_batch()
        self._queued = 0

    def close(self) -> None:
        if self._db is not None:
            self.commit()
            self._db.close()
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # as LMDBWriter: no half database left behind
            self._batch = self._db.write_batch()
            self.close()
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.close()


def normalize_backend(backend: Union[str, int]) -> str:
    """'lmdb' or 'leveldb' from a flag value or DataParameter.DB enum (LEVELDB = 0, LMDB = 1)."""
    name = {0: "leveldb", 1: "lmdb"}.get(backend, "") if isinstance(backend, int) \
        else str(backend).strip().lower()
    if name not in ("lmdb", "leveldb"):
        raise DataError(f"unknown database backend '{backend}'", hint="use lmdb or leveldb")
    return name


def open_db(path: str, backend: Union[str, int] = "lmdb", mode: str = "r"):
    """A reader (``mode="r"``) or a writer of a new database (``mode="w"``) for ``backend``."""
    name = normalize_backend(backend)
    if mode not in ("r", "w"):
        raise DataError(f"unknown database mode '{mode}'", hint="use 'r' (read) or 'w' (new)")
    if name == "lmdb":
        return LMDBReader(path) if mode == "r" else LMDBWriter(path)
    return LevelDBReader(path) if mode == "r" else LevelDBWriter(path)
