"""Every training record exactly once, in batches: the stream an exact weight step sums over.

An exact weight step (docs/exact_steps.md) builds its normal equations, or its full-batch loss,
from the whole training set, with each record's stored support looked up by its record index.
:func:`ordered_batches` yields ``(inputs, indices)`` for the net's (single) data layer:

* Data / ImageData: a private reader of the same records in key order with the TEST-style
  transform (centre crop, no mirror), as the I-alternation support pass reads them; batches of
  ``batch_size`` (default: the train batch);
* HDF5Data / MemoryData: the layer itself, put at the start of a pass and put back afterwards
  (``state``/``load_state``), in its own batch size and order (HDF5 shuffle included); a last
  batch that wraps into the next pass keeps only the records not seen yet.

The training data cursor is left where it was, so an exact step does not change which batches
a later SGD iteration or a test sees.

With a :class:`~pycaffe_alt.distributed.sharding.RecordSplit` (a data-parallel job) each rank
streams only its records ``rank, rank + W, ...``: the Data/ImageData reader reads that shard
(Caffe's skip rule in key order), the HDF5Data/MemoryData layer keeps only those rows of what it
serves. The exact step then sums over the ranks (every sum it makes is over records).
"""
from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ..distributed.sharding import UNSHARDED, RecordSplit, records_taken
from ..errors import SolverError
from ..layers.data import DataLayerBase, HDF5Data, MemoryData, PipelinedDataLayer

Batch = Tuple[Dict[str, torch.Tensor], torch.Tensor]


def data_step(net):
    """The net's only data layer step; SolverError when there is none or more than one."""
    steps = [s for s in net.steps if isinstance(s.layer, DataLayerBase)]
    if len(steps) != 1:
        found = ", ".join(s.name for s in steps) or "none"
        raise SolverError(f"{net.source}: an exact weight step streams the training set through "
                          f"exactly one data layer; the train net has {found}",
                          hint="give the train net one Data, ImageData, HDF5Data or MemoryData "
                               "layer with the inputs and the targets")
    return steps[0]


def test_reader(layer: PipelinedDataLayer, batch_size: int = 0,
                split: Optional[RecordSplit] = None):
    """``(pipe, n, bs)``: a private reader of ``layer``'s ``n`` records in key order, batches of
    ``bs`` (``batch_size``, default the train batch), TEST-style transform (centre crop, no
    mirror); the last batch wraps to the first records. With a ``split`` (a data-parallel
    rank's part of a pass), local sample ``j`` is record ``j * W + rank`` (key order, Caffe's
    skip rule), wrapping likewise. The caller closes ``pipe``."""
    from ..data.pipeline import BatchMaker, InputPipeline, Ordering

    maker = layer.pipeline.maker
    n = int(maker.ordering.num_records)
    bs = int(batch_size) or maker.batch_size
    source = pickle.loads(pickle.dumps(maker.source))  # the training prefetcher keeps its own
    spec = dataclasses.replace(maker.spec, train=False, mirror=False)
    shard = split.shard if split is not None else UNSHARDED
    reader = BatchMaker(source, spec, bs, Ordering(n), maker.seed, layer.where, shard=shard)
    reader.channels_last = maker.channels_last  # the net's layout, as the training batches have
    pipe = InputPipeline(reader, workers=0, depth=2)
    return pipe, n, bs


def _pipelined(layer: PipelinedDataLayer, tops, batch_size: int, device: torch.device,
               split: Optional[RecordSplit]) -> Iterator[Batch]:
    pipe, n, bs = test_reader(layer, batch_size, split)
    mine = records_taken(split, n)
    try:
        for b in range(math.ceil(mine / bs)):
            batch = pipe.next_batch(device)
            keep = min(bs, mine - b * bs)  # the last batch wraps to the first records
            inputs = {tops[0]: batch["data"][:keep]}
            if len(tops) > 1:
                inputs[tops[1]] = batch["label"][:keep]
            yield inputs, batch["indices"][:keep]
    finally:
        pipe.close()


def _start_state(layer: DataLayerBase) -> dict:
    state = dict(layer.state())
    if isinstance(layer, HDF5Data):
        # The first sample of the global order: a data-parallel (sharded) layer then serves
        # rows rank, rank + W, ... of it, whatever cursor a resume on another number of
        # ranks left its shard at (an offset cursor would serve only other ranks' records).
        state.update(served=0, shard_start=0, global_cursor=0)
    else:
        state["pos"] = 0
    return state


def _self_served(layer: DataLayerBase, tops, n: int,
                 split: Optional[RecordSplit]) -> Iterator[Batch]:
    saved = layer.state()
    # Records already streamed, or not this rank's: both are skipped.
    seen = np.ones(n, dtype=bool)
    seen[split.records(n) if split is not None else slice(None)] = False
    served, limit = 0, 2 * n + 1  # any order serves every record within two passes
    try:
        layer.load_state(_start_state(layer))
        while not seen.all():
            if served > limit:
                missing = int((~seen).sum())
                raise SolverError(f"data layer '{layer.name}' served {served} records without "
                                  f"{missing} of the {n} the exact weight step needs",
                                  hint="its source must list every training record")
            out = layer()
            out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            idx = layer.last_indices.cpu()
            served += len(idx)
            fresh = ~seen[idx.numpy()]
            seen[idx.numpy()] = True
            if not fresh.any():
                continue
            sel = torch.from_numpy(fresh)
            yield ({t: v[sel.to(v.device)] for t, v in zip(tops, out)}, idx[sel])
    finally:
        layer.load_state(saved)


def ordered_batches(net, num_records: int, batch_size: int = 0,
                    split: Optional[RecordSplit] = None) -> Iterator[Batch]:
    """``(inputs, indices)`` covering each of the ``num_records`` training records once (with
    ``split``: this rank's records, see the module notes).

    ``inputs`` maps the data layer's top names to tensors on the net's device (feed them to
    ``net.run(inputs, start=first_layer_after_data)``); ``indices`` are the records' indices
    (int64, CPU), the keys of the mask store. A batch may be smaller than the others (the last).
    """
    step = data_step(net)
    layer = step.layer
    tops = net.top_names[step.name]
    if isinstance(layer, PipelinedDataLayer):
        yield from _pipelined(layer, tops, batch_size, net.device, split)
    elif isinstance(layer, (HDF5Data, MemoryData)):
        yield from _self_served(layer, tops, int(num_records), split)
    else:
        raise SolverError(f"{net.source}: data layer '{step.name}' ({layer.type}) cannot be "
                          "streamed record by record for an exact weight step",
                          hint="use a Data, ImageData, HDF5Data or MemoryData layer")


__all__ = ["ordered_batches", "data_step", "test_reader"]
