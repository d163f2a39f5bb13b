"""Pictures of nets (pycaffe's ``caffe.draw``): layers as boxes, blobs as octagons.

:func:`to_dot` writes the graph as Graphviz DOT text with no dependencies (render it anywhere:
``dot -Tpng net.dot -o net.png``). :func:`draw_net` / :func:`draw_net_to_file` render it like
pycaffe: through pydot (or pydotplus) when importable, else through Graphviz's ``dot`` program
when it is on PATH; ``.dot``/``.gv``/``.raw`` files get the DOT text itself.

Styling follows pycaffe's draw.py: convolutions red, pooling orange, inner products purple, other
layers blue, in-place layers green, blobs grey octagons unless last written (outputs plain); a
layer's label holds its name, type, kernel/stride/pad for spatial layers and optionally the
lr_mults; edges into a layer's tops carry the batch size (Data) or num_output (Convolution,
Deconvolution, InnerProduct).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

from .errors import ArgumentTypeError, CaffeError, path_argument
from .fileio import atomic_write, check_output_path
from .proto import caffe_pb2

LAYER_STYLE = {"shape": "record", "style": "filled", "fillcolor": "#6495ED"}
LAYER_STYLE_DEFAULT = LAYER_STYLE  # pycaffe's name for it
NEURON_LAYER_STYLE = {"shape": "record", "style": "filled", "fillcolor": "#90EE90"}
BLOB_STYLE = {"shape": "octagon", "style": "filled", "fillcolor": "#E0E0E0"}
_TYPE_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                "InnerProduct": "#CC33FF"}
_LEARNING = ("Convolution", "Deconvolution", "InnerProduct")
_TEXT_FORMATS = ("dot", "gv", "raw")


def choose_color_by_layertype(layer_type: str) -> str:
    """The fill colour of a layer box (pycaffe's palette)."""
    return _TYPE_COLORS.get(layer_type, LAYER_STYLE["fillcolor"])


def get_pooling_types_dict() -> Dict[int, str]:
    """Pooling method number -> name (0 -> 'MAX')."""
    enum = caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR
    return {v.number: name for name, v in enum.values_by_name.items()}


def get_edge_label(layer) -> str:
    """What the edges into the layer's tops say: batch size or num_output, else nothing."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def get_layer_lr_mult(layer) -> Tuple[float, float]:
    """(weights, bias) lr_mult of a Convolution/Deconvolution/InnerProduct layer (1 if unset)."""
    if layer.type not in _LEARNING:
        raise CaffeError(f"{layer.type} layers have no learning rate multipliers",
                         where=f"layer '{layer.name}'")
    mults = [p.lr_mult if p.HasField("lr_mult") else 1.0 for p in layer.param[:2]]
    return tuple(mults + [1.0] * (2 - len(mults)))  # type: ignore[return-value]


def _first(values, default: int) -> int:
    return values[0] if len(values) else default


def get_layer_label(layer, rankdir: str, display_lrm: bool = False) -> str:
    """A layer's label lines (joined by spaces for vertical layouts, which have room across,
    by line breaks for horizontal ones)."""
    separator = " " if rankdir in ("TB", "BT") else "\n"
    if layer.type == "Pooling":
        kind = get_pooling_types_dict().get(layer.pooling_param.pool, "?")
        parts = [layer.name, f"({layer.type} {kind})"]
    else:
        parts = [layer.name, f"({layer.type})"]
    if layer.type == "Pooling":
        p = layer.pooling_param
        parts.append(separator.join([f"kernel size: {p.kernel_size}", f"stride: {p.stride}",
                                     f"pad: {p.pad}"]))
    elif layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        parts.append(separator.join([f"kernel size: {_first(p.kernel_size, 1)}",
                                     f"stride: {_first(p.stride, 1)}", f"pad: {_first(p.pad, 0)}"]))
    if display_lrm and layer.type in _LEARNING:
        w, b = get_layer_lr_mult(layer)
        if w or b:
            parts.append(f"lr mult: {w:.1f}, {b:.1f}")
    return separator.join(parts)


def _included(layer, phase: Optional[int]) -> bool:
    """pycaffe draw's phase rule: include rules name the phases shown, exclude rules hide."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise CaffeError("has both include and exclude rules", where=f"layer '{layer.name}'",
                         hint="a layer may use only one of them")
    shown = not len(layer.include) or any(r.phase == phase for r in layer.include)
    return shown and not any(r.phase == phase for r in layer.exclude)


def _quote(text: str) -> str:
    # DOT strings: only the quote needs escaping; a line break is written as Graphviz's \n.
    return '"' + text.replace('"', '\\"').replace("\n", "\\n") + '"'


def _record_label(text: str) -> str:
    # In record shapes, { } | < > separate fields: escape them so names show as written.
    for ch in "{}|<>":
        text = text.replace(ch, "\\" + ch)
    return text


def _attrs(attrs: Dict[str, str]) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items()) + "]"


def to_dot(caffe_net, rankdir: str = "LR", label_edges: bool = True,
           phase: Optional[int] = None, display_lrm: bool = False) -> str:
    """The net (a ``caffe_pb2.NetParameter``) as Graphviz DOT text; ``phase`` (caffe.TRAIN /
    caffe.TEST) keeps only that phase's layers, None keeps all."""
    if getattr(getattr(caffe_net, "DESCRIPTOR", None), "full_name", None) != "caffe.NetParameter":
        # A Net, a path or None failed on '.name' with an AttributeError, as in pycaffe.
        raise ArgumentTypeError(f"caffe.draw takes a caffe_pb2.NetParameter, got "
                                f"{type(caffe_net).__name__}",
                                hint="read the prototxt into one: text_format.Merge(open(path)"
                                     ".read(), caffe_pb2.NetParameter())")
    if rankdir not in ("LR", "RL", "TB", "BT"):
        raise CaffeError(f"rankdir {rankdir!r} is not a Graphviz direction",
                         hint="use 'LR', 'TB', 'BT' or 'RL'")
    lines: List[str] = [f"digraph {_quote(caffe_net.name or 'Net')} {{",
                        f"  rankdir={rankdir};"]
    # Blob -> whether its last use was as a bottom. pycaffe's get_pydot_graph remakes a blob's
    # node at each use, as a grey octagon for a bottom and a plain node for a top, and draws the
    # last one made: outputs (and blobs an in-place layer writes last) come out plain.
    blobs: Dict[str, bool] = {}
    edges: List[str] = []
    for layer in caffe_net.layer:
        if not _included(layer, phase):
            continue
        node = f"{layer.name}_{layer.type}"
        in_place = len(layer.bottom) == 1 and list(layer.bottom) == list(layer.top)
        style = dict(NEURON_LAYER_STYLE if in_place else LAYER_STYLE)
        if not in_place:
            style["fillcolor"] = choose_color_by_layertype(layer.type)
        label = _record_label(get_layer_label(layer, rankdir, display_lrm))
        lines.append(f"  {_quote(node)} {_attrs(dict(label=label, **style))};")
        for bottom in layer.bottom:
            blobs[bottom] = True
            edges.append(f"  {_quote(bottom + '_blob')} -> {_quote(node)};")
        edge_label = get_edge_label(layer) if label_edges else ""
        for top in layer.top:
            blobs[top] = False
            attrs = f" {_attrs({'label': edge_label})}" if edge_label else ""
            edges.append(f"  {_quote(node)} -> {_quote(top + '_blob')}{attrs};")
    for blob, read_last in blobs.items():
        style = BLOB_STYLE if read_last else {}
        lines.append(f"  {_quote(blob + '_blob')} {_attrs(dict(label=blob, **style))};")
    lines.extend(edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _pydot():
    try:
        import pydotplus as pydot  # pycaffe prefers pydotplus under Python 3
    except ImportError:
        try:
            import pydot
        except ImportError:
            return None
    return pydot


def get_pydot_graph(caffe_net, rankdir: str, label_edges: bool = True,
                    phase: Optional[int] = None, display_lrm: bool = False):
    """The net as a pydot ``Dot`` graph (needs ``pip install pydot`` and Graphviz to render)."""
    pydot = _pydot()
    if pydot is None:
        raise CaffeError("get_pydot_graph needs pydot", where="caffe.draw",
                         hint="pip install pydot, and install Graphviz (apt-get install "
                              "graphviz); or use caffe.draw.to_dot(net_param) for DOT text")
    graphs = pydot.graph_from_dot_data(to_dot(caffe_net, rankdir, label_edges, phase,
                                              display_lrm))
    return graphs[0] if isinstance(graphs, list) else graphs


def _render_with_dot(dot_text: str, ext: str) -> bytes:
    program = shutil.which("dot")
    if program is None:
        raise CaffeError(f"drawing a net as '{ext}' needs Graphviz", where="caffe.draw",
                         hint="install Graphviz (apt-get install graphviz) and optionally "
                              "pip install pydot; or write a .dot file (draw_net_to_file(net, "
                              "'net.dot')) and render it elsewhere")
    done = subprocess.run([program, f"-T{ext}"], input=dot_text.encode("utf-8"),
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise CaffeError(f"Graphviz could not draw the net as '{ext}': "
                         f"{done.stderr.decode(errors='replace').strip()}", where="caffe.draw",
                         hint="check the format name (png, svg, pdf, ps...)")
    return done.stdout


def draw_net(caffe_net, rankdir: str, ext: str = "png", phase: Optional[int] = None,
             display_lrm: bool = False) -> bytes:
    """The net drawn in format ``ext`` (png, svg, pdf...; dot/gv/raw give DOT text) as bytes."""
    dot_text = to_dot(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    if ext in _TEXT_FORMATS:
        return dot_text.encode("utf-8")
    if _pydot() is not None:
        return get_pydot_graph(caffe_net, rankdir, phase=phase,
                               display_lrm=display_lrm).create(format=ext)
    return _render_with_dot(dot_text, ext)


def draw_net_to_file(caffe_net, filename: str, rankdir: str = "LR",
                     phase: Optional[int] = None, display_lrm: bool = False) -> None:
    """Draw the net into ``filename`` in the format its extension names (``.png``, ``.svg``;
    ``.dot``/``.gv``/``.raw`` for DOT text)."""
    filename = path_argument(filename, "draw_net_to_file()")
    ext = os.path.splitext(filename)[1].lstrip(".") or "png"
    check_output_path(filename, CaffeError)  # before the drawing: a FIFO, a folder
    payload = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    # Atomic, as every output here: a folder, a missing parent or a FIFO is one message.
    atomic_write(filename, payload, CaffeError)
