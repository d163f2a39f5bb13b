#!/usr/bin/env python3
"""Benchmark: forward+backward time of nets built from prototxt vs the best hand-written nn.Module.

The issues' targets (15 and 14 item 4): a Net built from benchmarks/nets/<name>.prototxt (Caffe's
LeNet and All-CNN-C with SoftmaxWithLoss) runs forward+backward at batch 64 on the CPU within 5%
of the best hand-written nn.Module of the same architecture (ratio best-hand/ours >= 0.95), both

- through the module call: ``net.run({...}); net.loss().backward()`` (what the solver does), and
- through pycaffe: ``net.blobs['data'].data[...] = x; net.forward(); net.backward()``, which
  also fills every blob's ``.diff`` (parameter diffs accumulate, as Caffe's do).

"Best hand-written" is the faster of the hand-written module in NCHW and in channels-last
layout (``model.to(memory_format=torch.channels_last)`` and a channels-last input), on the same
data. Ours is the Net as built (its memory format chosen by pycaffe_alt/memory_format.py).
All variants are timed alternately in the same process, many rounds, and the medians are
compared, so machine noise hits all alike.

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
from pycaffe_alt.memory_format import format_name  # noqa: E402
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
    torch.manual_seed(0)
    hand = cls()
    hand_cl = cls().to(memory_format=torch.channels_last)
    hand_cl.load_state_dict(hand.state_dict())
    ours = prototxt_net(name, batch)
    x = torch.randn(batch, *shape)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    yf = y.float()

    def hand_step(model, inp):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(inp), y).backward()
        return run

    def module_step():
        ours.zero_grad(set_to_none=True)
        ours.loss(ours.run({"data": x, "label": yf})).backward()

    ours.blobs["data"].data[...] = x.numpy()
    ours.blobs["label"].data[...] = yf.numpy()

    def pycaffe_step():
        ours.forward()
        ours.backward()

    fns = {"hand NCHW": hand_step(hand, x), "hand channels_last": hand_step(hand_cl, x_cl),
           "ours module": module_step, "ours pycaffe": pycaffe_step}
    for fn in fns.values():  # warm-up
        time_step(fn, 2)
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        # Each round starts at the next variant: a variant always timed right after the same
        # other one inherits that one's allocator and cache state, a bias that does not average
        # out over rounds (it moved LeNet's ratios by several % between runs).
        for k in order[r % len(order):] + order[:r % len(order)]:
            times[k].append(time_step(fns[k], iters))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min(med["hand NCHW"], med["hand channels_last"])
    print(f"{name} batch {batch}, ours in {format_name(ours.memory_format)}: " +
          ", ".join(f"{k} {v:.2f}" for k, v in med.items()) + " ms/iter (medians)")
    for path in ("module", "pycaffe"):
        print(f"  best hand / ours {path}: {best / med['ours ' + path]:.3f}")
    return {k: best / med["ours " + k] for k in ("module", "pycaffe")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--nets", default="lenet,allcnn_c")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="apply the malloc policy of tools/train|test|time and pycaffe-alt run "
                         "(pycaffe_alt/host_memory.py) first; every variant runs under it")
    args = ap.parse_args()
    if args.keep_freed_memory:
        from pycaffe_alt.host_memory import keep_freed_memory

        print("malloc policy of the tools applied:", keep_freed_memory())
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.nets.split(","):
        bench(name, args.batch, args.rounds, iters=5 if name == "lenet" else 1)


if __name__ == "__main__":
    main()
