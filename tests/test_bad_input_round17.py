"""Round 17 of bad input: data layers, the transformer and the prefetching pipeline fed odd
combinations (a failing batch under each engine, HDF5 files larger than memory, MemoryData
arrays that are not numbers, fillers on empty blobs, rand_skip beyond the list)."""
import cv2
import numpy as np
import pytest
import torch

from layer_check import make_layer
from pycaffe_alt.data.db import open_db
from pycaffe_alt.errors import CaffeError, DataError
from pycaffe_alt.layers import TEST
from pycaffe_alt.proto import caffe_pb2


def _encoded(h, w):
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 7, np.uint8))
    return caffe_pb2.Datum(data=buf.tobytes(), encoded=True, label=h).SerializeToString()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_batch_fails_again_under_every_engine_and_keeps_the_position(tmp_path, workers):
    # The prefetch thread exited after the error (the next call said only "the prefetch thread
    # stopped without a batch"); worker processes went on and served the batch after the bad
    # one while state() still pointed at the bad one.
    with open_db(str(tmp_path / "db"), "lmdb", "w") as db:
        for i, value in enumerate([_encoded(8, 8), b"\x08garbage\xff\xff", _encoded(8, 8)]):
            db.put(f"{i:08d}", value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave a core free, so that workers: 0 reads in a thread
    try:
        layer = make_layer(f'type: "Data" top: "data" top: "label" data_param {{ source: '
                           f'"{tmp_path / "db"}" batch_size: 1 backend: LMDB workers: {workers} }}',
                           [], TEST)
        layer()
        for _ in range(2):
            with pytest.raises(DataError, match="00000001"):
                layer()
            assert layer.state()["batch"] == 1
        layer.close()
    finally:
        torch.set_num_threads(threads)


def test_an_hdf5_file_larger_than_memory_is_named_at_set_up(tmp_path):
    # Caffe reads a listed file whole; numpy's allocation failure came out of the first
    # forward as a traceback (the row order alone of 10**12 rows is 7 TiB).
    import h5py

    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as h5:  # declared, never written: the file stays small
        h5.create_dataset("data", shape=(10 ** 12, 1), dtype="f4")
        h5.create_dataset("label", shape=(10 ** 12,), dtype="f4")
    (tmp_path / "list.txt").write_text(f"{path}\n")
    with pytest.raises(DataError, match=r"big.h5.*10{12} rows.*more than this machine's memory"):
        make_layer(f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: '
                   f'"{tmp_path / "list.txt"}" batch_size: 2 }}', [], TEST)


@pytest.mark.parametrize("data, labels, said", [
    (np.full((2, 1, 2, 2), "a"), np.zeros(2), r"data array holds <U1"),
    (np.zeros((2, 1, 2, 2)), np.array(["a", "b"]), r"labels array holds <U1"),
    (np.zeros((2, 1, 2, 2), complex), np.zeros(2), r"complex128 values, not real numbers"),
    ([[1, 2], [3]], [1], r"data cannot be made an array"),
])
def test_memory_data_arrays_that_are_not_real_numbers_are_refused_by_name(data, labels, said):
    # numpy's conversion error came out as a traceback; complex values lost their imaginary
    # part with only numpy's warning.
    layer = make_layer('type: "MemoryData" top: "data" top: "label" memory_data_param { '
                       'batch_size: 2 channels: 1 height: 2 width: 2 }', [], TEST)
    with pytest.raises(DataError, match=said):
        layer.set_input_arrays(data, labels)


@pytest.mark.parametrize("filler, shape", [("xavier", "dim: 3 dim: 0"), ("msra", "dim: 0 dim: 3"),
                                           ("bilinear", "dim: 0 dim: 1 dim: 0 dim: 0")])
def test_fillers_on_an_empty_dummy_blob_fill_nothing(filler, shape):
    # Their fan-in or kernel size is zero: "uniform draw needs finite a <= b" or
    # ZeroDivisionError, where Caffe's loops over no values draw and write nothing.
    from pycaffe_alt import caffe_rng

    before = caffe_rng.stream().state()
    layer = make_layer(f'type: "DummyData" top: "x" dummy_data_param {{ shape {{ {shape} }} '
                       f'data_filler {{ type: "{filler}" }} }}', [], TEST)
    assert layer().numel() == 0
    assert caffe_rng.stream().state() == before


def test_an_image_data_skip_beyond_the_list_is_refused_as_caffe_does(tmp_path, monkeypatch):
    # The skip drawn from rand_skip wrapped round the list; Caffe's set-up CHECKs it is below
    # the number of lines. With the stream seeded, the draw is Caffe's own.
    from pycaffe_alt import caffe_rng

    monkeypatch.chdir(tmp_path)
    for name in "abc":
        cv2.imwrite(f"{name}.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "list.txt").write_text("a.png 0\nb.png 1\nc.png 2\n")
    caffe_rng.seed(1)
    draw = int(caffe_rng.stream().raw(1)[0])  # ImageData's first draw without shuffle or crop
    skip = draw % 1000
    assert skip >= 3
    caffe_rng.seed(1)
    with pytest.raises(CaffeError, match=rf"rand_skip 1000 drew a skip of {skip} but list.txt "
                                         r"lists 3 images"):
        make_layer('type: "ImageData" top: "data" top: "label" image_data_param { '
                   'source: "list.txt" batch_size: 1 rand_skip: 1000 }', [], TEST)
    caffe_rng.seed(1)
    layer = make_layer('type: "ImageData" top: "data" top: "label" image_data_param { '
                       'source: "list.txt" batch_size: 1 rand_skip: 3 }', [], TEST)
    layer()
    assert layer.last_indices.tolist() == [draw % 3]
    layer.close()


def test_an_image_list_saved_with_a_byte_order_mark_says_so(tmp_path, monkeypatch):
    # The error was "no such image file (a.png)" with the mark invisible in front of a name
    # that exists.
    monkeypatch.chdir(tmp_path)
    cv2.imwrite("a.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfa.png 1\r\n")
    with pytest.raises(DataError, match=r"list.txt:1: the list starts with a UTF-8 byte-order"):
        make_layer('type: "ImageData" top: "data" top: "label" image_data_param { '
                   'source: "list.txt" batch_size: 1 }', [], TEST)
