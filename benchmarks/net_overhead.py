#!/usr/bin/env python3
"""Benchmark: forward+backward time of nets built from prototxt vs hand-written nn.Modules.

The issue's target: a Net built from benchmarks/nets/<name>.prototxt (Caffe's LeNet and
All-CNN-C with SoftmaxWithLoss) runs forward+backward at batch 64 on the CPU within 5% of a hand-written nn.Module of the
same architecture (ratio hand/ours >= 0.95). The two are timed alternately in the same process,
many rounds, and the median of each is compared, so machine noise hits both alike.

usage: python3 benchmarks/net_overhead.py [--batch 64] [--rounds 15] [--nets lenet,allcnn_c]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pycaffe_alt as caffe  # noqa: E402
from pycaffe_alt.prototxt import read_net  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.ip1 = nn.Linear(800, 500)
        self.ip2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2, 2)
        x = F.max_pool2d(self.conv2(x), 2, 2)
        x = F.relu(self.ip1(x.flatten(1)))
        return self.ip2(x)


class AllCNNC(nn.Module):
    def __init__(self):
        super().__init__()
        spec = [(3, 96, 3, 1, 1), (96, 96, 3, 1, 1), (96, 96, 3, 1, 2), (96, 192, 3, 1, 1),
                (192, 192, 3, 1, 1), (192, 192, 3, 1, 2), (192, 192, 3, 0, 1), (192, 192, 1, 0, 1),
                (192, 10, 1, 0, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for i, o, k, p, s in spec)

    def forward(self, x):
        for c in self.convs:
            x = F.relu(c(x))
        return x.mean(dim=(2, 3))


HAND = {"lenet": (LeNet, (1, 28, 28)), "allcnn_c": (AllCNNC, (3, 32, 32))}


def prototxt_net(name, batch):
    """benchmarks/nets/<name>.prototxt (Caffe's architecture, SoftmaxWithLoss) at ``batch``."""
    param = read_net(os.path.join(ROOT, "benchmarks", "nets", name + ".prototxt"))
    for layer in param.layer:
        if layer.type == "Input":
            layer.input_param.shape[0].dim[0] = batch
    return caffe.Net(param, caffe.TRAIN)


def time_step(fn, iters):
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1000.0


def bench(name, batch, rounds, iters):
    cls, shape = HAND[name]
    hand = cls()
    ours = prototxt_net(name, batch)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def hand_step():
        hand.zero_grad(set_to_none=True)
        F.cross_entropy(hand(x), y).backward()

    yf = y.float()

    def our_step():
        ours.zero_grad(set_to_none=True)
        ours.run({"data": x, "label": yf})
        ours.loss().backward()

    for fn in (hand_step, our_step):  # warm-up
        time_step(fn, 2)
    h, o = [], []
    for _ in range(rounds):
        h.append(time_step(hand_step, iters))
        o.append(time_step(our_step, iters))
    mh, mo = statistics.median(h), statistics.median(o)
    print(f"{name:9s} batch {batch}: hand-written {mh:8.2f} ms/iter   from prototxt {mo:8.2f} ms/iter"
          f"   ratio hand/ours {mh / mo:.3f}")
    return mh / mo


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--nets", default="lenet,allcnn_c")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.nets.split(","):
        bench(name, args.batch, args.rounds, iters=10 if name == "lenet" else 1)


if __name__ == "__main__":
    main()
