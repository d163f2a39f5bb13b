"""``pycaffe-alt``: one command with Caffe's subcommands (``caffe train|test|time|device_query``).

    pycaffe-alt train --solver solver.prototxt [--weights W | --snapshot S] ...
    pycaffe-alt test --model M --weights W --iterations N
    pycaffe-alt time --model M --iterations N
    pycaffe-alt device_query

Each subcommand is the same code as the matching executable in ``tools/`` (``tools/train`` ...)
and takes the same flags, in gflags spellings too (``-solver=x``). The log tools are reachable
the same way (``pycaffe-alt parse_log ...``, ``pycaffe-alt plot_training_log ...``). As with
gflags, flags may also come before the subcommand (``pycaffe-alt --gpu=0 train ...``).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import CaffeError
from .cli import run_main

# subcommand -> (module under pycaffe_alt.tools, one-line description); Caffe's four come first.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("train", "train or finetune a model"),
    "test": ("test", "score a model"),
    "device_query": ("device_query", "show CPU and GPU diagnostic information"),
    "time": ("time_net", "benchmark model execution time"),
    "parse_log": ("parse_log", "training log -> train/test CSV tables"),
    "plot_training_log": ("plot_training_log", "plot training logs into a PNG"),
    "convert_model": ("convert_model", "a net + weights to ONNX/TorchScript/torch.export/PyTorch code"),
}


def usage() -> str:
    """Caffe's usage text, with our extra commands."""
    lines = ["command line brew", "usage: pycaffe-alt <command> <args>", "", "commands:"]
    lines += [f"  {name:<18}{desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run 'pycaffe-alt <command> --help' for a command's flags."]
    return "\n".join(lines)


def split_command(argv: Sequence[str]) -> Tuple[str, List[str]]:
    """``(command, the other arguments)``: the first argument that names a command."""
    for i, arg in enumerate(argv):
        if arg in COMMANDS:
            return arg, list(argv[:i]) + list(argv[i + 1:])
    if argv and not argv[0].startswith("-"):
        raise CaffeError(f"unknown command {argv[0]!r}",
                         hint="available commands: " + ", ".join(COMMANDS))
    raise CaffeError("no command given\n" + usage())


def command_main(name: str) -> Callable[[Optional[Sequence[str]]], int]:
    """The ``main(argv)`` of a subcommand."""
    module = importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")
    return module.main


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-version"):
        from .. import __version__

        print(f"pycaffe-alt {__version__}")
        return 0
    name, rest = split_command(argv)
    return command_main(name)(rest) or 0


def run() -> None:
    """The console-script entry point (setup.py: ``pycaffe-alt=pycaffe_alt.tools.caffe:run``)."""
    run_main(main)


if __name__ == "__main__":
    run()
