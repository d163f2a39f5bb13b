"""Export a Caffe net to what the PyTorch world runs (docs/convert.md).

* :func:`as_module` (also ``Net.as_module``): the live net as a plain ``nn.Module`` with a
  positional forward, sharing the Net's parameters;
* :func:`convert`: a net + weights to ``onnx``, ``torchscript``, ``export`` (torch.export .pt2),
  ``pytorch`` (standalone code + weights), ``caffemodel`` or ``h5``, checked against the Net;
* :func:`state_dict_to_caffemodel`: the reverse, a ``net.state_dict()``-named state into a
  caffemodel (``convert(..., state_dict=..., to="caffemodel")`` does the same).

Every format is written from one lowered graph (:mod:`.graph`).
"""
from .convert import FORMATS, Conversion, convert  # noqa: F401
from .graph import Graph, Op, lower_net, plan_layers  # noqa: F401
from .module import NetModule, as_module, dynamic_batch_shapes  # noqa: F401
from .weights import load_state_dict, state_dict_to_caffemodel  # noqa: F401

__all__ = ["FORMATS", "Conversion", "convert", "Graph", "Op", "lower_net", "plan_layers",
           "NetModule", "as_module", "dynamic_batch_shapes", "load_state_dict",
           "state_dict_to_caffemodel"]
