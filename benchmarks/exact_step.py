#!/usr/bin/env python3
"""Benchmark: the cost of one exact weight step in forward-pass equivalents (FPE).

One FPE = one forward pass of the train net over the whole training set (no gradients, test
mode, the exact step's own record stream and batch size). Measured side by side in the same
process on the same data:

* ``sgd epoch``: forward + backward over every record, in train mode (what one epoch of SGD
  iterations costs, without the update arithmetic);
* the exact step's support pass (supports + max-pool switches stored) and each layer's solve
  (``separable`` output layer, ``dense`` normal equations, ``CG`` with ``cg_iter`` passes,
  or ``L-BFGS``), as ``ExactWeightStep.iterate`` reports them.

Nets: ``lenet`` (models/lenet, hard-threshold form, on the 4,000 mnist5k training digits; a
squared-loss variant on one-hot targets for LEAST_SQUARES, the softmax one for CONVEX) and
``allcnn_c`` (models/allcnn_c's shapes on ``--records`` random CIFAR-sized images, squared loss).
CG and L-BFGS costs grow linearly with ``cg_iter`` / ``lbfgs_iter``: the table gives the cost
per iteration too, so other settings can be read off.

usage: python3 benchmarks/exact_step.py [--nets lenet_ls,lenet_convex,allcnn_c_ls]
           [--records 64] [--cg-iter 3] [--lbfgs-iter 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from exact_nets import mnist5k_hdf5, net_text, random_hdf5, solver_text  # noqa: E402
from pycaffe_alt.solver import get_solver  # noqa: E402


def timed_passes(solver, backward: bool) -> float:
    """Seconds of one pass over the training set through the exact step's stream."""
    ex, net = solver.exact, solver.net
    net.train(backward)
    t = time.perf_counter()
    for inputs, _ in ex.batches():
        with torch.set_grad_enabled(backward):
            values = net.run(inputs, start=ex.first, end=ex.loss_end)
            loss = net.loss(values)
            if backward:
                loss.backward()
    for p in net.parameters():
        p.grad = None
    return time.perf_counter() - t


def measure(name: str, solver) -> list:
    fwd = min(timed_passes(solver, False) for _ in range(2))
    fb = timed_passes(solver, True)
    stats = solver.exact.iterate()
    rows = [(name, "forward (1 FPE)", fwd, 1.0), (name, "sgd epoch (fwd+bwd)", fb, fb / fwd),
            (name, "support pass", stats["support_seconds"], stats["support_seconds"] / fwd)]
    total = stats["support_seconds"]
    for layer, how, sec in stats["layers"]:
        rows.append((name, f"{layer}: {how}", sec, sec / fwd))
        total += sec
    rows.append((name, "exact step total", total, total / fwd))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--nets", default="lenet_ls,lenet_convex,allcnn_c_ls")
    ap.add_argument("--records", type=int, default=64, help="All-CNN-C random images")
    ap.add_argument("--cg-iter", type=int, default=3)
    ap.add_argument("--lbfgs-iter", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            model = "allcnn_c" if name.startswith("allcnn_c") else "lenet"
            lists = mnist5k_hdf5(folder) if model == "lenet" else \
                random_hdf5(folder, args.records)
            kind = "CONVEX" if name.endswith("convex") else "LEAST_SQUARES"
            loss = "softmax" if kind == "CONVEX" else "euclidean"
            batch = 64 if model == "lenet" else 32
            net_path = os.path.join(folder, "net.prototxt")
            with open(net_path, "w") as f:
                f.write(net_text(model, lists, loss, batch=batch))
            solver_path = os.path.join(folder, "solver.prototxt")
            with open(solver_path, "w") as f:
                f.write(solver_text(net_path, kind, max_iter=1, extra=(
                    f"cg_iter: {args.cg_iter} lbfgs_iter: {args.lbfgs_iter}")))
            rows += measure(name, get_solver(solver_path))
            for r in rows[-1:]:
                print(f"{r[0]}: one exact step = {r[3]:.1f} FPE ({r[2]:.1f} s)", flush=True)
    print("\n| net | part | seconds | FPE |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} |")
    print(f"\ncg_iter {args.cg_iter}, lbfgs_iter {args.lbfgs_iter}, {args.threads} thread(s); "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
