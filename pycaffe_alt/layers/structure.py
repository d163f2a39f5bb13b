"""Structure layers: blob plumbing (concat, slice, split, reshape, crop, ...), InnerProduct, Embed,
element-wise combination of bottoms (Eltwise), reductions, ArgMax and constant/parameter sources.

Shapes follow Caffe's ``Reshape`` rules exactly; each layer checks its shapes when it is built (so
a bad prototxt fails at load time, naming the layer) and recomputes them from the actual bottoms
in ``forward`` (so the net can be reshaped from Python, as in pycaffe). Views stand in for Caffe's
``ShareData``; autograd gives the backward except where noted.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..fillers import FILLERS, fill
from ..errors import CaffeError
from ..fillers import check as check_filler
from ..proto import caffe_pb2
from ..log import get_logger
from ..registry import LAYERS
from .base import Layer, Shape


# -- shared helpers ----------------------------------------------------------------------------

def count(shape: Sequence[int], start: int = 0, end: Optional[int] = None) -> int:
    """Product of ``shape[start:end]`` (Caffe's ``Blob::count(start, end)``)."""
    # A plain product over the slice (no generator): torch.compile traces this without a break.
    return int(math.prod(shape[start:end]))


def legacy_or_axis(layer: Layer, p, legacy_field: str, num_axes: int) -> int:
    """The axis of Concat/Slice, given as ``axis`` or as the legacy ``concat_dim``/``slice_dim``."""
    if p.HasField("axis") and p.HasField(legacy_field):
        raise layer.error(f"sets both axis and {legacy_field}",
                          f"keep only 'axis' ({legacy_field} is its old name)")
    if p.HasField(legacy_field):
        legacy = int(getattr(p, legacy_field))
        if legacy >= num_axes:
            raise layer.error(f"{legacy_field} {legacy} is out of range for a {num_axes}-axis bottom",
                              f"use a value below {num_axes}")
        return legacy
    return layer.canonical_axis(int(p.axis), num_axes)


def caffe_topk(x: torch.Tensor, dim: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest values along ``dim`` and their indices, ties broken as Caffe's ArgMax does.

    Caffe partially sorts (value, index) pairs with ``std::greater``, so among equal values the
    larger index comes first. A stable descending sort of the reversed axis yields the same order.
    """
    n = x.shape[dim]
    values, rev_idx = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
    values = values.narrow(dim, 0, k)
    indices = (n - 1) - rev_idx.narrow(dim, 0, k)
    return values, indices


def filler_or_default(layer: Layer, p, field: str) -> caffe_pb2.FillerParameter:
    """The FillerParameter in ``p.<field>``, checked to be a known type (Caffe's default: constant 0)."""
    filler = getattr(p, field) if p.HasField(field) else caffe_pb2.FillerParameter(type="constant")
    if (filler.type or "constant") not in FILLERS:
        raise layer.error(f"{field} has unknown filler type {filler.type!r}",
                          f"known fillers: {', '.join(sorted(FILLERS))}")
    return filler


def no_in_place(layer: Layer, param) -> None:
    """Layers whose top is a view of the bottom (Reshape, Flatten) cannot run in place in Caffe."""
    if len(param.top) and len(param.bottom) and param.top[0] == param.bottom[0]:
        raise layer.error("does not allow in-place computation (top == bottom)",
                          "give the top a new name")


# -- InnerProduct, Embed --------------------------------------------------------------------------
@LAYERS.register("InnerProduct")
class InnerProduct(Layer):
    """Fully connected: flattens axes from ``axis`` on (K values) into N outputs.

    Weight blob (N, K), or (K, N) with ``transpose: true``; bias (N,). Top shape =
    ``bottom.shape[:axis] + (N,)``.
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ("weight", "bias")

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.inner_product_param
        shape = tuple(bottom_shapes[0])
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("needs num_output > 0", "set inner_product_param { num_output: N }")
        self.axis = self.canonical_axis(int(p.axis), len(shape))
        self.K = count(shape, self.axis)
        self.transpose = bool(p.transpose)
        self.bias_term = bool(p.bias_term)
        w_shape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self.add_blob(w_shape, filler_or_default(self, p, "weight_filler"))
        if self.bias_term:
            self.add_blob((self.num_output,), filler_or_default(self, p, "bias_filler"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if count(x.shape, self.axis) != self.K:
            raise self.error(f"bottom shape {tuple(x.shape)} has {count(x.shape, self.axis)} inputs "
                             f"from axis {self.axis} on, but the weights expect {self.K}",
                             "only the axes before 'axis' may change after setup")
        # A bottom already flat (the second of two InnerProducts) is used as it is: a reshape to
        # its own shape is still a view op and a backward node (see SoftmaxWithLoss.forward).
        flat = x if x.dim() == self.axis + 1 else x.reshape(tuple(x.shape[:self.axis]) + (self.K,))
        bias = self.bias if self.bias_term else None
        if self.transpose:
            y = flat @ self.weight
            return y + bias if bias is not None else y
        return F.linear(flat, self.weight, bias)


@LAYERS.register("Embed")
class Embed(Layer):
    """Looks up rows of a (input_dim, num_output) table by the integer values of the bottom.

    Top shape = ``bottom.shape + (num_output,)``. Indices carry no gradient (Caffe refuses to
    backpropagate into them).
    """

    backward_reads_bottom_copy = True  # its indices, as integers
    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ("weight", "bias")

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.embed_param
        self.num_output, self.input_dim = int(p.num_output), int(p.input_dim)
        if self.num_output <= 0 or self.input_dim <= 0:
            raise self.error(f"needs num_output > 0 and input_dim > 0, got {self.num_output} and "
                             f"{self.input_dim}", "set embed_param { input_dim: V num_output: N }")
        self.bias_term = bool(p.bias_term)
        self.add_blob((self.input_dim, self.num_output), filler_or_default(self, p, "weight_filler"))
        if self.bias_term:
            self.add_blob((self.num_output,), filler_or_default(self, p, "bias_filler"))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return [tuple(bottom_shapes[0]) + (self.num_output,)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = (x < 0) | (x >= self.input_dim) | (x != torch.floor(x))
        if bool(bad.any()):
            v = x[bad].flatten()[0].item()
            raise self.error(f"index {v} is not an integer in [0, {self.input_dim})",
                             "feed integer indices below input_dim")
        y = F.embedding(x.detach().long(), self.weight)
        return y + self.bias if self.bias_term else y


# -- element-wise combination ------------------------------------------------------------------
@LAYERS.register("Eltwise")
class Eltwise(Layer):
    """PROD, SUM (with one coefficient per bottom) or MAX of bottoms of identical shape.

    MAX routes the gradient to the bottom Caffe records as the maximum: bottom 0 only where it is
    strictly greater than bottom 1 (ties go to bottom 1), and a later bottom only where it is
    strictly greater than the running maximum (ties stay with the earlier one).
    """

    num_bottoms = (2, None)
    num_tops = (1, 1)
    blob_names = ()

    PROD, SUM, MAX = 0, 1, 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.eltwise_param
        self.op = int(p.operation)
        n = len(bottom_shapes)
        if len(p.coeff) not in (0, n):
            raise self.error(f"has {len(p.coeff)} coeff values for {n} bottoms",
                             "give one coeff per bottom, or none")
        if p.coeff and self.op != self.SUM:
            raise self.error("takes coeff only for operation SUM", "remove the coeff lines")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * n
        self._check_shapes(bottom_shapes)

    def _check_shapes(self, shapes: Sequence[Shape]) -> None:
        first = tuple(shapes[0])
        for i, s in enumerate(shapes[1:], 1):
            if tuple(s) != first:
                raise self.error(f"bottom 0 has shape {first} but bottom {i} has shape {tuple(s)}",
                                 "Eltwise needs bottoms of exactly the same shape")

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        self._check_shapes([tuple(x.shape) for x in xs])
        if self.op == self.PROD:
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
            return y
        if self.op == self.SUM:
            y = None
            for c, x in zip(self.coeffs, xs):
                term = x if c == 1.0 else x * c
                y = term if y is None else y + term
            return y
        # MAX, following Caffe's comparison order so ties send the gradient where Caffe does.
        y = torch.where(xs[0] > xs[1], xs[0], xs[1])
        for x in xs[2:]:
            y = torch.where(x > y, x, y)
        return y


# -- concatenation, slicing, splitting -----------------------------------------------------------
@LAYERS.register("Concat")
class Concat(Layer):
    """Joins bottoms along ``axis`` (or legacy ``concat_dim``); other axes must agree."""

    num_bottoms = (1, None)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        first = tuple(bottom_shapes[0])
        self.axis = legacy_or_axis(self, param.concat_param, "concat_dim", len(first))
        self._check_shapes(bottom_shapes)

    def _check_shapes(self, shapes: Sequence[Shape]) -> None:
        first = tuple(shapes[0])
        for i, s in enumerate(shapes[1:], 1):
            s = tuple(s)
            if len(s) != len(first) or any(a != b for j, (a, b) in enumerate(zip(first, s))
                                           if j != self.axis):
                raise self.error(f"bottom 0 has shape {first} but bottom {i} has shape {s}",
                                 f"all bottoms must have the same shape except on axis {self.axis}")

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if len(xs) == 1:
            return xs[0].view_as(xs[0])  # Caffe shares the single bottom
        self._check_shapes([tuple(x.shape) for x in xs])
        return torch.cat(xs, dim=self.axis)


@LAYERS.register("Slice")
class Slice(Layer):
    """Cuts the bottom along ``axis`` (or legacy ``slice_dim``) at ``slice_point``s, or evenly."""

    num_bottoms = (1, 1)
    num_tops = (1, None)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.slice_param
        shape = tuple(bottom_shapes[0])
        self.axis = legacy_or_axis(self, p, "slice_dim", len(shape))
        self.points = [int(v) for v in p.slice_point]
        self.n_tops = len(param.top)
        self.sizes(shape[self.axis])

    def sizes(self, length: int) -> List[int]:
        """The tops' lengths along the axis for a bottom ``length`` long (Caffe's checks)."""
        n = self.n_tops
        if self.points:
            if len(self.points) != n - 1:
                raise self.error(f"has {len(self.points)} slice_point values for {n} tops",
                                 "give one slice_point fewer than the number of tops")
            if n > length:
                raise self.error(f"cannot cut {length} entries on axis {self.axis} into {n} tops",
                                 "use fewer tops")
            bounds = [0] + self.points + [length]
            if any(b <= a for a, b in zip(bounds[:-2], bounds[1:-1])) or self.points[-1] > length:
                raise self.error(f"slice_point values {self.points} must increase strictly and stay "
                                 f"within the axis length {length}", "fix the slice_point list")
            return [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if length % n:
            raise self.error(f"cannot split axis {self.axis} of length {length} evenly into {n} tops",
                             "give slice_point values, or a number of tops that divides the length")
        return [length // n] * n

    def forward(self, x: torch.Tensor):
        sizes = self.sizes(x.shape[self.axis])
        if len(sizes) == 1:
            return x.view_as(x)
        # Caffe's SliceLayer copies into tops of their own (it shares only a single top): a
        # view would let a write into the bottom's data (or a top's) reach the other blobs.
        return tuple(t.clone() for t in torch.split(x, sizes, dim=self.axis))


@LAYERS.register("Split")
class Split(Layer):
    """Copies the bottom to every top (Caffe shares the data; autograd sums the gradients)."""

    num_bottoms = (1, 1)
    num_tops = (1, None)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.n_tops = max(1, len(param.top))

    def forward(self, x: torch.Tensor):
        return tuple(x.view_as(x) for _ in range(self.n_tops))


@LAYERS.register("Silence")
class Silence(Layer):
    """Consumes bottoms so they do not show as net outputs; no tops, zero gradient."""

    num_bottoms = (1, None)
    num_tops = (0, 0)
    blob_names = ()

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return []

    def forward(self, *xs: torch.Tensor):
        return ()


# -- reshaping views -----------------------------------------------------------------------------
@LAYERS.register("Flatten")
class Flatten(Layer):
    """Merges axes ``axis`` .. ``end_axis`` (inclusive) into one."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        no_in_place(self, param)
        self._axes(len(bottom_shapes[0]))

    def _axes(self, num_axes: int) -> Tuple[int, int]:
        p = self.param.flatten_param
        start = self.canonical_axis(int(p.axis), num_axes)
        end = self.canonical_axis(int(p.end_axis), num_axes, "end_axis")
        if end < start:
            raise self.error(f"end_axis {p.end_axis} comes before axis {p.axis}",
                             "end_axis must not precede axis")
        return start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, end = self._axes(x.dim())
        return x.reshape(tuple(x.shape[:start]) + (count(x.shape, start, end + 1),)
                         + tuple(x.shape[end + 1:]))


def reshape_top_shape(bottom: Sequence[int], dims: Sequence[int], axis: int, num_axes: int) -> Shape:
    """Caffe's Reshape rule: replace ``num_axes`` axes from ``axis`` by ``dims``.

    ``0`` copies the bottom dimension at the same position (relative to ``axis``), one ``-1`` is
    inferred from the count; ``axis`` may be negative (-1 = after the last axis), ``num_axes`` -1
    means all remaining axes. Raises ValueError with a message on a bad specification.
    """
    n = len(bottom)
    start = axis if axis >= 0 else n + axis + 1
    if not 0 <= start <= n:
        raise ValueError(f"axis {axis} is out of range for a {n}-axis bottom")
    if num_axes < -1:
        raise ValueError(f"num_axes must be >= 0, or -1 for all, got {num_axes}")
    end = n if num_axes == -1 else start + num_axes
    if end > n:
        raise ValueError(f"axis + num_axes = {end} is beyond the {n} axes of the bottom")
    if sum(1 for d in dims if d == -1) > 1:
        raise ValueError("shape contains more than one -1; at most one dimension can be inferred")
    if any(d < -1 for d in dims):
        raise ValueError(f"shape {list(dims)} has a negative dimension other than -1")
    top = list(bottom[:start]) + list(dims) + list(bottom[end:])
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= n:
                raise ValueError(f"shape dim {i} is 0 (copy) but the bottom has no axis {start + i}")
            top[start + i] = bottom[start + i]
    if -1 in dims:
        i = start + list(dims).index(-1)
        known = math.prod(d for j, d in enumerate(top) if j != i)
        total = count(bottom)
        if known == 0 or total % known:
            raise ValueError(f"bottom count {total} is not divisible by the product of the given "
                             f"dimensions ({known})")
        top[i] = total // known
    if count(top) != count(bottom):
        raise ValueError(f"top shape {tuple(top)} has {count(top)} elements but the bottom "
                         f"{tuple(bottom)} has {count(bottom)}")
    return tuple(int(d) for d in top)


@LAYERS.register("Reshape")
class Reshape(Layer):
    """Changes the shape without touching data (``reshape_param { shape, axis, num_axes }``)."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        no_in_place(self, param)
        p = param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        self.axis, self.num_axes = int(p.axis), int(p.num_axes)
        self._top_shape(tuple(bottom_shapes[0]))

    def _top_shape(self, bottom: Shape) -> Shape:
        try:
            return reshape_top_shape(bottom, self.dims, self.axis, self.num_axes)
        except ValueError as e:
            raise self.error(f"cannot reshape {tuple(bottom)}: {e}",
                             "fix reshape_param (0 copies a dimension, -1 infers one)") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self._top_shape(tuple(x.shape)))


@LAYERS.register("Crop")
class Crop(Layer):
    """Crops bottom 0 to the shape of bottom 1 on axes ``axis`` and after, at ``offset``s.

    One offset applies to every cropped axis; otherwise one per cropped axis. Bottom 1 only gives
    the shape and gets no gradient.
    """

    num_bottoms = (2, 2)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.crop_param
        n = len(bottom_shapes[0])
        self.axis = self.canonical_axis(int(p.axis), n)
        self.offsets = [int(o) for o in p.offset]
        if len(self.offsets) > 1 and self.axis + len(self.offsets) != n:
            raise self.error(f"has {len(self.offsets)} offsets for the {n - self.axis} axes from "
                             f"axis {self.axis} on", "give one offset for all cropped axes, or one each")
        self.windows(tuple(bottom_shapes[0]), tuple(bottom_shapes[1]))
        if not param.HasField("crop_param") and tuple(bottom_shapes[0]) != tuple(bottom_shapes[1]):
            # BVLC's default is offset 0; HED's fork (s9xie/hed) has Crop layers without
            # crop_param whose offsets it works out from the layers' geometry, so its nets run
            # here with their edge maps shifted unless the offsets are written in.
            get_logger().warning(
                "%s: Crop without crop_param crops %s to %s at offset 0 (BVLC Caffe's default). A "
                "net from HED's Caffe fork needs its offsets written in: crop_param { offset: N } "
                "on the cropped axes", self.where, tuple(bottom_shapes[0]),
                tuple(bottom_shapes[1]))

    def windows(self, big: Shape, ref: Shape) -> List[Tuple[int, int, int]]:
        """``(axis, offset, size)`` of every cropped axis for bottoms of these shapes."""
        if len(big) != len(ref):
            raise self.error(f"bottoms have different numbers of axes: {big} and {ref}",
                             "the reference bottom must have as many axes as the cropped one")
        out = []
        for i in range(self.axis, len(big)):
            off = self.offsets[0] if len(self.offsets) == 1 else (
                self.offsets[i - self.axis] if self.offsets else 0)
            if big[i] - off < ref[i]:
                raise self.error(f"crop of axis {i} is out of bounds: size {ref[i]} at offset {off} "
                                 f"does not fit in {big[i]} (bottom shapes {big} and {ref})",
                                 "reduce the offset or crop to a smaller reference")
            out.append((i, off, ref[i]))
        return out

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        y = x
        for i, off, size in self.windows(tuple(x.shape), tuple(ref.shape)):
            if off != 0 or size != x.shape[i]:
                y = y.narrow(i, off, size)
        # CropLayer::Forward copies the window into a top of its own: no view of the bottom,
        # which a write into one blob's data would carry into the other.
        return y.clone() if y is not x else x.clone()


@LAYERS.register("Tile")
class Tile(Layer):
    """Repeats the block of axes from ``axis`` on ``tiles`` times (the axis grows by that factor)."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.tile_param
        self.axis = self.canonical_axis(int(p.axis), len(bottom_shapes[0]))
        if not p.HasField("tiles") or p.tiles <= 0:
            raise self.error("needs a positive number of tiles", "set tile_param { tiles: T }")
        self.tiles = int(p.tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reps = [1] * x.dim()
        reps[self.axis] = self.tiles
        return x.repeat(*reps)


# -- reductions ------------------------------------------------------------------------------------
@LAYERS.register("Reduction")
class Reduction(Layer):
    """Reduces all axes from ``axis`` on by SUM, ASUM (sum of |x|), SUMSQ or MEAN, times ``coeff``.

    Top shape = ``bottom.shape[:axis]`` (axis 0 gives a scalar).
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    SUM, ASUM, SUMSQ, MEAN = 1, 2, 3, 4

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.reduction_param
        self.op = int(p.operation)
        if self.op not in (self.SUM, self.ASUM, self.SUMSQ, self.MEAN):
            raise self.error(f"unknown reduction operation {self.op}", "use SUM, ASUM, SUMSQ or MEAN")
        self.coeff = float(p.coeff)
        self.canonical_axis(int(p.axis), len(bottom_shapes[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.canonical_axis(int(self.param.reduction_param.axis), x.dim())
        rows = x.reshape(tuple(x.shape[:axis]) + (-1,))
        if self.op == self.ASUM:
            y = rows.abs().sum(-1)
        elif self.op == self.SUMSQ:
            y = (rows * rows).sum(-1)
        else:
            y = rows.sum(-1)
        coeff = self.coeff / rows.shape[-1] if self.op == self.MEAN else self.coeff
        return y * coeff if coeff != 1.0 else y


@LAYERS.register("ArgMax")
class ArgMax(Layer):
    """Indices (and optionally values) of the ``top_k`` largest entries.

    With ``axis``: along that axis, top shape = bottom shape with ``top_k`` there (values instead
    of indices when ``out_max_val``). Without: over each item flattened, top shape
    ``(N, 1 or 2, top_k)`` padded with 1s to the bottom's axis count, where channel 0 holds the
    indices and channel 1 the values. Indices are floats, as in Caffe. No backward (Caffe has none).
    """

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.argmax_param
        shape = tuple(bottom_shapes[0])
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        self.axis = self.canonical_axis(int(p.axis), len(shape)) if p.HasField("axis") else None
        if self.top_k < 1:
            raise self.error("top_k must be at least 1", "set argmax_param { top_k: 1 } or more")
        self._check_k(shape)

    def _check_k(self, shape: Shape) -> None:
        n = shape[self.axis] if self.axis is not None else count(shape, 1)
        if self.top_k > n:
            where = f"axis {self.axis}" if self.axis is not None else "each flattened item"
            raise self.error(f"top_k {self.top_k} exceeds the {n} entries of {where} (bottom {shape})",
                             "lower top_k")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        self._check_k(tuple(x.shape))
        if self.axis is not None:
            values, indices = caffe_topk(x, self.axis, self.top_k)
            return values if self.out_max_val else indices.to(x.dtype)
        values, indices = caffe_topk(x.reshape(x.shape[0], count(tuple(x.shape), 1)), 1, self.top_k)
        parts = [indices.to(x.dtype)] + ([values] if self.out_max_val else [])
        y = torch.stack(parts, dim=1)  # (N, 1 or 2, top_k)
        return y.reshape(tuple(y.shape) + (1,) * max(0, x.dim() - 3))


# -- index-driven gathers -----------------------------------------------------------------------------
@LAYERS.register("BatchReindex")
class BatchReindex(Layer):
    """Top item i = bottom item ``index[i]`` (bottom 1, 1-D); gradients add up over repeats."""

    backward_reads_bottom_copy = True  # its indices, as integers
    num_bottoms = (2, 2)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.top_shapes(bottom_shapes)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        data, index = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if len(index) != 1:
            raise self.error(f"the index bottom must be 1-D, got shape {index}",
                             "feed a vector of item indices")
        return [(index[0],) + data[1:]]

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(x.shape), tuple(index.shape)])
        index = index.detach()
        if index.numel() and bool(((index < 0) | (index >= x.shape[0])).any()):
            raise self.error(f"an index is outside [0, {x.shape[0]}): {index.tolist()}",
                             "indices must point at items of the first bottom")
        return x.index_select(0, index.long())


@LAYERS.register("Filter")
class Filter(Layer):
    """Keeps the items (axis 0) of each bottom whose selector (the last bottom) is nonzero.

    The number of items out depends on the data; before the first forward the tops are declared
    with the full batch, as Caffe does. Gradients go back to the selected items; the selector gets
    none.
    """

    backward_reads_bottom_copy = True  # its indices, as integers
    num_bottoms = (2, None)
    num_tops = (1, None)
    blob_names = ()
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if len(param.top) != len(bottom_shapes) - 1:
            raise self.error(f"has {len(param.top)} tops for {len(bottom_shapes) - 1} filtered bottoms",
                             "give one top per bottom, not counting the selector (the last bottom)")
        self.selector_index = len(bottom_shapes) - 1
        self._check_shapes(bottom_shapes)

    def _check_shapes(self, shapes: Sequence[Shape]) -> None:
        sel = tuple(shapes[-1])
        if len(sel) == 0 or any(d != 1 for d in sel[1:]):
            raise self.error(f"the selector (last bottom) must have shape (N,) or (N, 1, ...), got {sel}",
                             "feed one selector value per item")
        for i, s in enumerate(shapes[:-1]):
            if len(s) == 0 or s[0] != sel[0]:
                raise self.error(f"bottom {i} has shape {tuple(s)} but the selector has {sel[0]} items",
                                 "every bottom needs as many items (axis 0) as the selector")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != self.selector_index

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_shapes(bottom_shapes)
        return [tuple(s) for s in bottom_shapes[:-1]]

    def forward(self, *xs: torch.Tensor):
        self._check_shapes([tuple(x.shape) for x in xs])
        keep = torch.nonzero(xs[-1].detach().reshape(-1) != 0).reshape(-1)
        tops = tuple(x.index_select(0, keep) for x in xs[:-1])
        return tops[0] if len(tops) == 1 else tops


# -- sources without bottoms -------------------------------------------------------------------------
@LAYERS.register("DummyData")
class DummyData(Layer):
    """Tops of given shapes filled by ``data_filler`` (one for all tops, or one per top).

    As in Caffe, other fillers draw new values at every forward, while a top with a "constant"
    filler (the default) is filled once, at set-up, and never again (DummyDataLayer::LayerSetUp
    runs Forward with ``refill_`` inverted): see :meth:`fixed_tops`. Shapes come from ``shape``
    or the legacy num/channels/height/width, until pycaffe reshapes a top
    (:meth:`take_top_shape`: Caffe's Reshape here does nothing).
    """

    num_bottoms = (0, 0)
    num_tops = (1, None)
    blob_names = ()
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.dummy_data_param
        n = len(param.top)
        # No data_filler: zeros.
        fillers = list(p.data_filler) or [caffe_pb2.FillerParameter(type="constant", value=0)]
        for f in fillers:
            if (f.type or "constant") not in FILLERS:
                raise self.error(f"unknown data_filler type {f.type!r}",
                                 f"known fillers: {', '.join(sorted(FILLERS))}")
        self.fillers = self.per_top(fillers, n, "data_filler entries", "data_filler { }")
        self.shapes = self._shapes(p, n)
        for shape, f in zip(self.shapes, self.fillers):
            check_filler(f, shape)  # refused here, named, not at some later forward
        # Carries the dtype/device the tops are created with (moves with .to()/.double()).
        self.register_buffer("_like", torch.zeros(0), persistent=False)

    def _shapes(self, p, n: int) -> List[Shape]:
        legacy = [("num", p.num), ("channels", p.channels), ("height", p.height), ("width", p.width)]
        if any(len(v) for _, v in legacy):
            if len(p.shape):
                raise self.error("sets both shape and the legacy num/channels/height/width",
                                 "keep only 'shape { dim: ... }'")
            for name, v in legacy:
                if len(v) not in (1, n):
                    raise self.error(f"gives {len(v)} '{name}' values for {n} tops",
                                     f"give '{name}' once, or once per top")
            return [tuple(int(v[0] if len(v) == 1 else v[i]) for _, v in legacy) for i in range(n)]
        return self.per_top([tuple(int(d) for d in s.dim) for s in p.shape], n, "shapes",
                            "shape { }")

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return list(self.shapes)

    def _filled(self, index: int) -> torch.Tensor:
        t = torch.empty(self.shapes[index], dtype=self._like.dtype, device=self._like.device)
        return fill(t, self.fillers[index])

    def fixed_tops(self) -> Dict[int, torch.Tensor]:
        # Caffe fills the constant tops in LayerSetUp and its Forward skips them: the net keeps
        # what the blob holds (what pycaffe wrote into a NetSpec placeholder L.DummyData).
        # The filler type as Caffe compares it (strcmp with "constant"; unset means constant).
        return {i: self._filled(i) for i, f in enumerate(self.fillers)
                if (f.type or "constant") == "constant"}

    def take_top_shape(self, index: int, shape: Shape) -> bool:
        # DummyDataLayer::Reshape is empty: every later Forward fills the blob at the shape
        # it has. A shape the filler refuses is refused now, as at set-up.
        try:
            check_filler(self.fillers[index], shape)
        except CaffeError as e:
            raise e.locate(self.where) from None
        self.shapes[index] = tuple(shape)
        return True

    def forward(self):
        tops = [self._filled(i) for i in range(len(self.shapes))]
        return tops[0] if len(tops) == 1 else tuple(tops)


@LAYERS.register("Parameter")
class Parameter(Layer):
    """Exposes one learnable blob (``parameter_param { shape }``, zeros initially) as its top."""

    num_bottoms = (0, 0)
    num_tops = (1, 1)
    blob_names = ("value",)
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.shape = tuple(int(d) for d in param.parameter_param.shape.dim)
        self.add_blob(self.shape, None)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return [self.shape]

    def forward(self) -> torch.Tensor:
        # A view, like Caffe's ShareData/ShareDiff: the top's gradient lands on the blob.
        return self.value.view_as(self.value)
