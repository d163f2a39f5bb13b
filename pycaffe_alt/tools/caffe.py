"""``pycaffe-alt``: one command with Caffe's subcommands (``caffe train|test|time|device_query``).

    pycaffe-alt train --solver solver.prototxt [--weights W | --snapshot S] ...
    pycaffe-alt test --model M --weights W --iterations N
    pycaffe-alt time --model M --iterations N
    pycaffe-alt device_query

Each subcommand is the same code as the matching executable in ``tools/`` (``tools/train`` ...)
and takes the same flags, in gflags spellings too (``-solver=x``). Every other tool of ``tools/``
is reachable the same way (``pycaffe-alt convert_imageset ...``, ``pycaffe-alt parse_log ...``,
``pycaffe-alt draw_net ...``), so a plain ``pip install`` without the checkout has them all. As
with gflags, flags may also come before the subcommand (``pycaffe-alt --gpu=0 train ...``).

``pycaffe-alt run script.py ARGS`` runs an unchanged pycaffe program with ``import caffe``
meaning pycaffe_alt; ``install-caffe-alias`` / ``uninstall-caffe-alias`` turn a bare ``import
caffe`` on and off for the whole environment (docs/pycaffe.md).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import CaffeError
from .cli import run_main

# subcommand -> ("module[:function]" under pycaffe_alt.tools, or a relative name such as "..run",
# one-line description); the function defaults to ``main``. Caffe's four come first, then the other tools of tools/.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("train", "train or finetune a model"),
    "test": ("test", "score a model"),
    "device_query": ("device_query", "show CPU and GPU diagnostic information"),
    "time": ("time_net", "benchmark model execution time"),
    "convert_imageset": ("convert_imageset", "images + list file -> LMDB of Datums"),
    "compute_image_mean": ("compute_image_mean", "mean image of a database -> binaryproto"),
    "extract_features": ("extract_features", "blobs of a trained net -> LMDB/LevelDB of Datums"),
    "convert_mnist": ("convert_mnist", "MNIST IDX files -> LMDBs"),
    "convert_cifar": ("convert_cifar", "CIFAR-10/100 batches -> LMDBs"),
    "upgrade_net_proto_text": ("upgrade_net_proto_text", "legacy net prototxt -> current format"),
    "upgrade_net_proto_binary": ("upgrade_net_proto_binary",
                                 "legacy binary net (caffemodel) -> current format"),
    "upgrade_solver_proto_text": ("upgrade_solver_proto_text",
                                  "legacy solver prototxt -> current format"),
    "convert_relu": ("convert_relu", "ReLU net (+ weights) -> hard-threshold form"),
    "parse_log": ("parse_log", "training log -> train/test CSV tables"),
    "plot_training_log": ("plot_training_log", "plot training logs into a PNG"),
    "draw_net": ("draw_net", "draw a net prototxt as an image (BVLC's draw_net.py)"),
    "run": ("..run", "run an unchanged pycaffe program with 'import caffe' = pycaffe_alt"),
    "install-caffe-alias": ("caffe_alias:install_main",
                            "make a bare 'import caffe' give pycaffe_alt in this environment"),
    "uninstall-caffe-alias": ("caffe_alias:uninstall_main", "remove that alias again"),
    "convert_model": ("convert_model", "a net + weights to ONNX/TorchScript/torch.export/PyTorch code"),
}


def usage() -> str:
    """Caffe's usage text, with our extra commands."""
    lines = ["command line brew", "usage: pycaffe-alt <command> <args>", "", "commands:"]
    width = max(len(name) for name in COMMANDS) + 2
    lines += [f"  {name:<{width}}{desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run 'pycaffe-alt <command> --help' for a command's flags."]
    return "\n".join(lines)


def split_command(argv: Sequence[str]) -> Tuple[str, List[str]]:
    """``(command, the other arguments)``: the first argument that names a command."""
    if argv and argv[0] == "run":
        # Everything after `run` belongs to the program it runs (its own `train`, `test`...).
        return "run", list(argv[1:])
    for i, arg in enumerate(argv):
        if arg in COMMANDS:
            return arg, list(argv[:i]) + list(argv[i + 1:])
    if argv and not argv[0].startswith("-"):
        raise CaffeError(f"unknown command {argv[0]!r}",
                         hint="available commands: " + ", ".join(COMMANDS))
    raise CaffeError("no command given\n" + usage())


def command_main(name: str) -> Callable[[Optional[Sequence[str]]], int]:
    """The ``main(argv)`` of a subcommand."""
    module_name, _, function = COMMANDS[name][0].partition(":")
    relative = module_name if module_name.startswith(".") else "." + module_name
    module = importlib.import_module(relative, __package__)
    return getattr(module, function or "main")


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
