"""Which nets the Convex solver solves, and the convex program's data read from such a net.

A net fits when its train-phase layers are exactly

    data layer (Data, ImageData, HDF5Data, MemoryData; data and label tops)
    -> InnerProduct, or 2-D Convolution (group 1)        "first"  (num_output = hidden units)
    -> ReLU (negative_slope 0), or HardThreshold with beta 0
    -> [Pooling AVE whose output is 1 x 1]               (a Convolution without it must already
                                                          give a 1 x 1 map)
    -> InnerProduct (num_output C)                       "last"
    -> EuclideanLoss(last's top, the label top)

Anything else is refused with the layer named. What the program needs from the net
(:class:`ConvexProblem`):

* features ``Z`` (n, K, d): each example's input (K = 1) or its K convolution patches, the
  average-pooling weight of the patch's position folded in (``(a z.w)_+ = a (z.w)_+`` for
  a >= 0, so a pattern is the same for a scaled patch); a first-layer bias is one more constant
  feature (value ``t`` below) in every patch;
* targets ``y`` (n, C) from the label top;
* ``beta`` of the papers: Caffe's objective ``w/(2n) ||f(X)-y||^2 + lambda/2 sum_b m_b ||b||^2``
  (w the loss weight, lambda weight_decay, m_b the blob's decay_mult) times ``n/w`` is
  ``1/2||f - y||^2 + beta0/2 (a||W1||^2 + c||b1||^2 + b||W2||^2 + c2||b2||^2)`` with
  ``beta0 = n lambda / w``. Rescaling every unit (first-layer row by ``(a/b)^{1/4}``, its output
  weight by the inverse) leaves f unchanged and turns the penalty into
  ``sqrt(ab) (||theta||^2 + alpha^2)``: beta = beta0 sqrt(ab). The bias feature ``t = sqrt(a/c)``
  makes ``a||w||^2 + c b1^2 = a ||(w, b1/t)||^2``.
* the output bias b2 (if any) is not a unit: it enters the loss as an offset with ridge
  ``gamma/2 b2^2``, ``gamma = beta0 c2``; minimizing it out leaves the loss
  ``1/2 ||S (f - y)||^2`` with ``S = I - s 11^T``, ``s = (1 - sqrt(gamma/(n+gamma)))/n``
  (S^2 = I - 11^T/(n+gamma)); see :mod:`.program`.

Refused, with the reason: a first-layer bias with decay_mult 0 (the penalty is then a seminorm of
the unit, not the group norm the equivalence is proved for, and the infimum need not be attained),
weight decay 0 or L1 regularization (no group lasso), decay_mult 0 on a weight blob, shared
parameter blobs, random data transformations in TRAIN (mirror, random crops: the training set is
then not a fixed X), non-global average pooling (each channel would feed several output weights:
a vector-output program per unit, which this solver does not solve).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import SolverError
from ..proto import caffe_pb2

DATA_TYPES = ("Data", "ImageData", "HDF5Data", "MemoryData")
NONLINEAR = ("ReLU", "HardThreshold", "Sigmoid", "TanH", "PReLU", "ELU", "AbsVal", "Power",
             "Dropout", "Pooling")
SHAPE = ("data layer (Data, ImageData, HDF5Data or MemoryData) -> InnerProduct or Convolution -> "
         "ReLU (or HardThreshold with beta 0) -> [Pooling AVE to 1x1] -> InnerProduct -> "
         "EuclideanLoss")
HINT = f"the Convex solver solves two-layer ReLU nets of the form: {SHAPE}; train this net with " \
       'type: "SGD" (or another update rule) instead'


@dataclass
class TwoLayerNet:
    """The roles of a fitting net's layers: names, indices in the net's layer order, blob names."""

    data: str
    data_index: int
    data_top: str
    label_top: str
    first: str
    first_index: int
    first_type: str
    relu: str
    pool: Optional[str]
    last: str
    last_index: int
    loss: str
    loss_top: str
    hidden: int          # first layer's num_output
    outputs: int         # last layer's num_output (C)
    first_bias: bool
    last_bias: bool


@dataclass
class ConvexProblem:
    """The convex program's data for one net and training set (float64 tensors).

    ``Z`` (n, K, d) features (pooling weights and the bias feature folded in), ``y`` (n, C),
    ``beta`` the group-lasso weight, ``out_bias_ridge`` gamma of the output bias (None: no output
    bias), ``scale`` = w/n (program objective -> Caffe objective), ``bias_feature`` t (None: no
    first-layer bias), ``unit_scale`` = (b/a)^{1/4} (program unit -> first-layer row), the input
    size ``d_in`` of one patch, and the net's roles.
    """

    Z: torch.Tensor
    y: torch.Tensor
    beta: float
    out_bias_ridge: Optional[float]
    scale: float
    bias_feature: Optional[float]
    unit_scale: float
    d_in: int
    roles: TwoLayerNet
    inputs: torch.Tensor   # the training inputs as read (n, ...), float64
    labels: torch.Tensor   # the label top's values (n, ...), float64

    @property
    def n(self) -> int:
        return int(self.Z.shape[0])


def _where(net, index: int) -> str:
    lp = net.net_param.layer[index]
    return f"{net.source}: layer '{lp.name}' (type {lp.type})"


def _refuse(net, index: Optional[int], what: str, hint: str = HINT) -> SolverError:
    where = _where(net, index) if index is not None else net.source
    return SolverError(what, where, hint)


def check_two_layer(net) -> TwoLayerNet:
    """The roles of ``net``'s layers, or a SolverError naming the first layer that does not fit.

    A layer that has the right role but a setting the program does not cover (MAX or local
    pooling, a leaky ReLU) is only reported once the rest of the net fits: on a net that cannot
    fit anyway (LeNet: a second convolution after the pooling) "use pool: AVE" would send the
    user to change a setting that does not help, so the layer that breaks the form comes first.
    """
    layers = list(net.net_param.layer)
    modules = [v.module for v in net.layers]
    pos = 0
    settings: list = []   # refusals for settings, raised only if the form itself fits

    def take(role: str, expected: str):
        nonlocal pos
        if pos >= len(layers):
            last = layers[-1].name if layers else "(none)"
            raise _refuse(net, None, f"the net ends after layer '{last}' where {role} "
                          f"({expected}) is expected")
        pos += 1
        return pos - 1, layers[pos - 1], modules[pos - 1]

    i, lp, _ = take("the data layer", " / ".join(DATA_TYPES))
    if lp.type == "Input":
        raise _refuse(net, i, "an Input layer holds no training set for the solver to read",
                      "feed the data through MemoryData (net.set_input_arrays) or HDF5Data, "
                      "Data or ImageData with a label top")
    if lp.type not in DATA_TYPES:
        raise _refuse(net, i, f"the first layer must be a data layer ({', '.join(DATA_TYPES)}) "
                      "that reads the training set")
    if len(lp.top) != 2:
        raise _refuse(net, i, "the data layer needs two tops, data and label (the targets of "
                      "EuclideanLoss)", "add the label top")
    _check_fixed_transform(net, i, lp)
    data_index, data_name, data_top, label_top = i, lp.name, lp.top[0], lp.top[1]

    i, lp, m = take("the first layer", "InnerProduct or Convolution")
    if lp.type not in ("InnerProduct", "Convolution") or list(lp.bottom) != [data_top]:
        raise _refuse(net, i, f"expected the first layer, an InnerProduct or Convolution on the "
                      f"data top '{data_top}'; found {lp.type} on {list(lp.bottom)}")
    if lp.type == "InnerProduct" and m.axis != 1:
        raise _refuse(net, i, f"InnerProduct with axis {m.axis}: only axis 1 (one example per "
                      "row) is supported", "remove inner_product_param.axis")
    if lp.type == "Convolution" and (m.n_spatial != 2 or m.group != 1 or m.axis != 1):
        raise _refuse(net, i, "only 2-D convolutions with group 1 on axis 1 are supported "
                      f"(this one: {m.n_spatial} spatial axes, group {m.group}, axis {m.axis})",
                      "use a 2-D Convolution with group: 1")
    first_index, first, first_type = i, lp.name, lp.type
    hidden, first_bias = int(m.num_output), bool(m.bias_term)
    current = lp.top[0]

    i, lp, m = take("the ReLU", "ReLU or HardThreshold")
    if lp.type not in ("ReLU", "HardThreshold") or list(lp.bottom) != [current]:
        raise _refuse(net, i, f"expected a ReLU (or HardThreshold with beta 0) on '{current}' "
                      f"after the first layer '{first}'; found {lp.type}")
    if lp.type == "ReLU" and m.negative_slope != 0:
        settings.append(_refuse(net, i, f"ReLU with negative_slope {m.negative_slope} (leaky): "
                                "the arrangement program needs max(0, q)",
                                "set negative_slope: 0"))
    relu = lp.name
    current = lp.top[0]

    pool = None
    i, lp, m = take("the last InnerProduct or a Pooling AVE", "Pooling or InnerProduct")
    if lp.type == "Pooling" and list(lp.bottom) == [current]:
        if m.method != caffe_pb2.PoolingParameter.AVE:
            name = caffe_pb2.PoolingParameter.PoolMethod.Name(m.method)
            settings.append(_refuse(net, i, f"{name} pooling: the convex program covers "
                                    "average pooling only (max pooling makes the output a "
                                    "non-convex function of the units' patterns)",
                                    "use pool: AVE"))
        shape = tuple(net.blob_shape(lp.top[0]))
        if len(shape) != 4 or shape[2:] != (1, 1):
            settings.append(_refuse(net, i, f"pooling to {shape[2:]} positions per channel: "
                                    "each hidden unit would feed several output weights (a "
                                    "vector-output program per unit, not solved here)",
                                    "pool to one value per channel: pooling_param { pool: AVE "
                                    "global_pooling: true }"))
        pool = lp.name
        current = lp.top[0]
        i, lp, m = take("the last InnerProduct", "InnerProduct")
    if lp.type in NONLINEAR + ("Convolution",) or \
            (lp.type == "InnerProduct" and list(lp.bottom) != [current]):
        raise _refuse(net, i, f"a second hidden layer ({lp.type}): the convex program is exact "
                      "for nets with ONE ReLU layer between two weight layers")
    if lp.type != "InnerProduct" or list(lp.bottom) != [current]:
        raise _refuse(net, i, f"expected the last InnerProduct on '{current}'; found {lp.type}")
    if m.axis != 1:
        raise _refuse(net, i, f"InnerProduct with axis {m.axis}: only axis 1 is supported",
                      "remove inner_product_param.axis")
    shape = tuple(net.blob_shape(current))
    if len(shape) == 4 and shape[2:] != (1, 1):
        settings.append(_refuse(net, i, f"the last InnerProduct sees {shape[2]}x{shape[3]} "
                                "positions per hidden channel: each unit would feed several "
                                "output weights (a vector-output program per unit, not solved "
                                "here)", "add Pooling { pool: AVE global_pooling: true } after "
                                "the ReLU"))
    last_index, last, outputs, last_bias = i, lp.name, int(m.num_output), bool(m.bias_term)
    current = lp.top[0]

    i, lp, m = take("the loss", "EuclideanLoss")
    if lp.type in NONLINEAR:
        raise _refuse(net, i, f"a second hidden layer ({lp.type} after the InnerProduct "
                      f"'{last}'): the convex program is exact for nets with ONE ReLU layer "
                      "between two weight layers")
    if lp.type != "EuclideanLoss":
        raise _refuse(net, i, f"{lp.type}: the convex program is the one of the squared loss; "
                      "only EuclideanLoss is solved (a classifier can be trained on one-hot "
                      "targets with EuclideanLoss)")
    if sorted(lp.bottom) != sorted([current, label_top]):
        raise _refuse(net, i, f"EuclideanLoss must compare the last layer's top '{current}' with "
                      f"the label top '{label_top}'; its bottoms are {list(lp.bottom)}")
    loss_top = lp.top[0] if len(lp.top) else ""
    if pos < len(layers):
        raise _refuse(net, pos, "a layer after the loss: the solver handles exactly "
                      "the two-layer form", HINT + " (remove accuracy or other extra layers from "
                      "the TRAIN phase with include { phase: TEST })")
    if loss_top and net.blob_loss_weights.get(loss_top, 0.0) <= 0:
        raise _refuse(net, i, "the EuclideanLoss has loss_weight <= 0",
                      "use a positive loss_weight")
    if settings:
        raise settings[0]
    return TwoLayerNet(data_name, data_index, data_top, label_top, first, first_index, first_type,
                       relu, pool, last, last_index, lp.name, loss_top, hidden, outputs,
                       first_bias, last_bias)


def _check_fixed_transform(net, index: int, lp) -> None:
    tp = lp.transform_param
    if net.phase == caffe_pb2.TRAIN and (tp.mirror or tp.crop_size > 0):
        raise _refuse(net, index, "the TRAIN data are randomly transformed (mirror or random "
                      "crop): the convex program needs one fixed training set",
                      "remove mirror/crop_size from transform_param for the Convex solver")


def decay_mults(net, roles: TwoLayerNet) -> Dict[Tuple[str, int], float]:
    """decay_mult of the first and last layers' blobs ``(layer, index)``; shared blobs refused."""
    owned = {(p.layer, p.index): float(p.decay_mult) for p in net.learnable_params}
    out = {}
    for name, count in ((roles.first, 2 if roles.first_bias else 1),
                        (roles.last, 2 if roles.last_bias else 1)):
        for j in range(count):
            if (name, j) not in owned:
                index = roles.first_index if name == roles.first else roles.last_index
                raise _refuse(net, index, f"its parameter blob {j} is shared with another layer "
                              "(param { name })", "remove the sharing for the Convex solver")
            out[(name, j)] = owned[(name, j)]
    return out


def read_training_set(net, roles: TwoLayerNet) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every training record once (:func:`~pycaffe_alt.alternation.record_stream.ordered_batches`,
    which leaves the training cursor where it was): inputs (n, ...) and labels (n, ...) as
    float64, in record order."""
    from ..alternation.record_stream import ordered_batches
    from ..alternation.support_pass import record_count

    layer = net.layers[roles.data_index].module
    total = record_count(layer)
    if total is None:
        hint = ("call net.set_input_arrays(data, labels) (solver.net) before solve()"
                if layer.type == "MemoryData" else "check the data source")
        raise _refuse(net, roles.data_index, "the data layer does not know how many records "
                      "it has", hint)
    total = int(total)
    inputs: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    seen = torch.zeros(total, dtype=torch.bool)
    with torch.no_grad():
        for values, idx in ordered_batches(net, total):
            data = values[roles.data_top].detach().double().cpu()
            label = values[roles.label_top].detach().double().cpu()
            idx = idx.long()
            if inputs is None:
                inputs = torch.zeros((total,) + tuple(data.shape[1:]), dtype=torch.float64)
                labels = torch.zeros((total,) + tuple(label.shape[1:]), dtype=torch.float64)
            inputs[idx] = data
            labels[idx] = label
            seen[idx] = True
    if inputs is None or not bool(seen.all()):
        raise _refuse(net, roles.data_index, f"reading the training set did not reach all "
                      f"{total} records", "check the data layer's source")
    return inputs, labels


def _check_finite(net, roles: TwoLayerNet, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse a training set holding NaN or infinite values, naming the first such record: the
    program's data would be NaN, and ADMM's Cholesky factorization or the certificate's NNLS would
    fail deep inside (Caffe's own solvers would just carry a NaN loss along)."""
    for what, values, top in (("input", inputs, roles.data_top),
                              ("target", labels, roles.label_top)):
        bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            record = int(bad.nonzero()[0, 0])
            raise _refuse(net, roles.data_index, f"record {record} (counting from 0) has a NaN "
                          f"or infinite {what} value in top '{top}' ({int(bad.sum())} record(s) "
                          "in all): the values are not finite, so the convex program has no "
                          "meaning", "remove or repair those records in the data source")


def _pool_weights(net, roles: TwoLayerNet, spatial: Tuple[int, int]) -> torch.Tensor:
    """The weight of each conv output position in the (linear) pooling, by running the net's own
    Pooling module on one-hot maps: exactly Caffe's divisor rules (padding, clipping)."""
    if roles.pool is None:
        return torch.ones(1, dtype=torch.float64)
    module = net.layer_dict[roles.pool].module
    k = spatial[0] * spatial[1]
    eye = torch.eye(k, dtype=torch.float64).reshape(k, 1, spatial[0], spatial[1])
    with torch.no_grad():
        out = module(eye.to(net.device))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(k).double().cpu()


def features(net, roles: TwoLayerNet, inputs: torch.Tensor,
             bias_feature: Optional[float]) -> Tuple[torch.Tensor, int]:
    """``(Z, d_in)``: Z (n, K, d) as described in the module doc, d_in the raw patch size."""
    n = inputs.shape[0]
    first = net.layer_dict[roles.first].module
    if roles.first_type == "InnerProduct":
        patches = inputs.reshape(n, 1, -1)
        weights = torch.ones(1, dtype=torch.float64)
    else:
        g = first.geom
        cols = F.unfold(inputs, g.kernel, dilation=g.dilation, padding=g.pad, stride=g.stride)
        patches = cols.transpose(1, 2)                     # (n, K, C*kh*kw), conv weight order
        spatial = tuple(net.blob_shape(net.top_names[roles.first][0])[2:])
        weights = _pool_weights(net, roles, spatial)
        if weights.numel() != patches.shape[1]:
            raise _refuse(net, roles.first_index, "internal: pooling weights do not match the "
                          "convolution's output positions", "report this")
        keep = weights > 0
        patches, weights = patches[:, keep], weights[keep]
    d_in = patches.shape[2]
    if bias_feature is not None:
        ones = torch.full(patches.shape[:2] + (1,), bias_feature, dtype=torch.float64)
        patches = torch.cat([patches, ones], dim=2)
    return patches * weights.reshape(1, -1, 1), d_in


def build_problem(net, roles: TwoLayerNet, weight_decay: float,
                  regularization_type: str = "L2") -> ConvexProblem:
    """Read the training set and turn net + solver settings into the convex program's data."""
    if regularization_type != "L2":
        raise SolverError(f"regularization_type {regularization_type}: the convex program is the "
                          "one of L2 weight decay", net.source, 'use regularization_type: "L2"')
    if not weight_decay > 0:
        raise SolverError(f"weight_decay {weight_decay}: the convex equivalence needs weight "
                          "decay > 0 (beta = N x weight_decay; without it the optimum is not "
                          "attained by a finite net in general)", net.source,
                          "set weight_decay > 0 in the solver file")
    mults = decay_mults(net, roles)
    a, b = mults[(roles.first, 0)], mults[(roles.last, 0)]
    for (name, j), m in mults.items():
        index = roles.first_index if name == roles.first else roles.last_index
        if j == 0 and m <= 0:
            raise _refuse(net, index, f"decay_mult {m} on the weights: the equivalence needs "
                          "both weight layers regularized", "use a positive decay_mult")
        if name == roles.first and j == 1 and m <= 0:
            raise _refuse(net, index, f"decay_mult {m} on the first layer's bias: the penalty "
                          "is then a seminorm of each unit, not the group norm the convex "
                          "equivalence is proved for", "give the bias a positive decay_mult "
                          "(e.g. the weights' value), or set bias_term: false")
        if name == roles.last and j == 1 and m < 0:
            raise _refuse(net, index, "negative decay_mult on the output bias", "use >= 0")
    hts = net.layer_dict[roles.relu].module
    if hts.type == "HardThreshold" and bool((hts.beta.detach() != 0).any()):
        raise _refuse(net, roles.first_index + 1, "HardThreshold with beta != 0 is not a ReLU",
                      "use a ReLU, or a HardThreshold whose beta is 0 (beta_filler constant 0)")
    inputs, labels = read_training_set(net, roles)
    _check_finite(net, roles, inputs, labels)
    n = inputs.shape[0]
    y = labels.reshape(n, -1)
    if y.shape[1] != roles.outputs:
        raise _refuse(net, roles.last_index, f"the label top holds {y.shape[1]} value(s) per "
                      f"example but the last layer has num_output {roles.outputs}",
                      "match num_output to the targets (e.g. one-hot labels from HDF5Data)")
    loss_weight = net.blob_loss_weights.get(roles.loss_top, 1.0) if roles.loss_top else 1.0
    beta0 = n * weight_decay / loss_weight
    t = math.sqrt(a / mults[(roles.first, 1)]) if roles.first_bias else None
    ridge = beta0 * mults[(roles.last, 1)] if roles.last_bias else None
    Z, d_in = features(net, roles, inputs, t)
    return ConvexProblem(Z=Z, y=y, beta=beta0 * math.sqrt(a * b), out_bias_ridge=ridge,
                         scale=loss_weight / n, bias_feature=t, unit_scale=(b / a) ** 0.25,
                         d_in=d_in, roles=roles, inputs=inputs, labels=labels)


def net_objective(net, inputs: torch.Tensor, labels: torch.Tensor, weight_decay: float,
                  roles: Optional[TwoLayerNet] = None) -> float:
    """Caffe's objective of ``net`` on the whole set: the loss of one forward pass over all of
    ``inputs``/``labels`` (from the layer after the data layer) plus ``weight_decay/2 x
    decay_mult x ||blob||^2`` over the learnable blobs. Runs in the net's dtype (use
    ``net.double()`` for float64)."""
    roles = roles or check_two_layer(net)
    dtype = next(iter(net.parameters())).dtype
    with torch.no_grad():
        values = net.run({roles.data_top: inputs.to(net.device, dtype),
                          roles.label_top: labels.to(net.device, dtype)},
                         start=roles.data_index + 1)
        loss = float(net.loss(values))
        decay = sum(float(p.decay_mult) * float((p.param.detach().double() ** 2).sum())
                    for p in net.learnable_params)
    return loss + weight_decay / 2 * decay


__all__ = ["TwoLayerNet", "ConvexProblem", "check_two_layer", "build_problem",
           "read_training_set", "features", "decay_mults", "net_objective", "SHAPE"]
