"""How the alternation solver obtains supports from a net: the I-alternation support pass over the
training set, and the per-batch eq. 41 supports of B-alternation and MaskT testing.

Both work through ``HardThreshold.fixed_support``: the callable receives the layer's input ``q``,
computes the support by the chosen rule and returns it, so the layer outputs ``m * q`` (or
``m * (q - beta)``). Consequence, on purpose: the support of layer ``l`` is computed from the
signal that arrives when the layers below already apply *their* computed supports, i.e. exactly
the signal the weight step will see with those supports fixed. With rule EQ12 this is ordinary
thresholding (``m = q > beta`` gives ``m * q = eta*(q; beta)``), so the recorded supports are the
net's own.

No state lives here beyond one pass; the solver owns the store and the schedule.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..distributed.sharding import RecordSplit, records_taken
from ..errors import SolverError
from ..layers.data import DataLayerBase, PipelinedDataLayer
from ..layers.support import HardThreshold, SupportMask
from ..memory_format import in_format
from .mask_store import MaskStore
from .record_stream import test_reader
from .rules import (batch_support, batch_support_sums, calibrated_threshold, channel_view,
                    count_changed_bits, majority_support, reconstruction_support,
                    threshold_support)

SumsReducer = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Finding the pieces of a net
# ---------------------------------------------------------------------------------------------
def hard_threshold_layers(net) -> List[Tuple[str, HardThreshold]]:
    """``(name, layer)`` of every HardThreshold layer of ``net``, in execution order."""
    return [(s.name, s.layer) for s in net.steps if isinstance(s.layer, HardThreshold)]


def store_supportmask_layers(net) -> List[str]:
    """Names of SupportMask layers with source STORE (not driven by the solver, see docs)."""
    return [s.name for s in net.steps
            if isinstance(s.layer, SupportMask) and s.layer.source == "STORE"]


def data_steps(net) -> list:
    """The data layers' steps (layers that produce batches and record indices)."""
    return [s for s in net.steps if isinstance(s.layer, DataLayerBase)]


def first_data_layer(net) -> Optional[DataLayerBase]:
    """The data layer whose ``last_indices`` key the supports (the one ``net.batch_indices`` reads)."""
    steps = data_steps(net)
    return steps[0].layer if steps else None


def record_count(layer: DataLayerBase) -> Optional[int]:
    """Number of records of a data layer's dataset (the store's key space), or None if unknown."""
    if isinstance(layer, PipelinedDataLayer):
        return int(layer.pipeline.maker.ordering.num_records)
    total = getattr(layer, "total", None)  # HDF5Data
    if total is not None:
        return int(total)
    data = getattr(layer, "_data", None)  # MemoryData once arrays are set
    return int(data.shape[0]) if data is not None else None


def batch_size_of(layer: DataLayerBase) -> int:
    """Samples per forward of a data layer (its top 0's first axis)."""
    return int(layer.top_shapes([])[0][0])


def support_layout(net) -> List[Tuple[str, Tuple[int, ...]]]:
    """``[(layer name, unit shape)]`` of the HardThreshold supports (the mask store's layout)."""
    layout = []
    for step in net.steps:
        if isinstance(step.layer, HardThreshold):
            shape = tuple(net.blob_shape(step.bottoms[0]))
            layout.append((step.name, shape[1:]))
    return layout


# ---------------------------------------------------------------------------------------------
# Rules applied to a layer's input q
# ---------------------------------------------------------------------------------------------
def thresholded_signal(layer: HardThreshold, q: torch.Tensor) -> torch.Tensor:
    """The layer's thresholded output ``x`` for input ``q`` in its current mode, detached.

    KEEP: ``q * (q > beta)``; SHIFT and RELU_BIAS: ``(q - beta) * (q > beta)``. Eq. 38 and 41
    reconstruct this signal (docs/alternation.md, "Which signal x the reconstruction rules see").
    """
    q = q.detach()
    beta = channel_view(layer.beta.detach().to(q.dtype), q)
    m = q > beta
    shift = layer.mode == "RELU_BIAS" or layer.output == "SHIFT"
    return (q - beta) * m if shift else q * m


def instance_support(layer: HardThreshold, q: torch.Tensor, rule: str, beta: float) -> torch.Tensor:
    """One support per example: eq. 12 (``q > beta_layer``) or eq. 38 (``x^2 > beta``). Bool."""
    if rule == "EQ12":
        return threshold_support(q, layer.beta)
    return reconstruction_support(thresholded_signal(layer, q), beta)


def _identity(stats: torch.Tensor) -> torch.Tensor:
    return stats


class BatchSupport:
    """``fixed_support`` callable of one HardThreshold layer: one mask for the batch it is given.

    Rule ``EQ41`` (the default): ``m_i = (sum_n x_i^(n)^2 > beta * N)`` with ``x`` the layer's
    thresholded signal and ``N`` the number of examples summed (``beta`` is per example, so one
    setting serves any batch size); with ``target_on > 0`` the threshold is instead calibrated on
    this batch's sums so that ``target_on`` of the layer's units are on
    (:func:`~pycaffe_alt.alternation.rules.calibrated_threshold`; the per-example value,
    threshold / N, is kept in ``beta_sink[name]``). Rule ``MAJORITY``: ``m_i`` is on when eq. 12
    (``q > beta_layer``) is on for more than half of the ``N`` examples. The mask has shape
    ``(1, *unit_shape)``; the last one is kept in ``sink[name]`` (DSD prunes with it).

    Distributed training: ``reduce`` is THE place where the statistics would be all-reduced
    (SUM) across processes. It receives one flat float32 tensor, the per-unit sums (EQ41) or
    counts (MAJORITY) followed by the example count, and must return the reduced tensor of the
    same shape; the default is the identity (one process). With ``torch.distributed.all_reduce``
    there, every process derives the same mask (and the same calibrated threshold) from the
    global batch.
    """

    def __init__(self, layer: HardThreshold, name: str, beta: float,
                 reduce: Optional[SumsReducer] = None,
                 sink: Optional[Dict[str, torch.Tensor]] = None, rule: str = "EQ41",
                 target_on: float = 0.0, beta_sink: Optional[Dict[str, torch.Tensor]] = None):
        self.layer = layer
        self.name = name
        self.beta = float(beta)
        self.reduce = reduce or _identity
        self.sink = sink
        self.rule = rule
        self.target_on = float(target_on)
        self.beta_sink = beta_sink

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        if self.rule == "MAJORITY":
            per_unit = threshold_support(q, self.layer.beta).sum(dim=0, dtype=torch.float32)
        else:
            per_unit = batch_support_sums(thresholded_signal(self.layer, q)).float()
        count = torch.full((1,), float(q.shape[0]), dtype=per_unit.dtype, device=per_unit.device)
        stats = self.reduce(torch.cat([per_unit.reshape(-1), count]))
        per_unit, n = stats[:-1].reshape(per_unit.shape), stats[-1]
        if self.rule == "MAJORITY":
            mask = majority_support(per_unit, n)
        else:
            threshold = calibrated_threshold(per_unit, self.target_on) if self.target_on > 0 \
                else n * self.beta
            mask = batch_support(per_unit, threshold)
            if self.beta_sink is not None:
                self.beta_sink[self.name] = threshold / n
        if self.sink is not None:
            self.sink[self.name] = mask
        return mask.unsqueeze(0)


class StoredSupports:
    """``fixed_support`` providers of I-alternation's weight step: the stored supports of the
    records in the current batch (``data_layer.last_indices``), fetched once per batch for all
    layers (one host->device copy, onto ``device``), 4-D masks laid out in ``mask_format()``.

    The fetch is host work keyed by the batch's record indices, so it stays out of a compiled
    graph: :meth:`prepare` does it (the layers call it through ``Layer.prepare_pass`` between
    the data layers and the graph), and the providers of :meth:`for_layer` then only return
    tensors; in an eager pass the first provider called fetches. The providers are made once
    and refer to this object, so a compiled graph stays valid across support steps.

    A sample the data layer mirrored gets its spatial (N, C, H, W) masks flipped along the width,
    so the support follows the image; 2-D (N, C) supports are not flipped. This is an
    approximation (a convolution of a flipped image is the flip of the convolution with flipped
    filters, not with the same ones). Random crops: the stored support is the centre crop's, used
    as is (docs/alternation.md, "Limits").
    """

    def __init__(self, store: MaskStore, data_layer: DataLayerBase, device: torch.device,
                 mask_format: Callable[[], torch.memory_format] = lambda: torch.contiguous_format):
        self.store = store
        self.data_layer = data_layer
        self.device = torch.device(device)
        # The layout 4-D masks are handed out in (asked per batch: a net can fall back from
        # compiled to eager); see pycaffe_alt.memory_format.activation_format.
        self.mask_format = mask_format
        self._key: Optional[torch.Tensor] = None
        # The masks of the batch last fetched, by layer name.
        self.fetched: Dict[str, torch.Tensor] = {}

    def prepare(self) -> None:
        """Fetch the current batch's masks, unless they are already fetched."""
        idx = self.data_layer.last_indices
        if self._key is idx:
            return
        masks = self.store.get(idx, self.device)
        mirrored = getattr(self.data_layer, "last_mirrored", None)
        if mirrored is not None and bool(mirrored.any()):
            sel = mirrored.to(self.device)
            for name, m in masks.items():
                if m.dim() == 4:
                    masks[name] = torch.where(sel.view(-1, 1, 1, 1), m.flip(-1), m)
        # In the layout of the activations they multiply: a mismatch costs a transpose of
        # every mask per batch (inside a compiled graph: LeNet weight steps 1.3-1.5x slower).
        fmt = self.mask_format()
        self.fetched = {n: in_format(m, fmt) for n, m in masks.items()}
        self._key = idx

    def forget(self) -> None:
        """Drop the fetched masks (the store's contents changed: a new support step)."""
        self.fetched, self._key = {}, None

    def masks(self) -> Dict[str, torch.Tensor]:
        """The current batch's masks by layer name (fetched if needed)."""
        self.prepare()
        return self.fetched

    def for_layer(self, name: str) -> "StoredLayerSupport":
        """The ``fixed_support`` of layer ``name``."""
        return StoredLayerSupport(self, name)


class StoredLayerSupport:
    """One layer's ``fixed_support`` from a :class:`StoredSupports` (``prepare`` is the shared
    fetch; inside a compiled graph the call only reads the fetched mask)."""

    def __init__(self, stored: StoredSupports, name: str):
        self.stored, self.name = stored, name

    def prepare(self) -> None:
        self.stored.prepare()

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.stored.prepare()
        return self.stored.fetched[self.name]


# ---------------------------------------------------------------------------------------------
# The I-alternation support pass
# ---------------------------------------------------------------------------------------------
class _Recorder:
    """``fixed_support`` of one layer during the pass: computes the rule's support, keeps it,
    returns it (so the layers above see the signal the weight step will see)."""

    def __init__(self, layer: HardThreshold, name: str, rule: str, beta: float,
                 sink: Dict[str, torch.Tensor]):
        self.layer, self.name, self.rule, self.beta, self.sink = layer, name, rule, beta, sink

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        m = instance_support(self.layer, q, self.rule, self.beta)
        self.sink[self.name] = m
        return m


def _pass_range(net) -> Tuple[int, int]:
    """Step indices the pass runs: from the first layer after the data layers up to the last
    HardThreshold (nothing above the last support is needed)."""
    steps = net.steps
    data_idx = [i for i, s in enumerate(steps) if isinstance(s.layer, DataLayerBase)]
    ht_idx = [i for i, s in enumerate(steps) if isinstance(s.layer, HardThreshold)]
    first_other = next(i for i, s in enumerate(steps) if not isinstance(s.layer, DataLayerBase))
    if data_idx and max(data_idx) > first_other:
        raise SolverError(f"{net.source}: data layer '{steps[max(data_idx)].name}' comes after "
                          f"layer '{steps[first_other].name}'",
                          hint="I-alternation feeds the net its own batches and needs the data "
                               "layers first; move them to the top of the prototxt")
    return first_other, max(ht_idx)


def run_support_pass(net, store: MaskStore, rule: str = "EQ12", beta: float = 0.0,
                     batch_size: int = 0, split: Optional[RecordSplit] = None
                     ) -> Dict[str, object]:
    """One pass over the whole training set of ``net``'s first data layer: every record exactly
    once, in key order, with the TEST-style transform (centre crop, no mirror) and the layers in
    test mode (Dropout off, BatchNorm on its global statistics), no gradients; each record's
    support at every HardThreshold layer goes into ``store`` under its record index.

    Only the layers up to the last HardThreshold run. Batches of ``batch_size`` (default: the
    train batch); the last batch wraps around to the first records (as the Data layer does) so
    every forward has the train batch's shape, and only its new records are stored. Packing
    runs on the device, one device->host copy per batch (MaskStore.put).

    ``split`` (data-parallel training, :class:`~pycaffe_alt.distributed.sharding.RecordSplit`):
    this rank computes only records ``rank, rank + W, ...`` (Caffe's skip rule in key order),
    then the packed rows of every rank are all-gathered into every rank's store, so all ranks
    end with the same complete store (the weight step of any rank may need any record's masks:
    which records a rank reads changes with shuffle and the wrap-around), and the counts behind
    the statistics are summed over the ranks (the statistics are the whole pass's).

    Returns the statistics: ``seconds``, ``records``, ``batches`` and ``records_computed`` (this
    rank's), ``first`` (no earlier supports), ``changed_fraction`` per layer and
    ``changed_overall`` (None on a first pass), ``on_fraction`` per layer and ``on_overall``,
    ``store_bytes``, ``gather_seconds`` (the all-gather and the sums; 0 without ``split``).
    """
    t0 = time.perf_counter()
    layer = first_data_layer(net)
    if not isinstance(layer, PipelinedDataLayer):
        kind = type(layer).__name__ if layer is not None else "no data layer"
        raise SolverError(f"{net.source}: I-alternation reads the training set through a Data or "
                          f"ImageData layer; the train net has {kind}",
                          hint="use a Data (LMDB) or ImageData layer, or mode: BATCH")
    n = int(layer.pipeline.maker.ordering.num_records)
    if n != store.num_records:
        raise SolverError(f"the mask store holds {store.num_records} records but the training "
                          f"set has {n}")
    pipe, n, bs = test_reader(layer, batch_size, split)
    mine = records_taken(split, n)  # records this rank computes
    tops = net.top_names[data_steps(net)[0].name]
    start, end = _pass_range(net)

    hts = hard_threshold_layers(net)
    sink: Dict[str, torch.Tensor] = {}
    saved = [(ht, ht.fixed_support) for _, ht in hts]
    for name, ht in hts:
        ht.fixed_support = _Recorder(ht, name, rule, beta, sink)
    was_training = net.training
    names = store.layer_names()
    columns = {nm: store.layer_columns(nm) for nm in names}
    changed = {nm: 0 for nm in names}
    on = {nm: None for nm in names}
    compared = 0
    batches = math.ceil(mine / bs)
    net.eval()
    try:
        with torch.no_grad():
            for b in range(batches):
                batch = pipe.next_batch(net.device)
                inputs = {tops[0]: batch["data"]}
                if len(tops) > 1:
                    inputs[tops[1]] = batch["label"]
                net.run(inputs, start=start, end=end, eager=True)
                keep = min(bs, mine - b * bs)
                idx = batch["indices"][:keep]
                masks = {nm: sink[nm][:keep] for nm in names}
                for nm in names:
                    count = masks[nm].sum(dtype=torch.int64)
                    on[nm] = count if on[nm] is None else on[nm] + count
                idx_np = idx.numpy()
                was = store.is_filled(idx_np)
                old = store.read_rows(idx_np[was]) if was.any() else None
                store.put(None, idx_np, masks)
                if old is not None:
                    new = store.read_rows(idx_np[was])
                    for nm in names:
                        changed[nm] += count_changed_bits(old[:, columns[nm]],
                                                          new[:, columns[nm]])
                    compared += int(was.sum())
    finally:
        for ht, fs in saved:
            ht.fixed_support = fs
        net.train(was_training)
        pipe.close()
    on_counts = {nm: int(on[nm]) if on[nm] is not None else 0 for nm in names}
    gather_seconds = 0.0
    if split is not None:
        t1 = time.perf_counter()
        gather_rows(store, split)
        counts = torch.tensor([changed[nm] for nm in names] + [on_counts[nm] for nm in names] +
                              [compared], dtype=torch.float64)
        counts = split.reduce(counts).tolist()  # exact: integers far below 2^53
        k = len(names)
        changed = {nm: int(counts[i]) for i, nm in enumerate(names)}
        on_counts = {nm: int(counts[k + i]) for i, nm in enumerate(names)}
        compared = int(counts[2 * k])
        gather_seconds = time.perf_counter() - t1
    units = store.units
    total_units = sum(units.values())
    stats: Dict[str, object] = {
        "seconds": time.perf_counter() - t0, "records": n, "batches": batches,
        "records_computed": mine, "gather_seconds": gather_seconds,
        "first": compared == 0,
        "changed_fraction": {nm: (changed[nm] / (units[nm] * compared) if compared else None)
                             for nm in names},
        "changed_overall": (sum(changed.values()) / (total_units * compared) if compared
                            else None),
        "on_fraction": {nm: on_counts[nm] / (units[nm] * n) for nm in names},
        "on_overall": sum(on_counts.values()) / (total_units * n),
        "store_bytes": store.nbytes,
    }
    return stats


# Rows exchanged per rank and all-gather: bounds the temporary memory of the exchange
# (W x this many bytes) for stores of any size.
GATHER_CHUNK_BYTES = 64 << 20


def gather_rows(store: MaskStore, split: RecordSplit,
                chunk_bytes: int = GATHER_CHUNK_BYTES) -> None:
    """Complete every rank's store with the rows the other ranks computed (records
    ``q, q + W, ...`` from rank ``q``): all-gathers of packed rows, each rank's part padded to
    rank 0's length, in chunks of about ``chunk_bytes`` per rank; afterwards the stores are
    byte-identical."""
    n, world = store.num_records, split.world
    height = split.rows_per_rank(n)
    per_chunk = max(1, chunk_bytes // max(store.row_bytes, 1))
    owned = [split.records(n, q) for q in range(world)]
    mine = owned[split.rank]
    for lo in range(0, height, per_chunk):
        hi = min(height, lo + per_chunk)
        part = np.zeros((hi - lo, store.row_bytes), dtype=np.uint8)
        local = mine[lo:hi]
        part[:len(local)] = store.read_rows(local)
        parts = split.gather(torch.from_numpy(part))
        for q, rows in enumerate(parts):
            theirs = owned[q][lo:hi]
            if q != split.rank and len(theirs):
                store.write_rows(theirs, rows[:len(theirs)].numpy())


def capture_rng(device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The torch generator states a train-mode forward on ``device`` draws from (Dropout)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def thresholded_loss(net, hts: List[Tuple[str, HardThreshold]],
                     rng: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss of the *thresholded* net (no fixed supports) on the batch ``net`` just ran,
    without disturbing training: the layers above the data layers run once more (no gradients),
    with the HardThresholds of ``hts`` thresholding, Dropout drawing from ``rng`` (the states
    :func:`capture_rng` took before the masked forward, so both passes drop the same units), and
    afterwards the blob values, every layer buffer (BatchNorm statistics) and the generators are
    as they were. Costs one forward pass of the batch. Returns ``(thresholded, masked)``, 0-d
    device tensors: the new loss and the loss of the pass that just ran (the last of
    ``iter_size`` passes, the same batch).
    """
    start, _ = _pass_range(net)
    values = net.run(start=len(net.steps), eager=True)  # no layer runs: the current blob values
    saved_values = dict(values)
    masked = net.loss(saved_values).detach()
    buffers = [(b, b.detach().clone()) for m in net.layer_sequence for b in m.buffers()]
    saved_fs = [(ht, ht.fixed_support) for _, ht in hts]
    devices = [net.device] if net.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if rng is not None:
                torch.set_rng_state(rng[0])
                if rng[1] is not None:
                    torch.cuda.set_rng_state(rng[1], net.device)
            for ht, _ in saved_fs:
                ht.fixed_support = None
            loss = net.loss(net.run(start=start, eager=True)).detach()
    finally:
        for ht, fs in saved_fs:
            ht.fixed_support = fs
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        values.clear()
        values.update(saved_values)
    return loss, masked


def data_states(net) -> Dict[str, object]:
    """Reading positions of ``net``'s data layers (to evaluate the same batches twice)."""
    return {s.name: s.layer.state() for s in data_steps(net) if hasattr(s.layer, "state")}


def load_data_states(net, states: Dict[str, object]) -> None:
    for s in data_steps(net):
        if s.name in states:
            s.layer.load_state(states[s.name])


def fraction_text(fractions: Dict[str, Optional[float]], overall: Optional[float]) -> str:
    """``4.21% (ht1 3.10%, ht2 5.00%)`` for a log line."""
    parts = ", ".join(f"{nm} {100 * f:.2f}%" for nm, f in fractions.items() if f is not None)
    return f"{100 * overall:.2f}% ({parts})"


__all__ = ["BatchSupport", "StoredSupports", "hard_threshold_layers", "first_data_layer",
           "record_count", "batch_size_of", "support_layout", "thresholded_signal",
           "instance_support", "run_support_pass", "gather_rows", "fraction_text", "data_states",
           "load_data_states", "store_supportmask_layers", "data_steps", "capture_rng",
           "thresholded_loss"]
