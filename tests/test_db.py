"""LMDB access: Caffe-written databases, key order, writer map growth, fork safety, bad databases."""
import multiprocessing
import os

import numpy as np
import pytest

from pycaffe_alt.data import db as dbmod
from pycaffe_alt.data.datum import array_to_datum, datum_to_array
from pycaffe_alt.data.db import LMDBReader, LMDBWriter, open_db
from pycaffe_alt.errors import DataError

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data")


def test_reads_caffe_lmdb_in_key_order():
    reader = open_db(os.path.join(GOLDEN, "mnist_test_lmdb"), "LMDB")
    assert len(reader) == 128
    keys = [k for k, _ in reader]
    assert keys == sorted(keys) and keys[0] == b"00000000_d00512.png"
    labels = [int(line.split()[1]) for line in open(os.path.join(GOLDEN, "digits_test.txt"))]
    assert [reader.datum(i).label for i in range(len(reader))] == labels
    assert datum_to_array(reader.datum(5)).shape == (1, 28, 28)
    assert reader.value(3) == dict(iter(reader))[reader.key(3)]


def test_writer_round_trip_and_caffe_key_order(tmp_path):
    path = str(tmp_path / "w_lmdb")
    with LMDBWriter(path) as w:
        for i in (3, 1, 2, 0):
            w.put("%08d" % i, array_to_datum(np.full((1, 2, 2), i, np.uint8), i).SerializeToString())
    r = LMDBReader(path)
    assert [r.key(i) for i in range(4)] == [b"%08d" % i for i in range(4)]
    assert [r.datum(i).label for i in range(4)] == [0, 1, 2, 3]


def test_writer_grows_map_instead_of_map_full(tmp_path, monkeypatch):
    monkeypatch.setattr(dbmod, "_INITIAL_MAP_SIZE", 64 * 1024)  # tiny map: forces several doublings
    path = str(tmp_path / "big_lmdb")
    value = os.urandom(50_000)
    with LMDBWriter(path, commit_every=7) as w:
        for i in range(40):  # 2 MB, 32x the initial map
            w.put(b"%05d" % i, value)
    r = LMDBReader(path)
    assert len(r) == 40 and r.value(39) == value


def test_writer_refuses_existing_path(tmp_path):
    with pytest.raises(DataError, match="already exists"):
        LMDBWriter(str(tmp_path))


def test_missing_names_path_and_creator():
    with pytest.raises(DataError) as e:
        open_db("/nonexistent/examples/mnist_train_lmdb")
    assert "/nonexistent/examples/mnist_train_lmdb" in str(e.value) and "get_mnist" in str(e.value)
    with pytest.raises(DataError, match="convert_imageset"):
        open_db("/nonexistent/photos_lmdb")


def test_empty_and_non_lmdb_name_path(tmp_path):
    empty = str(tmp_path / "empty_lmdb")
    LMDBWriter(empty).close()
    with pytest.raises(DataError, match="empty_lmdb.*empty"):
        LMDBReader(empty)
    junk = tmp_path / "junk_lmdb"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(os.urandom(20000))
    with pytest.raises(DataError, match="junk_lmdb"):
        LMDBReader(str(junk))


def test_corrupt_record_names_path_and_key(tmp_path):
    path = str(tmp_path / "bad_lmdb")
    with LMDBWriter(path) as w:
        w.put("00000000", array_to_datum(np.zeros((1, 2, 2), np.uint8), 0).SerializeToString())
        w.put("00000001", b"\xff\xff\xff")
    r = LMDBReader(path)
    r.datum(0)
    with pytest.raises(DataError, match=r"bad_lmdb key '00000001'"):
        r.datum(1)


def test_leveldb_without_plyvel_says_how_to_install():
    try:
        import plyvel  # noqa: F401
        pytest.skip("plyvel is installed")
    except ImportError:
        pass
    with pytest.raises(DataError, match="pip install plyvel"):
        open_db("whatever", backend="leveldb")
    with pytest.raises(DataError, match="unknown database backend"):
        open_db("whatever", backend="rocksdb")


def _child_read(reader, conn):
    conn.send([reader.datum(i).label for i in range(len(reader))])
    conn.close()


def test_reader_reopens_after_fork():
    reader = LMDBReader(os.path.join(GOLDEN, "mnist_test_lmdb"))
    want = [reader.datum(i).label for i in range(len(reader))]  # opens a handle in the parent
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_read, args=(reader, child))
    proc.start()
    child.close()  # so a crashed child ends recv() with EOFError instead of a hang
    assert parent.poll(60), "child process did not answer"
    got = parent.recv()
    proc.join(30)
    assert got == want and proc.exitcode == 0
    assert reader._env_pid == os.getpid()  # the parent's handle is untouched
    assert reader.datum(1).label == want[1]
    reader.close()


def test_two_readers_of_one_database_share_it():
    path = os.path.join(GOLDEN, "mnist_test_lmdb")
    a, b = LMDBReader(path), LMDBReader(path)
    assert a.value(2) == b.value(2)
    a.close()
    assert b.value(3) == LMDBReader(path).value(3)
    b.close()
    assert a.value(4)  # reopens after close


def test_reader_pickles_without_handle():
    import pickle

    reader = LMDBReader(os.path.join(GOLDEN, "mnist_test_lmdb"))
    reader.value(0)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.value(7) == reader.value(7) and len(clone) == 128


def test_a_reader_dropped_without_close_gives_the_database_back(tmp_path):
    import gc

    import lmdb

    path = str(tmp_path / "db")
    with LMDBWriter(path) as w:
        w.put("0001", array_to_datum(np.zeros((1, 2, 2), np.uint8), 3).SerializeToString())
    reader = LMDBReader(path)
    assert reader.datum(0).label == 3
    del reader
    gc.collect()
    # py-lmdb refuses a second environment on the same files while the first is open.
    env = lmdb.open(path, readonly=True, lock=False)
    env.close()


def test_a_database_the_program_holds_open_is_read_through_a_child_process(tmp_path, caplog):
    # py-lmdb allows one handle per database and process; Caffe's C++ reader is not counted,
    # so pycaffe programs that keep their own lmdb.open() (a tutorial's generator, the
    # lmdb_build.py recipe) train on it there. Here a child process reads for the reader.
    import logging

    import lmdb

    import pycaffe_alt as caffe

    path = str(tmp_path / "db")
    with LMDBWriter(path) as w:
        for i in range(4):
            w.put(f"{i:04d}", array_to_datum(np.full((1, 2, 2), i, np.uint8), i).SerializeToString())
    env = lmdb.open(path, readonly=True)
    try:
        with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
            reader = LMDBReader(path)
            assert len(reader) == 4 and reader.datum(2).label == 2
            assert [parse for parse in reader.values([3, 0])] == [reader.value(3), reader.value(0)]
            reader.close()
            proto = tmp_path / "net.prototxt"
            proto.write_text(f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
                             f'data_param {{ source: "{path}" batch_size: 4 backend: LMDB }} }}')
            net = caffe.Net(str(proto), caffe.TRAIN)
            assert net.forward()["label"].tolist() == [0, 1, 2, 3]
            del net
        assert sum("child process" in r.getMessage() for r in caplog.records) == 1
    finally:
        env.close()
    assert LMDBReader(path).datum(0).label == 0  # and directly once the program's handle is closed


def test_a_reader_collected_while_an_environment_opens_does_not_deadlock(tmp_path):
    # Opening an environment may run the garbage collector, whose collected reader gives its
    # environment back under the same lock, in the same thread (a retried failing net hung).
    import threading

    path = str(tmp_path / "db")
    with LMDBWriter(path) as w:
        w.put("0001", array_to_datum(np.zeros((1, 2, 2), np.uint8), 3).SerializeToString())

    def nested():
        with dbmod._ENVS_LOCK:
            reader = LMDBReader(path)  # acquires and releases inside the held lock
            reader.close()

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()


def test_the_child_reader_keeps_its_snapshot_beside_a_writing_program(tmp_path):
    # Review: opened lock-free, the child's snapshot pages were reused by the program's own
    # writes (every record "disappeared"); with a reader-table slot they stay.
    import lmdb

    path = str(tmp_path / "db")
    with LMDBWriter(path) as w:
        for i in range(4):
            w.put(f"{i:04d}", array_to_datum(np.full((1, 2, 2), i, np.uint8), i).SerializeToString())
    env = lmdb.open(path, map_size=1 << 24)
    try:
        reader = LMDBReader(path)
        assert reader.datum(1).label == 1
        for _ in range(50):  # rewrite every record many times: freed pages get reused
            with env.begin(write=True) as txn:
                for i in range(4):
                    txn.put(b"%04d" % i, array_to_datum(np.full((1, 2, 2), 9, np.uint8), 9)
                            .SerializeToString())
        assert [reader.datum(i).label for i in range(4)] == [0, 1, 2, 3]  # its snapshot
        reader.close()
    finally:
        env.close()
