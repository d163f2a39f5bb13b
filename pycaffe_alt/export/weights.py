"""Weight formats behind the export API: Caffe's ``.caffemodel`` and ``.h5``, and the way back
from PyTorch: a state_dict named as ``net.state_dict()`` names it (``'<layer>.<blob>'``, e.g.
``conv1.weight``, ``bn1.mean``) loaded into a Net, which then writes any format.

The caffemodel/h5 writers are the Net's own (``Net.save``, ``Net.save_hdf5``); this module only
puts them behind the same ``convert(..., to=...)`` switch as the other formats.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Mapping, Union

import torch

from ..errors import WeightsError
from ..fileio import check_input_path

StateDict = Mapping[str, torch.Tensor]


def write_caffemodel(net, path: str) -> str:
    """The Net's layers with their current blobs as a binary NetParameter (Caffe's ToProto)."""
    net.save(path)
    return path


def write_h5(net, path: str) -> str:
    """The Net's blobs in Caffe's HDF5 layout (``data/<layer>/<i>``)."""
    net.save_hdf5(path)
    return path


def where_of(source) -> str:
    """The file a state_dict came from, or a placeholder for an in-memory one."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<state_dict>"


def read_state_dict(source: Union[str, StateDict]) -> "OrderedDict[str, torch.Tensor]":
    """A state_dict from a mapping or a ``torch.save``'d file (tensors only: weights_only load).

    A ``module.`` prefix on every key (``nn.DataParallel``) is removed.
    """
    where = where_of(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise WeightsError(f"file not found: {path}", hint="check the state_dict path")
        # A FIFO would block torch.load forever, a device would be read without end.
        check_input_path(path, WeightsError, "state_dict file")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip or torch version errors all mean "not loadable"
            # Only the first sentence of torch's text: its advice to load with
            # weights_only=False would run the file's code.
            first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
            raise WeightsError(f"not a torch.save'd state_dict of tensors ({type(e).__name__}: "
                               f"{first})", where=path,
                               hint="save it with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(source, Mapping):
        raise WeightsError(f"holds a {type(source).__name__}, not a state_dict", where=where,
                           hint="save model.state_dict(), not the model")
    bad = [str(k) for k, v in source.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"state_dict entries that are not tensors: {', '.join(bad[:8])}",
                           where=where, hint="a state_dict maps '<layer>.<blob>' to tensors")
    state = OrderedDict((k, v) for k, v in source.items())
    if state and all(k.startswith("module.") for k in state):
        state = OrderedDict((k[len("module."):], v) for k, v in state.items())
    return state


def load_state_dict(net, source: Union[str, StateDict], where: str = "<state_dict>") -> None:
    """Copy a ``net.state_dict()``-named state into the Net; every parameter blob of the Net must
    be present with its shape, and every key must name one (one error lists all differences)."""
    state = read_state_dict(source)
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
    own: Dict[str, torch.Tensor] = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for what, names in (("missing", missing), ("not in the net", unexpected), ("wrong shape", wrong)):
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise WeightsError("the state_dict does not fit the net (" + "; ".join(problems) + ")",
                           where=where, hint="keys are '<layer>.<blob>' as net.state_dict() names "
                           "them (conv1.weight, conv1.bias, bn1.mean, ...); give the prototxt the "
                           "state_dict came from")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def state_dict_to_caffemodel(model, state: Union[str, StateDict], path: str) -> str:
    """The reverse conversion: ``state`` (``net.state_dict()`` naming, a mapping or a file) for
    the net ``model`` (prototxt path or built Net) written as a ``.caffemodel``."""
    from ..net import Net
    from ..phase import TEST

    net = model if isinstance(model, Net) else Net(model, TEST)
    load_state_dict(net, state)
    return write_caffemodel(net, path)
