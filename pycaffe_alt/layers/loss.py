"""Loss layers and Accuracy, following BVLC Caffe's numerics.

Every loss writes one scalar (shape ``()``, as Caffe's 0-axis loss blob); the net multiplies it by
the layer's ``loss_weight``. Gradients come from autograd wherever Caffe's backward is the exact
gradient of its forward. Where it is not (a clamped log whose clamp Caffe's backward ignores,
ContrastiveLoss's ``+1e-4`` in a denominator) the layer uses :func:`with_caffe_gradient`, which
keeps the forward value and takes the gradient of a surrogate built to equal Caffe's backward.

The normalisation rule (``loss_param``) exists once, as :func:`normalization_mode` and
:func:`loss_normalizer`; Caffe duplicates it in three layers.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CaffeError
from ..fileio import read_input_bytes
from ..proto import caffe_pb2
from ..log import get_logger
from ..registry import LAYERS
from .base import Layer, Shape

Normalizer = Union[float, torch.Tensor]

_Mode = caffe_pb2.LossParameter
FULL, VALID, BATCH_SIZE, NONE = _Mode.FULL, _Mode.VALID, _Mode.BATCH_SIZE, _Mode.NONE

# Caffe's clamps before a log: SoftmaxWithLoss uses FLT_MIN, the others kLOG_THRESHOLD (1e-20).
FLT_MIN = float(np.finfo(np.float32).tiny)
LOG_THRESHOLD = 1e-20


# -- pure helpers ------------------------------------------------------------------------------
def normalization_mode(loss_param, default: int = VALID) -> int:
    """The NormalizationMode a loss uses: ``normalization`` if set, else the legacy ``normalize``
    bool (true -> VALID, false -> BATCH_SIZE), else ``default`` (Caffe: VALID for SoftmaxWithLoss,
    BATCH_SIZE for SigmoidCrossEntropyLoss)."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return VALID if loss_param.normalize else BATCH_SIZE
    return default


def loss_normalizer(mode: int, outer_num: int, inner_num: int,
                    valid_count: Union[int, torch.Tensor]) -> Normalizer:
    """Caffe's ``get_normalizer``: what the summed loss is divided by, never less than 1 (so a batch
    whose labels are all ignored gives 0, not NaN). ``valid_count`` may be a tensor (the count of
    non-ignored labels), which keeps the computation on the device."""
    if mode == FULL:
        n: Union[int, torch.Tensor] = outer_num * inner_num
    elif mode == VALID:
        n = valid_count
    elif mode == BATCH_SIZE:
        n = outer_num
    elif mode == NONE:
        n = 1
    else:
        raise ValueError(f"unknown normalization mode {mode}")
    if isinstance(n, torch.Tensor):
        return n.clamp(min=1)
    return float(max(1, n))


def with_caffe_gradient(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    ``s - s.detach()`` is exactly 0 for finite ``s``, so the forward value is not perturbed.
    """
    return value.detach() + (surrogate - surrogate.detach())



def legacy_dim(shape: Shape, index: int) -> int:
    """Caffe's num()/channels()/height()/width(): axes past the last one count as 1."""
    return int(shape[index]) if index < len(shape) else 1


def _prod(dims: Sequence[int]) -> int:
    return int(math.prod(dims))  # no generator: torch.compile traces it without a break


# -- shared layer machinery --------------------------------------------------------------------
def _class_indices(layer: Layer, labels: torch.Tensor, num_classes: int,
                   ignore_label: Optional[int]) -> torch.Tensor:
    """Integer class labels (truncated like Caffe's static_cast<int>), checked to lie in
    ``[0, num_classes)`` unless they equal ``ignore_label``.

    Caffe only DCHECKs the range (release builds read garbage); we raise an error instead. The
    common case costs one reduction and one host read (``aminmax``); only a batch whose extremes
    fall outside the classes is searched for the first offending label.
    """
    idx = labels.long()
    # The check reads the labels on the host; a compiled graph cannot (it would break there).
    # Compiled runs skip it: an out-of-range label then fails the graph's indexing, and
    # pycaffe_alt.compile re-runs the step eagerly, which raises this error.
    if torch.compiler.is_compiling() or idx.numel() == 0:
        return idx
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()
    if lo >= 0 and hi < num_classes:
        return idx
    bad = (idx < 0) | (idx >= num_classes)
    if ignore_label is not None:
        bad &= idx != ignore_label
    if bool(bad.any()):
        # Name the label as given: a NaN or infinite float label converts to an arbitrary
        # integer (INT64_MIN on x86), which would hide what is wrong.
        given = labels[bad][0].item()
        first = idx[bad][0].item() if math.isfinite(given) else given
        raise layer.error(f"label {first} is outside the {num_classes} classes [0, {num_classes - 1}]",
                          "labels must be class indices of the predictions' class axis"
                          + ("" if ignore_label is None else f" or the ignore_label {ignore_label}"))
    return idx


def _check_class_labels(layer: Layer, labels: torch.Tensor, num_classes: int,
                        ignore_label: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_class_indices` plus the mask of labels that count; ignored positions get index 0
    so they can be gathered safely and then masked out."""
    idx = _class_indices(layer, labels, num_classes, ignore_label)
    if ignore_label is None:
        return idx, torch.ones_like(idx, dtype=torch.bool)
    valid = idx != ignore_label
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


# F.nll_loss's ignore_index when the layer ignores nothing: a value no float label converts to
# (2^62 + 1 has no float32/float64 representation; a NaN or infinite label becomes INT64_MIN on
# x86 and 0 or INT64_MAX on ARM, all of which nll_loss range-checks), so no label is skipped.
_NO_IGNORE = -(2 ** 62) - 1
# Below this log-probability Caffe's clamp of prob at FLT_MIN takes effect.
_LOG_FLT_MIN = math.log(FLT_MIN)


class LossLayer(Layer):
    """Common ground of Caffe's loss layers: two or more bottoms (predictions, labels, ...), one
    scalar top (created anonymously when the prototxt names none), loss_weight 1 by default, no
    forced gradient into the label bottom, and the same first dimension for bottoms 0 and 1."""

    num_bottoms = (2, 2)
    num_tops = (1, 1)
    auto_top = True
    is_loss = True
    blob_names = ()
    # Tops are known from shapes; forward also validates label values, which fake tensors cannot.
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.n_tops = max(len(param.top), self.num_tops[0])
        s0, s1 = bottom_shapes[0], bottom_shapes[1]
        if len(s0) and len(s1) and s0[0] != s1[0]:
            raise self.error(f"bottoms have different first dimensions {tuple(s0)} and {tuple(s1)}",
                             "the predictions and labels must hold the same number of examples")

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        # Extra tops (SoftmaxWithLoss, InfogainLoss) are the probabilities, shaped like bottom 0.
        return [()] + [tuple(bottom_shapes[0])] * (self.n_tops - 1)

    def _ignore_label(self) -> Optional[int]:
        lp = self.param.loss_param
        return int(lp.ignore_label) if lp.HasField("ignore_label") else None


@LAYERS.register("SoftmaxWithLoss")
class SoftmaxWithLoss(LossLayer):
    """Softmax over ``softmax_param.axis`` then the negative log-likelihood of the labels (one per
    outer x inner position, i.e. per pixel for spatial outputs), normalised per ``loss_param``;
    an optional second top gives the probabilities."""

    num_tops = (1, 2)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        s0 = tuple(bottom_shapes[0])
        axis = param.softmax_param.axis
        a = self.axis = self.canonical_axis(axis, len(s0))
        outer, inner = _prod(s0[:a]), _prod(s0[a + 1:])
        n_labels = _prod(bottom_shapes[1])
        if outer * inner != n_labels:
            raise self.error(
                f"has {n_labels} labels for predictions of shape {s0} (class axis {a})",
                f"give one label per prediction: {outer * inner} labels (the product of the "
                f"prediction's dimensions other than the class axis)")
        self.ignore_label = self._ignore_label()
        self.mode = normalization_mode(param.loss_param)
        lp = param.loss_param
        # SegNet's weight_by_label_freqs: each label's term (value and gradient) times its
        # class's weight; the normalizer still counts labels (caffe-segnet softmax_loss_layer).
        weights = None
        if lp.weight_by_label_freqs:
            if len(lp.class_weighting) != s0[a]:  # the fork's CHECK_EQ
                raise self.error(f"has {len(lp.class_weighting)} class_weighting values for "
                                 f"{s0[a]} classes", "give one class_weighting per class")
            weights = torch.tensor(np.asarray(lp.class_weighting, dtype=np.float32))
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, x: torch.Tensor, label: torch.Tensor):
        outer, c = _prod(x.shape[:self.axis]), x.shape[self.axis]
        inner = _prod(x.shape[self.axis + 1:])  # explicit: -1 is ambiguous for an empty batch
        if inner == 1:
            # One prediction per example (classifiers): the (N, C) form of the same ops. ATen's
            # nll_loss of (N, C, 1) goes through a 4-D reshape to its spatial kernel: several
            # us more per pass, which a small net's step notices.
            # Already in that form, no reshape: a view is still an op dispatch and a backward
            # node, and inside a pass each costs more than alone (the convolutions before it
            # evict the dispatcher's code from the caches: 10-30 us each in LeNet's step timed
            # op by op on one thread; within the noise of benchmarks/net_overhead.py).
            x3 = x if x.dim() == 2 and self.axis == 1 else x.reshape(outer, c)
            labels = label if label.dim() == 1 else label.reshape(outer)
        else:
            x3, labels = x.reshape(outer, c, inner), label.reshape(outer, inner)
        logp = F.log_softmax(x3, dim=1)
        ignore = _NO_IGNORE if self.ignore_label is None else self.ignore_label
        loss = None
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and \
                self.class_weights is None:
            loss = self._unclamped_loss(logp, labels, ignore, inner)
        if loss is None:
            idx = _class_indices(self, labels, c, self.ignore_label)
            # One fused op picks -log p[label] and zeroes ignored positions (value and gradient).
            nll = F.nll_loss(logp, idx, reduction="none", ignore_index=ignore)
            # Caffe: loss -= log(max(prob, FLT_MIN)); its backward is prob - onehot regardless of
            # the clamp, i.e. the gradient of the unclamped log-softmax.
            nll = with_caffe_gradient(nll.clamp(max=-_LOG_FLT_MIN), nll)
            if self.class_weights is not None:
                known = torch.where(idx == ignore, torch.zeros_like(idx), idx)
                nll = nll * self.class_weights.to(nll.dtype)[known]
            loss = nll.sum() / self._normalizer(idx, ignore, inner)
        if self.n_tops == 1:
            return loss
        # Caffe's backward ignores any diff arriving at the probability top.
        return loss, F.softmax(x, dim=self.axis).detach()

    def _unclamped_loss(self, logp: torch.Tensor, labels: torch.Tensor,
                        ignore: int, inner: int) -> Optional[torch.Tensor]:
        """The loss in as few ops as torch's own cross-entropy, where host reads are free (CPU,
        eager); None when Caffe's FLT_MIN clamp would act (the general path handles it).

        Each small op of the general path costs a LeNet training step more than its own time
        (benchmarks/net_overhead.py), so this path does without them: when no log-probability
        is below log(FLT_MIN) the clamp is void, and ``nll_loss``'s own reduction gives the sum,
        or directly the mean when Caffe's normalizer is the number of labels. Out-of-range
        labels make ``nll_loss`` raise on the CPU; the layer's error then names the label.
        """
        if logp.numel() == 0:
            return None  # the general path (an empty batch: loss 0 over Caffe's normalizer 1)
        with torch.no_grad():  # no detach op to dispatch (see forward)
            smallest = float(logp.min())
        if smallest < _LOG_FLT_MIN:
            return None  # Caffe's clamp acts: the general path
        idx = labels.long()
        norm = self._normalizer(idx, ignore, inner)
        # nll_loss's mean divides by the labels not ignored: Caffe's normalizer when nothing is.
        by_count = self.ignore_label is None and norm == idx.numel()
        try:
            total = F.nll_loss(logp, idx, reduction="mean" if by_count else "sum",
                               ignore_index=ignore)
        except (IndexError, RuntimeError):
            _class_indices(self, labels, logp.shape[1], self.ignore_label)  # raises the layer's error
            raise
        return total if by_count else total / norm

    def _normalizer(self, idx: torch.Tensor, ignore: int, inner: int) -> Normalizer:
        """Caffe's normalizer of this batch's ``(outer, inner)`` labels ``idx``."""
        count: Union[int, torch.Tensor] = (idx != ignore).sum() \
            if self.ignore_label is not None else idx.numel()
        return loss_normalizer(self.mode, idx.shape[0], inner, count)


@LAYERS.register("InfogainLoss")
class InfogainLoss(LossLayer):
    """InfogainLoss as the reference Caffe computes it (the golden fixtures): bottom 0 holds
    probabilities (no softmax inside), ``loss = -sum_i sum_j H[y_i, j] log(max(p_ij, 1e-20)) / num``.
    H is a dim x dim matrix from a third bottom or the binaryproto ``infogain_loss_param.source``.

    BVLC master's source (commit 337b075 onwards) instead applies a softmax internally and adds
    axis / ignore_label / normalization; the reference binary behind the golden outputs does not,
    so those options are refused here rather than silently ignored."""

    num_bottoms = (2, 3)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        lp, ip = param.loss_param, param.infogain_loss_param
        newer = [name for name, used in (("infogain_loss_param.axis", ip.HasField("axis")),
                                         ("loss_param.ignore_label", lp.HasField("ignore_label")),
                                         ("loss_param.normalization", lp.HasField("normalization")),
                                         ("loss_param.normalize", lp.HasField("normalize"))) if used]
        if newer:
            raise self.error(f"sets {', '.join(newer)}, which this InfogainLoss (Caffe's, taking "
                             "probabilities, averaged over num) does not have",
                             "remove the option; put a Softmax layer before InfogainLoss and feed it probabilities")
        s0, s1 = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if any(legacy_dim(s1, i) != 1 for i in (1, 2, 3)):
            raise self.error(f"labels have shape {s1}", "give one class label per example, shape (N,) or (N, 1, 1, 1)")
        dim = _prod(s0[1:])
        if len(bottom_shapes) < 3:
            h = self._read_h(ip)
            n_h = h.size
            # A buffer (moves with .to()/.double()) but not a parameter blob: not in the caffemodel.
            self.register_buffer("infogain", torch.from_numpy(h.reshape(-1)), persistent=False)
        else:
            n_h = _prod(bottom_shapes[2])
        # Caffe checks H's legacy shape is (1, 1, dim, dim); any shape holding dim*dim values is
        # accepted here.
        if n_h != dim * dim:
            raise self.error(f"the infogain matrix H has {n_h} entries, expected {dim}x{dim}",
                             f"H must be square with one row and column per class ({dim})")

    def _read_h(self, ip) -> np.ndarray:
        if not ip.source:
            raise self.error("has no infogain matrix",
                             "give H as a third bottom or infogain_loss_param { source: 'H.binaryproto' }")
        path = ip.source
        # Caffe opens the path relative to the working directory; we also try the prototxt's folder.
        if not os.path.exists(path) and os.path.isfile(self.ctx.source):
            alt = os.path.join(os.path.dirname(os.path.abspath(self.ctx.source)), path)
            path = alt if os.path.exists(alt) else path
        try:
            blob = caffe_pb2.BlobProto.FromString(read_input_bytes(path, what="infogain matrix"))
        except CaffeError as e:  # missing, a directory, a FIFO...
            raise self.error(f"cannot read the infogain matrix '{ip.source}': {e.what}",
                             "check infogain_loss_param.source (relative to the working "
                             "directory)")
        except Exception as e:  # protobuf DecodeError and friends
            raise self.error(f"'{ip.source}' is not a BlobProto binaryproto ({e})",
                             "save H with caffe_pb2.BlobProto(...).SerializeToString()")
        values = blob.double_data if len(blob.double_data) else blob.data
        return np.asarray(values, dtype=np.float32)

    def allow_force_backward(self, bottom_index: int) -> bool:
        # Caffe allows forcing a gradient into H and then aborts in Backward ("cannot backpropagate
        # to infogain inputs"); we simply never ask for one.
        return bottom_index == 0

    def forward(self, p: torch.Tensor, label: torch.Tensor, h: Optional[torch.Tensor] = None):
        num = p.shape[0]
        p2 = p.reshape(num, -1)
        dim = p2.shape[1]
        idx, _ = _check_class_labels(self, label.reshape(num), dim, None)
        h = (self.infogain if h is None else h).to(p.dtype).detach().reshape(dim, dim)
        weights = h[idx]  # row H[label] per example
        clamped = p2.clamp(min=LOG_THRESHOLD)
        # Caffe's backward is -H[y, j] / max(p_j, 1e-20) even where the clamp is active.
        per_elem = with_caffe_gradient(-weights * torch.log(clamped), -weights * p2 / clamped.detach())
        return per_elem.sum() / num


@LAYERS.register("EuclideanLoss")
class EuclideanLoss(LossLayer):
    """``sum((a - b)^2) / (2 * num)``; gradients flow to both bottoms."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        s0, s1 = bottom_shapes[0], bottom_shapes[1]
        if _prod(s0[1:]) != _prod(s1[1:]):
            raise self.error(f"bottoms of shapes {tuple(s0)} and {tuple(s1)} differ in size per example",
                             "both bottoms must hold the same number of values per example")

    def allow_force_backward(self, bottom_index: int) -> bool:
        # Caffe: either bottom may be the prediction, so force_backward reaches both.
        return True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2


@LAYERS.register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(LossLayer):
    """Cross-entropy of sigmoid(x) against targets in [0, 1], Caffe's overflow-free form, normalised
    per ``loss_param`` (default BATCH_SIZE here, as in Caffe); targets equal to ``ignore_label``
    (after truncation to int) are skipped."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if _prod(bottom_shapes[0]) != _prod(bottom_shapes[1]):
            raise self.error(f"bottoms of shapes {tuple(bottom_shapes[0])} and {tuple(bottom_shapes[1])} "
                             "differ in size", "give one target per prediction")
        self.mode = normalization_mode(param.loss_param, default=BATCH_SIZE)
        self.ignore_label = self._ignore_label()

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.reshape(x.shape).detach()
        # Caffe: x * (t - [x >= 0]) - log(1 + exp(x - 2 x [x >= 0])), negated. Its backward,
        # sigmoid(x) - t, is the exact gradient of this, so autograd matches.
        pos = (x >= 0).to(x.dtype)
        per_elem = -(x * (t - pos) - torch.log(1 + torch.exp(x - 2 * x * pos)))
        outer = x.shape[0] if x.dim() else 1
        if self.ignore_label is None:
            total, count = per_elem.sum(), x.numel()
        else:
            valid = t.long() != self.ignore_label
            total, count = (per_elem * valid).sum(), valid.sum()
        return total / loss_normalizer(self.mode, outer, x.numel() // max(outer, 1), count)


@LAYERS.register("HingeLoss")
class HingeLoss(LossLayer):
    """One-vs-all hinge loss: ``sum_j max(0, 1 - s_j x_j)`` (L1) or its square (L2) over the
    classes, s_j = +1 for the label and -1 otherwise, divided by num."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        num = legacy_dim(bottom_shapes[0], 0)
        if _prod(bottom_shapes[1]) != num:
            raise self.error(f"has {_prod(bottom_shapes[1])} labels for {num} examples",
                             "give one class label per example")
        self.norm = param.hinge_loss_param.norm

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        num = x.shape[0]
        x2 = x.reshape(num, -1)
        idx, _ = _check_class_labels(self, label.reshape(num), x2.shape[1], None)
        sign = torch.ones_like(x2).scatter_(1, idx.unsqueeze(1), -1.0)
        # Caffe's L1 backward uses sign(margin) with sign(0) = 0, as relu's gradient at 0 does.
        margin = F.relu(1 + sign * x2)
        if self.norm == caffe_pb2.HingeLossParameter.L2:
            return (margin * margin).sum() / num
        return margin.sum() / num


@LAYERS.register("ContrastiveLoss")
class ContrastiveLoss(LossLayer):
    """Hadsell et al.'s contrastive loss on pairs (a, b) with a similarity label y:
    ``d^2`` for similar pairs, ``max(margin - d, 0)^2`` for dissimilar ones (legacy_version:
    ``max(margin - d^2, 0)``), summed and divided by 2 * num."""

    num_bottoms = (3, 3)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        sa, sb, sy = (tuple(s) for s in bottom_shapes)
        ok = (legacy_dim(sa, 1) == legacy_dim(sb, 1)
              and all(legacy_dim(s, i) == 1 for s in (sa, sb) for i in (2, 3))
              and all(legacy_dim(sy, i) == 1 for i in (1, 2, 3)))
        if not ok:
            raise self.error(f"needs bottoms shaped (N, C, 1, 1), (N, C, 1, 1), (N, 1, 1, 1); got {sa}, {sb}, {sy}",
                             "feed flat feature vectors for a and b and one similarity label per pair")
        cp = param.contrastive_loss_param
        self.margin, self.legacy = float(cp.margin), bool(cp.legacy_version)

    def allow_force_backward(self, bottom_index: int) -> bool:
        # Caffe: both feature bottoms may receive gradients; never the similarity label.
        return bottom_index != 2

    def forward(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        num = a.shape[0]
        diff = (a - b).reshape(num, -1)
        dist_sq = (diff * diff).sum(1)
        similar = y.reshape(num).detach().long() != 0
        if self.legacy:
            dissimilar = F.relu(self.margin - dist_sq)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = F.relu(self.margin - dist)
            # Caffe's backward divides by (d + 1e-4) instead of d (no NaN at d = 0): the surrogate
            # -(mdist / (d + 1e-4)) * d^2 has exactly that gradient.
            coef = (mdist / (dist + 1e-4)).detach()
            dissimilar = with_caffe_gradient(mdist * mdist, -coef * dist_sq)
        per_pair = torch.where(similar, dist_sq, dissimilar)
        return per_pair.sum() / num / 2


@LAYERS.register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(LossLayer):
    """``-sum log(max(p[label], 1e-20)) / num`` for probabilities p (e.g. a Softmax top)."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        s1 = tuple(bottom_shapes[1])
        if any(legacy_dim(s1, i) != 1 for i in (1, 2, 3)):
            raise self.error(f"labels have shape {s1}", "give one class label per example, shape (N,) or (N, 1, 1, 1)")

    def forward(self, p: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        num = p.shape[0]
        p2 = p.reshape(num, -1)
        idx, _ = _check_class_labels(self, label.reshape(num), p2.shape[1], None)
        prob = p2.gather(1, idx.unsqueeze(1)).squeeze(1)
        clamped = prob.clamp(min=LOG_THRESHOLD)
        # Caffe's backward is -1 / max(p, 1e-20) even where the clamp is active.
        nll = with_caffe_gradient(-torch.log(clamped), -prob / clamped.detach())
        return nll.sum() / num


@LAYERS.register("Accuracy")
class Accuracy(Layer):
    """Top-k accuracy over ``accuracy_param.axis`` (a scalar), optionally per class (second top,
    one value per class; 0 for classes with no example). No backward.

    As the reference Caffe computes it (the SSD-era AccuracyLayer behind the golden fixtures):
    the classes are ranked by (score, class index) descending with ``std::partial_sort`` and
    ``std::greater``, so among equal scores the higher class index ranks first, and a prediction
    is correct when its label is among the first ``top_k``. With every label ignored the
    accuracy is 0/0, NaN. (BVLC master later counted ties against the label and returned 0.)"""

    num_bottoms = (2, 2)
    num_tops = (1, 2)
    blob_names = ()
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        ap = param.accuracy_param
        s0 = tuple(bottom_shapes[0])
        a = self.canonical_axis(ap.axis, len(s0))
        self.axis, self.top_k, self.n_tops = a, int(ap.top_k), max(len(param.top), 1)
        self.ignore_label = int(ap.ignore_label) if ap.HasField("ignore_label") else None
        self._warned_range = False
        n_labels = _prod(bottom_shapes[1])
        # Caffe's CHECK_LE(top_k, count / label count): the class axis when the counts agree
        # (checked next); an empty batch divides by zero there.
        if self.top_k > s0[a]:
            raise self.error(f"top_k {self.top_k} exceeds the {s0[a]} classes",
                             "top_k must be at most the number of classes")
        if _prod(s0[:a]) * _prod(s0[a + 1:]) != n_labels:
            raise self.error(f"has {n_labels} labels for predictions of shape {s0} (class axis {a})",
                             "give one label per prediction")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False  # Caffe's Accuracy has no backward

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return [()] + [(int(bottom_shapes[0][self.axis]),)] * (self.n_tops - 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, label: torch.Tensor):
        outer, c = _prod(x.shape[:self.axis]), x.shape[self.axis]
        inner = _prod(x.shape[self.axis + 1:])
        x3 = x.detach().reshape(outer, c, inner)
        idx = label.reshape(outer, inner).long()  # static_cast<int>
        counted = torch.ones_like(idx, dtype=torch.bool) if self.ignore_label is None \
            else idx != self.ignore_label
        # Caffe only DCHECKs the label range here: a release build counts a label outside the
        # classes as a miss (ENet's recipes feed Cityscapes' 255 to an Accuracy without
        # ignore_label and train). We do the same, and say so once.
        in_range = (idx >= 0) & (idx < c)
        if not self._warned_range and not torch.compiler.is_compiling() and \
                idx.numel() and not bool((in_range | ~counted).all()):
            self._warned_range = True
            bad = int(idx[~in_range & counted][0])
            get_logger().warning(
                "%s: label %d is outside the %d classes; it counts as a miss, as in Caffe's "
                "release build (set accuracy_param { ignore_label: %d } if it marks what to "
                "skip)", self.where, bad, c, bad)
        idx = torch.where(in_range, idx, torch.zeros_like(idx))
        true_score = x3.gather(1, idx.unsqueeze(1))
        classes = torch.arange(c, device=x.device).view(1, c, 1)
        ahead = (x3 > true_score) | ((x3 == true_score) & (classes > idx.unsqueeze(1)))
        valid = counted & in_range
        correct = (ahead.sum(1) < self.top_k) & valid
        # Counted and divided in at least float32 (Caffe's float accuracy / int count): scores
        # in bf16/fp16 (mixed precision) would round the counts.
        dtype = torch.promote_types(x.dtype, torch.float32)
        acc = correct.sum().to(dtype) / counted.sum().to(dtype)  # 0/0 = NaN as in Caffe
        if self.n_tops == 1:
            return acc
        # (Caffe's per-class buffers would be written out of bounds; such labels are left out.)
        flat_idx, flat_valid = idx.reshape(-1), valid.reshape(-1)
        seen = torch.zeros(c, dtype=dtype, device=x.device).index_add_(0, flat_idx, flat_valid.to(dtype))
        hits = torch.zeros(c, dtype=dtype, device=x.device).index_add_(0, flat_idx, correct.reshape(-1).to(dtype))
        per_class = torch.where(seen > 0, hits / seen.clamp(min=1), torch.zeros_like(seen))
        return acc, per_class
