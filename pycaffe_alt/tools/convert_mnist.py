"""convert_mnist: MNIST-format IDX files (plain or gzipped) -> LMDB of 1 x rows x cols uint8 Datums.

    convert_mnist [--backend lmdb] IMAGES LABELS OUTPUT_DB
    convert_mnist --from-dir DIR --out OUTDIR     (-> OUTDIR/mnist_train_lmdb, OUTDIR/mnist_test_lmdb)

Same records as Caffe's examples/mnist/convert_mnist_data.cpp: keys ``%08d`` (item index), raw
pixels, label. Works for Fashion-MNIST (same format and file names), e.g. Debian's
dataset-fashion-mnist: ``convert_mnist --from-dir /usr/share/datasets/fashion-mnist --out data/fashion``.
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import time
from typing import Optional, Sequence, Tuple

import numpy as np

from ..data.datum import array_to_datum
from ..data.db import normalize_backend, open_db
from ..errors import DataError
from ..fileio import read_input_bytes
from .cli import parse_args, progress, run_main

IMAGE_MAGIC = 2051  # IDX: unsigned byte, 3 dimensions
LABEL_MAGIC = 2049  # IDX: unsigned byte, 1 dimension


def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file (gzipped when it starts with the gzip signature) as a uint8 array."""
    try:
        raw = read_input_bytes(path, DataError, "IDX file")
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as e:  # includes gzip.BadGzipFile
        raise DataError(f"cannot read IDX file ({e.strerror or e})", where=path) from None
    except EOFError:
        raise DataError("gzipped IDX file is truncated", where=path) from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        kind = "image (magic 2051)" if magic == IMAGE_MAGIC else "label (magic 2049)"
        raise DataError(f"not an IDX {kind} file (magic {found})", where=path,
                        hint="pass the images file first and the labels file second")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)  # Python ints: numpy's int64 product of 2^31 x 2^16 x 2^16 wraps
    if len(raw) - header < size:
        raise DataError(f"IDX file is truncated: header says {'x'.join(map(str, dims))} "
                        f"({size} bytes) but only {len(raw) - header} follow", where=path)
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims)


def convert(images_path: str, labels_path: str, db_path: str, backend: str = "lmdb") -> int:
    """Write one LMDB from an image and a label IDX file; returns the record count."""
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    if images.ndim != 3 or 0 in images.shape:
        # An empty database or empty images would only fail later, in a Data layer or a mean.
        raise DataError(f"the image file holds {' x '.join(map(str, images.shape))} "
                        "(images x rows x columns): nothing to convert", where=images_path,
                        hint="give an MNIST image file (idx3-ubyte) with at least one image")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels", where=labels_path,
                        hint="the two files must come from the same split (train or t10k)")
    with open_db(db_path, normalize_backend(backend), "w") as db:
        for i in progress(range(len(images)), len(images), os.path.basename(db_path)):
            db.put("%08d" % i, array_to_datum(images[i][None], int(labels[i])).SerializeToString())
    return len(images)


def find_split(directory: str, split: str) -> Tuple[str, str]:
    """(images, labels) of ``split`` ("train" / "t10k") in ``directory``, gzipped or not."""
    found = []
    for kind, rank in (("images", 3), ("labels", 1)):
        names = [f"{split}-{kind}-idx{rank}-ubyte", f"{split}-{kind}.idx{rank}-ubyte"]
        candidates = [os.path.join(directory, n + gz) for n in names for gz in ("", ".gz")]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise DataError(f"no {split}-{kind}-idx{rank}-ubyte[.gz] in this folder", where=directory,
                            hint="download MNIST with data/mnist/get_mnist, or install Debian's "
                                 "dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)")
        found.append(path)
    return found[0], found[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="convert_mnist", description=(
        "Convert MNIST/Fashion-MNIST IDX files (optionally .gz) to an LMDB of Caffe Datums."))
    p.add_argument("files", nargs="*", metavar="IMAGES LABELS OUTPUT_DB")
    p.add_argument("--from-dir", "--from_dir", dest="from_dir", metavar="DIR",
                   help="folder with train-/t10k- images and labels files")
    p.add_argument("--out", metavar="OUTDIR",
                   help="with --from-dir: where mnist_train_lmdb and mnist_test_lmdb are written")
    p.add_argument("--prefix", default="mnist",
                   help="with --from-dir: database name prefix (default mnist)")
    p.add_argument("--backend", default="lmdb", help="lmdb (default) or leveldb")
    args = parse_args(p, argv)
    start = time.time()
    backend = normalize_backend(args.backend)
    if args.from_dir:
        if args.files or not args.out:
            p.error("--from-dir takes --out OUTDIR and no positional files")
        jobs = [(*find_split(args.from_dir, split),
                 os.path.join(args.out, f"{args.prefix}_{name}_{backend}"))
                for split, name in (("train", "train"), ("t10k", "test"))]
        os.makedirs(args.out, exist_ok=True)
    elif len(args.files) == 3:
        jobs = [tuple(args.files)]
    else:
        p.error("give IMAGES LABELS OUTPUT_DB, or --from-dir DIR --out OUTDIR")
    for images, labels, db_path in jobs:
        count = convert(images, labels, db_path, backend)
        print(f"convert_mnist: wrote {count} records to {db_path}, skipped 0, "
              f"in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
