"""pycaffe's ``caffe.coord_map``: how the spatial coordinates of two NetSpec blobs relate, and
the Crop layer that aligns them (FCN net surgery: crop an upsampled score map to the input).

A *coordinate map* is a triple ``(axis, scale, shift)`` (pycaffe's convention): input
coordinate ``i`` lands at output coordinate ``i * scale``, and the output is shifted by
``shift``. ``axis`` is the last non-spatial axis, after which the map applies (1 for
N x C x H x W; None for layers that leave coordinates alone). ``scale`` and ``shift`` are numpy
arrays with one entry per spatial axis (or one for all).

Per layer, with stride ``s``, effective kernel extent ``k = (kernel - 1) * dilation + 1`` and
padding ``p`` (Caffe's output size formula read backwards):

* Convolution, Pooling, Im2col: scale ``1 / s``, shift ``(p - (k - 1) / 2) / s``;
* Deconvolution: scale ``s``, shift ``(k - 1) / 2 - p``;
* point-wise layers (ReLU, BatchNorm, Eltwise, ...): the identity ``(None, 1, 0)``;
* Crop: scale 1, shift ``-offset`` on the axes from ``crop_param.axis``;
* anything else has no defined map (:class:`UndefinedMapException`).

Maps compose along a path of layers; :func:`coord_map_from_to` walks back from both blobs to a
common ancestor and composes one path with the inverse of the other. :func:`crop` builds the
Crop layer from that map. Exception types are pycaffe's (RuntimeError when the blobs are not
connected, AssertionError for an impossible crop), and they are CaffeErrors as well.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from .errors import CaffeError
from .net_spec import Function, Top, layers as L

CoordMap = Tuple[Optional[int], np.ndarray, np.ndarray]

# Layers whose output element (n, c, y, x) depends on input (n, ., y, x) only.
PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU",
                       "Log", "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid",
                       "Split", "TanH", "Threshold",
                       # ours: the paper's point-wise layers
                       "HardThreshold", "SupportMask"]

_IDENTITY: CoordMap = (None, np.array([1.0]), np.array([0.0]))


class UndefinedMapException(CaffeError):
    """The layer has no coordinate map (e.g. InnerProduct, global pooling)."""

    def __init__(self, what: str = "layer has no coordinate map"):
        super().__init__(what)


class AxisMismatchException(CaffeError):
    """Two maps to compose work on different axes."""

    def __init__(self, what: str = "coordinate maps on different axes cannot be composed"):
        super().__init__(what)


class UnconnectedError(CaffeError, RuntimeError):
    """The two blobs share no ancestor through layers with coordinate maps (a RuntimeError, as
    pycaffe raises)."""


class CropError(CaffeError, AssertionError):
    """The blobs' map is not a pure non-negative integer offset, so no Crop layer aligns them (an
    AssertionError, as pycaffe's asserts raise)."""


def _layer_params(fn: Function, nested: str) -> Dict:
    """The layer's keyword parameters: the ``nested`` dict if given that way (``convolution_param
    =dict(...)``), else the flat keywords (``kernel_size=3``), as NetSpec accepts both."""
    value = fn.params.get(nested)
    return value if isinstance(value, dict) else fn.params


def _vector(value, default) -> np.ndarray:
    return np.array(default if value is None else value, ndmin=1)


def conv_params(fn: Function) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(axis, stride, effective kernel extent, pad)`` of a Convolution, Deconvolution, Im2col
    or Pooling layer (kernel_h/kernel_w style parameters count as two spatial axes)."""
    params = _layer_params(fn, "pooling_param" if fn.type_name == "Pooling" else
                           "convolution_param")
    if params.get("global_pooling"):
        raise UndefinedMapException(f"{fn.type_name} with global_pooling has no coordinate map")

    def spatial(name: str, default):
        if f"{name}_h" in params or f"{name}_w" in params:
            return np.array([params.get(f"{name}_h", default), params.get(f"{name}_w", default)])
        return _vector(params.get(name), default)

    kernel = spatial("kernel", None) if ("kernel_h" in params or "kernel_w" in params) \
        else _vector(params.get("kernel_size"), None)
    if kernel.dtype == object:
        raise UndefinedMapException(f"{fn.type_name} layer without kernel_size")
    dilation = _vector(params.get("dilation"), 1)
    extent = (kernel - 1) * dilation + 1
    return int(params.get("axis", 1)), spatial("stride", 1), extent, spatial("pad", 0)


def crop_params(fn: Function) -> Tuple[int, np.ndarray]:
    """``(axis, offset)`` of a Crop layer with Caffe's defaults (axis 2, offset 0)."""
    params = _layer_params(fn, "crop_param")
    return int(params.get("axis", 2)), _vector(params.get("offset"), 0)


def coord_map(fn: Function) -> CoordMap:
    """The coordinate map of one layer (see the module docstring)."""
    kind = fn.type_name
    if kind in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if kind == "Deconvolution":
        axis, stride, extent, pad = conv_params(fn)
        return axis, stride * 1.0, (extent - 1) / 2 - pad
    if kind in PASS_THROUGH_LAYERS:
        return _IDENTITY
    if kind == "Crop":
        axis, offset = crop_params(fn)
        # The map's axis is the last one not cropped.
        return axis - 1, np.array([1.0]), -offset
    raise UndefinedMapException(f"{kind} layers have no coordinate map")


def compose(base_map: CoordMap, next_map: CoordMap) -> CoordMap:
    """``base_map`` followed by ``next_map``: scales multiply, the second shift is scaled by the
    first scale and added to the first shift."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException(f"coordinate maps on axis {ax1} and axis {ax2} cannot be "
                                    "composed")
    return (ax2 if ax1 is None else ax1), a1 * a2, a1 * b2 + b1


def inverse(coord_map: CoordMap) -> CoordMap:
    """The map back: scale ``1 / a``, shift ``-b / a``."""
    ax, a, b = coord_map
    return ax, 1 / a, -b / a


def _mapped_bottoms(top: Top):
    # A Crop's second bottom only gives the reference shape: its coordinates do not flow through.
    inputs = top.fn.inputs
    return inputs[:1] if top.fn.type_name == "Crop" else inputs


def _walk_back(start: Top):
    """Yield ``(blob, map from blob to start)`` for ``start`` and every ancestor reachable
    through layers with a coordinate map, nearest first."""
    maps = {start: _IDENTITY}
    queue = [start]
    while queue:
        top = queue.pop(0)
        yield top, maps[top]
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(top):
            if bottom not in maps:
                maps[bottom] = compose(maps[top], step)
                queue.append(bottom)


def coord_map_from_to(top_from: Top, top_to: Top) -> CoordMap:
    """The map taking coordinates of ``top_from`` to those of ``top_to``: both are walked back
    to their nearest common ancestor blob. RuntimeError (:class:`UnconnectedError`) when there is
    none."""
    from_maps = dict(_walk_back(top_from))
    for top, to_map in _walk_back(top_to):
        if top in from_maps:
            return compose(to_map, inverse(from_maps[top]))
    raise UnconnectedError("Could not compute map between tops; are they connected by "
                           "spatial layers?")


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer cutting ``top_from`` to the coordinates of ``top_to`` (FCN's score crop): the
    map between them must be a shift by a non-positive integer on every spatial axis."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    if not np.all(a == 1):
        raise CropError(f"scale mismatch on crop (a = {a})")
    if not np.all(b <= 0):
        raise CropError(f"cannot crop negative offset (b = {b})")
    if not np.all(np.round(b) == b):
        raise CropError(f"cannot crop noninteger offset (b = {b})")
    axis = 1 if ax is None else ax  # only point-wise layers between them: crop H, W...
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=axis + 1, offset=[int(v) for v in -np.round(b)]))
