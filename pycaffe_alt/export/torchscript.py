"""TorchScript from a lowered net: the generated standalone module (:mod:`.pytorch_code`),
compiled with ``torch.jit.script`` and saved with its weights in one file.

Loading needs torch only: ``torch.jit.load(PATH)(data)``. Scripting (rather than tracing) keeps
every size symbolic, so any batch size runs, and the saved code is the readable generated code.
"""
from __future__ import annotations

import sys
import tempfile

import torch

from .graph import Graph
from . import pytorch_code


def script(graph: Graph) -> torch.jit.ScriptModule:
    """The graph's generated module, scripted (eval mode, weights included)."""
    with tempfile.TemporaryDirectory(prefix="pycaffe_alt_ts_") as tmp:
        model = pytorch_code.instantiate(graph, tmp)
        try:
            return torch.jit.script(model)
        finally:
            sys.modules.pop(type(model).__module__, None)


def write(graph: Graph, path: str) -> str:
    """Save the scripted module to ``path`` (conventionally ``.pt``); returns the path."""
    script(graph).save(path)
    return path


def load(path: str) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of a file written by :func:`write`."""
    return torch.jit.load(path, map_location="cpu")
