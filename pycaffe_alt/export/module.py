"""``net.as_module(outputs=[...], inputs=[...])``: a Net as a plain ``nn.Module``.

The Net's own ``forward`` is pycaffe's (keyword blobs in, a dict out); tracers and exporters need
``forward(*tensors) -> tensor(s)``. :class:`NetModule` runs the Net's layer modules (the same
objects, so the parameters are shared and stay in sync with the Net) on positional inputs in
layer order and returns the named blobs. Data layers become inputs, loss and accuracy layers
are left out unless asked (see :func:`~pycaffe_alt.export.graph.plan_layers`).

It traces (``torch.jit.trace``), exports (``torch.export`` with a dynamic batch, see
:func:`dynamic_batch_shapes`) and converts with ``torch.onnx.export``. It does not script: the
layers are written for eager PyTorch; the ``pytorch``/``torchscript`` formats of
:func:`pycaffe_alt.export.convert` give a scriptable module.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .graph import plan_layers


class NetModule(nn.Module):
    """A Net's layers between ``inputs`` and ``outputs`` as ``forward(*inputs) -> output(s)``.

    ``input_names`` / ``output_names`` are the Caffe blob names, in argument / result order;
    one output comes back as a tensor, several as a tuple.
    """

    def __init__(self, net, outputs: Optional[Sequence[str]] = None,
                 inputs: Optional[Sequence[str]] = None, include_loss: bool = False):
        super().__init__()
        plan = plan_layers(net, outputs, inputs, include_loss)
        self.input_names: List[str] = plan.inputs
        self.output_names: List[str] = plan.outputs
        self.layer_names: List[str] = [layer.name for layer in plan.layers]
        # The Net's own layer objects: shared parameters, shared buffers (BatchNorm statistics).
        self.layers = nn.ModuleList(layer.module for layer in plan.layers)
        self._wiring: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = [
            (layer.bottoms, layer.tops) for layer in plan.layers]
        self.input_shapes: Dict[str, Tuple[int, ...]] = {
            n: tuple(net.blobs[n].shape) for n in plan.inputs}

    def forward(self, *inputs: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"forward takes {len(self.input_names)} input(s) "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        values: Dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for layer, (bottoms, tops) in zip(self.layers, self._wiring):
            out = layer(*[values[b] for b in bottoms])
            if isinstance(out, torch.Tensor):
                out = (out,)
            for t, v in zip(tops, out):
                values[t] = v
        result = tuple(values[n] for n in self.output_names)
        return result[0] if len(result) == 1 else result

    def example_inputs(self, batch: Optional[int] = None) -> Tuple[torch.Tensor, ...]:
        """Random inputs of the Net's blob shapes (batch size ``batch`` if given)."""
        device = next(iter(self.parameters()), torch.zeros(())).device
        out = []
        for n in self.input_names:
            shape = self.input_shapes[n]
            if batch is not None and shape:
                shape = (batch,) + tuple(shape[1:])
            out.append(torch.randn(shape, device=device))
        return tuple(out)

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, outputs={self.output_names}"


def as_module(net, outputs: Optional[Sequence[str]] = None, inputs: Optional[Sequence[str]] = None,
              include_loss: bool = False) -> NetModule:
    """The Net as a plain module with a positional forward (see :class:`NetModule`)."""
    return NetModule(net, outputs, inputs, include_loss)


def dynamic_batch_shapes(module: nn.Module, n_inputs: int, name: str = "batch",
                         max_batch: int = 1 << 16) -> tuple:
    """``dynamic_shapes`` for ``torch.export.export(module, ...)``: axis 0 of every input is one
    symbolic size (a NetModule takes ``*inputs``, so its spec is nested one level).

    torch.export specialises a size of 1 to a constant; declaring the axis dynamic (min 1) keeps
    the batch free even when the example input has batch 1.
    """
    batch = torch.export.Dim(name, min=1, max=max_batch)
    specs = tuple({0: batch} for _ in range(n_inputs))
    return (specs,) if isinstance(module, NetModule) else specs
