"""Shared plumbing for the command-line tools: Caffe-style flags, progress bars, error exits.

Every tool's ``main`` is wrapped by :func:`run_main`, so a user mistake (a
:class:`~pycaffe_alt.errors.CaffeError`) or Ctrl-C ends in one readable paragraph on stderr and exit
status 1, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Iterable, List, Optional, Sequence

from ..errors import CaffeError

# A gflags-style long option: one dash, then a name of 2+ word characters (so "-1" or "-" stay).
_SINGLE_DASH_FLAG = re.compile(r"^-([A-Za-z_][A-Za-z0-9_]+)(=.*)?$")


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "pycaffe_alt"


def run_main(fn: Callable[[], Optional[int]]) -> None:
    """Run ``fn`` and exit with its return code; report user errors and Ctrl-C without traceback."""
    prog = _prog()
    try:
        code = fn()
    except CaffeError as e:
        print(f"{prog}: error: {e.message()}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def gflags_argv(argv: Sequence[str], bool_flags: Iterable[str] = ()) -> List[str]:
    """Rewrite Caffe's gflags spellings into argparse ones.

    gflags accepts ``-flag``, ``--flag``, ``-flag=value``, and for booleans also ``--noflag`` and
    ``--flag=false``; Caffe's scripts use all of them (e.g. ``-backend=lmdb``).
    """
    bools = set(bool_flags)
    out: List[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":  # everything after "--" is positional, untouched
            out.extend(argv[i:])
            break
        if _SINGLE_DASH_FLAG.match(arg):
            arg = "-" + arg
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name.startswith("no") and name[2:] in bools and not eq:
                arg = f"--no-{name[2:]}"
            elif name in bools and eq:
                arg = f"--{name}" if value.lower() in ("true", "1", "yes", "t", "y") \
                    else f"--no-{name}"
        out.append(arg)
    return out


def int32(text: str) -> int:
    """argparse type of a gflags ``int32`` flag: an integer that fits in 32 signed bits.

    gflags refuses a value out of that range when it parses the command line ("illegal value ...
    for int32 flag"); a plain ``int`` would accept it and fail much later, or loop for ever.
    """
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -2 ** 31 <= value < 2 ** 31:
        raise argparse.ArgumentTypeError(f"{text} does not fit in a 32-bit signed integer "
                                         "(Caffe's int32 flags range from -2147483648 to "
                                         "2147483647)")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive, finite number of seconds")
    return value


def add_bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A gflags boolean: ``--name`` sets it; ``--name=false`` / ``--noname`` clear it.

    It never consumes the next argument (gflags booleans take no separate value). The dashed
    spelling (``--allow-unmatched-weights``) is accepted too, as our other tools accept it.
    """
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=False,
                        help=help)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
               bool_flags: Iterable[str] = ()) -> argparse.Namespace:
    """``parser.parse_args`` after :func:`gflags_argv`; ``argv`` None means ``sys.argv[1:]``."""
    return parser.parse_args(gflags_argv(sys.argv[1:] if argv is None else argv, bool_flags))


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "") -> Iterable:
    """A tqdm bar on stderr when it is a terminal; the bare iterable otherwise (logs, pipes)."""
    if not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar, same result
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


def warn(message: str) -> None:
    """One warning line on stderr, prefixed with the tool name."""
    print(f"{_prog()}: warning: {message}", file=sys.stderr)
