"""Dataset tools against Caffe's own outputs, tiny MNIST/CIFAR inputs, and bad-input handling."""
import gzip
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pycaffe_alt.data.datum import datum_to_array
from pycaffe_alt.data.db import LMDBReader, LMDBWriter
from pycaffe_alt.errors import DataError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.tools import compute_image_mean, convert_cifar, convert_imageset, convert_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden", "data")


def records(path):
    r = LMDBReader(path)
    return [(r.key(i), r.datum(i), r.value(i)) for i in range(len(r))]


def run_tool(name, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def convert(tmp_path, *flags, root="digits/", listfile="digits_test.txt", name="out"):
    out = str(tmp_path / name)
    convert_imageset.main([*flags, os.path.join(GOLDEN, root), os.path.join(GOLDEN, listfile), out])
    return out


def test_gray_is_byte_identical_to_caffe(tmp_path):
    ours, caffe = records(convert(tmp_path, "--gray")), records(os.path.join(GOLDEN, "mnist_test_lmdb"))
    assert [(k, v) for k, _, v in ours] == [(k, v) for k, _, v in caffe]


def test_resize_matches_caffe(tmp_path):
    out = convert(tmp_path, "-resize_height=36", "-resize_width", "40", root="photos/",
                  listfile="photos.txt")
    ours, caffe = records(out), records(os.path.join(GOLDEN, "photos_resized_lmdb"))
    assert [(k, d.label) for k, d, _ in ours] == [(k, d.label) for k, d, _ in caffe]
    for (_, a, _), (_, b, _) in zip(ours, caffe):
        x, y = datum_to_array(a).astype(int), datum_to_array(b).astype(int)
        assert x.shape == y.shape == (3, 36, 40)
        assert np.abs(x - y).max() <= 3 and np.abs(x - y).mean() <= 0.5


@pytest.mark.parametrize("flags,root,listfile,caffe_db", [
    (["--encoded"], "photos/", "photos.txt", "photos_encoded_lmdb"),
    (["--gray", "--encoded", "--encode_type", "png"], "digits/", "digits_test.txt",
     "mnist_test_encoded_lmdb"),
])
def test_encoded_matches_caffe(tmp_path, flags, root, listfile, caffe_db):
    ours = records(convert(tmp_path, *flags, root=root, listfile=listfile))
    caffe = records(os.path.join(GOLDEN, caffe_db))
    assert [(k, d.label) for k, d, _ in ours] == [(k, d.label) for k, d, _ in caffe]
    for (_, a, _), (_, b, _) in zip(ours, caffe):
        assert a.encoded and np.array_equal(datum_to_array(a), datum_to_array(b))


def test_reencode_when_resizing_and_shuffle_is_seeded(tmp_path):
    a = records(convert(tmp_path, "--encode_type", "png", "--resize_height", "10",
                        "--resize_width", "12", "--shuffle", root="photos/", listfile="photos.txt",
                        name="a"))
    b = records(convert(tmp_path, "--shuffle", root="photos/", listfile="photos.txt", name="b"))
    assert datum_to_array(a[0][1]).shape == (3, 10, 12) and a[0][1].encoded
    names = lambda recs: [k.split(b"_", 1)[1] for k, _, _ in recs]
    assert names(a) == names(b) and names(a) != sorted(names(a))  # same seed, same order


def test_compute_image_mean_equals_caffe(tmp_path):
    out = str(tmp_path / "mean.binaryproto")
    assert compute_image_mean.main([os.path.join(GOLDEN, "photos_resized_lmdb"), out]) == 0
    ours, caffe = caffe_pb2.BlobProto(), caffe_pb2.BlobProto()
    ours.ParseFromString(open(out, "rb").read())
    caffe.ParseFromString(open(os.path.join(GOLDEN, "photos_mean.binaryproto"), "rb").read())
    assert (ours.num, ours.channels, ours.height, ours.width) == (1, 3, 36, 40)
    assert not ours.HasField("shape")  # Caffe writes the legacy 4-D fields only
    np.testing.assert_allclose(ours.data, caffe.data, rtol=1e-5)


def test_compute_image_mean_decodes_encoded(tmp_path):
    raw = compute_image_mean.mean_blob(os.path.join(GOLDEN, "mnist_test_lmdb"))
    enc = compute_image_mean.mean_blob(os.path.join(GOLDEN, "mnist_test_encoded_lmdb"))
    assert (enc.channels, enc.height, enc.width) == (1, 28, 28)
    np.testing.assert_array_equal(raw.data, enc.data)


def write_idx(path, arr, magic, gz):
    raw = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in arr.shape) + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_convert_mnist(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    sfx = ".gz" if gz else ""
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{sfx}", images, 2051, gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{sfx}", labels, 2049, gz)
    assert convert_mnist.main(["--from-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    recs = records(str(tmp_path / "o" / "mnist_test_lmdb"))
    assert [k for k, _, _ in recs] == [b"%08d" % i for i in range(5)]
    assert [d.label for _, d, _ in recs] == labels.tolist()
    assert all(np.array_equal(datum_to_array(d), images[i][None]) for i, (_, d, _) in enumerate(recs))
    with pytest.raises(DataError, match="not an IDX image"):  # swapped arguments
        convert_mnist.convert(str(tmp_path / f"train-labels-idx1-ubyte{sfx}"),
                              str(tmp_path / f"train-images-idx3-ubyte{sfx}"), str(tmp_path / "x"))


def cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_convert_cifar10_python(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batches[name] = (cifar_images(2, i), [i % 10, (i + 1) % 10])
        with open(src / name, "wb") as f:
            pickle.dump({b"data": batches[name][0], b"labels": batches[name][1]}, f, protocol=2)
    assert convert_cifar.main([str(tmp_path), str(tmp_path / "out")]) == 0
    train = records(str(tmp_path / "out" / "cifar10_train_lmdb"))
    assert len(train) == 10 and train[3][0] == b"00003"
    assert train[3][1].label == batches["data_batch_2"][1][1]
    assert np.array_equal(datum_to_array(train[3][1]), batches["data_batch_2"][0][1].reshape(3, 32, 32))
    assert len(records(str(tmp_path / "out" / "cifar10_test_lmdb"))) == 2


@pytest.mark.parametrize("label,index", [("fine", 1), ("coarse", 0)])
def test_convert_cifar100_binary(tmp_path, label, index):
    for name, seed in (("train.bin", 0), ("test.bin", 1)):
        images = cifar_images(3, seed)
        labels = np.array([[1, 50], [2, 60], [3, 70]], np.uint8)
        np.concatenate([labels, images], axis=1).tofile(tmp_path / name)
    assert convert_cifar.main(["--label", label, str(tmp_path), str(tmp_path / "o")]) == 0
    test = records(str(tmp_path / "o" / "cifar100_test_lmdb"))
    assert [d.label for _, d, _ in test] == labels[:, index].tolist()
    assert np.array_equal(datum_to_array(test[2][1]), images[2].reshape(3, 32, 32))


def test_cifar_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="refusing"):
        convert_cifar.read_python_batch(str(tmp_path / "evil"), "labels")


def test_list_file_errors_name_line(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a.png 1\n\nb.png x\n")
    with pytest.raises(DataError, match=r"l.txt:3"):
        convert_imageset.read_list_file(str(lst))
    lst.write_text("a b.png 1\r\nc.png\t2\n\n")
    assert convert_imageset.read_list_file(str(lst)) == [("a b.png", 1), ("c.png", 2)]


# --- through the executables: one paragraph on stderr, exit 1, never a traceback ------------

def assert_clean_failure(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_cli_undecodable_image_is_skipped_and_counted(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("d00512.png", "d00513.png"):
        shutil.copy(os.path.join(GOLDEN, "digits", name), root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "list.txt").write_text("d00512.png 3\nbroken.png 1\nmissing.png 2\nd00513.png 7\n")
    proc = run_tool("convert_imageset", "--gray", f"{root}/", tmp_path / "list.txt", tmp_path / "db")
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr and "missing.png" in proc.stderr
    assert "wrote 2 records" in proc.stdout and "skipped 2" in proc.stdout
    # Keys keep the list position, as Caffe's (line 3 -> 00000003).
    assert [k for k, _, _ in records(str(tmp_path / "db"))] == [b"00000000_d00512.png",
                                                                b"00000003_d00513.png"]


def test_cli_bad_list_line(tmp_path):
    (tmp_path / "list.txt").write_text("d00512.png 3\nd00513.png seven\n")
    proc = run_tool("convert_imageset", f"{GOLDEN}/digits/", tmp_path / "list.txt", tmp_path / "db")
    assert_clean_failure(proc, "list.txt:2")
    assert not (tmp_path / "db").exists()


def test_cli_missing_empty_and_corrupt_databases(tmp_path):
    assert_clean_failure(run_tool("compute_image_mean", tmp_path / "mnist_train_lmdb"),
                         "mnist_train_lmdb", "get_mnist")
    LMDBWriter(str(tmp_path / "empty_lmdb")).close()
    assert_clean_failure(run_tool("compute_image_mean", tmp_path / "empty_lmdb"), "empty_lmdb",
                         "empty")
    with LMDBWriter(str(tmp_path / "bad_lmdb")) as w:
        w.put("00000000", b"\xff\xff\xff")
    assert_clean_failure(run_tool("compute_image_mean", tmp_path / "bad_lmdb"),
                         "bad_lmdb key '00000000'")
