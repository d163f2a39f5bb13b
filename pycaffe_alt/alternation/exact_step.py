"""Exact weight steps given the supports: one layer at a time, solved, not stepped.

With every HardThreshold / ReLU support and every max-pool switch fixed, the net output is an
affine function of any one layer's weights (the paper's eq. 13; for one hidden layer, Jagatap &
Hegde's alternating minimisation). A weight step can then solve each layer's block exactly
(block coordinate descent) instead of taking SGD steps on it:

* LEAST_SQUARES (EuclideanLoss): ``min_w lw/(2n) sum_x ||A_x w + c_x - y_x||^2 + 1/2 w' L w``
  with ``L`` the diagonal of ``weight_decay * decay_mult`` per blob (Caffe's objective), i.e.
  the ridge normal equations ``(s G + L) w = s b`` with ``s = lw/n``, ``G = sum A_x' A_x``,
  ``b = sum A_x' (y_x - c_x)``, accumulated in float64 over the streamed training set and solved
  by Cholesky (minimum-norm lstsq on the update when singular, so directions no record sees,
  e.g. a unit whose support is empty, keep their weights);
* CONVEX (SoftmaxWithLoss and other losses convex in the output): the same block problem is
  convex; a few full-batch L-BFGS iterations (torch.optim.LBFGS, strong Wolfe line search).

How ``A_x`` is obtained (docs/exact_steps.md, "Design matrix"): a layer's output is
``z = W F_x`` with ``F_x`` its patch matrix (the unfolded input for a convolution, the flattened
input for an InnerProduct, a row of ones for the bias), and the masked net above it is linear in
``z``: ``f(x) = J_x z + e_x``. So ``A_x = sum_p J_x[:, :, p] (x) F_x[:, p]'``. ``J_x`` comes from
one backward pass per output coordinate (batched over the examples, which the fixed supports
keep independent). Three cases:

* *separable*: the layer's top is the loss's prediction (the output layer): ``J`` is the
  identity, ``G`` is block-diagonal with one shared ``K x K`` block ``sum F F'`` - no backward;
* *dense*: up to ``max_dense_unknowns`` unknowns, ``G`` built explicitly from ``J`` and ``F``;
* *CG*: bigger layers, ``cg_iter`` conjugate-gradient iterations on the same normal equations,
  matrix-free (``A v`` by double backward, ``A' u`` by one backward), warm-started at the
  current weights: exact in the limit, approximate at a finite ``cg_iter`` (logged).

Everything below the solved layer runs without gradients, in TEST mode (Dropout off, BatchNorm on
its statistics), on the records of :func:`~pycaffe_alt.alternation.record_stream.ordered_batches`.

Data-parallel (``split``, a :class:`~pycaffe_alt.distributed.sharding.RecordSplit`): every
quantity above is a sum over records (the support pass's loss and counts, ``G`` and ``b``, each
CG product ``sum_x A_x' A_x v``, the L-BFGS loss and its gradient), so each rank streams only
its records ``rank, rank + W, ...`` and the sums are all-reduced; every rank then solves the
same system and ends with the same weights. A rank's mask store has rows for its own records
only (a W-th of the one-process store): the split is the same in every pass, so no masks are
exchanged.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..distributed.sharding import RecordSplit, records_taken
from ..errors import SolverError
from ..layers.neuron import ReLU
from ..layers.structure import InnerProduct
from ..layers.support import HardThreshold
from ..layers.vision import MAX, Convolution, Pooling, max_pool, PoolGeometry
from ..log import get_logger
from .mask_store import MaskStore
from .pool_switches import decode_switches, encode_switches, switch_bits
from .record_stream import data_step, ordered_batches
from .support_pass import instance_support

logger = get_logger()

SWITCH_SUFFIX = "#switch"
# Losses convex in the net output (CONVEX's per-layer problem is then convex given the supports).
CONVEX_LOSSES = ("EuclideanLoss", "SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "HingeLoss",
                 "MultinomialLogisticLoss")


# ---------------------------------------------------------------------------------------------
# Pure formulas
# ---------------------------------------------------------------------------------------------
def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: torch.Tensor,
                current: torch.Tensor) -> torch.Tensor:
    """Minimiser of ``1/2 w' (G + diag(ridge)) w - w' rhs`` (columns of ``rhs``/``current`` are
    independent right-hand sides), float64.

    Solved for the update from ``current``: Cholesky when ``G + diag(ridge)`` is positive
    definite, else the minimum-norm least-squares update (directions in the null space, which
    no data constrains, keep their current values).
    """
    m = gram + torch.diag(ridge)
    r = rhs - m @ current
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return current + torch.cholesky_solve(r, chol)
    driver = "gelsd" if m.device.type == "cpu" else None
    return current + torch.linalg.lstsq(m, r, driver=driver).solution


def design_rows(jac: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``A`` of a batch: rows ``(example, output coordinate)``, columns ``(unit, feature)``.

    ``jac`` is ``(B, D, C, L)`` (output coordinate by layer-output unit and position), ``feats``
    ``(B, K, L)``; ``A[b, j, o, k] = sum_p jac[b, j, o, p] feats[b, k, p]``.
    """
    b, d, c, _ = jac.shape
    return torch.einsum("bjol,bkl->bjok", jac, feats).reshape(b * d, c * feats.shape[1])


def ridge_vector(cout: int, n_weight_feats: int, has_bias: bool, lam_w: float,
                 lam_b: float) -> torch.Tensor:
    """Diagonal of the ridge for unknowns laid out ``(unit, feature)``: weights then bias."""
    per_unit = [lam_w] * n_weight_feats + ([lam_b] if has_bias else [])
    return torch.tensor(per_unit, dtype=torch.float64).repeat(cout)


# ---------------------------------------------------------------------------------------------
# The pieces of a net
# ---------------------------------------------------------------------------------------------
def support_layers(net) -> List[Tuple[str, object]]:
    """``(name, layer)`` of every HardThreshold and ReLU layer (a ReLU is a HardThreshold with
    beta 0 for the alternation solver), in execution order."""
    return [(s.name, s.layer) for s in net.steps if isinstance(s.layer, (HardThreshold, ReLU))]


def max_pool_layers(net) -> List[Tuple[str, Pooling]]:
    """``(name, layer)`` of every MAX Pooling layer, in execution order."""
    return [(s.name, s.layer) for s in net.steps
            if isinstance(s.layer, Pooling) and s.layer.method == MAX]


def pool_geometry(layer: Pooling, in_hw: Tuple[int, int]) -> PoolGeometry:
    """The pooling windows of ``layer`` for an input plane of ``in_hw``."""
    kernel = tuple(int(v) for v in in_hw) if layer.kernel is None else layer.kernel
    return PoolGeometry(kernel, layer.stride, layer.pad, layer.ceil)


def exact_layout(net) -> List[Tuple[str, Tuple[int, ...]]]:
    """The mask store layout: each support's unit shape, then each MAX pool's switch planes
    ``(bits, C, OH, OW)`` under ``name#switch``."""
    shapes = {n: net.blob_shape(n) for s in net.steps for n in (*s.bottoms, *s.tops)}
    steps = {s.name: s for s in net.steps}
    layout = [(n, tuple(shapes[steps[n].bottoms[0]])[1:]) for n, _ in support_layers(net)]
    for n, layer in max_pool_layers(net):
        in_shape = tuple(shapes[steps[n].bottoms[0]])
        out_shape = tuple(shapes[steps[n].tops[0]])
        geom = pool_geometry(layer, in_shape[2:])
        layout.append((n + SWITCH_SUFFIX, (switch_bits(geom.kernel),) + out_shape[1:]))
    return layout


@dataclass
class LayerBlock:
    """One layer whose weights an exact step solves for: unknowns laid out ``(unit, feature)``,
    features = the weight's inputs (when its lr_mult > 0) then a 1 for the bias (likewise)."""

    name: str
    index: int
    layer: object
    bottom: str
    top: str
    weight: Optional[torch.nn.Parameter]
    bias: Optional[torch.nn.Parameter]
    lam_w: float
    lam_b: float

    @property
    def cout(self) -> int:
        return int(self.layer.num_output)

    @property
    def n_weight_feats(self) -> int:
        if self.weight is None:
            return 0
        w = self.layer.weight
        return int(w.shape[0]) if self._transposed else int(w[0].numel())

    @property
    def _transposed(self) -> bool:
        return isinstance(self.layer, InnerProduct) and self.layer.transpose

    @property
    def n_feats(self) -> int:
        return self.n_weight_feats + (1 if self.bias is not None else 0)

    @property
    def unknowns(self) -> int:
        return self.cout * self.n_feats

    def params(self) -> List[torch.nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as ``(B, K, L)`` patch columns (all weight inputs)."""
        if isinstance(self.layer, InnerProduct):
            return x.reshape(x.shape[0], -1, 1)
        g = self.layer.geom
        return F.unfold(x, g.kernel, dilation=g.dilation, padding=g.pad, stride=g.stride)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``F_x``: ``(B, n_feats, L)``, the trainable part's inputs."""
        p = self.patches(x)
        parts = [p] if self.weight is not None else []
        if self.bias is not None:
            parts.append(torch.ones_like(p[:, :1]))
        return torch.cat(parts, dim=1)

    def current(self) -> torch.Tensor:
        """The trainable unknowns as ``(cout, n_feats)``."""
        parts = []
        if self.weight is not None:
            w = self.layer.weight.detach()
            parts.append(w.t() if self._transposed else w.reshape(self.cout, -1))
        if self.bias is not None:
            parts.append(self.layer.bias.detach().reshape(-1, 1))
        return torch.cat(parts, dim=1)

    def assign(self, unknowns: torch.Tensor) -> None:
        """Write ``(cout, n_feats)`` unknowns back into the blobs (their dtype and device)."""
        k = self.n_weight_feats
        with torch.no_grad():
            if self.weight is not None:
                w = unknowns[:, :k]
                w = w.t() if self._transposed else w.reshape(self.weight.shape)
                self.weight.copy_(w.to(self.weight.dtype))
            if self.bias is not None:
                self.bias.copy_(unknowns[:, k].reshape(self.bias.shape).to(self.bias.dtype))

    def output(self, feats: torch.Tensor, unknowns: torch.Tensor) -> torch.Tensor:
        """The trainable part's contribution to the layer output, ``(B, cout, L)``."""
        return torch.einsum("ok,bkl->bol", unknowns.to(feats.dtype), feats)


def layer_blocks(net, weight_decay: float, only: Tuple[str, ...] = ()) -> List[LayerBlock]:
    """The InnerProduct / Convolution layers with a trainable blob, in execution order."""
    infos = {(i.layer, i.index): i for i in net.learnable_params}
    blocks = []
    for s in net.steps:
        if not isinstance(s.layer, (InnerProduct, Convolution)):
            continue
        if only and s.name not in only:
            continue
        blobs = list(s.layer.blobs)
        trainable = [infos.get((s.name, i)) for i in range(len(blobs))]
        trainable = [t if t is not None and t.lr_mult != 0 else None for t in trainable]
        if not any(trainable):
            continue
        w_info = trainable[0]
        b_info = trainable[1] if len(trainable) > 1 else None
        blocks.append(LayerBlock(
            s.name, s.index, s.layer, s.bottoms[0], s.tops[0],
            w_info.param if w_info else None, b_info.param if b_info else None,
            weight_decay * (w_info.decay_mult if w_info else 0.0),
            weight_decay * (b_info.decay_mult if b_info else 0.0)))
    return blocks


# ---------------------------------------------------------------------------------------------
# Fixed supports and switches
# ---------------------------------------------------------------------------------------------
class FixedSupports:
    """Installs the stored supports and switches of a batch's records on the net's layers
    (``fixed_support`` / ``fixed_switches``), or recorders that compute and keep them."""

    def __init__(self, net, rule: str = "EQ12", beta: float = 0.0):
        self.net = net
        self.rule, self.beta = rule, float(beta)
        self.supports = support_layers(net)
        self.pools = max_pool_layers(net)

    def record(self, sink: Dict[str, torch.Tensor]) -> None:
        """From now on every forward computes eq. 12 supports (beta 0 for a ReLU) and the pools'
        argmax switches, uses them, and leaves them (bool) in ``sink``."""
        for name, layer in self.supports:
            layer.fixed_support = self._support_recorder(name, layer, sink)
        for name, layer in self.pools:
            layer.fixed_switches = self._switch_recorder(name, layer, sink)

    def _support_recorder(self, name, layer, sink):
        def rec(q: torch.Tensor) -> torch.Tensor:
            m = q.detach() > 0 if isinstance(layer, ReLU) else \
                instance_support(layer, q, self.rule, self.beta)
            sink[name] = m
            return m
        return rec

    def _switch_recorder(self, name, layer, sink):
        def rec(x: torch.Tensor) -> torch.Tensor:
            geom = pool_geometry(layer, tuple(x.shape[-2:]))
            _, idx = max_pool(x.detach(), geom, with_mask=True)
            idx = idx.long()
            sink[name + SWITCH_SUFFIX] = encode_switches(idx, tuple(x.shape[-2:]), geom.kernel,
                                                         geom.stride, geom.pad)
            return idx
        return rec

    def install(self, masks: Dict[str, torch.Tensor]) -> None:
        """Fix every support and switch to ``masks`` (a MaskStore.get result for one batch)."""
        for name, layer in self.supports:
            layer.fixed_support = _constant(masks[name])
        for name, layer in self.pools:
            layer.fixed_switches = self._switches(layer, masks[name + SWITCH_SUFFIX])

    @staticmethod
    def _switches(layer, planes):
        def provide(x: torch.Tensor) -> torch.Tensor:
            geom = pool_geometry(layer, tuple(x.shape[-2:]))
            return decode_switches(planes.to(x.device), tuple(x.shape[-2:]), geom.kernel,
                                   geom.stride, geom.pad)
        return provide

    def remove(self) -> None:
        for _, layer in self.supports:
            layer.fixed_support = None
        for _, layer in self.pools:
            layer.fixed_switches = None


def _constant(m: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda q: m


# ---------------------------------------------------------------------------------------------
# The exact weight step
# ---------------------------------------------------------------------------------------------
class ExactWeightStep:
    """Support step + one sweep of exact layer solves over a net's training set.

    ``ExactWeightStep(net, kind, records, weight_decay, ...)``; ``kind`` is ``"LEAST_SQUARES"``
    or ``"CONVEX"``. :meth:`iterate` runs one alternation and returns its statistics (``loss``:
    the training objective's data term at the weights before the sweep, ``changed``: share of
    support/switch bits that changed, ``layers``: per solved layer its method and seconds).
    ``where`` names the solver file field for errors. ``split`` (set by a data-parallel
    solver): this rank's share of the records, see the module notes.
    """

    split: Optional[RecordSplit] = None

    def __init__(self, net, kind: str, records: int, weight_decay: float,
                 regularization: str = "L2", batch_size: int = 0, order: str = "BOTTOM_UP",
                 lbfgs_iter: int = 10, max_dense: int = 6000, cg_iter: int = 20,
                 only: Tuple[str, ...] = (), rule: str = "EQ12", beta: float = 0.0,
                 where: str = "alternation_param", store_path: Optional[str] = None,
                 max_ram_bytes: int = 1 << 30):
        self.net, self.kind, self.records = net, kind, int(records)
        self.regularization = regularization
        self.batch_size, self.lbfgs_iter = int(batch_size), int(lbfgs_iter)
        self.max_dense, self.cg_iter = int(max_dense), int(cg_iter)
        self.where = where
        self.first = data_step(net).index + 1
        self._check_only(tuple(only))
        self.blocks = layer_blocks(net, float(weight_decay), tuple(only))
        if not self.blocks:
            raise SolverError(f"{net.source}: no InnerProduct or Convolution layer with lr_mult > 0 "
                              "to solve for", where,
                              "exact weight steps solve InnerProduct / Convolution weights")
        if order == "TOP_DOWN":
            self.blocks.reverse()
        self.loss_steps = [s for s in net.steps
                           if any(net.blob_loss_weights.get(t, 0.0) != 0 for t in s.tops)]
        self._check(regularization, only)
        self.fixed = FixedSupports(net, rule, beta)
        self._layout = exact_layout(net)
        self._store_path, self._max_ram_bytes = store_path, int(max_ram_bytes)
        # Made by the first support pass, once the split (if any) is known: a data-parallel
        # rank never allocates the one-process store.
        self.store: Optional[MaskStore] = None
        self.loss_end = max(s.index for s in self.loss_steps)

    # ------------------------------------------------------------------ checks
    def _check_only(self, only: Tuple[str, ...]) -> None:
        net = self.net
        names = {s.name for s in net.steps}
        missing = [n for n in only if n not in names]
        if missing:
            raise SolverError(f"exact_layer names {', '.join(missing)}, which the train net "
                              f"{net.source} does not have", self.where,
                              "name InnerProduct / Convolution layers with lr_mult > 0")
        solvable = {b.name for b in layer_blocks(net, 0.0)}
        other = [n for n in only if n not in solvable]
        if other:
            raise SolverError(f"exact_layer names {', '.join(other)}, not an InnerProduct or "
                              f"Convolution layer with lr_mult > 0 in {net.source}", self.where)

    def _check(self, regularization: str, only: Tuple[str, ...]) -> None:
        net = self.net
        for b in self.blocks:
            lay = b.layer
            if isinstance(lay, InnerProduct) and lay.axis != 1:
                raise SolverError(f"layer '{b.name}': exact weight steps need InnerProduct axis 1, "
                                  f"it has axis {lay.axis}", self.where)
            if isinstance(lay, Convolution) and (lay.n_spatial != 2 or lay.group != 1 or
                                                 lay.axis != 1):
                raise SolverError(f"layer '{b.name}': exact weight steps solve 2-D convolutions "
                                  f"with group 1 on axis 1 (it has {lay.n_spatial} spatial axes, "
                                  f"group {lay.group})", self.where,
                                  "set lr_mult: 0 on it, list the others in exact_layer, or use "
                                  "weight_step: SGD")
        for s in net.steps:
            if isinstance(s.layer, (HardThreshold, ReLU)) and s.reads_final:
                raise SolverError(f"layer '{s.name}' works in place on a blob that a later layer "
                                  "also changes in place; its backward would not see the fixed "
                                  "support", self.where, f"give '{s.name}' its own top blob")
        losses = self.loss_steps
        if self.kind == "LEAST_SQUARES":
            if regularization != "L2":
                raise SolverError(f"weight_step LEAST_SQUARES solves a ridge (L2) problem; "
                                  f"regularization_type is {regularization}", self.where,
                                  "use regularization_type: \"L2\" or weight_step: CONVEX")
            bad = [s for s in losses if s.layer.type != "EuclideanLoss"]
            if bad or len(losses) != 1:
                what = (f"loss layer '{bad[0].name}' is {bad[0].layer.type}" if bad
                        else f"the train net has {len(losses)} loss layers")
                raise SolverError(f"weight_step LEAST_SQUARES needs exactly one EuclideanLoss; "
                                  f"{what} ({net.source})", self.where,
                                  "use weight_step: CONVEX for SoftmaxWithLoss and other "
                                  "convex losses")
        elif self.kind == "CONVEX":
            bad = [s for s in losses if s.layer.type not in CONVEX_LOSSES]
            if bad or not losses:
                what = (f"loss layer '{bad[0].name}' is {bad[0].layer.type}" if bad
                        else "the train net has no loss layer")
                raise SolverError(f"weight_step CONVEX needs losses convex in the net output "
                                  f"({', '.join(CONVEX_LOSSES)}); {what} ({net.source})",
                                  self.where)

    # ------------------------------------------------------------------ passes
    def batches(self) -> Iterator[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
        return ordered_batches(self.net, self.records, self.batch_size, self.split)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over this rank's records made a sum over all records (itself on one
        process); the same dtype and device."""
        if self.split is None:
            return t
        return self.split.reduce(t.detach().to("cpu", torch.float64)).to(t.device, t.dtype)

    def _new_store(self) -> Optional[MaskStore]:
        """A store with a row for each record this process streams (with ``split``: its own
        records only, a W-th of the set)."""
        if not self._layout:
            return None
        return MaskStore(self._layout, records_taken(self.split, self.records),
                         path=self._store_path, max_ram_bytes=self._max_ram_bytes)

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Store rows of records ``idx`` (record ``rank + j * W`` is row ``j`` under a split)."""
        return idx if self.split is None else (idx - self.split.rank) // self.split.world

    def _fix(self, idx: torch.Tensor) -> None:
        if self.store is not None:
            self.fixed.install(self.store.get(self._rows(idx), self.net.device))

    def support_pass(self) -> Dict[str, float]:
        """Compute and store every record's supports and switches at the current weights;
        returns ``loss`` (mean training loss there), ``changed`` (share of stored bits that
        changed, None on the first pass), ``on`` (share of support units on), all over every
        rank's records, and ``records_computed`` (this rank's)."""
        net = self.net
        if self._layout and (self.store is None or
                             self.store.num_records != records_taken(self.split, self.records)):
            self.store = self._new_store()  # first pass, or the split changed
        sink: Dict[str, torch.Tensor] = {}
        total, changed_bits, compared, on, units, here = 0.0, 0, 0, 0, 0, 0
        sup_names = [n for n, _ in self.fixed.supports]
        self.fixed.record(sink)
        try:
            with torch.no_grad():
                for inputs, idx in self.batches():
                    values = net.run(inputs, start=self.first, end=self.loss_end, eager=True)
                    total += float(net.loss(values)) * len(idx)
                    here += len(idx)
                    if self.store is None:
                        continue
                    rows = self._rows(idx)
                    was = self.store.is_filled(rows)
                    changed_bits += self.store.put(None, rows, sink)
                    compared += int(was.sum())
                    for n in sup_names:
                        on += int(sink[n].sum())
                        units += sink[n].numel()
        finally:
            self.fixed.remove()
        sums = self._sum_over_ranks(torch.tensor([total, changed_bits, compared, on, units],
                                                 dtype=torch.float64)).tolist()
        total, changed_bits, compared, on, units = sums
        real_bits = sum(self.store.units.values()) if self.store is not None else 0
        return {"loss": total / self.records,
                "changed": changed_bits / (real_bits * compared) if compared else None,
                "on": on / units if units else None, "records_computed": here}

    def _upstream(self, block: LayerBlock, inputs, idx, through: bool = True
                  ) -> Dict[str, torch.Tensor]:
        """Fix the batch's supports, run the net up to the block (``through``: and the block's
        own layer) without gradients."""
        self._fix(idx)
        with torch.no_grad():
            return self.net.run(inputs, start=self.first,
                                end=block.index if through else block.index - 1, eager=True)

    def _downstream(self, block: LayerBlock, z: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.net.run({block.top: z}, start=block.index + 1, end=self.loss_end,
                            eager=True)

    def _prediction(self, values, block: LayerBlock) -> Tuple[str, torch.Tensor, torch.Tensor]:
        loss = self.loss_steps[0]
        a, b = (values[n] for n in loss.bottoms[:2])
        if a.requires_grad == b.requires_grad:
            raise SolverError(f"layer '{block.name}' does not reach exactly one bottom of the "
                              f"EuclideanLoss '{loss.name}'", self.where,
                              "list the layers to solve in exact_layer")
        return (loss.bottoms[0], a, b) if a.requires_grad else (loss.bottoms[1], b, a)

    def _separable(self, block: LayerBlock) -> bool:
        loss = self.loss_steps[0]
        between = self.net.steps[block.index + 1:loss.index]
        return block.top in loss.bottoms[:2] and not any(block.top in s.tops for s in between)

    # ------------------------------------------------------------------ LEAST_SQUARES
    def _scale(self) -> float:
        loss = self.loss_steps[0]
        return self.net.blob_loss_weights.get(loss.tops[0], 1.0) / self.records

    def solve_separable(self, block: LayerBlock) -> None:
        """The output layer: one shared ``K x K`` Gram for all units (no backward pass)."""
        k = block.n_feats
        gram = torch.zeros(k, k, dtype=torch.float64, device=self.net.device)
        rhs = torch.zeros(k, block.cout, dtype=torch.float64, device=self.net.device)
        loss = self.loss_steps[0]
        other = loss.bottoms[1] if loss.bottoms[0] == block.top else loss.bottoms[0]
        for inputs, idx in self.batches():
            values = self._upstream(block, inputs, idx)
            feats = block.features(values[block.bottom]).double()
            pred = values[block.top].reshape(len(idx), block.cout, -1).double()
            target = values[other].reshape(pred.shape).double()
            gram += torch.einsum("bkl,bml->km", feats, feats)
            rhs += torch.einsum("bkl,bol->ko", feats, target - pred)
        gram, rhs = self._sum_over_ranks(gram), self._sum_over_ranks(rhs)
        cur = block.current().double().t()
        s = self._scale()
        ridge = ridge_vector(1, block.n_weight_feats, block.bias is not None, block.lam_w,
                             block.lam_b).to(gram.device)
        sol = ridge_solve(s * gram, s * (rhs + gram @ cur), ridge, cur)
        block.assign(sol.t())

    def _jacobian(self, block: LayerBlock, inputs, idx):
        """``(feats, jac (B, D, cout, L), residual y - f (B*D))`` of one batch."""
        values = self._upstream(block, inputs, idx)
        feats = block.features(values[block.bottom]).double()
        z = values[block.top].detach().requires_grad_(True)
        with torch.enable_grad():
            values = self._downstream(block, z)
            _, pred, target = self._prediction(values, block)
            pred = pred.reshape(len(idx), -1)
            cols = []
            for j in range(pred.shape[1]):
                (g,) = torch.autograd.grad(pred[:, j].sum(), z, retain_graph=True)
                cols.append(g.reshape(len(idx), block.cout, -1))
        jac = torch.stack(cols, dim=1).double()
        resid = (target.detach().reshape(pred.shape) - pred.detach()).double().reshape(-1)
        return feats, jac, resid

    def solve_dense(self, block: LayerBlock) -> None:
        """Normal equations of the whole block from ``A = J (x) F`` (float64), then Cholesky."""
        n = block.unknowns
        dev = self.net.device
        gram = torch.zeros(n, n, dtype=torch.float64, device=dev)
        rhs = torch.zeros(n, 1, dtype=torch.float64, device=dev)
        for inputs, idx in self.batches():
            feats, jac, resid = self._jacobian(block, inputs, idx)
            a = design_rows(jac, feats)
            gram += a.t() @ a
            rhs += a.t() @ resid.unsqueeze(1)
        gram, rhs = self._sum_over_ranks(gram), self._sum_over_ranks(rhs)
        cur = block.current().double().reshape(-1, 1)
        s = self._scale()
        ridge = ridge_vector(block.cout, block.n_weight_feats, block.bias is not None,
                             block.lam_w, block.lam_b).to(dev)
        sol = ridge_solve(s * gram, s * (rhs + gram @ cur), ridge, cur)
        block.assign(sol.reshape(block.cout, block.n_feats))

    def _normal_product(self, block: LayerBlock, direction: Optional[torch.Tensor]
                        ) -> torch.Tensor:
        """One pass: ``sum_x A_x' A_x direction`` (or, with None, ``sum_x A_x' (y_x - f_x)``)."""
        out = torch.zeros(block.cout, block.n_feats, dtype=torch.float64, device=self.net.device)
        for inputs, idx in self.batches():
            values = self._upstream(block, inputs, idx)
            feats = block.features(values[block.bottom])
            z = values[block.top].detach().requires_grad_(True)
            with torch.enable_grad():
                values = self._downstream(block, z)
                _, pred, target = self._prediction(values, block)
                if direction is None:
                    u = target.detach().reshape(pred.shape) - pred.detach()
                else:
                    zdir = block.output(feats, direction).reshape(z.shape)
                    dummy = torch.zeros_like(pred, requires_grad=True)
                    (vjp,) = torch.autograd.grad(pred, z, dummy, create_graph=True)
                    (u,) = torch.autograd.grad(vjp, dummy, zdir)  # A_x direction (forward mode)
                (gz,) = torch.autograd.grad(pred, z, u)
            out += torch.einsum("bol,bkl->ok", gz.reshape(len(idx), block.cout, -1).double(),
                                feats.double())
        return self._sum_over_ranks(out)

    def solve_cg(self, block: LayerBlock) -> float:
        """``cg_iter`` CG iterations on ``(s G + L) w = s b`` from the current weights; returns
        the final residual norm relative to the first."""
        s = self._scale()
        ridge = ridge_vector(block.cout, block.n_weight_feats, block.bias is not None,
                             block.lam_w, block.lam_b).to(self.net.device)
        ridge = ridge.reshape(block.cout, block.n_feats)
        x = block.current().double()
        r = s * self._normal_product(block, None) - ridge * x
        p = r.clone()
        rr = float((r * r).sum())
        rr0 = rr
        for _ in range(self.cg_iter):
            if rr == 0.0:
                break
            mp = s * self._normal_product(block, p.float()) + ridge * p
            alpha = rr / float((p * mp).sum())
            x = x + alpha * p
            r = r - alpha * mp
            rr_new = float((r * r).sum())
            p = r + (rr_new / rr) * p
            rr = rr_new
        block.assign(x)
        return (rr / rr0) ** 0.5 if rr0 > 0 else 0.0

    # ------------------------------------------------------------------ CONVEX
    def solve_lbfgs(self, block: LayerBlock) -> float:
        """``lbfgs_iter`` full-batch L-BFGS iterations on the block's loss + weight decay (L2 or
        L1, as the solver's regularization_type)."""
        params = block.params()
        lams = [block.lam_w if p is block.weight else block.lam_b for p in params]
        net = self.net
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=self.lbfgs_iter, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                tolerance_change=1e-12)

        def closure() -> torch.Tensor:
            for p in params:
                p.grad = None
            total = torch.zeros((), dtype=torch.float64, device=net.device)
            for inputs, idx in self.batches():
                self._upstream(block, inputs, idx, through=False)
                with torch.enable_grad():
                    # Re-run the solved layer itself with gradients into its blobs.
                    values = net.run(None, start=block.index, end=self.loss_end, eager=True)
                    loss = net.loss(values) * (len(idx) / self.records)
                    loss.backward()
                total += loss.detach().double()
            if self.split is not None:  # the data term over every rank's records
                total = self._sum_over_ranks(total)
                for p in params:  # every rank reduces every block parameter (collectives)
                    p.grad = self._sum_over_ranks(p.grad if p.grad is not None
                                                  else torch.zeros_like(p))
            with torch.enable_grad():
                # Caffe's penalties: L2 adds decay x w to the diff (1/2 decay ||w||^2), L1 adds
                # decay x sign(w) (decay ||w||_1; torch's |w| has gradient sign(w), 0 at 0).
                l1 = self.regularization == "L1"
                reg = sum(lam * p.abs().sum() if l1 else 0.5 * lam * (p * p).sum()
                          for p, lam in zip(params, lams) if lam)
                if isinstance(reg, torch.Tensor):
                    reg.backward()
                    total += reg.detach().double()
            return total.float()

        final = opt.step(closure)
        for p in net.parameters():  # gradients that reached other layers are not an update
            p.grad = None
        return float(final)

    # ------------------------------------------------------------------ one alternation
    def iterate(self) -> Dict[str, object]:
        """Support step, then each block solved once (in ``self.blocks`` order)."""
        net = self.net
        was_training = net.training
        net.eval()
        t0 = time.perf_counter()
        try:
            stats: Dict[str, object] = dict(self.support_pass())
            stats["support_seconds"] = time.perf_counter() - t0
            layers = []
            # A NaN/inf loss (NaN data, diverged weights) would put NaN into every normal
            # equation, and LAPACK's least-squares fallback aborts on it. Nothing is solved; the
            # loss reported for this iteration stops training with the loop's paragraph, as an
            # SGD iteration's non-finite loss does (Caffe itself would keep iterating on NaN).
            blocks = self.blocks if math.isfinite(stats["loss"]) else []
            if not blocks:
                logger.warning("Exact weight step: the training loss is %s before the sweep; no "
                               "layer solved", stats["loss"])
            for block in blocks:
                t = time.perf_counter()
                if self.kind == "CONVEX":
                    self.solve_lbfgs(block)
                    how = f"L-BFGS {self.lbfgs_iter}"
                elif self._separable(block):
                    self.solve_separable(block)
                    how = f"separable {block.n_feats}x{block.n_feats}"
                elif block.unknowns <= self.max_dense:
                    self.solve_dense(block)
                    how = f"dense {block.unknowns}"
                else:
                    rel = self.solve_cg(block)
                    how = f"CG {self.cg_iter} on {block.unknowns}, residual x{rel:.2g}"
                layers.append((block.name, how, time.perf_counter() - t))
            stats["layers"] = layers
        finally:
            self.fixed.remove()
            net.train(was_training)
        stats["seconds"] = time.perf_counter() - t0
        return stats


__all__ = ["ExactWeightStep", "FixedSupports", "LayerBlock", "layer_blocks", "support_layers",
           "max_pool_layers", "exact_layout", "ridge_solve", "design_rows", "ridge_vector",
           "pool_geometry", "CONVEX_LOSSES", "SWITCH_SUFFIX"]
