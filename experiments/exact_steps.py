#!/usr/bin/env python3
"""Exact weight steps (alternation_param.weight_step) against SGD: seed 004's teacher-student
problem and LeNet on mnist5k. docs/exact_steps.md discusses the results.

    python3 experiments/exact_steps.py [--parts teacher,samples,mnist5k] [--seeds 3]
        [--mnist-seeds 1] [--sgd-epochs 10] [--alternations 3] [--cg-iter 3] [--lbfgs-iter 3]
        [--out experiments/results] [--threads 1]

Parts:

* ``teacher``: ``y = sum_j relu(w_j' x)`` (d 20, k 4, n 2000, Gaussian x; output weights fixed
  to 1), the student started at the teacher + 30% noise (Frobenius), with and without a skip
  connection. LEAST_SQUARES alternations (Jagatap & Hegde) against SGD (momentum 0.9, batch 500,
  the best lr of 0.03/0.1/0.3 per seed) for the same compute. Compute in forward-pass
  equivalents (FPE, one forward over the training set): an alternation is counted as 4 (support
  pass 1, the solve's forward 1, its one backward 2), an SGD iteration as 3 x batch / n.
  -> ``teacher_recovery.csv``, ``teacher_recovery.png``.
* ``samples``: the share of seeds recovered (relative error < 1e-4 after 20 alternations,
  start at teacher + 30%) against n / (d k^2) for a few (d, k), n from 0.5 to 4 times the
  number of unknowns d k. -> ``teacher_samples.csv``, ``teacher_samples.png``.
* ``mnist5k``: LeNet (models/lenet, hard-threshold form, HDF5 copies of the 4,000/1,000 digits)
  from one init per seed: SGD (softmax), SGD (squared loss on one-hot targets), LEAST_SQUARES
  on the squared-loss LeNet, CONVEX on the softmax LeNet (every layer solved), and both exact
  steps solving the output layer ip2 only (``exact_layer: "ip2"``), and LEAST_SQUARES sweeps
  after 2 epochs of SGD warm-up (``warmup_iter: 124``, counted). Test accuracy (all 1,000 test digits)
  against iterations and FPE (SGD: 3 x batch / n per iteration; exact steps: their measured
  seconds over the measured seconds of one forward pass). Iterations and FPE to reach SGD's
  plateau (mean of its last three tests) minus 0.5 and minus 0.2 points.
  -> ``mnist5k_exact.csv``, ``mnist5k_exact_summary.csv``, ``mnist5k_exact.png``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "experiments")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from exact_case import relative_error, teacher_files  # noqa: E402
from exact_nets import mnist5k_hdf5, net_text, solver_text  # noqa: E402
from pycaffe_alt.solver import get_solver  # noqa: E402

ALTERNATION_FPE = 4.0
SGD_FPE_PER_RECORD = 3.0


def write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def hidden(solver) -> np.ndarray:
    return solver.net.params["hidden"][0].data.astype(np.float64)


def start(case) -> object:
    solver = get_solver(str(case["solver"]))
    solver.net.copy_from(str(case["weights"]))
    return solver


# ------------------------------------------------------------------ teacher-student
def teacher_part(out: str, work: str, seeds: int) -> None:
    rows = []
    n, batch, alternations = 2000, 500, 10
    sgd_iters = int(alternations * ALTERNATION_FPE * n / (SGD_FPE_PER_RECORD * batch))
    for skip in (False, True):
        for seed in range(seeds):
            tag = f"{'skip' if skip else 'plain'}_{seed}"
            case = teacher_files(os.path.join(work, "ls_" + tag), n=n, batch=batch, seed=seed,
                                 skip=skip, max_iter=alternations, display=0)
            solver = start(case)
            rows.append(dict(arm="LEAST_SQUARES", skip=skip, seed=seed, lr="", iteration=0,
                             fpe=0.0, rel_error=relative_error(hidden(solver), case["w"])))
            for it in range(1, alternations + 1):
                solver.step(1)
                rows.append(dict(arm="LEAST_SQUARES", skip=skip, seed=seed, lr="", iteration=it,
                                 fpe=it * ALTERNATION_FPE,
                                 rel_error=relative_error(hidden(solver), case["w"])))
            best = None
            for lr in (0.03, 0.1, 0.3):
                case = teacher_files(os.path.join(work, f"sgd{lr}_" + tag), n=n, batch=batch,
                                     seed=seed, skip=skip, solver_type="SGD", lr=lr,
                                     max_iter=sgd_iters, display=0)
                solver = start(case)
                curve = [(0, relative_error(hidden(solver), case["w"]))]
                for it in range(1, sgd_iters + 1):
                    solver.step(1)
                    if it % 4 == 0 or it == sgd_iters:
                        curve.append((it, relative_error(hidden(solver), case["w"])))
                final = curve[-1][1]
                if np.isfinite(final) and (best is None or final < best[0]):
                    best = (final, lr, curve)
            for it, err in best[2]:
                rows.append(dict(arm="SGD", skip=skip, seed=seed, lr=best[1], iteration=it,
                                 fpe=it * SGD_FPE_PER_RECORD * batch / n, rel_error=err))
            print(f"teacher {tag}: LS after {alternations} = {rows[-len(best[2]) - 1]['rel_error']:.2e}"
                  f", SGD (lr {best[1]}) = {best[0]:.2e}", flush=True)
    write_csv(os.path.join(out, "teacher_recovery.csv"), rows)
    plot_teacher(out, rows)


def plot_teacher(out: str, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, skip in zip(axes, (False, True)):
        for arm, color in (("LEAST_SQUARES", "C0"), ("SGD", "C3")):
            seeds = sorted({r["seed"] for r in rows if r["arm"] == arm and r["skip"] == skip})
            for s in seeds:
                pts = [(r["fpe"], max(r["rel_error"], 1e-9)) for r in rows
                       if r["arm"] == arm and r["skip"] == skip and r["seed"] == s]
                ax.semilogy(*zip(*pts), color=color, alpha=0.7,
                            label=arm if s == seeds[0] else None)
        ax.set_title(f"teacher d20 k4 n2000{' + skip' if skip else ''}")
        ax.set_xlabel("forward-pass equivalents")
        ax.axhline(1e-4, color="gray", lw=0.5, ls="--")
        ax.legend()
    axes[0].set_ylabel("relative error ||W - W*|| / ||W*||")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "teacher_recovery.png"), dpi=110)
    plt.close(fig)


def samples_part(out: str, work: str, seeds: int) -> None:
    rows = []
    for d, k in ((10, 2), (20, 2), (10, 4), (20, 4)):
        for ratio in (0.5, 1, 1.1, 1.25, 1.5, 2, 4):  # n / (d k): multiples of the unknowns
            n = int(round(ratio * d * k))
            c = n / (d * k * k)
            ok = 0
            for seed in range(seeds):
                case = teacher_files(os.path.join(work, f"n_{d}_{k}_{c}_{seed}"), d=d, k=k, n=n,
                                     seed=100 + seed, batch=min(n, 500), max_iter=20, display=0)
                solver = start(case)
                solver.step(20)
                err = relative_error(hidden(solver), case["w"])
                ok += err < 1e-4
                rows.append(dict(d=d, k=k, n=n, n_over_dk=n / (d * k), n_over_dk2=c, seed=seed,
                                 rel_error=err, recovered=int(err < 1e-4)))
            print(f"samples d {d} k {k} n {n} ({ratio} d k = {c:.3g} d k^2): {ok}/{seeds} "
                  "recovered", flush=True)
    write_csv(os.path.join(out, "teacher_samples.csv"), rows)
    plot_samples(out, rows)


def plot_samples(out: str, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "n_over_dk2", "n / (d k^2)"),
                           (axes[1], "n_over_dk", "n / (d k)  (d k = number of unknowns)")):
        for d, k in sorted({(int(r["d"]), int(r["k"])) for r in rows}):
            sub = [r for r in rows if int(r["d"]) == d and int(r["k"]) == k]
            pts = sorted({float(r[key]) for r in sub})
            rate = [np.mean([int(r["recovered"]) for r in sub if float(r[key]) == p]) for p in pts]
            ax.plot(pts, rate, marker="o", label=f"d {d}, k {k}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([0.25, 0.5, 1, 2, 4])
        ax.set_xlabel(label)
        ax.legend()
    axes[0].set_ylabel("share of seeds recovered (rel. error < 1e-4)")
    fig.suptitle("LEAST_SQUARES alternations from teacher + 30%: samples needed")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "teacher_samples.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ mnist5k
def forward_seconds(solver) -> float:
    ex, net = solver.exact, solver.net
    net.eval()
    t = time.perf_counter()
    with torch.no_grad():
        for inputs, _ in ex.batches():
            net.loss(net.run(inputs, start=ex.first, end=ex.loss_end))
    net.train()
    return time.perf_counter() - t


def accuracy(solver) -> float:
    return float(solver.test(0)["accuracy"])


# (name, weight step, loss, layers solved: () = every trainable layer)
MNIST_ARMS = (("SGD softmax", "SGD", "softmax", ()), ("SGD euclidean", "SGD", "euclidean", ()),
              ("LEAST_SQUARES", "LEAST_SQUARES", "euclidean", ()),
              ("CONVEX", "CONVEX", "softmax", ()),
              ("LEAST_SQUARES ip2 only", "LEAST_SQUARES", "euclidean", ("ip2",)),
              ("CONVEX ip2 only", "CONVEX", "softmax", ("ip2",)),
              ("LEAST_SQUARES after 2 epochs SGD", "LEAST_SQUARES", "euclidean", ()))
WARMUP = {"LEAST_SQUARES after 2 epochs SGD": 124}  # SGD iterations first (counted)


def mnist_part(out: str, work: str, seeds: int, sgd_epochs: float, alternations: int,
               cg_iter: int, lbfgs_iter: int, only=None, seed_from: int = 0) -> None:
    lists = mnist5k_hdf5(os.path.join(work, "data"))
    n, batch = 4000, 64
    nets = {}
    for loss in ("softmax", "euclidean"):
        nets[loss] = os.path.join(work, f"lenet_{loss}.prototxt")
        with open(nets[loss], "w") as f:
            f.write(net_text("lenet", lists, loss, batch=batch))
    sgd_iters = int(sgd_epochs * n / batch)
    test_every = max(1, sgd_iters // 10)
    arms = [a for a in MNIST_ARMS if only is None or a[0] in only]
    csv_path = os.path.join(out, "mnist5k_exact.csv")
    rows = []
    if os.path.exists(csv_path):  # keep the arms not run now (runs can be split by --arms)
        with open(csv_path) as f:
            rows = [dict(r, seed=int(r["seed"]), iteration=int(r["iteration"]),
                         fpe=float(r["fpe"]), accuracy=float(r["accuracy"]),
                         wall_s=float(r["wall_s"])) for r in csv.DictReader(f)
                    if r["arm"] not in {a[0] for a in arms}
                    or not seed_from <= int(r["seed"]) < seeds]
    for seed in range(seed_from, seeds):
        init = os.path.join(work, f"init_{seed}.caffemodel")
        for arm, kind, loss, layers in arms:
            path = os.path.join(work, f"{arm.replace(' ', '_')}_{seed}.prototxt")
            only_layers = " ".join(f'exact_layer: "{n}"' for n in layers)
            with open(path, "w") as f:
                # The warm-up arm's first WARMUP iterations are SGD iterations of the same
                # solver (alternation_param.warmup_iter), counted in its iterations and FPE.
                f.write(solver_text(nets[loss], kind, base_lr=0.01,
                                    max_iter=sgd_iters if kind == "SGD"
                                    else WARMUP.get(arm, 0) + alternations,
                                    test_iter=10, seed=seed + 1, extra=(
                                        f"cg_iter: {cg_iter} lbfgs_iter: {lbfgs_iter} "
                                        f"{only_layers}")).replace(
                                            "warmup_iter: 0", f"warmup_iter: {WARMUP.get(arm, 0)}"))
            solver = get_solver(path)
            if not os.path.exists(init):
                solver.net.save(init)  # the filler's weights for this seed: every arm starts here
            solver.net.copy_from(init)
            t0 = time.perf_counter()
            rows.append(dict(arm=arm, seed=seed, iteration=0, fpe=0.0, accuracy=accuracy(solver),
                             wall_s=0.0))
            if kind == "SGD":
                for it in range(test_every, sgd_iters + 1, test_every):
                    solver.step(test_every)
                    rows.append(dict(arm=arm, seed=seed, iteration=it,
                                     fpe=it * SGD_FPE_PER_RECORD * batch / n,
                                     accuracy=accuracy(solver),
                                     wall_s=time.perf_counter() - t0))
            else:
                warm = WARMUP.get(arm, 0)
                fpe = warm * SGD_FPE_PER_RECORD * batch / n
                if warm:
                    solver.step(warm)
                    rows.append(dict(arm=arm, seed=seed, iteration=warm, fpe=fpe,
                                     accuracy=accuracy(solver),
                                     wall_s=time.perf_counter() - t0))
                fwd = forward_seconds(solver)
                for it in range(warm + 1, warm + alternations + 1):
                    t = time.perf_counter()
                    solver.step(1)
                    fpe += (time.perf_counter() - t) / fwd
                    rows.append(dict(arm=arm, seed=seed, iteration=it, fpe=fpe,
                                     accuracy=accuracy(solver),
                                     wall_s=time.perf_counter() - t0))
            print(f"mnist5k {arm} seed {seed}: accuracy {rows[-1]['accuracy']:.4f} after "
                  f"{rows[-1]['iteration']} iterations, {rows[-1]['fpe']:.1f} FPE, "
                  f"{rows[-1]['wall_s']:.0f} s", flush=True)
            write_csv(csv_path, rows)
    summarize_mnist(out, rows)


def summarize_mnist(out: str, rows) -> None:
    summary = []
    for seed in sorted({r["seed"] for r in rows}):
        sgd = [r for r in rows if r["arm"] == "SGD softmax" and r["seed"] == seed]
        plateau = float(np.mean([r["accuracy"] for r in sgd[-3:]]))
        for arm in dict.fromkeys(r["arm"] for r in rows):
            curve = [r for r in rows if r["arm"] == arm and r["seed"] == seed]
            if not curve:
                continue
            row = dict(arm=arm, seed=seed, sgd_plateau=plateau,
                       final_accuracy=curve[-1]["accuracy"],
                       best_accuracy=max(r["accuracy"] for r in curve))
            for gap in (0.005, 0.002):
                hit = next((r for r in curve if r["iteration"] > 0 and
                            r["accuracy"] >= plateau - gap), None)
                key = f"minus_{gap * 100:.1f}pt"
                row[f"iters_{key}"] = hit["iteration"] if hit else "not reached"
                row[f"fpe_{key}"] = round(hit["fpe"], 1) if hit else "not reached"
            summary.append(row)
    write_csv(os.path.join(out, "mnist5k_exact_summary.csv"), summary)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, low in zip(axes, (0, 90)):
        for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
            for seed in sorted({r["seed"] for r in rows}):
                pts = [(r["fpe"], 100 * r["accuracy"]) for r in rows
                       if r["arm"] == arm and r["seed"] == seed]
                ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}",
                        label=arm if seed == 0 else None)
        ax.set_xlabel("forward-pass equivalents (4,000 training digits)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(low, 100)
    axes[1].set_xlim(0, 1.1 * max(r["fpe"] for r in rows if r["arm"].startswith("SGD")))
    axes[0].legend(fontsize=8)
    fig.suptitle("LeNet on mnist5k from one init: exact weight steps vs SGD")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mnist5k_exact.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="teacher,samples,mnist5k")
    ap.add_argument("--seeds", type=int, default=3, help="teacher-student seeds")
    ap.add_argument("--mnist-seeds", type=int, default=1)
    ap.add_argument("--sgd-epochs", type=float, default=10)
    ap.add_argument("--alternations", type=int, default=3)
    ap.add_argument("--cg-iter", type=int, default=3)
    ap.add_argument("--lbfgs-iter", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
    ap.add_argument("--work", default=os.path.join(ROOT, "experiments", "out", "exact_steps"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed-from", type=int, default=0, help="mnist5k: first seed to run")
    ap.add_argument("--plot-only", action="store_true",
                    help="mnist5k: summary and figure from <out>/mnist5k_exact.csv")
    ap.add_argument("--arms", default=None, help="comma-separated mnist5k arms (default all: "
                    + ", ".join(a[0] for a in MNIST_ARMS) + ")")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pycaffe_alt").setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    parts = args.parts.split(",")
    if "teacher" in parts:
        teacher_part(args.out, args.work, args.seeds)
    if "samples" in parts:
        samples_part(args.out, args.work, args.seeds)
    if "mnist5k" in parts and args.plot_only:
        with open(os.path.join(args.out, "mnist5k_exact.csv")) as f:
            rows = [dict(r, seed=int(r["seed"]), iteration=int(r["iteration"]),
                         fpe=float(r["fpe"]), accuracy=float(r["accuracy"]))
                    for r in csv.DictReader(f)]
        summarize_mnist(args.out, rows)
    elif "mnist5k" in parts:
        mnist_part(args.out, args.work, args.mnist_seeds, args.sgd_epochs, args.alternations,
                   args.cg_iter, args.lbfgs_iter,
                   args.arms.split(",") if args.arms else None, args.seed_from)


if __name__ == "__main__":
    main()
