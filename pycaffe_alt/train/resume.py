"""What a snapshot records beyond Caffe's solverstate, so that a resumed run continues exactly.

Caffe's ``.solverstate`` holds the iteration, ``current_step``, the update history and the
weights' file; on resume Caffe's data layers start again at the first record and the random
generators are freshly seeded. Our snapshots add, in ``SolverState.resume_state`` (a field
Caffe skips):

- ``data``: every data layer's reading position and stream seeds (``layer.state()``), for the
  train net and for each test net (test nets keep their cursor between tests, as in Caffe);
- ``rng``: the global generators layers draw from during training: torch's CPU generator
  (Dropout on the CPU), every CUDA device's generator (Dropout on GPUs) when CUDA is in use,
  numpy's and Python's global generators (Python layers).

With these, N iterations + snapshot + restore + N iterations equals 2N iterations bit for bit
on the CPU. The smoothed-loss window is not recorded: Caffe restarts it at every ``step`` call.
A snapshot without this data (Caffe's own) restores what Caffe restores and nothing else.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List

import numpy as np
import torch

from .. import caffe_rng
from ..log import get_logger

logger = get_logger()
VERSION = 1


def _data_layers(net) -> Dict[str, Any]:
    """Layers that expose ``state()``/``load_state()`` (the data layers), by name."""
    return {name: m for name, m in net.layer_modules.items()
            if callable(getattr(m, "state", None)) and callable(getattr(m, "load_state", None))}


def _net_data_state(net) -> Dict[str, Any]:
    return {name: layer.state() for name, layer in _data_layers(net).items()}


def _numpy_rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": np.asarray(keys, dtype=np.uint32).tobytes(), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _rng_state() -> Dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state().numpy().tobytes(),
             "caffe": caffe_rng.stream().state(),
             "numpy": _numpy_rng_state(),
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _decode_rng_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """The generator states of a :func:`capture` as the setters take them, each checked on a
    throwaway generator (ValueError/TypeError/KeyError otherwise): a damaged snapshot is
    refused before any generator changes. MT19937 positions are range-checked here, as neither
    numpy's setters nor ours check them (a position past 624 reads outside the key: a crash)."""
    if not isinstance(state, dict):
        raise TypeError(f"rng is a {type(state).__name__}, not a dict")
    out: Dict[str, Any] = {}
    if "torch" in state:
        out["torch"] = torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8)
        torch.Generator().set_state(out["torch"])
    if "caffe" in state:  # absent in snapshots from before the stream was kept
        out["caffe"] = state["caffe"]
        caffe_rng.CaffeRNG(0).set_state(out["caffe"])
    if "numpy" in state:
        n = state["numpy"]
        keys = np.frombuffer(n["keys"], dtype=np.uint32).copy()
        out["numpy"] = (n["kind"], keys, caffe_rng.check_mt_position(keys, n["pos"]),
                        int(n["has_gauss"]), float(n["gauss"]))
        np.random.RandomState().set_state(out["numpy"])
    if "python" in state:
        version, internal, gauss_next = state["python"]
        out["python"] = (version, tuple(internal), gauss_next)
        random.Random().setstate(out["python"])
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(c, bytes) for c in cuda):
        raise TypeError("cuda generator states are not a list of byte strings")
    out["cuda"] = cuda
    return out


def _set_rng_state(decoded: Dict[str, Any]) -> None:
    """Set the generators from a :func:`_decode_rng_state`."""
    if "torch" in decoded:
        torch.set_rng_state(decoded["torch"])
    if "caffe" in decoded:
        caffe_rng.stream().set_state(decoded["caffe"])
    if "numpy" in decoded:
        np.random.set_state(decoded["numpy"])
    if "python" in decoded:
        random.setstate(decoded["python"])
    cuda = decoded["cuda"]
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(cuda[i]), dtype=torch.uint8), i)


def capture(solver) -> Dict[str, Any]:
    """The continuation data of ``solver`` now (stored by :meth:`Solver.snapshot`)."""
    return {"version": VERSION,
            "data": {"train": _net_data_state(solver.net),
                     "test": [_net_data_state(n) for n in solver.test_nets]},
            "rng": _rng_state()}


def _load_net_data_state(net, states: Dict[str, Any], label: str, where: str) -> None:
    layers = _data_layers(net)
    if not isinstance(states, dict):
        raise TypeError(f"the {label} data state is a {type(states).__name__}, not a dict")
    for name, state in states.items():
        layer = layers.get(name)
        if layer is None:
            logger.warning("%s: the snapshot has a reading position for %s data layer '%s', "
                           "which this net does not have; ignored", where, label, name)
            continue
        layer.load_state(state)
    for name in layers.keys() - states.keys():
        logger.warning("%s: no reading position for %s data layer '%s' in the snapshot; it "
                       "continues from where it is", where, label, name)


def apply(solver, state: Dict[str, Any], where: str = "resume_state") -> None:
    """Put ``solver``'s data cursors and random generators back to a :func:`capture`."""
    version = state.get("version")
    if version != VERSION:
        logger.warning("%s: continuation data of version %r (expected %d); data cursors and "
                       "random generators restart as in Caffe", where, version, VERSION)
        return
    # Generator states are checked before anything is set; a data layer refuses a damaged
    # position before it moves (DataError). The caller reports either as a damaged snapshot.
    rng = _decode_rng_state(state.get("rng", {}))
    data = state.get("data", {})
    _load_net_data_state(solver.net, data.get("train", {}), "train", where)
    tests: List[Dict[str, Any]] = data.get("test", [])
    for i, net in enumerate(solver.test_nets):
        if i < len(tests):
            _load_net_data_state(net, tests[i], f"test net #{i}", where)
    _set_rng_state(rng)
