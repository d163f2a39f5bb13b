"""Export a Caffe net to what the PyTorch world runs (docs/convert.md).

* :func:`as_module` (also ``Net.as_module``): the live net as a plain ``nn.Module`` with a
  positional forward, sharing the Net's parameters;
* :func:`convert`: a net + weights to ``onnx``, ``torchscript``, ``export`` (torch.export .pt2),
  ``pytorch`` (standalone code + weights), ``caffemodel`` or ``h5``;
* :func:`state_dict_to_caffemodel`: the reverse, a ``net.state_dict()``-named state into a
  caffemodel.

Every format is written from one lowered graph (:mod:`.graph`).
"""
from .graph import Graph, Op, lower_net  # noqa: F401
