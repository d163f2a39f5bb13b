"""``convert(model, weights, to=FORMAT, out=PATH)``: one call from a Caffe net to any format.

The net is built in the TEST phase (TRAIN-only layers are gone), with ``shapes`` overriding the
input sizes (a data layer named there becomes an Input layer, so its database is not needed);
it is lowered once (:mod:`.graph`) and written by the format's module. Unless ``verify=False``,
the written file is then loaded back through its own runtime (onnxruntime, torch.jit.load,
torch.export.load, the generated .py) and run against the Net's layers on the same random input;
the largest relative difference is reported, and a difference over :data:`TOLERANCE` is an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import (ArgumentTypeError, CaffeError, NetError, WeightsError, first_line,
                      integer_argument)
from ..fileio import check_output_path
from ..proto import caffe_pb2
from ..weights import warn_uncovered
from . import exported, pytorch_code, torchscript
from . import onnx as onnx_format
from . import weights as weight_formats
from .graph import DATA_TYPES, Graph, lower_net
from .module import as_module

FORMATS: Dict[str, str] = {
    "onnx": "one .onnx file (onnxruntime, TensorRT, OpenVINO...)",
    "torchscript": "a torch.jit.save'd ScriptModule: torch.jit.load(PATH)(data)",
    "export": "a torch.export ExportedProgram (.pt2): torch.export.load(PATH).module()(data)",
    "pytorch": "standalone PyTorch code (.py) + its weights (.pt): load() returns the module",
    "caffemodel": "Caffe binary weights",
    "h5": "Caffe HDF5 weights",
}
# Exported and reference outputs must agree to this relative difference (max |a-b| / max |b|).
TOLERANCE = 1e-4


@dataclass
class Conversion:
    """What :func:`convert` wrote and how well the result reproduced the Net."""

    format: str
    paths: List[str]
    inputs: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    outputs: List[str] = field(default_factory=list)
    # output blob -> max |exported - net| / max |net|, per verified batch size
    max_rel_error: Dict[int, Dict[str, float]] = field(default_factory=dict)
    verified_with: str = ""
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """The lines the command-line tool prints."""
        lines = [f"convert_model: wrote {', '.join(self.paths)} ({self.format})"]
        if self.inputs:
            shapes = ", ".join(f"{n} {tuple(s)}" for n, s in self.inputs.items())
            lines.append(f"  inputs:  {shapes}  (axis 0 = batch, dynamic)")
            lines.append("  outputs: " + ", ".join(self.outputs))
        for batch, errs in self.max_rel_error.items():
            worst = max(errs.values()) if errs else 0.0
            lines.append(f"  checked with {self.verified_with} at batch {batch}: "
                         f"max relative difference {worst:.2e}")
        lines += ["  " + n for n in self.notes]
        return "\n".join(lines)


def apply_shapes(net_param: "caffe_pb2.NetParameter",
                 shapes: Mapping[str, Sequence[int]]) -> "caffe_pb2.NetParameter":
    """A copy of ``net_param`` whose Input layers take the given top shapes, and whose data
    layers with a top named in ``shapes`` become Input layers (other tops of such a layer, e.g.
    a label, get shape ``(batch,)``), so no database is opened."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    found = set()
    for layer in out.layer:
        if layer.type not in DATA_TYPES or layer.bottom:
            continue
        tops = list(layer.top)
        given = [t for t in tops if t in shapes]
        if not given:
            continue
        if layer.type != "Input" and tops[0] not in shapes:
            # Its data top would get the labels' shape (batch,), and the first layer reading
            # it failed ("axis 1 is out of range for a 1-axis bottom") far from the cause.
            raise NetError(f"--shape gives {', '.join(given)} but not '{tops[0]}', the data top "
                           f"of {layer.type} layer '{layer.name}'", None,
                           f"add --shape {tops[0]}=N,C,H,W (the other tops then get (N,))")
        batch = int(shapes[given[0]][0]) if len(shapes[given[0]]) else 1
        if layer.type != "Input":
            keep = caffe_pb2.LayerParameter()
            keep.name, keep.type = layer.name, "Input"
            keep.top.extend(tops)
            keep.include.extend(layer.include)
            keep.exclude.extend(layer.exclude)
            layer.CopyFrom(keep)
        old = [list(s.dim) for s in layer.input_param.shape]
        layer.input_param.ClearField("shape")
        for i, t in enumerate(tops):
            dims = shapes.get(t) or (old[i] if i < len(old) else old[0] if len(old) == 1 else [batch])
            layer.input_param.shape.add().dim.extend(int(d) for d in dims)
            found.add(t)
    missing = sorted(set(shapes) - found)
    if missing:
        raise NetError(f"--shape names {', '.join(missing)}, which no Input or data layer produces",
                       None, "give shapes for the tops of Input/Data layers (e.g. data=1,3,224,224)")
    return out


def _names(value, what: str) -> Optional[List[str]]:
    """Blob names as a list: a str is one comma-separated list (as --outputs takes)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    if not all(isinstance(n, str) for n in value):
        raise ArgumentTypeError(f"convert() {what} takes blob names, got {value!r}"[:300])
    return list(value)


def _shapes(value) -> Optional[Dict[str, Tuple[int, ...]]]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"convert() shapes takes {{blob: (d0, d1, ...)}}, got {value!r}"[:300])
    out = {}
    for name, dims in value.items():
        if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
            raise ArgumentTypeError(f"convert() shapes['{name}'] must be a sequence of sizes, got {dims!r}")
        shape = tuple(integer_argument(d, f"convert() shapes['{name}']") for d in dims)
        if not shape or min(shape) <= 0:
            raise ArgumentTypeError(f"convert() shapes['{name}'] needs positive sizes, got {shape}")
        out[name] = shape
    return out


def _batches(value) -> List[int]:
    """``verify`` as a list of batch sizes to check at (1..4096)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ArgumentTypeError(f"convert() verify takes True, False or batch sizes, got {value!r}")
    batches = [integer_argument(b, "convert() verify batch size") for b in value]
    if not batches or not all(1 <= b <= 4096 for b in batches):
        raise ArgumentTypeError(f"convert() verify batch sizes must be in 1..4096, got {batches}")
    return batches


def build_net(model, weights: Optional[str] = None, shapes: Optional[Mapping[str, Sequence[int]]] = None,
              state_dict=None, allow_unmatched_weights: bool = False, allow_python: bool = False,
              stages: Sequence[str] = (), level: int = 0):
    """A TEST-phase Net from a prototxt path / NetParameter / Net, with weights from a caffemodel
    or .h5 (``weights``) or a ``net.state_dict()``-named state (``state_dict``).

    A ``weights`` file that shares no layer name with a net that has parameters is an error
    unless ``allow_unmatched_weights``: the converted file would hold the fillers' random values
    and pass its own check (as ``tools/test`` refuses to score such a net). ``allow_python``:
    build Python layers (a Python data layer becomes an input of the export). ``stages`` and
    ``level``: the NetState the TEST-phase net is built in (layers with include/exclude rules on
    stages, e.g. BVLC's mnist_autoencoder's test-on-test data).
    """
    from .. import prototxt
    from ..net import Net
    from ..phase import TEST

    if isinstance(model, Net):
        if shapes or stages or level:
            raise NetError("shapes, stages and level can be set only when building the net from a "
                           "prototxt", model.source, "reshape the input blobs and call "
                           "net.reshape() instead, or build the Net with stages=/level=")
        net = model
    else:
        source = model
        if shapes:
            param = model if isinstance(model, caffe_pb2.NetParameter) else prototxt.read_net(model)
            source = apply_shapes(param, shapes)
        try:
            net = Net(source, TEST, allow_python=allow_python, stages=list(stages), level=level)
        except CaffeError as e:
            raise _named_after(e, model) from None
        if shapes and not isinstance(model, caffe_pb2.NetParameter):
            net.source = os.fspath(model)  # built from the reshaped copy; messages name the file
    copied = net.copy_from(weights) if weights else []
    if copied:
        warn_uncovered([weights], copied, net.params)
    if weights and not copied and len(net.params) and not allow_unmatched_weights:
        raise WeightsError("no layer of this weights file has the name of a layer of the net, so "
                           "the converted model would hold random initial weights", where=weights,
                           hint=f"check that the weights belong to {getattr(net, 'source', 'the net')}; "
                           "to convert the unmatched net anyway, add --allow-unmatched-weights "
                           "(allow_unmatched_weights=True)")
    if state_dict is not None:
        weight_formats.load_state_dict(net, state_dict)
    return net


def _named_after(error: CaffeError, model) -> CaffeError:
    """``error`` from building the reshaped copy of ``model``, naming the file, not the copy."""
    if isinstance(model, (str, os.PathLike)) and error.where and error.where.startswith("<net_param>"):
        error.where = os.fspath(model) + error.where[len("<net_param>"):]
        error.args = (error.message(),)
    return error


def check_writable(path: str) -> None:
    """A CaffeError unless ``path`` can be created: its directory exists and is writable, and
    nothing but a regular file is there (a FIFO would block the writer, a device be written)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CaffeError(f"the output {path} is a directory", hint="give a file name (--out FILE)")
    check_output_path(path, CaffeError)
    if not os.path.isdir(directory):
        raise CaffeError(f"cannot write {path}: the directory {directory} does not exist",
                         hint="create it first, or choose another --out")
    if not os.access(directory, os.W_OK):
        raise CaffeError(f"cannot write {path}: the directory {directory} is not writable",
                         hint="choose another --out")


def check_not_an_input(out: str, inputs: Mapping[str, object]) -> None:
    """A CaffeError when the output ``out`` is the same file as one of ``inputs`` (a label such
    as ``--model`` -> the path, or a non-path value, which is skipped): the converted file would
    replace the net definition or the weights it is made from (a binary caffemodel written over
    the prototxt)."""
    if not os.path.isfile(out):
        return
    for flag, source in inputs.items():
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) \
                and os.path.samefile(out, source):
            raise CaffeError(f"the output {out} is the {flag} file the conversion reads",
                             hint="give --out a new file name: the converted file would "
                                  "replace its own input")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    # NaN (sqrt of a negative input) or inf in the same places in both agree; a NaN or inf in
    # one only is a disagreement (the result is then inf).
    same = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    if np.any(~np.isfinite(a) & ~same) or np.any(~np.isfinite(b) & ~same):
        return float("inf")
    a, b = np.where(same, 0, a), np.where(same, 0, b)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    return diff / scale if scale > 0 else diff


def reference(net, graph: Graph, feed: Dict[str, torch.Tensor], include_loss: bool,
              inputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
    """The Net's own layers' outputs for ``feed`` (through :func:`as_module`).

    ``inputs`` is what ``graph`` was lowered with (None: the net's Input/data tops). Naming them
    again would not be the same plan: a named blob is a cut, and an in-place layer on an Input
    top (``relu0: data -> data``) would be left out of the reference but not of the graph.
    """
    module = as_module(net, graph.outputs, inputs, include_loss)
    with torch.no_grad():
        out = module(*[feed[n].to(net.device) for n in graph.inputs])
    out = (out,) if isinstance(out, torch.Tensor) else out
    return [o.detach().cpu().numpy() for o in out]


def random_inputs(graph: Graph, batch: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Normal random values for each graph input at batch size ``batch``; label inputs of loss
    layers get class 0 (a valid label for any classifier)."""
    gen = torch.Generator().manual_seed(seed)
    labels = {op.inputs[1] for op in graph.ops if op.kind == "softmax_loss"}
    out = {}
    for name, shape in graph.inputs.items():
        shape = (batch,) + tuple(shape[1:])
        out[name] = torch.zeros(shape) if name in labels else torch.randn(shape, generator=gen)
    return out


def run_file(fmt: str, path: str, graph: Graph, inputs: Dict[str, torch.Tensor]) -> List[np.ndarray]:
    """Run a written file through its own runtime on named inputs."""
    args = [inputs[n] for n in graph.inputs]
    if fmt == "onnx":
        return onnx_format.run_onnxruntime(path, {n: t.numpy() for n, t in inputs.items()},
                                           graph.outputs)
    with torch.no_grad():
        if fmt == "torchscript":
            out = torchscript.load(path)(*args)
        elif fmt == "export":
            out = exported.load(path)(*args)
        else:
            out = pytorch_code.import_generated(path).load()(*args)
    out = (out,) if isinstance(out, torch.Tensor) else out
    return [o.detach().cpu().numpy() for o in out]


def convert(model, weights: Optional[str] = None, to: str = "onnx", out: Optional[str] = None, *,
            outputs: Optional[Sequence[str]] = None, inputs: Optional[Sequence[str]] = None,
            shapes: Optional[Mapping[str, Sequence[int]]] = None, include_loss: bool = False,
            state_dict=None, verify: Union[bool, Sequence[int]] = True,
            allow_unmatched_weights: bool = False, allow_python: bool = False,
            stages: Sequence[str] = (), level: int = 0) -> Conversion:
    """Convert a Caffe net (prototxt path, NetParameter or Net) with its weights to ``to``.

    ``weights``: a .caffemodel or .h5; ``state_dict``: instead (or on top), a PyTorch state in
    ``net.state_dict()`` naming (mapping or file): with ``to="caffemodel"`` that is the reverse
    conversion. ``outputs``/``inputs``: blob names (default: the net's outputs and its Input/data
    tops). ``shapes``: ``{blob: shape}`` for Input/data tops. ``verify``: check the written file
    against the Net (True: at the net's batch size and at 2 more; or a list of batch sizes).
    ``allow_unmatched_weights``, ``stages``, ``level``: see :func:`build_net`.
    """
    if to not in FORMATS:
        raise CaffeError(f"unknown format {to!r}", hint="formats: " + ", ".join(FORMATS))
    outputs, inputs = _names(outputs, "outputs"), _names(inputs, "inputs")
    shapes = _shapes(shapes)
    batches = None if isinstance(verify, bool) else _batches(verify)
    if not out:
        raise CaffeError("no output path given", hint="give out= (--out PATH)")
    check_writable(out)
    if to == "pytorch":
        # The code is imported back from the file (a module needs a .py name) and its weights
        # go next to it: both paths are checked before anything is written.
        if os.path.splitext(out)[1] != ".py":
            raise CaffeError(f"the PyTorch code output {out} does not end in .py",
                             hint="give --out NAME.py (its weights are written to NAME.pt)")
        check_writable(os.path.splitext(out)[0] + ".pt")
    sources = {"--model": model, "--weights": weights, "--state-dict": state_dict}
    check_not_an_input(out, sources)
    if to == "pytorch":
        check_not_an_input(os.path.splitext(out)[0] + ".pt", sources)
    if stages is None:
        stages = ()
    elif isinstance(stages, str):  # one stage name, or the command line's comma list
        stages = [x for x in stages.split(",") if x]
    elif not isinstance(stages, (list, tuple)):
        raise ArgumentTypeError(f"stages must be a list of stage names, got {stages!r}")
    net = build_net(model, weights, shapes, state_dict, allow_unmatched_weights, allow_python,
                    stages, level)
    if to in ("caffemodel", "h5"):
        path = (weight_formats.write_caffemodel if to == "caffemodel" else weight_formats.write_h5)(net, out)
        return Conversion(to, [path])
    graph = lower_net(net, outputs, inputs, include_loss)
    try:
        if to == "onnx":
            paths = [onnx_format.write(graph, out)]
        elif to == "torchscript":
            paths = [torchscript.write(graph, out)]
        elif to == "export":
            paths = [exported.write(graph, out)]
        else:
            paths = list(pytorch_code.write(graph, out, source=getattr(net, "source", "")))
    except OSError as e:  # disk full, permissions changed meanwhile
        raise CaffeError(f"cannot write {out}: {e.strerror or e}",
                         hint="check the disk space and the permissions of the directory") from None
    except RuntimeError as e:  # torch.jit.script / torch.export refusing the generated module
        raise CaffeError(f"could not write the {to} form of {getattr(net, 'source', 'the net')}: "
                         f"{first_line(e)}",
                         hint="this is a bug in pycaffe_alt's exporter; please report it with the "
                         "prototxt, and meanwhile try another format (--to pytorch or onnx)") from None
    result = Conversion(to, paths, dict(graph.inputs), list(graph.outputs))
    if to == "onnx":
        result.notes.append(f"ONNX opset {onnx_format.OPSET}")
    if verify is False:
        return result
    if to == "onnx" and not onnx_format.onnxruntime_available():
        result.notes.append("not checked: onnxruntime is not installed (pip install onnxruntime)")
        return result
    first = next(iter(graph.inputs.values()), (1,))
    if batches is None:
        batches = [int(first[0]) if first else 1, int(first[0]) + 2 if first else 3]
    result.verified_with = {"onnx": "onnxruntime", "torchscript": "torch.jit.load",
                            "export": "torch.export.load", "pytorch": "the generated load()"}[to]
    for batch in batches:
        feed = random_inputs(graph, batch)
        ref = reference(net, graph, feed, include_loss, inputs)
        got = run_file(to, paths[0], graph, feed)
        # A shape that differs is a mismatch too (the difference alone would broadcast).
        errs = {n: _rel(g, r) if np.shape(g) == np.shape(r) else float("inf")
                for n, g, r in zip(graph.outputs, got, ref)}
        result.max_rel_error[batch] = errs
        bad = {n: e for n, e in errs.items() if not e <= TOLERANCE}
        if bad:
            raise CaffeError(
                f"the {to} file {paths[0]} does not reproduce the net at batch {batch}: relative "
                f"difference " + ", ".join(f"{n} {e:.2e}" for n, e in bad.items()) +
                f" (tolerance {TOLERANCE:g})", hint="this is a bug in pycaffe_alt's exporter; "
                "please report it with the prototxt (the file was written; --no-verify skips this "
                "check)")
    return result
