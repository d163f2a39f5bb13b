"""``extract_features``: blobs of a trained net, one Datum per example, into new databases.

    extract_features PRETRAINED_WEIGHTS FEATURE_PROTOTXT BLOB1[,BLOB2...] DB1[,DB2...] \\
        NUM_MINI_BATCHES lmdb|leveldb [CPU|GPU] [DEVICE_ID]

Caffe's tools/extract_features.cpp, argument for argument: the net (TEST phase, its data layers
feeding it) runs NUM_MINI_BATCHES forward passes; after each, every example of each named blob
becomes a Datum (channels/height/width are the blob's legacy axes 1-3, ``float_data`` its values)
stored under the key ``%010d`` of its running index in that blob's database. Where Caffe would
carry on with a surprise we stop with a message: weights that match no layer of the net (the
features would be the random initial weights'), a blob of more than 4 axes (Caffe's legacy
accessors abort), an output database that exists, a count that is not a positive integer
(Caffe's ``atoi`` reads "ten" as 0). A failed run leaves no half-written database behind.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..data.datum import decimal_label
from ..data.db import normalize_backend, open_db
from ..errors import CaffeError, WeightsError
from ..log import get_logger, setup_tool_logging
from ..mode import resolve_device
from ..proto import caffe_pb2
from ..weights import warn_uncovered
from .cli import parse_args, run_main

# Caffe commits (and logs) every 1000 records of a database.
_REPORT_EVERY = 1000


def legacy_dims(shape: Sequence[int], blob: str) -> List[int]:
    """Caffe's ``num, channels, height, width`` of a blob (absent axes are 1); more than four
    axes is an error, as Blob::LegacyShape's CHECK."""
    if len(shape) > 4:
        raise CaffeError(f"blob '{blob}' has {len(shape)} axes {tuple(shape)}; a Datum holds at "
                         "most 4 (num, channels, height, width)",
                         hint="extract a blob of at most 4 axes, e.g. add a Reshape or Flatten "
                              "layer above it to the feature prototxt")
    return [int(d) for d in shape] + [1] * (4 - len(shape))


def _report(count: int, blob: str) -> None:
    # Caffe's progress line, every 1000 records of a database and at its end.
    get_logger().info("Extracted features of %d query images for feature blob %s", count, blob)


def feature_datum(values: np.ndarray, dims: Sequence[int]) -> bytes:
    """One example's features as Caffe writes them: channels/height/width and ``float_data``
    (no label, no ``data`` bytes)."""
    datum = caffe_pb2.Datum(channels=dims[1], height=dims[2], width=dims[3])
    datum.float_data.extend(values.ravel().tolist())
    return datum.SerializeToString()


def extract_features(net, blob_names: Sequence[str], db_paths: Sequence[str], num_batches: int,
                     backend: str = "lmdb") -> List[int]:
    """Run ``num_batches`` forward passes of ``net`` and write each blob's examples into its new
    database (``db_paths[i]`` for ``blob_names[i]``); returns the number written to each.

    The databases are created only after every argument checks out, and removed again if the
    run fails or is interrupted.
    """
    blob_names, db_paths = list(blob_names), list(db_paths)
    if len(blob_names) != len(db_paths) or not blob_names:
        raise CaffeError(f"{len(blob_names)} feature blob(s) {blob_names} but {len(db_paths)} "
                         f"database(s) {db_paths}: the numbers must be equal and not zero",
                         hint="give one database name per blob, both lists separated by commas")
    if len({os.path.realpath(p) for p in db_paths}) != len(db_paths):
        raise CaffeError(f"the database names {db_paths} repeat one",
                         hint="every blob needs its own database")
    for name in blob_names:
        if name not in net.blobs:
            raise CaffeError(f"unknown feature blob name '{name}' in the network",
                             where=str(net.source or ""),
                             hint="blobs: " + ", ".join(list(net.blobs)[:30]))
        legacy_dims(net.blobs[name].shape, name)  # before any database is made
    if net.inputs:
        # Nothing fills an Input blob here (Caffe's tool runs the net as it is, on zeros):
        # the features would be the net's response to zeros.
        raise CaffeError(f"the net has input blob(s) {', '.join(net.inputs)} that nothing fills; "
                         "extract_features runs the net's own data layers",
                         where=str(net.source or ""),
                         hint="use a prototxt whose data layers (Data, ImageData, HDF5Data...) "
                              "read the examples, or call pycaffe's forward with your arrays")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise CaffeError(f"number of mini-batches {num_batches!r}: must be a positive integer")
    backend = normalize_backend(backend)
    log = get_logger()
    counts = [0] * len(blob_names)
    with contextlib.ExitStack() as stack:
        writers = []
        for path in db_paths:
            log.info("Opening dataset %s", path)
            writers.append(stack.enter_context(open_db(path, backend, "w")))
        log.info("Extracting Features")
        with torch.no_grad():
            for _ in range(num_batches):
                values = net.run()
                for i, name in enumerate(blob_names):
                    data = values[name].detach().float().cpu().numpy()
                    dims = legacy_dims(data.shape, name)
                    rows = data.reshape(dims[0], -1) if dims[0] else ()  # a batch of 0
                    for row in rows:
                        writers[i].put(f"{counts[i]:010d}", feature_datum(row, dims))
                        counts[i] += 1
                        if counts[i] % _REPORT_EVERY == 0:
                            _report(counts[i], name)
    for name, n in zip(blob_names, counts):
        if n % _REPORT_EVERY:
            _report(n, name)
    log.info("Successfully extracted the features!")
    return counts


def _positive_int(text: str) -> int:
    # ASCII decimals, as Caffe's atoi reads them (int() took "1_0" as 10 and other scripts'
    # digits, which atoi reads as 1 and 0).
    value = decimal_label(text) or 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    if value >= 2 ** 31:  # Caffe's atoi into an int cannot hold it; here it ran for ever
        raise argparse.ArgumentTypeError(f"{text} does not fit in a 32-bit signed integer "
                                         "(Caffe reads NUM_MINI_BATCHES into an int)")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="extract_features",
        description="Extract blobs of a trained net (fed by its data layers) into LMDB/LevelDB "
                    "databases of Datums, as Caffe's extract_features.")
    p.add_argument("weights", metavar="PRETRAINED_NET_PARAM", help="the .caffemodel (or .h5)")
    p.add_argument("model", metavar="FEATURE_EXTRACTION_PROTO_FILE",
                   help="the net prototxt, with data layers (TEST phase)")
    p.add_argument("blobs", metavar="BLOB1[,BLOB2,...]", help="blob names, comma-separated")
    p.add_argument("datasets", metavar="DB1[,DB2,...]",
                   help="one new database per blob, comma-separated")
    p.add_argument("num_mini_batches", metavar="NUM_MINI_BATCHES", type=_positive_int)
    p.add_argument("db_type", metavar="DB_TYPE", help="lmdb or leveldb")
    p.add_argument("mode", metavar="CPU|GPU", nargs="?", default="CPU")
    p.add_argument("device_id", metavar="DEVICE_ID", nargs="?", type=int, default=0)
    p.add_argument("--allow-python", "--allow_python", action="store_true",
                   help="allow Python layers (they run code named in the prototxt)")
    args = parse_args(p, argv)
    if args.mode.upper() not in ("CPU", "GPU"):
        raise CaffeError(f"mode {args.mode!r}: expected CPU or GPU",
                         hint="extract_features W.caffemodel net.prototxt fc7 fc7_db 10 lmdb GPU 0")
    gpu = args.mode.upper() == "GPU"
    if gpu and args.device_id < 0:  # Caffe: CHECK_GE(device_id, 0)
        raise CaffeError(f"device id {args.device_id}: must be >= 0")
    if gpu and not torch.cuda.is_available():
        raise CaffeError("GPU: no CUDA device is available to PyTorch",
                         hint="give CPU (or nothing) as the mode, or install a CUDA build of torch")
    setup_tool_logging()
    from ..net import Net

    start = time.time()
    device = resolve_device(args.device_id if gpu else None)
    normalize_backend(args.db_type)  # an unknown type is refused before the net is built
    net = Net(args.model, caffe_pb2.TEST, allow_python=args.allow_python, device=device)
    copied = net.copy_from(args.weights)
    if not copied and len(net.params):
        raise WeightsError("no layer of the weights file has the name of a layer of the net, so "
                           "the features would be those of the random initial weights",
                           where=args.weights,
                           hint=f"check that the weights belong to {args.model}")
    warn_uncovered([args.weights], copied, net.params)
    counts = extract_features(net, args.blobs.split(","), args.datasets.split(","),
                              args.num_mini_batches, args.db_type)
    print(f"extract_features: {', '.join(f'{n} records of {b}' for n, b in zip(counts, args.blobs.split(',')))}"
          f" in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
