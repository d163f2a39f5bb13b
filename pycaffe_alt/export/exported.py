"""torch.export from a lowered net: an ``ExportedProgram`` (``.pt2``) with a dynamic batch axis.

The generated standalone module (:mod:`.pytorch_code`) is exported with an example of batch 2
and axis 0 declared dynamic: torch.export specialises any size-1 dimension of the example to the
constant 1, so exporting from a batch-1 deploy net would otherwise fix the batch.
Load with ``torch.export.load(PATH).module()(data)`` (torch only).
"""
from __future__ import annotations

import sys
import tempfile

import torch

from .graph import Graph
from .module import dynamic_batch_shapes
from . import pytorch_code

EXAMPLE_BATCH = 2


def export(graph: Graph) -> "torch.export.ExportedProgram":
    """The graph's generated module as an ExportedProgram with a symbolic batch."""
    with tempfile.TemporaryDirectory(prefix="pycaffe_alt_ep_") as tmp:
        model = pytorch_code.instantiate(graph, tmp)
        sys.modules.pop(type(model).__module__, None)
    example = tuple(torch.randn((EXAMPLE_BATCH,) + tuple(s[1:])) for s in graph.inputs.values())
    with torch.no_grad():
        return torch.export.export(model, example,
                                   dynamic_shapes=dynamic_batch_shapes(model, len(example)))


def write(graph: Graph, path: str) -> str:
    """Save the ExportedProgram to ``path`` (conventionally ``.pt2``); returns the path."""
    torch.export.save(export(graph), path)
    return path


def load(path: str):
    """The callable module of a saved ExportedProgram."""
    return torch.export.load(path).module()
