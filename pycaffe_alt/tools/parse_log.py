"""``tools/parse_log``: a training log -> ``<log>.train`` and ``<log>.test`` CSV tables.

The same job as Caffe's ``tools/extra/parse_log.py``, and the same output layout: columns
``NumIters, Seconds, LearningRate`` then one column per net output (``loss``, ``accuracy``, ...),
one row per logged iteration (train) or per test pass (test). It reads any glog-formatted log,
Caffe's or ours, in either timestamp style (``I1123 05:20:04.578788`` or glog >= 0.6's
``I20261123 05:20:04.578788``).

Where it deliberately differs from Caffe's script (documented so that nobody is surprised):
- A train row's ``LearningRate`` is the rate logged for *that* iteration (``Iteration N, lr = X``
  comes after the outputs of iteration N); Caffe's script attaches the previous iteration's rate.
  A test row at iteration N gets the rate used for iteration N.
- Rows are built per iteration, so a net whose outputs differ in number between lines, or a log
  holding several runs (a resumed run appended to the first), still gives one row per iteration
  and pass, in log order.
- When the log has ``Iteration N, loss = X`` lines (Caffe's smoothed display loss), their value is
  added as a last column ``SmoothedLoss`` of the train table; with ``average_loss: 1`` it equals
  the ``loss`` output.
- Outputs of a second test net (``Testing net (#1)``) get the column suffix ``#1``.
- ``nan``/``inf`` values (a diverged run) are kept, not dropped.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import os
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import CaffeError
from ..fileio import atomic_write, check_input_path
from .cli import parse_args, run_main

Row = "OrderedDict[str, float]"

_NUMBER = r"[-+]?(?:nan|inf|infinity|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
# glog's prefix: severity, [yyyy]mmdd, hh:mm:ss.micro (the year appears with glog >= 0.6).
_GLOG_TIME = re.compile(r"^[IWEF](\d{4})?(\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{1,6})\s")
# Caffe >= 1.0 writes "Iteration N (x iter/s, ys/k iters), loss = X"; older ones "Iteration N, loss = X".
_SMOOTHED_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = (" + _NUMBER + r")", re.I)
_LEARNING_RATE = re.compile(r"Iteration (\d+), lr = (" + _NUMBER + r")", re.I)
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = (" + _NUMBER + r")", re.I)
_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = (" + _NUMBER + r")", re.I)

KEY_COLUMNS = ("NumIters", "Seconds", "LearningRate")


def line_datetime(line: str, year: int) -> Optional[_dt.datetime]:
    """The timestamp of a glog line, or None for a line without one (e.g. an echoed prototxt).

    ``year`` is used when the line itself carries none (glog before 0.6 omits it).
    """
    m = _GLOG_TIME.match(line)
    if not m:
        return None
    y, mo, d, h, mi, s, frac = m.groups()
    try:
        return _dt.datetime(int(y) if y else year, int(mo), int(d), int(h), int(mi), int(s),
                            int(frac.ljust(6, "0")))
    except ValueError:  # e.g. Feb 29 guessed into a non-leap year
        return None


class _Clock:
    """Seconds since the start of training from glog stamps, across a new year.

    Year-less stamps start in the year the log file was created (its ctime, as Caffe's
    extract_seconds.py does) and move to the next year whenever the month goes backwards.
    """

    def __init__(self, year: int):
        self.year = year
        self.start: Optional[_dt.datetime] = None
        self.last: Optional[_dt.datetime] = None

    def stamp(self, line: str) -> Optional[_dt.datetime]:
        t = line_datetime(line, self.year)
        if t is None:
            return None
        if self.last is not None and t.month < self.last.month and not _GLOG_TIME.match(line).group(1):
            self.year += 1
            t = line_datetime(line, self.year) or t
        self.last = t
        return t

    def seconds(self, t: Optional[_dt.datetime]) -> float:
        if t is None or self.start is None:
            return float("nan")
        return (t - self.start).total_seconds()


def _file_year(path: str) -> int:
    try:
        return _dt.datetime.fromtimestamp(os.path.getctime(path)).year
    except OSError:
        return _dt.datetime.now().year


def parse_log_lines(lines: Iterable[str], year: int) -> Tuple[List[Row], List[Row]]:
    """Train and test rows from glog lines (see the module docstring for their meaning)."""
    lines = list(lines)
    clock = _Clock(year)
    # Training starts at Caffe's "Solving <net>" line; a log without one starts at its first stamp.
    for line in lines:
        if "Solving" in line and _GLOG_TIME.match(line):
            clock.start = line_datetime(line, year)
            break
    train: List[Row] = []
    test: List[Row] = []
    lr_by_iter: Dict[int, float] = {}
    train_row: Optional[Row] = None
    test_row: Optional[Row] = None
    test_suffix = ""

    def train_row_for(it: int, seconds: float) -> Row:
        nonlocal train_row
        if train_row is None or train_row["NumIters"] != it:
            train_row = OrderedDict((("NumIters", it), ("Seconds", seconds),
                                     ("LearningRate", float("nan"))))
            train.append(train_row)
        return train_row

    for line in lines:
        t = clock.stamp(line)
        if clock.start is None and t is not None:
            clock.start = t
        seconds = clock.seconds(t)
        m = _TESTING.search(line)
        if m:
            test_row = OrderedDict((("NumIters", int(m.group(1))), ("Seconds", seconds),
                                    ("LearningRate", float("nan"))))
            test_suffix = "" if m.group(2) == "0" else f"#{m.group(2)}"
            test.append(test_row)
            continue
        m = _TEST_OUTPUT.search(line)
        if m and test_row is not None:
            test_row[m.group(2) + test_suffix] = float(m.group(3))
            continue
        m = _SMOOTHED_LOSS.search(line)
        if m:
            train_row_for(int(m.group(1)), seconds)["SmoothedLoss"] = float(m.group(2))
            continue
        m = _TRAIN_OUTPUT.search(line)
        if m and train_row is not None:
            train_row[m.group(2)] = float(m.group(3))
            continue
        m = _LEARNING_RATE.search(line)
        if m:
            it, rate = int(m.group(1)), float(m.group(2))
            lr_by_iter[it] = rate
            if train_row is not None and train_row["NumIters"] == it:
                train_row["LearningRate"] = rate
    _fill_test_rates(test, lr_by_iter)
    return _move_smoothed_last(train), test


def _fill_test_rates(test: List[Row], lr_by_iter: Dict[int, float]) -> None:
    """A test pass at iteration N ran with the weights before step N: give it step N's rate,
    or the nearest logged rate before it (the final test, after the last step, has none of its own)."""
    known = sorted(lr_by_iter)
    for row in test:
        it = row["NumIters"]
        if it in lr_by_iter:
            row["LearningRate"] = lr_by_iter[it]
            continue
        before = [i for i in known if i <= it]
        after = [i for i in known if i > it]
        if before:
            row["LearningRate"] = lr_by_iter[before[-1]]
        elif after:
            row["LearningRate"] = lr_by_iter[after[0]]


def _move_smoothed_last(rows: List[Row]) -> List[Row]:
    for row in rows:
        if "SmoothedLoss" in row:
            row.move_to_end("SmoothedLoss")
    return rows


def parse_log(path: str) -> Tuple[List[Row], List[Row]]:
    """``(train_rows, test_rows)`` of a log file, each row an OrderedDict of column -> value."""
    # Missing, a directory, a FIFO (reading it would wait forever): each said by name.
    check_input_path(path, CaffeError, "log file")
    with open(path, errors="replace") as f:
        return parse_log_lines(f, _file_year(path))


def columns(rows: Sequence[Row]) -> List[str]:
    """Every column of the rows, key columns first, outputs in order of first appearance."""
    names: "OrderedDict[str, None]" = OrderedDict((k, None) for k in KEY_COLUMNS)
    for row in rows:
        for k in row:
            names.setdefault(k, None)
    if "SmoothedLoss" in names:
        names.move_to_end("SmoothedLoss")
    return list(names)


def write_csv(path: str, rows: Sequence[Row], delimiter: str = ",") -> bool:
    """Write rows as a CSV table (missing values empty); False (and no file) when there are none."""
    if not rows:
        return False
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns(rows), delimiter=delimiter, restval="")
    writer.writeheader()
    writer.writerows(rows)
    # Atomically, like every file the tools write: a FIFO or device in the way is refused (a
    # plain open() would block on a FIFO until someone reads it), and an interrupted run
    # leaves the previous table intact.
    atomic_write(path, text.getvalue().encode())
    return True


def save_csv_files(log_path: str, output_dir: str, train: Sequence[Row], test: Sequence[Row],
                   delimiter: str = ",") -> List[str]:
    """``<output_dir>/<log basename>.train`` and ``.test``; returns the paths written."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise CaffeError(f"output folder {output_dir!r} is a file, not a folder",
                         hint="give the folder to write LOG.train and LOG.test into")
    if not os.path.isdir(output_dir):
        raise CaffeError(f"output folder {output_dir!r} does not exist", hint=f"mkdir -p {output_dir}")
    base = os.path.join(output_dir, os.path.basename(log_path))
    written = []
    for suffix, rows in ((".train", train), (".test", test)):
        try:
            if write_csv(base + suffix, rows, delimiter):
                written.append(base + suffix)
        except OSError as e:
            raise CaffeError(f"cannot write {base + suffix}: {e.strerror}",
                             hint="choose a writable output folder") from None
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="parse_log", description="Parse a Caffe/pycaffe_alt training log into two CSV tables "
        "(<log>.train and <log>.test in OUTPUT_DIR).")
    parser.add_argument("logfile_path", help="the training log")
    parser.add_argument("output_dir", help="folder for the CSV files")
    parser.add_argument("--delimiter", default=",", help="column delimiter (default ',')")
    parser.add_argument("--verbose", action="store_true", help="print the files written")
    args = parse_args(parser, argv)
    if len(args.delimiter) != 1:
        raise CaffeError(f"--delimiter must be one character, got {args.delimiter!r}",
                         hint="e.g. --delimiter ';' (use $'\\t' in bash for a tab)")
    train, test = parse_log(args.logfile_path)
    if not train and not test:
        raise CaffeError(f"{args.logfile_path}: no training or test lines found",
                         hint="expected glog lines such as 'Iteration 10, loss = 0.5' or "
                              "'Test net output #0: accuracy = 0.9'")
    for path in save_csv_files(args.logfile_path, args.output_dir, train, test, args.delimiter):
        if args.verbose:
            print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
