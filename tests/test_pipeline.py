"""Input pipeline: order, prefetch engines (thread / worker processes), exact resume."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from layer_check import make_layer
from pycaffe_alt import set_random_seed
from pycaffe_alt.data.datum import array_to_datum
from pycaffe_alt.data.db import open_db
from pycaffe_alt.data.pipeline import Ordering
from pycaffe_alt.errors import DataError
from pycaffe_alt.layers import TRAIN

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data")
MNIST = os.path.join(GOLDEN, "mnist_test_lmdb")  # 128 records


def train_layer(source=MNIST, batch_size=48, transform="crop_size: 24 mirror: true", seed=5,
                extra=""):
    set_random_seed(seed)  # torch's generator and Caffe's stream (the transformer's seed)
    return make_layer(f'name: "data" type: "Data" top: "data" top: "label" transform_param '
                      f'{{ {transform} }} data_param {{ source: "{source}" batch_size: {batch_size} '
                      f'backend: LMDB {extra} }}', [], TRAIN)


def take(layer, n):
    out = []
    for _ in range(n):
        data, label = layer()
        out.append((data.clone(), label.clone(), layer.last_indices.clone()))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (d1, l1, i1), (d2, l2, i2) in zip(a, b):
        assert torch.equal(d1, d2) and torch.equal(l1, l2) and torch.equal(i1, i2)


def test_ordering_wraps_skips_and_shuffles():
    o = Ordering(5, skip=3)
    assert o.indices(0, 7).tolist() == [3, 4, 0, 1, 2, 3, 4]
    s = Ordering(6, shuffle=True, seed=9)
    first, second = s.indices(0, 6), s.indices(6, 6)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(6))
    assert first.tolist() != second.tolist()
    # Any window gives the same indices as the whole sequence, wherever it starts.
    assert s.indices(4, 5).tolist() == np.concatenate([first, second])[4:9].tolist()


def test_thread_prefetch_order_is_key_order_with_wrap():
    layer = train_layer(transform="", batch_size=50)
    idx = [b[2].tolist() for b in take(layer, 3)]
    assert idx[0] == list(range(50)) and idx[2][:28] == list(range(100, 128))
    assert idx[2][28:] == list(range(22))
    layer.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_give_the_single_process_batches(workers):
    single = train_layer()
    expected = take(single, 5)  # wraps past the 128 records
    single.close()
    multi = train_layer()
    multi.set_pipeline(workers=workers)
    assert_same(take(multi, 5), expected)
    multi.close()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_state_and_load_state_continue_exactly(workers, shuffle):
    straight = train_layer()
    straight.set_pipeline(shuffle=shuffle)
    expected = take(straight, 6)
    straight.close()

    first = train_layer()
    first.set_pipeline(workers=workers, shuffle=shuffle)
    head = take(first, 3)
    state = first.state()
    take(first, 1)  # reading on after the snapshot does not matter
    first.close()

    resumed = train_layer(seed=123)  # a different torch seed: the state carries the layer's
    resumed.set_pipeline(workers=workers)
    resumed.load_state(state)
    assert_same(head + take(resumed, 3), expected)
    resumed.close()


def test_shuffle_is_off_by_default_and_per_pass_when_on():
    layer = train_layer(transform="", batch_size=64)
    layer.set_pipeline(shuffle=True)
    a = torch.cat([layer.forward()[1] is not None and layer.last_indices for _ in range(2)])
    b = torch.cat([layer.forward()[1] is not None and layer.last_indices for _ in range(2)])
    assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(128))
    assert a.tolist() != list(range(128)) and a.tolist() != b.tolist()
    layer.close()


def test_load_state_refuses_another_dataset():
    layer = train_layer(batch_size=10)
    state = layer.state()
    state["num_records"] = 99
    with pytest.raises(DataError, match="99 records"):
        layer.load_state(state)
    with pytest.raises(DataError, match="malformed"):
        layer.load_state({"batch": 1})
    layer.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_errors_reach_the_caller_as_data_errors(tmp_path, workers):
    with open_db(str(tmp_path / "db"), "lmdb", "w") as db:
        for i in range(4):
            db.put(f"{i:08d}", array_to_datum(np.zeros((1, 4, 4), np.uint8), i).SerializeToString()
                   if i != 2 else b"\xff\xff\xff")
    layer = train_layer(str(tmp_path / "db"), batch_size=2, transform="")
    layer.set_pipeline(workers=workers)
    layer()
    with pytest.raises(DataError, match="00000002"):
        layer()
    layer.close()


def test_batches_follow_the_layer_device():
    layer = train_layer(transform="", batch_size=4)
    assert layer().__getitem__(0).device.type == "cpu"
    if torch.cuda.is_available():
        layer.to("cuda")
        data, label = layer()
        assert data.is_cuda and label.is_cuda and not layer.last_indices.is_cuda
    layer.close()


def test_worker_processes_leave_no_temp_folders(tmp_path):
    """Workers stopped by close() leave no multiprocessing folder (/tmp/pymp-*) behind: they
    share the one this process made, removed when it exits (one per worker per run before)."""
    code = ("import sys; sys.path[:0] = [%r]\n"
            "from test_pipeline import train_layer, take\n"
            "layer = train_layer(); layer.set_pipeline(workers=2); take(layer, 3); layer.close()\n"
            % os.path.dirname(__file__))
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("pymp-")] == []
