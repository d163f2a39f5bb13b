"""convert_imageset: a folder of images + a list file -> LMDB/LevelDB of Datum records, as Caffe's tool.

    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

Each LISTFILE line is ``relative/path.jpg LABEL`` (the label after the last space; paths may contain
spaces). Record keys are ``%08d_<path>`` with the line's position (after --shuffle), as Caffe writes
them, so a skipped image leaves a gap in the numbering exactly as in Caffe.
"""
from __future__ import annotations

import argparse
import random
import shutil
import time
from typing import List, Optional, Sequence, Tuple

from google.protobuf.message import EncodeError

from ..data.datum import decimal_label, too_large
from ..data.db import normalize_backend, open_db
from ..data.image import guess_encoding, image_to_datum
from ..errors import DataError
from ..fileio import read_input_bytes
from ..log import get_logger, setup_tool_logging
from .cli import add_bool_flag, int32, parse_args, progress, run_main, warn

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
_BOOL_FLAGS = ("gray", "shuffle", "check_size", "encoded")
# Caffe commits, and logs "Processed N files.", every 1000 records (and after the last).
_REPORT_EVERY = 1000


def read_list_file(path: str) -> List[Tuple[str, int]]:
    """(relative filename, label) per non-blank line; a malformed line raises naming its number."""
    try:
        text = read_input_bytes(path, DataError, "list file").decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("the list file is not UTF-8 text", where=path) from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue  # blank lines (typically a trailing one) are not entries
        # Caffe splits at the last space, so file names may contain spaces; tabs are accepted too.
        name, _, label = line.rstrip().rpartition(" ")
        if not name and "\t" in line:
            name, _, label = line.rstrip().rpartition("\t")
        value = decimal_label(label)
        if not name.strip() or value is None:
            raise DataError(f"malformed line {line!r}: expected 'FILENAME LABEL' with an integer "
                            f"label", where=f"{path}:{number}",
                            hint="one image per line: a path relative to ROOTFOLDER, a space, "
                                 "the integer label")
        if not INT32_MIN <= value <= INT32_MAX:  # Datum.label is an int32
            raise DataError(f"label {value} does not fit the Datum's int32 label",
                            where=f"{path}:{number}",
                            hint=f"labels are integers from {INT32_MIN} to {INT32_MAX}")
        entries.append((name.strip("\t"), value))
    return entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_imageset",
        description="Convert a set of images to an LMDB/LevelDB of Caffe Datum records.")
    p.add_argument("root_folder", metavar="ROOTFOLDER/",
                   help="prefix joined to each listed file name (Caffe concatenates the strings: "
                        "keep the trailing slash)")
    p.add_argument("list_file", metavar="LISTFILE", help="lines of 'relative/path LABEL'")
    p.add_argument("db_name", metavar="DB_NAME", help="database to create (must not exist)")
    add_bool_flag(p, "gray", "treat images as grayscale (1 channel)")
    add_bool_flag(p, "shuffle", "randomly shuffle the order of images and their labels")
    p.add_argument("--seed", type=int32, default=0,
                   help="seed for --shuffle (ours; Caffe's shuffle is unseeded)")
    p.add_argument("--backend", default="lmdb", help="lmdb (default) or leveldb")
    p.add_argument("--resize_width", type=int32, default=0, help="width images are resized to")
    p.add_argument("--resize_height", type=int32, default=0, help="height images are resized to")
    add_bool_flag(p, "check_size", "check that all images have the same size")
    add_bool_flag(p, "encoded", "store the encoded image (the file bytes) in the Datum")
    p.add_argument("--encode_type", default="",
                   help="encode images as this type ('png', 'jpg', ...); implies --encoded")
    return p


def convert(root_folder: str, list_file: str, db_name: str, gray: bool = False,
            shuffle: bool = False, seed: int = 0, backend: str = "lmdb", resize_width: int = 0,
            resize_height: int = 0, check_size: bool = False, encoded: bool = False,
            encode_type: str = "") -> Tuple[int, List[str]]:
    """Write the database; returns (records written, warnings for skipped images)."""
    backend = normalize_backend(backend)
    entries = read_list_file(list_file)
    if not entries:
        # Caffe writes an empty database here, which a Data layer then refuses to read from.
        raise DataError("the list file names no image, so no database was written",
                        where=list_file, hint="one image per line: a path relative to ROOTFOLDER, "
                                              "a space, the integer label")
    log = get_logger()
    if shuffle:
        log.info("Shuffling data")
        random.Random(seed).shuffle(entries)
    log.info("A total of %d images.", len(entries))
    # Caffe: an encode_type alone means encoded output; negative sizes mean "no resize"
    # (std::max(0, FLAGS_resize_*)), accepted without a word: we accept them with one.
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
    encoded = encoded or bool(encode_type)
    for flag, value in (("--resize_height", resize_height), ("--resize_width", resize_width)):
        if value < 0:
            warn(f"{flag} {value} is negative; as in Caffe it is taken as 0 (no resize)")
    resize_height, resize_width = max(0, resize_height), max(0, resize_width)
    if encode_type:
        _check_encode_type(encode_type)
    if resize_height and resize_width:  # Caffe resizes only when both are given
        _check_resized_size(resize_height, resize_width, 1 if gray else 3, encoded)
    skipped: List[str] = []
    first_shape = None
    with open_db(db_name, backend, "w") as db:
        for line_id, (name, label) in enumerate(progress(entries, len(entries), "convert_imageset")):
            encoding = encode_type or (guess_encoding(name) if encoded else "")
            path = root_folder + name  # Caffe concatenates ROOTFOLDER and the name as strings
            try:
                datum = image_to_datum(path, label, resize_height, resize_width, not gray, encoding)
            except DataError as e:
                message = f"skipping {name!r}: {e.message()}"
                warn(message)
                skipped.append(message)
                continue
            if check_size and not datum.encoded:
                shape = (datum.channels, datum.height, datum.width)
                if first_shape is None:
                    first_shape = shape
                elif shape != first_shape:
                    raise DataError(f"image is {shape[0]}x{shape[1]}x{shape[2]} but the first one "
                                    f"was {first_shape[0]}x{first_shape[1]}x{first_shape[2]} "
                                    f"(--check_size)", where=path,
                                    hint="resize with --resize_height/--resize_width")
            try:
                value = datum.SerializeToString()
            except EncodeError:  # protobuf's 2 GiB message limit
                message = (f"skipping {name!r}: its {datum.channels}x{datum.height}x{datum.width} "
                           "pixels are more than a Datum (at most 2 GiB) can hold")
                warn(message)
                skipped.append(message)
                continue
            db.put("%08d_%s" % (line_id, name), value)
            if db.count % _REPORT_EVERY == 0:
                log.info("Processed %d files.", db.count)
        written = db.count
        if written % _REPORT_EVERY:
            log.info("Processed %d files.", written)
    return written, skipped


def _check_encode_type(encode_type: str) -> None:
    """Refuse once, up front, an --encode_type OpenCV cannot write (otherwise every image is
    skipped with the same warning)."""
    import cv2

    if not cv2.haveImageWriter("x." + encode_type):
        raise DataError(f"--encode_type {encode_type!r}: OpenCV cannot encode images as that type",
                        hint="use png or jpg (or another extension OpenCV writes: bmp, tif, ...)")


def _check_resized_size(height: int, width: int, channels: int, encoded: bool) -> None:
    """Refuse, before any image is read, a resize this machine cannot hold in memory (OpenCV's
    own allocation failure would come with no word on the flags) or, for raw records, no Datum
    can hold (protobuf messages are at most 2 GiB; an encoded Datum holds the re-encoded file,
    whose size is checked per image)."""
    size = height * width * channels
    why = too_large(size, None if encoded else "Datum")
    if why is not None:
        raise DataError(f"--resize_height {height} --resize_width {width} makes every image "
                        f"{channels}x{height}x{width} = {size:,} bytes, {why}",
                        hint="choose a smaller size")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv, _BOOL_FLAGS)
    setup_tool_logging()
    start = time.time()
    # A failed or interrupted run leaves no half-written database: the writer removes it.
    written, skipped = convert(args.root_folder, args.list_file, args.db_name, args.gray,
                               args.shuffle, args.seed, args.backend, args.resize_width,
                               args.resize_height, args.check_size, args.encoded, args.encode_type)
    if written == 0:
        shutil.rmtree(args.db_name, ignore_errors=True)
        raise DataError("no image could be read, so no database was written", where=args.list_file,
                        hint="check ROOTFOLDER (it is prefixed to each listed name) and the files")
    print(f"convert_imageset: wrote {written} records to {args.db_name}, skipped {len(skipped)} "
          f"unreadable images, in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
