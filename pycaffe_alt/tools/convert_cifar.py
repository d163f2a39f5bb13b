"""convert_cifar: CIFAR-10 / CIFAR-100 (python pickles or binary batches) -> train/test LMDBs.

    convert_cifar [--label fine|coarse] INPUT_DIR OUTPUT_DIR [BACKEND]

Same records as Caffe's examples/cifar10/convert_cifar_data.cpp: 3 x 32 x 32 uint8 Datums with keys
``%05d``, written to OUTPUT_DIR/cifar10_{train,test}_lmdb (cifar100_... for CIFAR-100). Note that
Caffe stores CIFAR pixels as the archive has them, in R, G, B plane order (not BGR like images read
with OpenCV); we keep that so existing CIFAR models and mean files stay valid.

INPUT_DIR may hold the extracted archive's files or its top folder (cifar-10-batches-py,
cifar-10-batches-bin, cifar-100-python, cifar-100-binary). The pickles are read with a restricted
unpickler that only rebuilds numpy arrays, lists and dicts (never arbitrary objects).
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import pickle
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..data.datum import array_to_datum
from ..data.db import normalize_backend, open_db
from ..errors import DataError
from ..fileio import read_input_bytes
from .cli import parse_args, progress, run_main

IMAGE_BYTES = 3 * 32 * 32

# (dataset, format) -> (train files, test files); binary records carry 1 (CIFAR-10) or 2 label bytes.
_LAYOUTS = {
    ("cifar10", "python"): ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    ("cifar10", "binary"): ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]),
    ("cifar100", "python"): (["train"], ["test"]),
    ("cifar100", "binary"): (["train.bin"], ["test.bin"]),
}
_ARCHIVE_FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin", "cifar-100-python",
                    "cifar-100-binary")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR pickles: numpy array reconstruction only, nothing executable."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}  # how protocol-2 pickles from Python 3 spell bytes

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # numpy 2 renamed numpy.core to numpy._core; pickles of either era name one of them.
        for candidate in (module.replace("numpy.core", "numpy._core"), module):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot find {module}.{name}")


def detect(input_dir: str) -> Tuple[str, str, str]:
    """(folder holding the files, dataset, format) for an extracted CIFAR archive."""
    for folder in [input_dir] + [os.path.join(input_dir, a) for a in _ARCHIVE_FOLDERS]:
        for (dataset, fmt), (train, test) in _LAYOUTS.items():
            if all(os.path.isfile(os.path.join(folder, f)) for f in train + test):
                return folder, dataset, fmt
    raise DataError("no CIFAR-10 or CIFAR-100 files here (looked for data_batch_1..5 + test_batch, "
                    "or train + test, as pickles or .bin)", where=input_dir,
                    hint="download with data/cifar10/get_cifar10 or data/cifar100/get_cifar100, "
                         "or extract the archive from https://www.cs.toronto.edu/~kriz/cifar.html")


def read_python_batch(path: str, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(N x 3072 uint8 images, N labels) from one pickled batch."""
    try:
        raw = read_input_bytes(path, DataError, "CIFAR batch")
        # latin1 is numpy's advice for Python 2 pickles (the official ones); keys may then be
        # str or, from other writers, bytes.
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            AttributeError) as e:
        raise DataError(f"not a CIFAR python batch with '{label_key}' ({e})", where=path) from None
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES or len(labels) != len(data):
        raise DataError(f"batch data is {data.shape} with {len(labels)} labels, expected "
                        f"N x {IMAGE_BYTES} and N labels", where=path)
    return data, labels


def read_binary_batch(path: str, label_bytes: int, label_index: int) -> Tuple[np.ndarray, np.ndarray]:
    """(N x 3072 uint8 images, N labels) from one binary batch (label byte(s) then the pixels)."""
    raw = np.frombuffer(read_input_bytes(path, DataError, "CIFAR batch"), dtype=np.uint8)
    record = label_bytes + IMAGE_BYTES
    if raw.size == 0 or raw.size % record:
        raise DataError(f"file size {raw.size} is not a multiple of the {record}-byte record",
                        where=path, hint="the file is truncated or is not this CIFAR variant")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:], rows[:, label_index].astype(np.int64)


def read_split(folder: str, dataset: str, fmt: str, files: List[str],
               label: str) -> Tuple[np.ndarray, np.ndarray]:
    """All images and labels of one split, batches concatenated in file order (as Caffe)."""
    parts = []
    for name in files:
        path = os.path.join(folder, name)
        if fmt == "python":
            key = "labels" if dataset == "cifar10" else f"{label}_labels"
            parts.append(read_python_batch(path, key))
        elif dataset == "cifar10":
            parts.append(read_binary_batch(path, 1, 0))
        else:  # CIFAR-100 binary: coarse label byte, then fine label byte
            parts.append(read_binary_batch(path, 2, 0 if label == "coarse" else 1))
        # CIFAR's classes: 10, or 100 fine / 20 coarse. A label outside them is a corrupt or
        # foreign batch; written as is, it would fail far away in a loss layer.
        classes = 10 if dataset == "cifar10" else (20 if label == "coarse" else 100)
        bad = parts[-1][1][(parts[-1][1] < 0) | (parts[-1][1] >= classes)]
        if bad.size:
            raise DataError(f"label {int(bad[0])} is outside {dataset}'s {classes} classes "
                            f"(0..{classes - 1})", where=path,
                            hint="is this a CIFAR batch of the right dataset?")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_db(path: str, backend: str, images: np.ndarray, labels: np.ndarray) -> None:
    with open_db(path, backend, "w") as db:
        for i in progress(range(len(images)), len(images), os.path.basename(path)):
            datum = array_to_datum(images[i].reshape(3, 32, 32), int(labels[i]))
            db.put("%05d" % i, datum.SerializeToString())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="convert_cifar", description=(
        "Convert CIFAR-10/CIFAR-100 (python or binary version) to train/test LMDBs."))
    p.add_argument("input_dir", metavar="INPUT_DIR")
    p.add_argument("output_dir", metavar="OUTPUT_DIR")
    p.add_argument("db_type", metavar="BACKEND", nargs="?", default=None,
                   help="lmdb or leveldb (Caffe's third argument; same as --backend)")
    p.add_argument("--backend", default="lmdb", help="lmdb (default) or leveldb")
    p.add_argument("--label", choices=("fine", "coarse"), default="fine",
                   help="CIFAR-100 label set: fine (100 classes, default) or coarse (20)")
    args = parse_args(p, argv)
    start = time.time()
    backend = normalize_backend(args.db_type or args.backend)
    folder, dataset, fmt = detect(args.input_dir)
    train_files, test_files = _LAYOUTS[(dataset, fmt)]
    # Read (and so validate) both splits before creating anything.
    splits = [(split, *read_split(folder, dataset, fmt, files, args.label))
              for split, files in (("train", train_files), ("test", test_files))]
    os.makedirs(args.output_dir, exist_ok=True)
    for split, images, labels in splits:
        path = os.path.join(args.output_dir, f"{dataset}_{split}_{backend}")
        write_db(path, backend, images, labels)
        print(f"convert_cifar: wrote {len(images)} {dataset} ({fmt}) records to {path}, "
              f"skipped 0, in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
