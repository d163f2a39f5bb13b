"""Seed 004's teacher-student problem (Jagatap & Hegde) as files for the exact-step tests:
``y = sum_j relu(w_j' x)`` with Gaussian inputs, a student started at the teacher plus noise.

:func:`teacher_files` writes the HDF5 data, the net, the solver and the start weights into a
folder and returns their paths; the experiments use the same builder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

NET = """name: "TeacherStudent"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "%(list)s" batch_size: %(batch)d } }
layer { name: "hidden" type: "InnerProduct" bottom: "data" top: "hidden"
  param { lr_mult: 1 decay_mult: 1 } %(bias_param)s
  inner_product_param { num_output: %(k)d bias_term: %(bias)s weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "hidden" top: "hidden" }
layer { name: "out" type: "InnerProduct" bottom: "hidden" top: "out"
  param { lr_mult: 0 decay_mult: 0 }
  inner_product_param { num_output: 1 bias_term: false weight_filler { type: "constant" value: 1 } } }
%(skip)s
layer { name: "loss" type: "EuclideanLoss" bottom: "%(pred)s" bottom: "label" top: "loss" }
"""

SKIP = """layer { name: "skip" type: "InnerProduct" bottom: "data" top: "skip"
  param { lr_mult: 0 decay_mult: 0 }
  inner_product_param { num_output: 1 bias_term: false weight_filler { type: "constant" value: 1 } } }
layer { name: "sum" type: "Eltwise" bottom: "out" bottom: "skip" top: "sum"
  eltwise_param { operation: SUM } }
"""

SOLVER = """net: "%(net)s"
type: "%(type)s"
base_lr: %(lr)s
lr_policy: "fixed"
momentum: %(momentum)s
weight_decay: %(decay)s
max_iter: %(max_iter)d
display: %(display)d
snapshot: %(snapshot)d
snapshot_prefix: "%(prefix)s"
random_seed: 1
%(extra)s
"""


def teacher(d: int = 20, k: int = 4, n: int = 2000, noise: float = 0.3, seed: int = 0,
            skip: bool = False) -> Dict[str, np.ndarray]:
    """Inputs ``x`` (n, d), targets ``y`` (n, 1), teacher ``w`` (k, d), start ``w0`` (k, d) with
    ``||w0 - w||_F = noise * ||w||_F``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, d))
    x = rng.standard_normal((n, d))
    y = np.maximum(x @ w.T, 0).sum(axis=1, keepdims=True)
    if skip:
        y = y + x.sum(axis=1, keepdims=True)
    e = rng.standard_normal((k, d))
    w0 = w + noise * np.linalg.norm(w) / np.linalg.norm(e) * e
    return {"x": x.astype(np.float32), "y": y.astype(np.float32), "w": w, "w0": w0}


def teacher_files(folder, d: int = 20, k: int = 4, n: int = 2000, noise: float = 0.3,
                  seed: int = 0, skip: bool = False, batch: int = 500,
                  solver_type: str = "Alternation", lr: float = 0.01, momentum: float = 0.9,
                  max_iter: int = 10, snapshot: int = 0, display: int = 1,
                  extra: Optional[str] = None, weight_decay: float = 0.0,
                  bias: bool = False) -> Dict[str, object]:
    """Write data, net, solver and start weights under ``folder``; returns paths and arrays.

    ``bias``: the hidden layer gets a bias (start 0), trained with decay_mult 0."""
    import h5py

    from pycaffe_alt.net import Net

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    case = teacher(d, k, n, noise, seed, skip)
    h5 = folder / "train.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = case["x"]
        f["label"] = case["y"]
    (folder / "train.txt").write_text(f"{h5}\n")
    net = folder / "net.prototxt"
    net.write_text(NET % {"list": folder / "train.txt", "batch": batch, "k": k,
                          "skip": SKIP if skip else "", "pred": "sum" if skip else "out",
                          "bias": "true" if bias else "false",
                          "bias_param": "param { lr_mult: 1 decay_mult: 0 }" if bias else ""})
    if extra is None:
        extra = ('alternation_param { weight_step: LEAST_SQUARES warmup_iter: 0 gap_iter: 1 }'
                 if solver_type == "Alternation" else "")
    solver = folder / "solver.prototxt"
    solver.write_text(SOLVER % {"net": net, "type": solver_type, "lr": lr, "momentum": momentum,
                                "max_iter": max_iter, "display": display, "snapshot": snapshot,
                                "prefix": folder / "snap", "extra": extra,
                                "decay": weight_decay})
    start = folder / "start.caffemodel"
    built = Net(str(net), 1)
    built.params["hidden"][0].data[...] = case["w0"]
    built.save(str(start))
    return {"net": net, "solver": solver, "weights": start, **case}


def hidden_weights(caffemodel) -> np.ndarray:
    """The ``hidden`` layer's weights of a caffemodel."""
    from pycaffe_alt.proto import caffe_pb2

    p = caffe_pb2.NetParameter()
    with open(os.fspath(caffemodel), "rb") as f:
        p.ParseFromString(f.read())
    for layer in list(p.layer) + list(p.layers):
        if layer.name == "hidden":
            b = layer.blobs[0]
            return np.asarray(b.data, dtype=np.float64).reshape(tuple(b.shape.dim))
    raise KeyError("hidden")


def relative_error(w_hat: np.ndarray, w: np.ndarray) -> float:
    """``||w_hat - w||_F / ||w||_F`` (the rows are matched as they are: no permutation, the
    student starts next to the teacher)."""
    return float(np.linalg.norm(w_hat - w) / np.linalg.norm(w))
