"""TorchScript from a lowered net: the generated standalone module (:mod:`.pytorch_code`),
compiled with ``torch.jit.script`` and saved with its weights in one file.

Loading needs torch only: ``torch.jit.load(PATH)(data)``. Scripting (rather than tracing) keeps
every size symbolic, so any batch size runs, and the saved code is the readable generated code.
"""
from __future__ import annotations

import sys
import tempfile
import warnings

import torch

from .graph import Graph
from . import pytorch_code


def script(graph: Graph) -> torch.jit.ScriptModule:
    """The graph's generated module, scripted (eval mode, weights included)."""
    with tempfile.TemporaryDirectory(prefix="pycaffe_alt_ts_") as tmp:
        model = pytorch_code.instantiate(graph, tmp)
        try:
            with warnings.catch_warnings():
                # torch 2.10+ marks TorchScript deprecated; the format is still what many
                # deployments load (docs/convert.md says so), so the warning is not the user's.
                warnings.simplefilter("ignore", DeprecationWarning)
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
