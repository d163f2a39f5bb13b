"""Console-script entry points of the tools that get a command of their own (setup.py): each
runs the tool's ``main`` with the error handling of :func:`~pycaffe_alt.tools.cli.run_main`."""
from __future__ import annotations

from .caffe import command_main
from .cli import run_main


def _tool(name: str):
    def entry() -> None:
        run_main(lambda: command_main(name)(None))

    entry.__name__ = name
    entry.__doc__ = f"The ``{name}`` command (same as ``pycaffe-alt {name}``)."
    return entry


draw_net = _tool("draw_net")
parse_log = _tool("parse_log")
plot_training_log = _tool("plot_training_log")
convert_mnist = _tool("convert_mnist")
convert_cifar = _tool("convert_cifar")
convert_relu = _tool("convert_relu")
