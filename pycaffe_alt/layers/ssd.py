"""The SSD detector's layers (Wei Liu's Caffe fork): Normalize, Permute, PriorBox, DetectionOutput.

These follow the fork's ``normalize_layer.cpp``, ``permute_layer.cpp``, ``prior_box_layer.cpp``,
``detection_output_layer.cpp`` and the box utilities of ``bbox_util.cpp`` (decoding and the greedy
``ApplyNMSFast``), so real SSD models (e.g. OpenCV's res10 face detector) give Caffe's outputs.

Permute's backward is autograd's (the fork's is the exact gradient). Normalize's is the fork's
hand-written one, which is not the exact gradient when each channel has its own scale (see
:class:`_NormalizeFn`). PriorBox's output depends only on shapes and DetectionOutput has no
backward in Caffe; neither connects its top to the graph.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..log import get_logger
from ..proto import caffe_pb2
from ..registry import LAYERS
from .base import Layer, Shape

# PriorBoxParameter.CodeType (wire facts of the SSD fork's caffe.proto).
CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3
FLT_MAX = float(np.finfo(np.float32).max)


def _positive(v: float) -> bool:
    """``v > 0`` and finite: the fork CHECKs ``> 0``, which NaN fails; an infinite size or
    ratio makes every box infinite."""
    return math.isfinite(v) and v > 0


# -- Normalize ------------------------------------------------------------------------------------
def _l2_norms(flat: torch.Tensor, across_spatial: bool, eps: float) -> torch.Tensor:
    """sqrt(sum x^2 + eps) of (N, C, S) values, over (C, S) per item or over C per position.

    The fork adds eps inside the square root in both modes (``norm_`` starts at eps and the
    channel sums are accumulated onto it).
    """
    return (flat.pow(2).sum(dim=(1, 2) if across_spatial else 1, keepdim=True) + eps).sqrt()


class _NormalizeFn(torch.autograd.Function):
    """The fork's Normalize: ``scale * x / norm``, with NormalizeLayer::Backward_cpu's gradients.

    The fork's bottom diff is ``scale * (g - x * sum(x * g) / norm^2) / norm`` (sums over the
    normalized span): it normalizes the top diff first and multiplies by the scale last, so a
    per-channel scale is left out of ``sum(x * g)``. That is the exact gradient only when every
    channel has the same scale (``channel_shared``, or equal values); autograd's ``sum(scale * x
    * g)`` would differ from Caffe otherwise. The scale's diff, the fork's ``sum(top * g) /
    scale``, is ``sum(x / norm * g)``, the exact one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, across_spatial: bool,  # type: ignore[override]
                eps: float) -> torch.Tensor:
        flat = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        norm = _l2_norms(flat, across_spatial, eps)
        s = scale.reshape(1, -1, 1) if scale.dim() else scale
        ctx.save_for_backward(flat, norm, scale)
        ctx.across_spatial = across_spatial
        return (flat / norm * s).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        flat, norm, scale = ctx.saved_tensors
        g = grad.reshape(flat.shape)
        s = scale.reshape(1, -1, 1) if scale.dim() else scale
        x_diff = scale_diff = None
        if ctx.needs_input_grad[0]:
            dot = (flat * g).sum(dim=(1, 2) if ctx.across_spatial else 1, keepdim=True)
            x_diff = ((g - flat * dot / (norm * norm)) / norm * s).reshape(grad.shape)
        if ctx.needs_input_grad[1]:
            per_channel = (flat / norm * g).sum(dim=(0, 2))
            scale_diff = per_channel.sum() if scale.dim() == 0 else per_channel.reshape(scale.shape)
        return x_diff, scale_diff, None, None


@LAYERS.register("Normalize")
class Normalize(Layer):
    """L2 normalisation (``norm_param``) followed by a learned scale: one per channel, or one
    shared by all channels (``channel_shared``), filled by ``scale_filler`` (default 1)."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ("scale",)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise self.error(f"needs a bottom with at least 2 axes (N, C, ...), got {shape}",
                             "normalise a blob with a channel axis")
        p = param.norm_param
        self.across_spatial = bool(p.across_spatial)
        self.channel_shared = bool(p.channel_shared)
        self.eps = float(p.eps)
        filler = p.scale_filler if p.HasField("scale_filler") else _constant_filler(1.0)
        # The fork stores a 0-axis blob (one value) when the scale is shared.
        self.add_blob(() if self.channel_shared else (shape[1],), filler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NormalizeFn.apply(x, self.scale, self.across_spatial, self.eps)


def _constant_filler(value: float):
    return caffe_pb2.FillerParameter(type="constant", value=value)


# -- Permute --------------------------------------------------------------------------------------
def full_permutation(order: Sequence[int], ndim: int) -> Tuple[int, ...]:
    """The given axes first, then every axis not named, in increasing order (the fork's rule)."""
    return tuple(order) + tuple(i for i in range(ndim) if i not in order)


@LAYERS.register("Permute")
class Permute(Layer):
    """Reorders axes (``permute_param.order``; unnamed axes follow in their original order)."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        ndim = len(bottom_shapes[0])
        order = [int(o) for o in param.permute_param.order]
        for o in order:
            if o >= ndim:
                raise self.error(f"order {o} is not an axis of the {ndim}-axis bottom "
                                 f"{tuple(bottom_shapes[0])}", f"use axes 0..{ndim - 1}")
        if len(set(order)) != len(order):
            raise self.error(f"order {order} names an axis twice", "name each axis at most once")
        self.order = full_permutation(order, ndim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Caffe's top is a fresh contiguous blob (or the bottom itself for the identity order).
        return x.permute(self.order).contiguous()


# -- PriorBox -------------------------------------------------------------------------------------
def prior_aspect_ratios(aspect_ratios: Sequence[float], flip: bool) -> List[float]:
    """1 first, then each new ratio (and 1/ratio with ``flip``); near-duplicates (1e-6) dropped."""
    ratios = [1.0]
    for ar in aspect_ratios:
        ar = float(np.float32(ar))
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(ar)
        if flip:
            ratios.append(float(np.float32(1.0 / ar)))
    return ratios


def prior_box_sizes(min_sizes: Sequence[float], max_sizes: Sequence[float],
                    ratios: Sequence[float]) -> np.ndarray:
    """(num_priors, 2) float32 box (width, height) in the fork's order per cell.

    For each min_size: the square min box, the square sqrt(min*max) box (when max sizes are
    given), then one box per ratio != 1. The fork reads each size into an ``int``, so fractional
    sizes are truncated; sqrt(min*max) is taken of that integer product.
    """
    sizes = []
    for s, min_size in enumerate(min_sizes):
        m = int(min_size)
        sizes.append((m, m))
        if len(max_sizes):
            side = math.sqrt(m * int(max_sizes[s]))
            sizes.append((side, side))
        for ar in ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            root = np.sqrt(np.float32(ar))  # float sqrt, as the fork's sqrt(float)
            sizes.append((np.float32(m) * root, np.float32(m) / root))
    return np.asarray(sizes, dtype=np.float32).reshape(-1, 2)


def prior_boxes(layer_hw: Tuple[int, int], img_hw: Tuple[int, int], step_hw: Tuple[float, float],
                offset: float, box_sizes: np.ndarray, clip: bool,
                variance: Sequence[float]) -> np.ndarray:
    """The PriorBox top, shape (1, 2, H*W*num_priors*4), float32.

    Channel 0: normalised [xmin, ymin, xmax, ymax] for each cell (row-major), each prior;
    channel 1: the variances, repeated per box. Arithmetic follows the fork's float/double mix:
    float centres ((w + offset) * step), then (centre -/+ size/2) / image size in double.
    """
    (lh, lw), (ih, iw), (sh, sw) = layer_hw, img_hw, step_hw
    off = np.float32(offset)
    cx = (np.arange(lw, dtype=np.float32) + off) * np.float32(sw)  # float32, as in the fork
    cy = (np.arange(lh, dtype=np.float32) + off) * np.float32(sh)
    cx = cx.astype(np.float64)[None, :, None]
    cy = cy.astype(np.float64)[:, None, None]
    half_w = box_sizes[:, 0].astype(np.float64)[None, None, :] / 2.0
    half_h = box_sizes[:, 1].astype(np.float64)[None, None, :] / 2.0
    shape = (lh, lw, box_sizes.shape[0])
    boxes = np.stack([np.broadcast_to((cx - half_w) / iw, shape),
                      np.broadcast_to((cy - half_h) / ih, shape),
                      np.broadcast_to((cx + half_w) / iw, shape),
                      np.broadcast_to((cy + half_h) / ih, shape)], axis=-1).astype(np.float32)
    boxes = boxes.reshape(-1)
    if clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    var = np.resize(np.asarray(variance, dtype=np.float32), boxes.size)
    return np.stack([boxes, var])[None]


@LAYERS.register("PriorBox")
class PriorBox(Layer):
    """Default boxes for one feature map (bottom 0) of an image (bottom 1), ``prior_box_param``.

    The top depends only on the bottoms' shapes, so it carries no gradient (the fork's backward
    does nothing).
    """

    num_bottoms = (2, 2)
    num_tops = (1, 1)
    blob_names = ()
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.prior_box_param
        if len(p.min_size) == 0:
            raise self.error("has no min_size", "give at least one 'min_size:'")
        if not all(_positive(m) for m in p.min_size):
            raise self.error(f"min_size must be positive and finite, got {list(p.min_size)}", None)
        if len(p.max_size) and len(p.max_size) != len(p.min_size):
            raise self.error(f"has {len(p.max_size)} max_size for {len(p.min_size)} min_size",
                             "give one max_size per min_size, or none")
        for mn, mx in zip(p.min_size, p.max_size):
            if not (mx > mn and math.isfinite(mx)):
                raise self.error(f"max_size {mx} is not greater than min_size {mn}",
                                 "each max_size must exceed its min_size")
        if len(p.variance) > 1 and len(p.variance) != 4:
            raise self.error(f"has {len(p.variance)} variance values",
                             "give one variance for all coordinates, or exactly four")
        if not all(_positive(v) for v in p.variance):  # NaN fails the fork's CHECK_GT too
            raise self.error(f"variance must be positive and finite, got {list(p.variance)}", None)
        self.variance = [float(v) for v in p.variance] or [0.1]  # the fork's default
        self.img_hw = self._pair(p, "img_size", "img_h", "img_w", "image size")
        self.step_hw = self._pair(p, "step", "step_h", "step_w", "step")
        self.offset = float(p.offset)
        if not math.isfinite(self.offset):
            raise self.error(f"offset must be finite, got {self.offset}",
                             "offset places the box centres within a cell, e.g. 0.5")
        self.clip = bool(p.clip)
        if not all(_positive(ar) for ar in p.aspect_ratio):
            # The fork divides by sqrt(ar): 0 gives infinite boxes, a negative one NaN.
            raise self.error(f"aspect_ratio must be positive, got {list(p.aspect_ratio)}",
                             "aspect ratios are width / height of the prior boxes, e.g. 2 or 3")
        ratios = prior_aspect_ratios(p.aspect_ratio, bool(p.flip))
        self.box_sizes = prior_box_sizes(p.min_size, p.max_size, ratios)
        self.num_priors = self.box_sizes.shape[0]
        self._check_shapes(bottom_shapes)
        # The boxes depend on nothing but the bottoms' geometry: cached per geometry/dtype/device.
        self._cache = {}

    def _pair(self, p, both: str, h: str, w: str, what: str) -> Tuple[float, float]:
        """(h, w) from ``both`` or ``h``/``w`` (exclusive); (0, 0) = derive from the bottoms."""
        if p.HasField(h) or p.HasField(w):
            if p.HasField(both):
                raise self.error(f"sets both {both} and {h}/{w}", f"give either {both} or {h} and {w}")
            vh, vw = getattr(p, h), getattr(p, w)
            if not (_positive(vh) and _positive(vw)):
                raise self.error(f"{h} and {w} must both be positive, got {vh} and {vw}", None)
            return float(vh), float(vw)
        if p.HasField(both):
            v = getattr(p, both)
            if not _positive(v):
                raise self.error(f"{both} must be positive, got {v}", None)
            return float(v), float(v)
        return 0.0, 0.0

    def _check_shapes(self, shapes: Sequence[Shape]) -> None:
        for i, s in enumerate(shapes):
            if len(s) != 4:
                raise self.error(f"bottom {i} must be 4-D (N, C, H, W), got {tuple(s)}",
                                 "bottom 0 is a feature map and bottom 1 the image")
        if shapes[0][2] * shapes[0][3] == 0:
            raise self.error(f"the feature map {tuple(shapes[0])} is empty", None)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_shapes(bottom_shapes)
        h, w = bottom_shapes[0][2], bottom_shapes[0][3]
        return [(1, 2, h * w * self.num_priors * 4)]

    def boxes(self, feature_shape: Shape, image_shape: Shape) -> np.ndarray:
        """The top for bottoms of these shapes (numpy float32)."""
        lh, lw = int(feature_shape[2]), int(feature_shape[3])
        ih, iw = self.img_hw
        if ih == 0 or iw == 0:
            ih, iw = int(image_shape[2]), int(image_shape[3])
        sh, sw = self.step_hw
        if sh == 0 or sw == 0:
            # The fork divides in float: static_cast<float>(img) / layer.
            sh, sw = float(np.float32(ih) / np.float32(lh)), float(np.float32(iw) / np.float32(lw))
        return prior_boxes((lh, lw), (int(ih), int(iw)), (sh, sw), self.offset, self.box_sizes,
                           self.clip, self.variance)

    def forward(self, feature: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        key = (tuple(feature.shape[2:]), tuple(image.shape[2:]), feature.dtype, feature.device)
        top = self._cache.get(key)
        if top is None:
            self._check_shapes([tuple(feature.shape), tuple(image.shape)])
            top = torch.as_tensor(self.boxes(feature.shape, image.shape), dtype=feature.dtype,
                                  device=feature.device)
            self._cache[key] = top
        # A fresh tensor per pass: pycaffe writes into blobs must not change the cache.
        return top.clone()


# -- DetectionOutput ------------------------------------------------------------------------------
def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: torch.Tensor, code_type: int,
                 variance_encoded_in_target: bool) -> torch.Tensor:
    """Boxes [xmin, ymin, xmax, ymax] from predicted offsets ``loc`` (..., P, 4) and priors (P, 4).

    The fork's ``DecodeBBox``: CORNER adds (variance-scaled) offsets to the corners, CENTER_SIZE
    moves the centre by offset*size and scales the size by exp(offset), CORNER_SIZE adds offsets
    scaled by the prior's size. With ``variance_encoded_in_target`` the variances are not applied.
    """
    v = torch.ones_like(variances) if variance_encoded_in_target else variances
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == CORNER:
        return priors + v * loc
    if code_type == CORNER_SIZE:
        size = torch.stack([pw, ph, pw, ph], dim=-1)
        return priors + v * loc * size
    # CENTER_SIZE; the order of float operations follows the fork.
    pcx = (priors[:, 0] + priors[:, 2]) * 0.5
    pcy = (priors[:, 1] + priors[:, 3]) * 0.5
    cx = v[:, 0] * loc[..., 0] * pw + pcx
    cy = v[:, 1] * loc[..., 1] * ph + pcy
    w = torch.exp(v[:, 2] * loc[..., 2]) * pw
    h = torch.exp(v[:, 3] * loc[..., 3]) * ph
    return torch.stack([cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], dim=-1)


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    """The fork's ``BBoxSize`` of normalised boxes: width*height, 0 for inverted boxes."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.where((w < 0) | (h < 0), torch.zeros_like(w), w * h)


def overlaps_with(box: torch.Tensor, area: torch.Tensor, boxes: torch.Tensor,
                  areas: torch.Tensor) -> torch.Tensor:
    """Jaccard overlap (IoU) of one box with each of ``boxes``, as the fork's ``JaccardOverlap``.

    Disjoint boxes and intersections without positive width and height give 0 (also for NaN
    coordinates); otherwise inter / (area1 + area2 - inter).
    """
    disjoint = ((boxes[:, 0] > box[2]) | (boxes[:, 2] < box[0]) |
                (boxes[:, 1] > box[3]) | (boxes[:, 3] < box[1]))
    iw = torch.minimum(boxes[:, 2], box[2]) - torch.maximum(boxes[:, 0], box[0])
    ih = torch.minimum(boxes[:, 3], box[3]) - torch.maximum(boxes[:, 1], box[1])
    inter = iw * ih
    iou = inter / (area + areas - inter)
    return torch.where(~disjoint & (iw > 0) & (ih > 0), iou, torch.zeros_like(iou))


def nms_fast(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float,
             nms_threshold: float, eta: float, top_k: int) -> torch.Tensor:
    """Indices kept by the fork's ``ApplyNMSFast``, in the order it keeps them.

    Candidates: scores > ``score_threshold``, sorted by descending score (stable: ties keep index
    order), the first ``top_k`` (-1 = all). A candidate is kept when its overlap with every box
    kept before it is <= the adaptive threshold, which is multiplied by ``eta`` after each keep
    while it is above 0.5. Since the threshold only changes at a keep, each step keeps the first
    later candidate whose running maximum overlap with the kept boxes passes, so the loop runs
    once per kept box with vector ops over the candidates.
    """
    cand = torch.nonzero(scores > score_threshold).reshape(-1)
    order = torch.sort(scores[cand], descending=True, stable=True).indices
    cand = cand[order]
    if top_k > -1:
        cand = cand[:top_k]
    k = cand.numel()
    if k == 0:
        return cand
    b = boxes[cand]
    areas = box_areas(b)
    max_overlap = torch.zeros(k, dtype=boxes.dtype, device=boxes.device)
    threshold = np.float32(nms_threshold)
    kept = []
    j = 0
    while True:
        kept.append(j)
        if eta < 1 and threshold > 0.5:
            threshold = np.float32(threshold * np.float32(eta))  # float arithmetic, as the fork
        if j + 1 >= k:
            break
        rest = slice(j + 1, k)
        # torch.maximum propagates NaN overlaps, which the fork's "<=" test never keeps.
        overlap = overlaps_with(b[j], areas[j], b[rest], areas[rest])
        max_overlap[rest] = torch.maximum(max_overlap[rest], overlap)
        passing = torch.nonzero(max_overlap[rest] <= float(threshold)).reshape(-1)
        if passing.numel() == 0:
            break
        j = j + 1 + int(passing[0])
    return cand[torch.as_tensor(kept, device=cand.device)]


@LAYERS.register("DetectionOutput")
class DetectionOutput(Layer):
    """Decodes SSD predictions and keeps the best boxes per class by greedy NMS.

    Bottoms: location offsets (N, P*L*4) with L = 1 (``share_location``) or num_classes,
    confidences (N, P*num_classes), priors (1, 2, P*4) from PriorBox; an optional fourth bottom
    (the image, used by the fork only to draw with ``visualize``) is ignored. Top: (1, 1, D, 7),
    rows [image_id, label, score, xmin, ymin, xmax, ymax]; with no detection at all, one row of
    -1 per image carrying its image_id, as the fork writes. No backward, as in Caffe.
    """

    num_bottoms = (3, 4)
    num_tops = (1, 1)
    blob_names = ()
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("has no num_classes", "set detection_output_param { num_classes: ... }")
        self.num_classes = int(p.num_classes)
        self.share_location = bool(p.share_location)
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        self.code_type = int(p.code_type)
        if self.code_type not in (CORNER, CENTER_SIZE, CORNER_SIZE):
            raise self.error(f"unknown code_type {self.code_type}",
                             "use CORNER, CENTER_SIZE or CORNER_SIZE")
        self.variance_encoded_in_target = bool(p.variance_encoded_in_target)
        self.keep_top_k = int(p.keep_top_k)
        # Unset means every score passes (the fork uses -FLT_MAX).
        self.confidence_threshold = (float(p.confidence_threshold) if p.HasField("confidence_threshold")
                                     else -FLT_MAX)
        self.nms_threshold = float(p.nms_param.nms_threshold)
        if not self.nms_threshold >= 0:  # NaN fails the fork's CHECK_GE too
            raise self.error(f"nms_threshold must be non-negative, got {self.nms_threshold}", None)
        self.eta = float(p.nms_param.eta)
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta}", None)
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        s = p.save_output_param
        if s.output_directory and s.label_map_file and s.name_size_file:
            # SSD's released deploys carry this block (ssd_pascal.py writes it); the top blob is
            # the same with or without it, so it is ignored rather than the net refused.
            get_logger().warning("%s: save_output_param is ignored: detections are not written to "
                                 "%s; read the top blob instead", self.where,
                                 s.output_directory)
        self._check_shapes(bottom_shapes)

    def _check_shapes(self, shapes: Sequence[Shape]) -> int:
        loc, conf, prior = (tuple(s) for s in shapes[:3])
        if len(loc) < 2 or len(conf) < 2 or len(prior) != 3 or prior[:2] != (1, 2) or prior[2] % 4:
            raise self.error(f"needs loc (N, P*4), conf (N, P*classes) and priors (1, 2, P*4), got "
                             f"{loc}, {conf} and {prior}", "flatten loc and conf; feed the PriorBox top")
        if loc[0] != conf[0]:
            raise self.error(f"loc has {loc[0]} items but conf has {conf[0]}", None)
        num_priors = prior[2] // 4
        if num_priors * self.num_loc_classes * 4 != loc[1] or int(np.prod(loc[2:])) != 1:
            raise self.error(f"loc {loc} does not hold {num_priors} priors x {self.num_loc_classes} x 4 "
                             "offsets",
                             "flatten the location predictions to (N, P*4) and check the priors")
        if num_priors * self.num_classes != conf[1] or int(np.prod(conf[2:])) != 1:
            raise self.error(f"conf {conf} does not hold {num_priors} priors x {self.num_classes} "
                             "classes",
                             "flatten the confidences to (N, P*num_classes) and check num_classes")
        return num_priors

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_shapes(bottom_shapes)
        return [(1, 1, 1, 7)]  # the real row count is known only after a forward, as in Caffe

    @torch.no_grad()
    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor,
                *image: torch.Tensor) -> torch.Tensor:
        num_priors = self._check_shapes([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)])
        num = loc.shape[0]
        loc = loc.detach().reshape(num, num_priors, self.num_loc_classes, 4).transpose(1, 2)
        conf = conf.detach().reshape(num, num_priors, self.num_classes)
        prior = prior.detach().reshape(2, num_priors, 4)
        boxes = decode_boxes(loc, prior[0], prior[1], self.code_type, self.variance_encoded_in_target)
        rows = []
        # Per image and class the greedy NMS is sequential, as in the fork.
        for i in range(num):
            found = []  # (label, its boxes, kept indices) by ascending label, as the fork's std::map
            for c in range(self.num_classes):
                if c == self.background_label_id:
                    continue
                b = boxes[i, 0 if self.share_location else c]
                keep = nms_fast(b, conf[i, :, c], self.confidence_threshold, self.nms_threshold,
                                self.eta, self.top_k)
                found.append((c, b, keep))
            found = self._keep_top_k(conf[i], found)
            for c, b, keep in found:
                k = keep.numel()
                if k:
                    ids = torch.tensor([float(i), float(c)], dtype=loc.dtype, device=loc.device)
                    scores = conf[i, keep, c].unsqueeze(1)
                    rows.append(torch.cat([ids.expand(k, 2), scores, b[keep]], dim=1))
        if not rows:
            out = torch.full((num, 7), -1.0, dtype=loc.dtype, device=loc.device)
            out[:, 0] = torch.arange(num, dtype=loc.dtype, device=loc.device)
            return out.reshape(1, 1, num, 7)
        return torch.cat(rows).reshape(1, 1, -1, 7)

    def _keep_top_k(self, conf: torch.Tensor, found):
        """At most ``keep_top_k`` detections per image, the best scores over all classes.

        The fork sorts (score, label, index) triples with an unstable std::sort; here ties keep
        label then NMS order (stable), which only matters for exactly equal scores.
        """
        total = sum(int(keep.numel()) for _, _, keep in found)
        if self.keep_top_k <= -1 or total <= self.keep_top_k:
            return found
        scores = torch.cat([conf[keep, c] for c, _, keep in found])
        owner = torch.cat([torch.full((keep.numel(),), n, dtype=torch.long, device=conf.device)
                           for n, (_, _, keep) in enumerate(found)])
        best = torch.sort(scores, descending=True, stable=True).indices[:self.keep_top_k]
        # Detections stay grouped by label; within a label, in descending score order.
        flat_index = torch.cat([keep for _, _, keep in found])
        result = []
        for n, (c, b, _) in enumerate(found):
            mine = best[owner[best] == n]
            result.append((c, b, flat_index[mine]))
        return result
