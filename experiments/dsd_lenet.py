"""DSD on the embedded mnist5k LeNet (models/lenet): Dense -> Sparse -> re-Dense, by magnitude and
by support (B-alternation in the Sparse step), from the same seed.

    python3 experiments/dsd_lenet.py [--phase-iters 300] [--sparsity 0.5] [--support-beta 0]
        [--support-min-fraction 0] [--modes MAGNITUDE,SUPPORT] [--tag _name]

Writes to experiments/out/: ``dsd_lenet_curves.csv`` (mode, iteration, phase, training loss,
test accuracy where tested), ``dsd_lenet_sparsity.csv`` (per mode and layer: pruned / total),
``dsd_lenet_summary.csv`` (test accuracy at the end of each phase) and ``dsd_lenet.png``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from pycaffe_alt.log import setup_logging  # noqa: E402
from pycaffe_alt.proto import caffe_pb2  # noqa: E402
from pycaffe_alt.solver.solver import get_solver  # noqa: E402

OUT = os.path.join(ROOT, "experiments", "out")


def solver_param(mode: str, n: int, sparsity: float, beta: float, test_interval: int,
                 min_fraction: float = 0.0):
    """lenet_sgd's hyper-parameters (Caffe's examples/mnist) with a DSD schedule of n+n+n."""
    p = caffe_pb2.SolverParameter()
    prune = (f"prune_by: MAGNITUDE sparsity: {sparsity}" if mode == "MAGNITUDE" else
             f"prune_by: SUPPORT support_min_fraction: {min_fraction}")
    alt = f"alternation_param {{ mode: BATCH support_beta: {beta} }}" if mode == "SUPPORT" else ""
    text_format.Parse(f"""
      net: "models/lenet/train_val.prototxt" test_iter: 10 test_interval: {test_interval}
      display: 0 max_iter: {3 * n} type: "SGD" base_lr: 0.01 lr_policy: "inv" gamma: 0.0001
      power: 0.75 momentum: 0.9 weight_decay: 0.0005 random_seed: 1 solver_mode: CPU
      snapshot_after_train: false
      dsd_param {{ dense_iter: {n} sparse_iter: {n} redense_iter: {n} {prune} }} {alt}""", p)
    return p


class Collect:
    def __init__(self, mode):
        self.mode, self.rows, self.tests = mode, [], {}

    def after_step(self, s, loss):
        self.rows.append([self.mode, s.iter - 1, s.phase_at(s.iter - 1), float(loss)])

    def on_test(self, s, net_id, results):
        self.tests[s.iter] = results.get("accuracy")


def run(mode, args):
    os.chdir(ROOT)  # the prototxt's paths are relative to the repository root
    s = get_solver(solver_param(mode, args.phase_iters, args.sparsity, args.support_beta,
                                args.test_interval, args.support_min_fraction))
    c = Collect(mode)
    s.add_hook(c)
    s.solve()
    return s, c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase-iters", type=int, default=300)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--support-beta", type=float, default=0.0)
    ap.add_argument("--test-interval", type=int, default=50)
    ap.add_argument("--support-min-fraction", type=float, default=0.0)
    ap.add_argument("--modes", default="MAGNITUDE,SUPPORT")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args()
    setup_logging()
    os.makedirs(OUT, exist_ok=True)
    n = args.phase_iters
    curves, sparsity, summary = [], [], []
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in args.modes.split(","):
        s, c = run(mode, args)
        curves += [r + [c.tests.get(r[1], "")] for r in c.rows]
        for it in sorted(set(c.tests) - {r[1] for r in c.rows}):
            curves.append([mode, it, s.phase_at(it), "", c.tests[it]])
        for layer, (pruned, total) in s.prune_stats.items():
            sparsity.append([mode, layer, pruned, total, pruned / total])
        ends = {"dense": n, "sparse": 2 * n, "redense": 3 * n}
        summary += [[mode, ph, it, c.tests.get(it)] for ph, it in ends.items()]
        its = [r[1] for r in c.rows]
        ax_loss.plot(its, [r[3] for r in c.rows], lw=0.6, label=mode.lower())
        t = sorted(c.tests)
        ax_acc.plot(t, [c.tests[i] for i in t], marker=".", label=mode.lower())
    for ax in (ax_loss, ax_acc):
        for x in (n, 2 * n):
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("iteration")
        ax.legend()
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_acc.set_ylabel("test accuracy (1,000 mnist5k test digits)")
    fig.suptitle(f"DSD on LeNet / mnist5k: dense [0,{n}), sparse [{n},{2 * n}), "
                 f"re-dense [{2 * n},{3 * n})")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"dsd_lenet{args.tag}.png"), dpi=120)
    for name, header, rows in [
            (f"dsd_lenet{args.tag}_curves.csv", ["mode", "iteration", "phase", "loss", "test_accuracy"],
             sorted(curves, key=lambda r: (r[0], r[1]))),
            (f"dsd_lenet{args.tag}_sparsity.csv", ["mode", "layer", "pruned", "total", "sparsity"],
             sparsity),
            (f"dsd_lenet{args.tag}_summary.csv", ["mode", "phase_end", "iteration", "test_accuracy"],
             summary)]:
        with open(os.path.join(OUT, name), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    for row in summary:
        print("%-9s end of %-7s (iteration %4d): test accuracy %s" % tuple(row))
    for row in sparsity:
        print("%-9s %-5s sparsity %5.1f%% (%d/%d)" % (row[0], row[1], 100 * row[4], row[2],
                                                      row[3]))


if __name__ == "__main__":
    main()
