"""Running one reference-Caffe golden case (tests/fixtures/golden) and comparing every blob:
shared by tests/test_golden.py and benchmarks/gpu_check.py (the same cases on a GPU)."""
import glob
import json
import os
import re
from typing import List, Tuple

import numpy as np

import pycaffe_alt as caffe

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden")
FWD_TOL, GRAD_TOL = 1e-4, 1e-3


def golden_cases() -> List[str]:
    """Every layer and net case folder, sorted."""
    return sorted(glob.glob(os.path.join(GOLDEN, "layers", "*")) +
                  glob.glob(os.path.join(GOLDEN, "nets", "*")))


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    a = np.asarray(a, np.float64).reshape(np.shape(b))
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-6, np.max(np.abs(b)))) if b.size else 0.0


def compare_case(case: str, device=None) -> List[Tuple[str, float, float]]:
    """Build the case's net (on ``device``), feed its inputs, run forward and, where the case has
    gradients, its top diffs and backward; ``(what, relative error, tolerance)`` per blob."""
    with open(os.path.join(case, "meta.json")) as f:
        meta = json.load(f)
    ref = np.load(os.path.join(case, "ref.npz"))
    phase = caffe.TRAIN if meta["phase"] == "TRAIN" else caffe.TEST
    kwargs = {} if device is None else {"device": device}
    net = caffe.Net(os.path.join(case, "net.prototxt"), os.path.join(case, "weights.caffemodel"),
                    phase, **kwargs)
    for k in ref.files:
        if k.startswith("in/"):
            net.blobs[k[3:]].reshape(*ref[k].shape)
            net.blobs[k[3:]].data[...] = ref[k]
    net.forward()
    out = [(f"forward {k[4:]}", rel_err(net.blobs[k[4:]].data, ref[k]), FWD_TOL)
           for k in ref.files if k.startswith("out/") and not re.search(r"_split_\d+$", k)]
    if any(k.startswith(("pdiff/", "bdiff/")) for k in ref.files):
        for k in ref.files:
            if k.startswith("topdiff/"):
                net.blobs[k[8:]].diff[...] = ref[k]
        net.backward()
        for k in ref.files:
            if k.startswith("pdiff/"):
                _, layer, i = k.split("/")
                out.append((f"param grad {layer}[{i}]",
                            rel_err(net.params[layer][int(i)].diff, ref[k]), GRAD_TOL))
            elif k.startswith("bdiff/"):
                out.append((f"input grad {k[6:]}", rel_err(net.blobs[k[6:]].diff, ref[k]),
                            GRAD_TOL))
    return out
