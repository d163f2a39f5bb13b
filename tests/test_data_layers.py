"""Data, ImageData, HDF5Data, MemoryData, WindowData: Caffe's batches, options and bad inputs."""
import os

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import pycaffe_alt as caffe
from layer_check import make_layer
from pycaffe_alt.caffe_rng import CaffeRNG
from pycaffe_alt.data.datum import array_to_datum
from pycaffe_alt.data.db import open_db
from pycaffe_alt.errors import CaffeError, DataError
from pycaffe_alt.layers import TEST, TRAIN
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.weights import write_binaryproto

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data")
CASES = ["mnist_encoded_meanvalue", "mnist_scale_crop", "photos_encoded_meanvalues",
         "photos_resized_meanfile"]


@pytest.fixture
def in_golden(monkeypatch):
    monkeypatch.chdir(GOLDEN)  # prototxt paths are relative to the current directory, as in Caffe


def layer_from(text, phase=TEST):
    layer = make_layer(text, [], phase)
    return layer


def data_layer(source, transform="", batch_size=4, phase=TEST, extra=""):
    return layer_from(f'type: "Data" top: "data" top: "label" transform_param {{ {transform} }} '
                      f'data_param {{ source: "{source}" batch_size: {batch_size} backend: LMDB '
                      f'{extra} }}', phase)


def write_lmdb(path, arrays, labels, corrupt=()):
    with open_db(str(path), "lmdb", "w") as db:
        for i, (a, l) in enumerate(zip(arrays, labels)):
            value = array_to_datum(a, l).SerializeToString()
            db.put(f"{i:08d}_x", b"\x08garbage\xff\xff" if i in corrupt else value)


# -- golden parity ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_first_three_batches_equal_caffe(in_golden, case):
    net = caffe_pb2.NetParameter()
    with open(f"data_{case}.prototxt") as f:
        text_format.Parse(f.read(), net)
    layer = layer_from(text_format.MessageToString(net.layer[0]))
    ref = np.load(f"data_{case}.npz")
    assert layer.top_shapes([]) == [ref["data/0"].shape, ref["label/0"].shape]
    for k in range(3):
        data, label = layer()
        assert data.dtype == torch.float32 and label.dtype == torch.float32
        np.testing.assert_array_equal(data.numpy(), ref[f"data/{k}"])
        np.testing.assert_array_equal(label.numpy(), ref[f"label/{k}"])
    layer.close()


def test_cursor_wraps_and_records_indices_are_key_positions(in_golden):
    layer = data_layer("photos_resized_lmdb", batch_size=5)
    seen = [layer()[1] is not None and layer.last_indices.tolist() for _ in range(3)]
    assert seen == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 0, 1, 2]]
    assert layer.last_indices.dtype == torch.long
    layer.close()


def test_data_layer_ignores_rand_skip_as_caffe_does(in_golden):
    # Caffe's Data layer never reads data_param.rand_skip (only ImageData does).
    with pytest.warns(UserWarning, match="rand_skip is ignored"):
        layer = data_layer("photos_resized_lmdb", batch_size=5, extra="rand_skip: 7", phase=TRAIN)
    layer()
    assert layer.last_indices.tolist() == [0, 1, 2, 3, 4]
    layer.close()


def test_data_only_top(in_golden):
    layer = layer_from('type: "Data" top: "data" data_param { source: "mnist_test_lmdb" '
                       'batch_size: 3 backend: LMDB }')
    assert layer.top_shapes([]) == [(3, 1, 28, 28)]
    out = layer()
    assert isinstance(out, torch.Tensor) and out.shape == (3, 1, 28, 28)
    layer.close()


def test_backend_left_out_is_detected_from_disk(in_golden):
    layer = layer_from('type: "Data" top: "data" data_param { source: "mnist_test_lmdb" '
                       'batch_size: 2 }')
    assert layer().shape == (2, 1, 28, 28)
    layer.close()


# -- transform options through the layer --------------------------------------------------------
def test_force_gray_and_force_color_decode_encoded_records(in_golden):
    gray = data_layer("photos_encoded_lmdb", "force_gray: true", batch_size=1)
    data, _ = gray()
    with open("photos/Blender_Suzanne1.jpg", "rb") as f:
        expected = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(data[0, 0].numpy(), expected.astype(np.float32))
    color = data_layer("mnist_test_encoded_lmdb", "force_color: true", batch_size=2)
    data, _ = color()
    assert data.shape == (2, 3, 28, 28)
    assert torch.equal(data[:, 0], data[:, 1]) and torch.equal(data[:, 1], data[:, 2])
    plain = layer_from('type: "Data" top: "data" data_param { source: "mnist_test_lmdb" '
                       'batch_size: 2 backend: LMDB }')
    assert torch.equal(plain()[:, 0], data[:, 0])
    for layer in (gray, color, plain):
        layer.close()


@pytest.mark.parametrize("in_line", [True, False])
def test_an_idle_layer_holds_no_lmdb_handle(in_golden, monkeypatch, in_line):
    # py-lmdb allows one environment per path and process: a layer whose prefetch queue is full
    # must let others (another net, a tool, a check script) open the same database.
    import time

    import lmdb

    from pycaffe_alt.data import pipeline

    monkeypatch.setattr(pipeline, "_cores_are_busy", lambda: in_line)
    layer = data_layer("mnist_test_lmdb", batch_size=2)
    layer()
    queue = getattr(layer.pipeline._engine, "_queue", None)  # None: batches read in line
    deadline = time.time() + 10
    while queue is not None and not queue.full() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the producer closes the handle right before it blocks
    env = lmdb.open("mnist_test_lmdb", readonly=True, lock=False)
    env.close()
    assert layer()[0].shape == (2, 1, 28, 28)
    layer.close()


def test_mean_file_equals_mean_value_for_a_constant_mean(in_golden, tmp_path):
    write_binaryproto(np.full((1, 1, 28, 28), 33.25, np.float32), str(tmp_path / "m.binaryproto"))
    by_file = data_layer("mnist_test_lmdb", f'mean_file: "{tmp_path}/m.binaryproto" scale: 0.5')
    a = by_file()[0]
    by_file.close()
    by_value = data_layer("mnist_test_lmdb", "mean_value: 33.25 scale: 0.5")
    b = by_value()[0]
    by_value.close()
    assert torch.equal(a, b) and a.min() < 0


def test_train_phase_random_crop_and_mirror_are_seeded_and_valid(in_golden):
    plain = data_layer("mnist_test_lmdb", batch_size=16)
    full = plain()[0].numpy()
    plain.close()

    def train_batches(seed):
        caffe.set_random_seed(seed)
        layer = data_layer("mnist_test_lmdb", "crop_size: 20 mirror: true", 16, TRAIN)
        out = [layer()[0].numpy() for _ in range(1)]
        layer.close()
        return out[0]

    a, b, c = train_batches(1), train_batches(1), train_batches(2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    offsets, flips = set(), 0
    for i in range(16):  # every sample is some 20x20 window of its image, maybe flipped
        matches = [(h, w, m) for h in range(9) for w in range(9) for m in (0, 1)
                   if np.array_equal(a[i, 0], (full[i, 0, h:h + 20, w:w + 20][:, ::-1] if m else
                                               full[i, 0, h:h + 20, w:w + 20]))]
        assert matches, f"sample {i} is not a crop of its record"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 4 and 0 < flips < 16


def test_train_crops_and_mirrors_follow_caffes_transformer_stream(in_golden):
    # Caffe: the Data layer's set-up draws the reader thread's seed, two transformer seeds and
    # the prefetch thread's seed from Caffe's stream; the second transformer seed starts the
    # mt19937 whose numbers give, per record in order, mirror = r % 2, h = r % (H - crop + 1),
    # w = r % (W - crop + 1) (data_transformer.cpp). Checked over two batches.
    plain = data_layer("mnist_test_lmdb", batch_size=32)
    full = plain()[0].numpy()
    plain.close()
    caffe.set_random_seed(1)
    layer = data_layer("mnist_test_lmdb", "crop_size: 20 mirror: true", 16, TRAIN)
    got = np.concatenate([layer()[0].numpy() for _ in range(2)])
    layer.close()
    stream = CaffeRNG(int(CaffeRNG(1).raw(4)[2])).raw(3 * 32)
    for i in range(32):
        m, h, w = (int(v) for v in stream[3 * i:3 * i + 3])
        window = full[i, 0, h % 9:h % 9 + 20, w % 9:w % 9 + 20]
        np.testing.assert_array_equal(got[i, 0], window[:, ::-1] if m % 2 else window)


# -- ImageData ---------------------------------------------------------------------------------
def image_layer(source, extra="", batch_size=4, phase=TEST, root="digits/"):
    return layer_from(f'type: "ImageData" top: "data" top: "label" image_data_param {{ '
                      f'source: "{source}" root_folder: "{root}" batch_size: {batch_size} {extra} }}',
                      phase)


def read_list(path):
    with open(path) as f:
        return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in f if line.strip()]


def test_image_data_reads_the_list_in_order_with_resize(in_golden):
    entries = read_list("digits_test.txt")
    layer = image_layer("digits_test.txt", "new_height: 20 new_width: 17 is_color: false")
    assert layer.top_shapes([]) == [(4, 1, 20, 17), (4,)]
    data, label = layer()
    for i in range(4):
        img = cv2.imread("digits/" + entries[i][0], cv2.IMREAD_GRAYSCALE)
        expected = cv2.resize(img, (17, 20), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(data[i, 0].numpy(), expected.astype(np.float32))
    assert label.tolist() == [e[1] for e in entries[:4]]
    assert layer.last_indices.tolist() == [0, 1, 2, 3]
    colour = image_layer("digits_test.txt", batch_size=1)
    assert colour().__getitem__(0).shape[1] == 3  # is_color defaults to true
    layer.close(), colour.close()


def test_image_data_shuffle_permutes_every_pass(in_golden):
    entries = read_list("digits_test.txt")
    n = len(entries)
    layer = image_layer("digits_test.txt", "shuffle: true", batch_size=n)
    passes = []
    for _ in range(2):
        _, label = layer()
        idx = layer.last_indices.tolist()
        assert sorted(idx) == list(range(n))
        assert label.tolist() == [entries[i][1] for i in idx]
        passes.append(idx)
    assert passes[0] != list(range(n)) and passes[0] != passes[1]
    layer.close()


def test_image_data_shuffle_reads_caffes_order(in_golden):
    """ImageData's passes are the key order shuffled in place by caffe::shuffle on an mt19937
    seeded with a draw from Caffe's stream: once at set-up, again after every pass; rand_skip
    starts the first pass at (the next draw) % rand_skip."""
    n = len(read_list("digits_test.txt"))
    for extra, skip_mod in (("shuffle: true", 0), ("shuffle: true rand_skip: 7", 7)):
        caffe.set_random_seed(31)
        layer = image_layer("digits_test.txt", extra, batch_size=n)
        draws = CaffeRNG(31).raw(2).tolist()  # no crop/mirror: the shuffle seed comes first
        rng, order, expected = CaffeRNG(draws[0]), np.arange(n), []
        for _ in range(3):
            rng.shuffle(order)
            expected.extend(order.tolist())
        skip = draws[1] % skip_mod if skip_mod else 0
        served = []
        for _ in range(2):
            layer()
            served.extend(layer.last_indices.tolist())
        assert served == expected[skip:skip + 2 * n]
        layer.close()


def test_image_data_caffe_shuffle_resumes_mid_pass(in_golden):
    n = len(read_list("digits_test.txt"))
    caffe.set_random_seed(5)
    a = image_layer("digits_test.txt", "shuffle: true", batch_size=3)
    for _ in range(n // 3 + 2):  # into the second pass
        a()
    state = a.pipeline.state()
    ahead = [a() and a.last_indices.tolist() for _ in range(n // 3 + 1)]
    caffe.set_random_seed(99)  # another shuffle seed at set-up: the state's must win
    b = image_layer("digits_test.txt", "shuffle: true", batch_size=3)
    b.pipeline.load_state(state)
    assert [b() and b.last_indices.tolist() for _ in range(n // 3 + 1)] == ahead
    a.close(), b.close()


def test_caffe_shuffles_pickle_their_current_pass():
    import pickle

    from pycaffe_alt.data.pipeline import CaffeShuffles

    chain = CaffeShuffles(500, 11)
    chain.order(4)
    copy = pickle.loads(pickle.dumps(chain))
    assert copy._pass == 4  # goes on from there in a worker, no replay of passes 0..4
    assert np.array_equal(copy.order(6), chain.order(6))
    assert np.array_equal(copy.order(2), CaffeShuffles(500, 11).order(2))  # earlier: replayed


def test_caffe_shuffle_equals_boosts_fisher_yates():
    """CaffeRNG.shuffle against caffe::shuffle compiled with boost
    (fixtures/boost_rng/shuffle_reference.cpp): three passes of 10, two of 1000, and two of
    300000 records, where boost's uniform_int rejects a few draws."""
    from pathlib import Path

    lines = (Path(__file__).parent / "fixtures" / "boost_rng" / "shuffle_passes.txt"
             ).read_text().splitlines()

    def passes(seed, n, count):
        rng, order, out = CaffeRNG(seed), np.arange(n), []
        for _ in range(count):
            rng.shuffle(order)
            out.append(order.copy())
        return out, int(rng.raw(1)[0])

    out, after = passes(1, 10, 3)
    assert [o.tolist() for o in out] == [[int(t) for t in line.split()] for line in lines[:3]]
    assert after == int(lines[3])
    out, after = passes(77, 1000, 2)
    assert [o.tolist() for o in out] == [[int(t) for t in line.split()] for line in lines[4:6]]
    assert after == int(lines[6])

    def fnv(order):
        h = 1469598103934665603
        for v in order.tolist():
            h = ((h ^ v) * 1099511628211) & (2 ** 64 - 1)
        return h

    out, after = passes(2024, 300000, 2)
    assert [fnv(o) for o in out] == [int(lines[7]), int(lines[8])] and after == int(lines[9])


def test_image_data_rand_skip_starts_later(in_golden):
    torch.manual_seed(0)
    layer = image_layer("digits_test.txt", "rand_skip: 10", batch_size=2)
    layer()
    first = layer.last_indices.tolist()
    assert 0 <= first[0] < 10 and first[1] == first[0] + 1
    layer.close()


def test_image_data_malformed_list_line_names_the_line(tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_text("a.png 1\nb.png 2\nc.png\n")
    with pytest.raises(DataError, match=r"list.txt:3") as e:
        image_layer(str(bad))
    assert "integer label" in str(e.value)


def test_image_data_missing_image_names_file_and_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    lst = tmp_path / "list.txt"
    lst.write_text("d00512.png 3\nnot_there.png 1\n")
    layer = image_layer(str(lst), batch_size=2)  # the first image sets the shape
    with pytest.raises(DataError, match="not_there.png") as e:
        layer()
    assert "entry 2" in str(e.value)
    layer.close()


# -- HDF5Data ----------------------------------------------------------------------------------
@pytest.fixture
def h5_list(tmp_path):
    import h5py

    names = []
    for f, rows in enumerate((5, 3)):
        path = tmp_path / f"part{f}.h5"
        with h5py.File(path, "w") as h5:
            base = 100 * f
            h5["data"] = (base + np.arange(rows * 6)).reshape(rows, 2, 3).astype(np.float64)
            h5["label"] = (base + np.arange(rows)).astype(np.int32)
        names.append(str(path))
    lst = tmp_path / "files.txt"
    lst.write_text("\n".join(names) + "\n")
    return str(lst)


def test_hdf5_data_reads_files_in_order_and_wraps(h5_list):
    layer = layer_from(f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
                       f'source: "{h5_list}" batch_size: 3 }}')
    assert layer.top_shapes([]) == [(3, 2, 3), (3,)]
    labels = []
    for _ in range(4):
        data, label = layer()
        assert data.dtype == torch.float32
        assert torch.equal(data[:, 0, 0], label * 6 - 500 * (label >= 100).float())
        labels += label.tolist()
    assert labels == [0, 1, 2, 3, 4, 100, 101, 102, 0, 1, 2, 3]
    state = layer.state()
    nxt = layer()[1].tolist()
    layer.load_state(state)
    assert layer()[1].tolist() == nxt == [4, 100, 101]


def test_hdf5_data_shuffle_covers_every_row_each_pass(h5_list):
    layer = layer_from(f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
                       f'source: "{h5_list}" batch_size: 8 shuffle: true }}')
    p1 = layer()[1].tolist()
    i1 = layer.last_indices.tolist()
    p2 = layer()[1].tolist()
    assert sorted(p1) == sorted(p2) == [0, 1, 2, 3, 4, 100, 101, 102]
    assert sorted(i1) == list(range(8)) and p1 != p2


def test_hdf5_data_errors(h5_list):
    with pytest.raises(CaffeError, match="does not transform"):
        layer_from(f'type: "HDF5Data" top: "data" transform_param {{ scale: 2 }} '
                   f'hdf5_data_param {{ source: "{h5_list}" batch_size: 3 }}')
    with pytest.raises(DataError, match="no dataset 'image'"):
        layer_from(f'type: "HDF5Data" top: "image" hdf5_data_param {{ source: "{h5_list}" '
                   f'batch_size: 3 }}')


# -- MemoryData --------------------------------------------------------------------------------
MEMORY = ('type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 '
          'channels: 1 height: 2 width: 3 }')


def test_memory_data_serves_arrays_and_wraps():
    layer = layer_from(MEMORY)
    assert layer.top_shapes([]) == [(2, 1, 2, 3), (2,)]
    data = np.arange(4 * 6, dtype=np.float64).reshape(4, 1, 2, 3)
    layer.set_input_arrays(data, np.array([5, 6, 7, 8]))
    got = [layer() for _ in range(3)]
    assert got[0][0].dtype == torch.float32
    assert torch.equal(got[1][0], torch.tensor(data[2:4], dtype=torch.float32))
    assert got[1][1].shape == (2, 1, 1, 1) and got[1][1].flatten().tolist() == [7, 8]
    assert torch.equal(got[2][0], got[0][0]) and layer.last_indices.tolist() == [0, 1]


def test_memory_data_errors():
    layer = layer_from(MEMORY)
    with pytest.raises(DataError, match="set_input_arrays"):
        layer()
    with pytest.raises(DataError, match="multiple of batch_size"):
        layer.set_input_arrays(np.zeros((3, 1, 2, 3)), np.zeros(3))
    with pytest.raises(DataError, match="expected N x 1 x 2 x 3"):
        layer.set_input_arrays(np.zeros((2, 3, 2, 3)), np.zeros(2))
    with pytest.raises(CaffeError, match="positive"):
        layer_from('type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 }')


def test_window_data_is_refused_with_advice():
    with pytest.raises(CaffeError, match="not supported") as e:
        layer_from('type: "WindowData" top: "data" top: "label" window_data_param { source: "w" }')
    assert "ImageData" in str(e.value)


# -- bad inputs --------------------------------------------------------------------------------
def test_missing_source_names_path_and_the_creating_command(tmp_path):
    with pytest.raises(DataError) as e:
        data_layer(str(tmp_path / "train_lmdb"))
    assert "train_lmdb" in str(e.value) and "convert_imageset" in str(e.value)
    with pytest.raises(DataError, match="image list") as e:
        image_layer(str(tmp_path / "list.txt"))


def test_corrupt_record_names_the_key(tmp_path):
    arrays = [np.full((1, 4, 4), i, np.uint8) for i in range(6)]
    write_lmdb(tmp_path / "db", arrays, range(6), corrupt={4})
    layer = data_layer(str(tmp_path / "db"), batch_size=2)
    layer(), layer()
    with pytest.raises(DataError) as e:
        layer()
    assert "00000004_x" in str(e.value) and str(tmp_path / "db") in str(e.value)
    layer.close()


def test_records_of_different_sizes_in_one_batch(tmp_path):
    arrays = [np.zeros((1, 4, 4), np.uint8), np.zeros((1, 5, 5), np.uint8)]
    write_lmdb(tmp_path / "db", arrays, [0, 1])
    layer = data_layer(str(tmp_path / "db"), batch_size=2)
    with pytest.raises(DataError, match="batch_size: 1"):
        layer()
    layer.close()


def test_bad_batch_size():
    with pytest.raises(CaffeError, match="batch_size must be positive"):
        layer_from('type: "Data" top: "data" data_param { source: "x" }')


def test_reads_in_line_when_torch_uses_every_core(in_golden, monkeypatch):
    """On the CPU with every core in torch's pool, batches are made in the caller's thread
    (a prefetch thread would pre-empt torch's workers); otherwise a prefetch thread."""
    from pycaffe_alt.data import pipeline

    monkeypatch.setattr(pipeline, "_cores_are_busy", lambda: True)
    layer = data_layer("mnist_test_lmdb", batch_size=2)
    first = layer()[0].clone()
    assert isinstance(layer.pipeline._engine, pipeline._SyncReader)
    layer.close()
    monkeypatch.setattr(pipeline, "_cores_are_busy", lambda: False)
    threaded = data_layer("mnist_test_lmdb", batch_size=2)
    assert torch.equal(threaded()[0], first)  # same batches either way
    assert isinstance(threaded.pipeline._engine, pipeline._ThreadPrefetcher)
    threaded.close()


def test_workers_and_shuffle_come_from_the_prototxt(tmp_path):
    """data_param { workers shuffle } (our fields 5201/5202) reach the pipeline."""
    import pycaffe_alt as caffe
    from pycaffe_alt.prototxt import parse_text
    from pycaffe_alt.proto import caffe_pb2

    src = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data", "mnist_test_lmdb")
    text = f'''layer {{ name: "d" type: "Data" top: "data" top: "label"
      data_param {{ source: "{src}" batch_size: 4 backend: LMDB workers: 1 shuffle: true }} }}'''
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN)
    layer = net.layer_dict["d"].module
    assert layer.pipeline.workers == 1
    net.forward()
    assert net.blobs["data"].data.shape == (4, 1, 28, 28)


def test_releasing_a_net_with_worker_processes_does_not_wait_for_them(tmp_path):
    """From a finalizer (del net) torch's graceful shutdown found its queues finalized and
    waited 5 s per worker; the workers are stopped outright now."""
    import gc

    from pycaffe_alt.prototxt import parse_text
    from pycaffe_alt.proto import caffe_pb2

    src = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data", "mnist_test_lmdb")
    text = f'''layer {{ name: "d" type: "Data" top: "data" top: "label"
      data_param {{ source: "{src}" batch_size: 4 backend: LMDB workers: 2 }} }}'''
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN)
    net.forward()
    import time

    gc.collect()  # earlier tests' garbage is not this net's release
    started = time.monotonic()
    del net
    gc.collect()
    # A hang guard, not a speed requirement: 10 s before (2 x torch's 5 s join timeout); the
    # finalizer swallows a watchdog's exception, so the elapsed time is what can tell.
    assert time.monotonic() - started < 5


def test_float_and_raw_records_mixed_in_a_batch_read_as_caffe(tmp_path):
    """The batch read decodes raw uint8 records directly and sends anything else (float_data
    here) through the record-by-record path: both land in the batch as Caffe's transformer
    leaves them."""
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (2, 3, 4), dtype=np.uint8) for _ in range(4)]
    arrays[1] = rng.standard_normal((2, 3, 4)).astype(np.float32)  # a float_data record
    write_lmdb(tmp_path / "db", arrays, [5, 6, 7, 8])
    layer = data_layer(str(tmp_path / "db"), "scale: 0.5", batch_size=4)
    data, label = layer()
    expected = np.stack([a.astype(np.float32) * np.float32(0.5) for a in arrays])
    np.testing.assert_array_equal(data.numpy(), expected)
    np.testing.assert_array_equal(label.numpy(), [5, 6, 7, 8])
    layer.close()


@pytest.mark.parametrize("in_line", [True, False])
def test_training_holds_the_lmdb_open_and_releases_it_after(in_golden, monkeypatch, tmp_path,
                                                            in_line):
    """Inside solver.step the database is opened once, not once per batch (reopening costs
    1.5-2 ms per LeNet batch); when step returns, other code can open it again."""
    import time

    import lmdb

    from pycaffe_alt.data import db as db_module
    from pycaffe_alt.data import pipeline
    from pycaffe_alt.solver.solver import get_solver

    monkeypatch.setattr(pipeline, "_cores_are_busy", lambda: in_line)
    opened = []
    real_open = db_module.open_lmdb_readonly
    monkeypatch.setattr(db_module, "open_lmdb_readonly",
                        lambda path: opened.append(path) or real_open(path))
    net = tmp_path / "net.prototxt"
    net.write_text(
        'layer { name: "d" type: "Data" top: "data" top: "label" transform_param { scale: 0.0039 }'
        ' data_param { source: "mnist_test_lmdb" batch_size: 2 backend: LMDB } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net}" base_lr: 0.01 lr_policy: "fixed" max_iter: 100 '
                           f'display: 0 snapshot_after_train: false solver_mode: CPU')
    solver = get_solver(str(solver_file))
    before = len(opened)
    solver.step(12)
    assert len(opened) - before == 1
    deadline = time.time() + 5  # a prefetch thread lets go at its next wait (0.1 s polls)
    while True:
        try:
            lmdb.open("mnist_test_lmdb", readonly=True, lock=False).close()
            break
        except lmdb.Error:
            assert time.time() < deadline, "the database stayed open after training"
            time.sleep(0.05)
    solver.step(2)  # and training goes on reading it
    assert solver.iter == 14


# -- DenseImageData (SegNet) -------------------------------------------------------------------
@pytest.fixture
def pairs(tmp_path):
    """Five 12 x 16 colour images with label images of class values 0..10."""
    rs = np.random.RandomState(0)
    lines = []
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), (rs.rand(12, 16, 3) * 255).astype(np.uint8))
        cv2.imwrite(str(tmp_path / f"lab{i}.png"), rs.randint(0, 11, (12, 16)).astype(np.uint8))
        lines.append(f"img{i}.png lab{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def dense_layer(root, extra="", transform="", batch_size=2, phase=TRAIN):
    return layer_from(f'type: "DenseImageData" top: "data" top: "label" dense_image_data_param {{ '
                      f'source: "{root}/list.txt" root_folder: "{root}/" batch_size: {batch_size} '
                      f'{extra} }} transform_param {{ {transform} }}', phase)


def test_dense_image_data_reads_pairs_with_caffes_order_flips_and_crops(pairs):
    """caffe-segnet: shuffle as ImageData; per image a flip draw (rand() % 2) and the crop's
    row/column offsets; the mean and scale go to the image, the label keeps its pixel values."""
    caffe.set_random_seed(8)
    layer = dense_layer(pairs, "shuffle: true mirror: true crop_height: 8 crop_width: 10",
                        "mean_value: 100 scale: 0.5")
    assert layer.top_shapes([]) == [(2, 3, 8, 10), (2, 1, 8, 10)]
    from pycaffe_alt.data.pipeline import layer_seed

    shuffle_seed, after = CaffeRNG(8).raw(2).tolist()
    assert caffe.caffe_rng.stream().raw(1)[0] == after  # set-up took one draw: the shuffle seed
    order = np.arange(5)
    CaffeRNG(shuffle_seed).shuffle(order)
    # The flips and crops: the layer's own generator (the fork's thread shares the process-wide
    # stream with the main thread, an order no run repeats).
    rng = CaffeRNG(layer_seed(layer.name) & 0xFFFFFFFF)
    for b in range(2):
        data, label = layer()
        assert layer.last_indices.tolist() == order[2 * b:2 * b + 2].tolist()
        for i, k in enumerate(order[2 * b:2 * b + 2]):
            img = cv2.imread(str(pairs / f"img{k}.png")).astype(np.float32)
            lab = cv2.imread(str(pairs / f"lab{k}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
            if rng.raw(1)[0] % 2:
                img, lab = img[:, ::-1], lab[:, ::-1]
            h_off, w_off = rng.raw(2) % np.array([5, 7])
            img, lab = img[h_off:h_off + 8, w_off:w_off + 10], lab[h_off:h_off + 8, w_off:w_off + 10]
            np.testing.assert_array_equal(data[i].numpy(), (img.transpose(2, 0, 1) - 100) * 0.5)
            np.testing.assert_array_equal(label[i, 0].numpy(), lab)
    state = layer.state()
    ahead = [t.clone() for t in layer()]
    again = dense_layer(pairs, "shuffle: true mirror: true crop_height: 8 crop_width: 10",
                        "mean_value: 100 scale: 0.5")
    again.load_state(state)
    assert all(torch.equal(a, b) for a, b in zip(again(), ahead))


def test_dense_image_data_resizes_labels_nearest_and_takes_any_size_at_batch_1(pairs):
    layer = dense_layer(pairs, "new_height: 6 new_width: 7 is_color: false", phase=TEST)
    data, label = layer()
    assert data.shape == (2, 1, 6, 7) and label.shape == (2, 1, 6, 7)
    lab = cv2.imread(str(pairs / "lab0.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(label[0, 0].numpy(),
                                  cv2.resize(lab, (7, 6), interpolation=cv2.INTER_NEAREST))
    cv2.imwrite(str(pairs / "img1.png"), np.zeros((9, 5, 3), np.uint8))
    cv2.imwrite(str(pairs / "lab1.png"), np.zeros((9, 5), np.uint8))
    one = dense_layer(pairs, batch_size=1, phase=TEST)
    assert one()[0].shape == (1, 3, 12, 16) and one()[1].shape == (1, 1, 9, 5)


def test_dense_image_data_checks_its_mean_at_set_up(pairs):
    # Round 9: a mean that does not fit the images failed at the first batch with numpy's
    # broadcast message; ImageData names it at set-up.
    with pytest.raises(DataError, match="2 mean_value entries for a 3-channel record"):
        dense_layer(pairs, "", "mean_value: 1 mean_value: 2")
    from pycaffe_alt.weights import write_binaryproto

    write_binaryproto(np.zeros((1, 3, 4, 4), np.float32), str(pairs / "mean.binaryproto"))
    with pytest.raises(DataError, match="mean_file has shape"):
        dense_layer(pairs, "", f'mean_file: "{pairs}/mean.binaryproto"')


def test_enet_label_divide_factor_reads_smaller_labels(pairs):
    # ENet's encoder trains against 1/8-size labels: the fork reads the label image at
    # new_height/f x new_width/f, nearest neighbour.
    layer = dense_layer(pairs, "new_height: 12 new_width: 16 label_divide_factor: 4", phase=TEST)
    assert layer.top_shapes([]) == [(2, 3, 12, 16), (2, 1, 3, 4)]
    data, label = layer()
    assert data.shape == (2, 3, 12, 16) and label.shape == (2, 1, 3, 4)
    lab = cv2.imread(str(pairs / "lab0.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(label[0, 0].numpy(),
                                  cv2.resize(lab, (4, 3), interpolation=cv2.INTER_NEAREST))
    for extra, words in (("label_divide_factor: 0", "at least 1"),
                         ("label_divide_factor: 2", "needs new_height"),
                         ("new_height: 12 new_width: 16 crop_height: 8 crop_width: 8 "
                          "label_divide_factor: 2", "no crop_height")):
        with pytest.raises(CaffeError, match=words):
            dense_layer(pairs, extra)


@pytest.mark.parametrize("extra,transform,setup,match", [
    ("", "mirror: true", None, "transform_param mirror/crop_size"),
    ("crop_height: 4", "", None, "only one of crop_height/crop_width"),
    ("crop_height: 20 crop_width: 4", "", "", "crop 20 x 4 is larger than the 12 x 16 image"),
    ("", "", "odd", "lists 11 names"),
    ("", "", "size", "label image .*is 5 x 4"),
])
def test_dense_image_data_bad_input_names_the_problem(pairs, extra, transform, setup, match):
    if setup == "odd":
        (pairs / "list.txt").write_text((pairs / "list.txt").read_text() + "img0.png\n")
    if setup == "size":
        cv2.imwrite(str(pairs / "lab0.png"), np.zeros((4, 5), np.uint8))
    with pytest.raises(CaffeError, match=match):
        layer = dense_layer(pairs, extra, transform, phase=TEST)
        layer()
