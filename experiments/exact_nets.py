"""Nets and data for the exact-weight-step benchmark and experiments (docs/exact_steps.md).

* :func:`mnist5k_hdf5`: the embedded 4,000 + 1,000 MNIST digits (data/mnist5k) as HDF5 files
  with ``data`` (scaled 1/256), ``label`` and ``onehot`` (the squared-loss target);
* :func:`net_text`: models/lenet or models/allcnn_c (their hard-threshold form) with HDF5Data
  layers instead of the LMDB ones and, for ``loss="euclidean"``, an EuclideanLoss on the one-hot
  targets instead of the SoftmaxWithLoss (Accuracy stays in the TEST net);
* :func:`solver_text`: an SGD or Alternation solver around such a net.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
from google.protobuf import text_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_hdf5(folder: str, name: str, x: np.ndarray, labels: np.ndarray, classes: int = 10) -> str:
    """``<folder>/<name>.h5`` with data/label/onehot and the list file naming it; returns the list."""
    import h5py

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".h5")
    with h5py.File(path, "w") as f:
        f["data"] = x.astype(np.float32)
        f["label"] = labels.astype(np.float32)
        f["onehot"] = np.eye(classes, dtype=np.float32)[labels.astype(np.int64)]
    listing = os.path.join(folder, name + ".txt")
    with open(listing, "w") as f:
        f.write(path + "\n")
    return listing


def mnist5k_hdf5(folder: str) -> Dict[str, str]:
    """Train/test list files of the mnist5k digits (train in data/mnist5k's fixed order)."""
    from pycaffe_alt.data.mnist5k import CSV_NAME, load_mnist5k_csv, split_indices

    images, labels = load_mnist5k_csv(os.path.join(ROOT, "data", "mnist5k", CSV_NAME))
    train, test = split_indices(labels)
    x = images[:, None].astype(np.float32) * 0.00390625
    return {"train": write_hdf5(folder, "train", x[train], labels[train]),
            "test": write_hdf5(folder, "test", x[test], labels[test])}


def random_hdf5(folder: str, records: int, shape=(3, 32, 32), seed: int = 0) -> Dict[str, str]:
    """CIFAR-shaped random images with random labels (cost does not depend on the values)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((records,) + tuple(shape)).astype(np.float32)
    y = rng.integers(0, 10, records)
    listing = write_hdf5(folder, "random", x, y)
    return {"train": listing, "test": listing}


def net_text(model: str, lists: Dict[str, str], loss: str = "softmax", batch: int = 64,
             test_batch: int = 100) -> str:
    """``model`` ("lenet", "allcnn_c") on HDF5 lists; ``loss`` "softmax" or "euclidean"."""
    from pycaffe_alt.proto import caffe_pb2

    net = caffe_pb2.NetParameter()
    with open(os.path.join(ROOT, "models", model, "train_val.prototxt")) as f:
        text_format.Parse(f.read(), net)
    target = "onehot" if loss == "euclidean" else "label"
    layers = []
    for phase, source, bs, tops in ((caffe_pb2.TRAIN, lists["train"], batch, ["data", target]),
                                    (caffe_pb2.TEST, lists["test"], test_batch,
                                     ["data", "label"] + (["onehot"] if loss == "euclidean" else []))):
        lp = caffe_pb2.LayerParameter(name="data", type="HDF5Data", top=tops)
        lp.include.add(phase=phase)
        lp.hdf5_data_param.source = source
        lp.hdf5_data_param.batch_size = bs
        layers.append(lp)
    for lp in net.layer:
        if lp.type in ("Data", "HDF5Data"):
            continue
        if lp.type == "Dropout" and model == "allcnn_c" and lp.bottom[0] == "data":
            continue  # input dropout of the data blob: keep the data blob unchanged
        if lp.type == "SoftmaxWithLoss" and loss == "euclidean":
            lp.type = "EuclideanLoss"
            del lp.bottom[1:]
            lp.bottom.append("onehot")
        layers.append(lp)
    del net.layer[:]
    net.layer.extend(layers)
    return text_format.MessageToString(net)


def solver_text(net_path: str, kind: str, base_lr: float = 0.01, max_iter: int = 100,
                test_interval: int = 0, test_iter: int = 10, display: int = 0,
                momentum: float = 0.9, weight_decay: float = 0.0005, seed: int = 1,
                extra: str = "", prefix: Optional[str] = None) -> str:
    """SGD (``kind="SGD"``) or Alternation with ``weight_step: kind``."""
    lines = [f'net: "{net_path}"', f"base_lr: {base_lr}", 'lr_policy: "fixed"',
             f"momentum: {momentum}", f"weight_decay: {weight_decay}", f"max_iter: {max_iter}",
             f"display: {display}", f"random_seed: {seed}", "snapshot_after_train: false"]
    # Test nets always exist; with test_interval 0 the caller tests when it wants to.
    lines += [f"test_interval: {test_interval or 1000000}", f"test_iter: {test_iter}",
              f"test_initialization: {'true' if test_interval else 'false'}"]
    if prefix:
        lines.append(f'snapshot_prefix: "{prefix}"')
    if kind == "SGD":
        lines.append('type: "SGD"')
    else:
        lines.append('type: "Alternation"')
        lines.append(f"alternation_param {{ weight_step: {kind} warmup_iter: 0 {extra} }}")
    return "\n".join(lines) + "\n"
