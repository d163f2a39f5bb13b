"""The ImageNet mean that pycaffe ships as ``caffe/imagenet/ilsvrc_2012_mean.npy`` (and that
BVLC's ``classify.py`` and many third-party programs load by default).

BVLC's file is the 3 x 256 x 256 (B, G, R; float64) pixel-wise mean of the ILSVRC 2012 training
images. We ship an equivalent made from its per-channel means, which are published facts
(B 104.00698793, G 116.66876762, R 122.67891434): the same shape, dtype and channel order, each
channel constant. Programs that reduce it to per-channel values (``mean.mean(1).mean(1)``, as
the pycaffe examples do and as Classifier/Transformer users mostly do) get BVLC's numbers; a
program that subtracts it pixel by pixel differs from BVLC's by the spatial variation of the
mean (smooth; 4.5 grey levels on average, 16.4 at most). ``python3 -m pycaffe_alt.imagenet`` rewrites the file.
"""
from __future__ import annotations

import os
import sys

import numpy as np

# Per-channel ILSVRC 2012 training-set mean, in Caffe's B, G, R order.
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
MEAN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ilsvrc_2012_mean.npy")


def ilsvrc_2012_mean(size: int = 256) -> np.ndarray:
    """The mean as pycaffe's file holds it: 3 x size x size float64, channels B, G, R."""
    return np.broadcast_to(np.asarray(BGR_MEAN, dtype=np.float64)[:, None, None],
                           (3, size, size)).copy()


def main(argv=None) -> int:
    """Write ``ilsvrc_2012_mean.npy`` next to this module (or to the path given)."""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else MEAN_FILE
    np.save(path, ilsvrc_2012_mean())
    print(path)
    return 0
