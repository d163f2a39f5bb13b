"""Parity with the reference Caffe: every golden layer/net case, forward and backward.

Each case folder (made by real BVLC Caffe, see fixtures/golden/README.md) holds a net, its
weights, the inputs, every blob after forward, the top diffs and the resulting parameter and
input gradients. Tolerances are those of the project: forward 1e-4, gradients 1e-3, relative to
the largest reference magnitude.
"""
import glob
import json
import os
import re

import numpy as np
import pytest

import pycaffe_alt as caffe

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "golden")
CASES = sorted(glob.glob(os.path.join(ROOT, "layers", "*")) + glob.glob(os.path.join(ROOT, "nets", "*")))
FWD_TOL, GRAD_TOL = 1e-4, 1e-3


def rel_err(a, b):
    a = np.asarray(a, np.float64).reshape(np.shape(b))
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-6, np.max(np.abs(b)))) if b.size else 0.0


@pytest.mark.parametrize("case", CASES, ids=[os.path.relpath(c, ROOT) for c in CASES])
def test_golden_case(case):
    meta = json.load(open(os.path.join(case, "meta.json")))
    ref = np.load(os.path.join(case, "ref.npz"))
    phase = caffe.TRAIN if meta["phase"] == "TRAIN" else caffe.TEST
    net = caffe.Net(os.path.join(case, "net.prototxt"), os.path.join(case, "weights.caffemodel"), phase)
    for k in ref.files:
        if k.startswith("in/"):
            net.blobs[k[3:]].reshape(*ref[k].shape)
            net.blobs[k[3:]].data[...] = ref[k]
    net.forward()
    errors = []
    for k in ref.files:
        if k.startswith("out/") and not re.search(r"_split_\d+$", k):
            e = rel_err(net.blobs[k[4:]].data, ref[k])
            if e > FWD_TOL:
                errors.append(f"forward {k[4:]}: rel {e:.2e}")
    if any(k.startswith(("pdiff/", "bdiff/")) for k in ref.files):
        for k in ref.files:
            if k.startswith("topdiff/"):
                net.blobs[k[8:]].diff[...] = ref[k]
        net.backward()
        for k in ref.files:
            if k.startswith("pdiff/"):
                _, layer, i = k.split("/")
                e = rel_err(net.params[layer][int(i)].diff, ref[k])
                if e > GRAD_TOL:
                    errors.append(f"param grad {layer}[{i}]: rel {e:.2e}")
            elif k.startswith("bdiff/"):
                e = rel_err(net.blobs[k[6:]].diff, ref[k])
                if e > GRAD_TOL:
                    errors.append(f"input grad {k[6:]}: rel {e:.2e}")
    assert not errors, "; ".join(errors)
