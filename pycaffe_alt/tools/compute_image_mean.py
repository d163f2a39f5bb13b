"""compute_image_mean: the per-pixel mean of every record in a database, as a BlobProto.

    compute_image_mean [--backend lmdb] INPUT_DB [OUTPUT_FILE]

Follows Caffe's tools/compute_image_mean.cpp: encoded records are decoded with their own channels,
the sum is kept in the BlobProto's float32 ``data`` (so it rounds like Caffe's), divided by the
record count, and written with the legacy num=1/channels/height/width fields.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import time
from typing import Optional, Sequence, Tuple

import numpy as np

from ..data.datum import datum_to_array, too_large
from ..data.db import open_db
from ..errors import DataError
from ..fileio import atomic_write, check_output_file
from ..log import format_value, get_logger, setup_tool_logging
from ..proto import caffe_pb2
from ..weights import array_to_blob
from .cli import parse_args, progress, run_main

# Caffe logs "Processed N files." every 10000 records (and after the last).
_REPORT_EVERY = 10000


def mean_blob(db_path: str, backend: str = "lmdb") -> "caffe_pb2.BlobProto":
    """Mean image of all records of the database as Caffe's BlobProto (num=1, C, H, W)."""
    log = get_logger()
    reader = open_db(db_path, backend, "r")
    try:
        total = None
        shape = None
        if len(reader) and reader.datum(0).encoded:
            log.info("Decoding Datum")
        log.info("Starting iteration")
        for i in progress(range(len(reader)), len(reader), "compute_image_mean"):
            pixels = datum_to_array(reader.datum(i), where=reader.where(i))
            if shape is None:
                check_mean_size(pixels.shape, reader.where(i))
                shape = pixels.shape
                total = np.zeros(pixels.size, dtype=np.float32)
            elif pixels.shape != shape:
                raise DataError(f"record is {'x'.join(map(str, pixels.shape))} but the first is "
                                f"{'x'.join(map(str, shape))}; a mean needs equal sizes",
                                where=reader.where(i),
                                hint="convert with --resize_height/--resize_width")
            # float32 accumulation, one record at a time, as Caffe adds into BlobProto.data.
            total += pixels.reshape(-1).astype(np.float32)
            if (i + 1) % _REPORT_EVERY == 0:
                log.info("Processed %d files.", i + 1)
        count = len(reader)
        if count % _REPORT_EVERY:
            log.info("Processed %d files.", count)
    finally:
        reader.close()
    return array_to_blob((total / np.float32(count)).astype(np.float32).reshape((1,) + shape),
                         legacy_dims=True)


def log_channel_means(blob: "caffe_pb2.BlobProto") -> None:
    """compute_image_mean.cpp's closing lines, on stderr as all its lines: the number of channels
    and each channel's mean value (what a prototxt's ``mean_value`` takes). Caffe adds a
    channel's values one by one into a float, so the sum is taken the same way (cumsum adds in
    order; a pairwise or double sum can differ in the last printed digit)."""
    log = get_logger()
    log.info("Number of channels: %d", blob.channels)
    mean = np.asarray(blob.data, dtype=np.float32).reshape(blob.channels, -1)
    for c, values in enumerate(mean):
        channel_sum = np.cumsum(values, dtype=np.float32)[-1]
        log.info("mean_value channel [%d]: %s", c, format_value(channel_sum / np.float32(values.size)))


def check_mean_size(shape: Tuple[int, ...], where: str) -> None:
    """Refuse an empty record, or a mean no BlobProto can hold (2 GiB of floats) or this
    machine cannot sum, before anything is accumulated."""
    size = int(np.prod(shape))
    if size == 0:
        raise DataError(f"record has no pixels (shape {'x'.join(map(str, shape))})", where=where,
                        hint="the record is empty or corrupt; re-create the database")
    why = too_large(size * 4, "BlobProto")
    if why is not None:
        raise DataError(f"records of {'x'.join(map(str, shape))} pixels need a mean of "
                        f"{size * 4:,} bytes, {why}", where=where,
                        hint="resize the images when creating the database (convert_imageset "
                             "--resize_height/--resize_width)")


# The files an LMDB (data.mdb, lock.mdb) or a LevelDB keeps in its folder.
_DB_FILE_NAMES = ("data.mdb", "lock.mdb", "CURRENT", "LOCK", "LOG", "LOG.old")
_DB_FILE_PATTERNS = ("MANIFEST-*", "*.ldb", "*.sst", "*.log")


def check_output_outside_db(db_path: str, output_file: str) -> None:
    """Refuse an output that is the database itself (a single-file LMDB) or one of the files
    in its folder (``DB/data.mdb``, a LevelDB table): the mean would silently replace the
    records it was computed from. Checked before the records are read."""
    if not (os.path.isfile(output_file) and os.path.exists(db_path)):
        return
    name = os.path.basename(output_file)
    in_folder = os.path.isdir(db_path) and os.path.samefile(
        os.path.dirname(os.path.abspath(output_file)), db_path)
    is_db_file = name in _DB_FILE_NAMES or any(fnmatch.fnmatchcase(name, p) for p in _DB_FILE_PATTERNS)
    if os.path.samefile(output_file, db_path) or (in_folder and is_db_file):
        raise DataError(f"OUTPUT_FILE '{output_file}' is a file of the input database "
                        f"'{db_path}': the mean would replace it",
                        hint="write the mean outside the database, e.g. mean.binaryproto")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="compute_image_mean",
                                description="Compute the mean image of a leveldb/lmdb.")
    p.add_argument("input_db", metavar="INPUT_DB")
    p.add_argument("output_file", metavar="OUTPUT_FILE", nargs="?",
                   help="binaryproto to write (omitted: only print the channel means)")
    p.add_argument("--backend", default="lmdb", help="lmdb (default) or leveldb")
    args = parse_args(p, argv)
    setup_tool_logging()
    start = time.time()
    if args.output_file:
        # Before the records are read (a large database takes minutes): a folder, FIFO or
        # device, or a missing folder, was refused only after the mean was computed.
        check_output_file(args.output_file, DataError)
        check_output_outside_db(args.input_db, args.output_file)
    blob = mean_blob(args.input_db, args.backend)
    if args.output_file:
        get_logger().info("Write to %s", args.output_file)
        # Atomic: an interrupted run keeps the old file, and a FIFO or device given as the
        # output is replaced by the file instead of blocking the write.
        atomic_write(args.output_file, blob.SerializeToString(), DataError)
    log_channel_means(blob)
    print(f"compute_image_mean: {blob.channels}x{blob.height}x{blob.width} mean of "
          f"{args.input_db}" + (f" written to {args.output_file}" if args.output_file else "")
          + f" in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
