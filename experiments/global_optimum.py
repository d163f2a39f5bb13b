#!/usr/bin/env python3
"""The certified global optimum of two-layer ReLU nets (solver type "Convex") against what SGD and
I-alternation reach from random starts; ADMM's convergence; exact against sampled patterns.

    python3 experiments/global_optimum.py                 # all datasets, ~10 CPU minutes
    python3 experiments/global_optimum.py --quick         # fewer SGD runs (smoke test)
    python3 experiments/global_optimum.py --plot-only     # redraw from the CSV files

Datasets (small enough that EVERY arrangement pattern is enumerated, so the optimum is certified
by the dual bound): ``teacher`` (40 points in R^2, a 3-unit teacher plus noise, biases on both
layers), ``mnist2`` (mnist5k digits 3 vs 5, 2x2 block means, 16 examples, targets +-1),
``mnist10`` (one digit of each class, 2x2 block means, one-hot targets: 10 stacked programs),
``cnn2`` (mnist5k 3 vs 5 at 3x3 block means, 6 images, Convolution 2x2 -> ReLU -> global AVE
pooling -> InnerProduct). Objective = Caffe's (EuclideanLoss over the whole set + weight_decay/2
||W||^2), weight_decay 0.01.

Arms: ``convex`` (the solver, tools/train's code path), ``sgd`` (Caffe's SGD rule, momentum 0.9,
full batch, float64, lr x hidden x seed grid, Gaussian(0.1) starts), ``ialt`` (the product's
AlternationSolver, I-alternation with HardThreshold beta 0 = ReLU, full batch, support step every
200 iterations, float32 as the solver trains), ``exact_step`` (alternation with the exact weight
step, weight_step LEAST_SQUARES: runs only where the alternation solver has that field; see
``exact_step_available``). Every final net is evaluated by the same float64 pycaffe_alt Net.

Writes to --out (default experiments/out/global_optimum): ``runs.csv`` (one row per run),
``admm_convergence.csv``, ``sampled.csv``, ``global_optimum.png``; ``--results`` copies the CSVs
and the figure to experiments/results/ and docs/figures/.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

WD = 0.01
DATA = ('layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" '
        'hdf5_data_param {{ source: "{src}" batch_size: {batch} }} }}\n')
FIRST = {
    "fc": 'layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "h" '
          'inner_product_param {{ num_output: {hidden} weight_filler {{ type: "gaussian" '
          'std: 0.1 }} }} }}\n',
    "cnn": 'layer {{ name: "ip1" type: "Convolution" bottom: "data" top: "h" '
           'convolution_param {{ num_output: {hidden} kernel_size: 2 bias_term: false '
           'weight_filler {{ type: "gaussian" std: 0.1 }} }} }}\n',
}
RELU = {"relu": 'layer { name: "relu1" type: "ReLU" bottom: "h" top: "h" }\n',
        "ht": 'layer { name: "relu1" type: "HardThreshold" bottom: "h" top: "h" '
              'param { lr_mult: 0 decay_mult: 0 } '
              'hard_threshold_param { mode: THRESHOLD output: KEEP } }\n'}
POOL = ('layer { name: "pool1" type: "Pooling" bottom: "h" top: "p" '
        'pooling_param { pool: AVE global_pooling: true } }\n')
LAST = ('layer {{ name: "ip2" type: "InnerProduct" bottom: "{bottom}" top: "out" '
        'inner_product_param {{ num_output: {outputs} weight_filler {{ type: "gaussian" '
        'std: 0.1 }} }} }}\n'
        'layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "label" '
        'top: "loss" }}\n')


# ------------------------------------------------------------------------------ datasets
def _mnist(digits, per_class, size):
    from pycaffe_alt.data.mnist5k import CSV_NAME, load_mnist5k_csv

    images, labels = load_mnist5k_csv(os.path.join(ROOT, "data", "mnist5k", CSV_NAME))
    rows = np.concatenate([np.flatnonzero(labels == d)[:per_class] for d in digits])
    small = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(images[rows]).double()[:, None] / 255, size).numpy()
    return small, labels[rows]


def dataset(name):
    """(X float32 (n, ...), y float32 (n, C), kind, rho)."""
    if name == "teacher":
        rng = np.random.default_rng(0)
        X = rng.standard_normal((40, 2))
        y = np.maximum(X @ rng.standard_normal((2, 3)) + 0.3, 0) @ rng.standard_normal((3, 1))
        y += 0.1 * rng.standard_normal(y.shape)
        return X.astype(np.float32), y.astype(np.float32), "fc", 3.0
    if name == "mnist2":
        X, lab = _mnist((3, 5), 8, 2)
        return (X.reshape(len(X), -1).astype(np.float32),
                np.where(lab == 3, 1.0, -1.0)[:, None].astype(np.float32), "fc", 1.0)
    if name == "mnist10":
        X, lab = _mnist(range(10), 1, 2)
        return (X.reshape(len(X), -1).astype(np.float32),
                np.eye(10)[lab].astype(np.float32), "fc", 1.0)
    if name == "cnn2":
        X, lab = _mnist((3, 5), 3, 3)
        # Blank corner blocks put patches on common hyperplanes (not in general position, and
        # the exact enumeration refuses); a little dequantization noise, as for pixel values.
        X = X + 1e-3 * np.random.default_rng(0).uniform(size=X.shape)
        return (X.astype(np.float32), np.where(lab == 3, 1.0, -1.0)[:, None].astype(np.float32),
                "cnn", 1.0)
    raise ValueError(name)


LMDB = ('layer {{ name: "data" type: "Data" top: "data" top: "label" '
        'data_param {{ source: "{src}" batch_size: {batch} backend: LMDB }} }}\n')


def integer_labels(y) -> bool:
    """Whether the targets fit a Datum's int label (one integer per example)."""
    return y.shape[1] == 1 and np.array_equal(y, np.round(y))


def _write_lmdb(path, X, y):
    from pycaffe_alt.data.datum import array_to_datum
    from pycaffe_alt.data.db import open_db

    if os.path.exists(path):
        return
    writer = open_db(path, "lmdb", "w")
    for i in range(len(X)):
        x = X[i].reshape(-1, 1, 1) if X[i].ndim == 1 else X[i]
        writer.put(f"{i:08d}", array_to_datum(x.astype(np.float64), int(y[i, 0]))
                   .SerializeToString())
    writer.close()


def write_case(folder, X, y, kind, hidden, relu="relu", lmdb=False):
    """The net prototxt (HDF5Data, or a Data layer over an LMDB of float Datums with integer
    labels: I-alternation reads Data/ImageData only)."""
    import h5py

    os.makedirs(folder, exist_ok=True)
    if lmdb:
        src = os.path.join(folder, "train_lmdb")
        _write_lmdb(src, X, y)
        data = LMDB.format(src=src, batch=len(X))
    else:
        h5 = os.path.join(folder, "train.h5")
        with h5py.File(h5, "w") as f:
            f["data"] = X
            f["label"] = y
        src = os.path.join(folder, "train.txt")
        with open(src, "w") as f:
            f.write(h5 + "\n")
        data = DATA.format(src=src, batch=len(X))
    text = data + FIRST[kind].format(hidden=hidden) + RELU[relu]
    text += (POOL if kind == "cnn" else "") + LAST.format(bottom="p" if kind == "cnn" else "h",
                                                         outputs=y.shape[1])
    net = os.path.join(folder, f"net_{relu}.prototxt")
    with open(net, "w") as f:
        f.write(text)
    return net


def objective(net_path, X, y, params):
    """Caffe's objective (float64) of the ReLU net with these layer params {name: [arrays]}."""
    import pycaffe_alt
    from pycaffe_alt.convex import net_objective

    net = pycaffe_alt.Net(net_path, pycaffe_alt.TRAIN).double()
    with torch.no_grad():
        for name, arrays in params.items():
            for blob, a in zip(net.params[name], arrays):
                blob.data[...] = a
    return net_objective(net, torch.from_numpy(X).double(), torch.from_numpy(y).double(), WD)


# ------------------------------------------------------------------------------ arms
def solve(solver_path, text):
    """Write the solver file ``text`` to ``solver_path``, solve it, return the solver."""
    from pycaffe_alt.solver.solver import get_solver

    with open(solver_path, "w") as f:
        f.write(text)
    solver = get_solver(solver_path)
    solver.solve()
    return solver


def run_convex(folder, X, y, kind, rho, hidden, extra="", max_iter=1000, display=100, wd=WD):
    net = write_case(folder, X, y, kind, hidden)
    solver = solve(os.path.join(folder, "convex.prototxt"),
                   f'net: "{net}" type: "Convex" max_iter: {max_iter} display: {display} '
                   f'weight_decay: {wd} snapshot_prefix: "{folder}/cvx" solver_mode: CPU '
                   f'random_seed: 1\nconvex_param {{ rho: {rho} '
                   f'max_exact_patterns: 100000 gap_tol: 1e-6 {extra} }}\n')
    r = solver.result
    params = {k: [b.data.copy() for b in v] for k, v in solver.net.params.items()}
    return r, objective(net, X, y, params), net


def sgd_run(X, y, kind, hidden, lr, seed, iters):
    """Caffe's SGD rule (history = 0.9 history + lr (grad + wd w); w -= history), full batch,
    float64, Gaussian(0.1) weights and zero biases as the prototxt's fillers."""
    g = torch.Generator().manual_seed(seed)
    Xt, yt = torch.from_numpy(X).double(), torch.from_numpy(y).double()
    C = y.shape[1]
    if kind == "fc":
        W1 = torch.randn(hidden, X.shape[1], generator=g, dtype=torch.float64) * 0.1
        params = [W1, torch.zeros(hidden, dtype=torch.float64)]
    else:
        params = [torch.randn(hidden, 1, 2, 2, generator=g, dtype=torch.float64) * 0.1]
    params += [torch.randn(C, hidden, generator=g, dtype=torch.float64) * 0.1,
               torch.zeros(C, dtype=torch.float64)]
    for p in params:
        p.requires_grad_(True)
    hist = [torch.zeros_like(p) for p in params]
    n = len(X)
    for _ in range(iters):
        if kind == "fc":
            h = torch.relu(Xt @ params[0].T + params[1])
        else:
            h = torch.relu(torch.nn.functional.conv2d(Xt, params[0])).mean((2, 3))
        out = h @ params[-2].T + params[-1]
        loss = ((out - yt) ** 2).sum() / (2 * n)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr, hi in zip(params, grads, hist):
                hi.mul_(0.9).add_(gr + WD * p, alpha=lr)
                p.sub_(hi)
    arrays = [p.detach().numpy() for p in params]
    if kind == "fc":
        return {"ip1": arrays[:2], "ip2": arrays[2:]}
    return {"ip1": arrays[:1], "ip2": arrays[1:]}


def exact_step_available() -> bool:
    """Whether this checkout's alternation solver has the exact weight step (issue 9)."""
    from pycaffe_alt.proto import caffe_pb2

    return "weight_step" in caffe_pb2.AlternationParameter.DESCRIPTOR.fields_by_name


def run_alternation(folder, X, y, kind, hidden, lr, seed, iters, exact_step=False):
    """The product's AlternationSolver (I-alternation) on the HardThreshold(beta 0) version."""
    net = write_case(folder, X, y, kind, hidden, relu="ht", lmdb=True)
    relu_net = write_case(folder, X, y, kind, hidden)
    step = " weight_step: LEAST_SQUARES" if exact_step else ""
    solver = solve(os.path.join(folder, f"alt_{seed}.prototxt"),
                   f'net: "{net}" type: "Alternation" base_lr: {lr} lr_policy: "fixed" '
                   f'momentum: 0.9 weight_decay: {WD} max_iter: {iters} display: 0 '
                   f'snapshot_after_train: false solver_mode: CPU random_seed: {seed}\n'
                   f'alternation_param {{ mode: INSTANCE base_type: "SGD" gap_iter: 200{step} }}\n')
    params = {k: [b.data.copy() for b in v] for k, v in solver.net.params.items()
              if k in ("ip1", "ip2")}
    return objective(relu_net, X, y, params)


# ------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "out", "global_optimum"))
    ap.add_argument("--datasets", default="teacher,mnist2,mnist10,cnn2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=1500, help="SGD / alternation iterations")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--results", action="store_true",
                    help="copy the CSVs to experiments/results/ and the PNG to docs/figures/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if not args.plot_only:
        run_all(args)
    plot(args.out)
    if args.results:
        res = os.path.join(ROOT, "experiments", "results")
        os.makedirs(res, exist_ok=True)
        for name in ("global_optimum_runs.csv", "global_optimum_admm.csv",
                     "global_optimum_sampled.csv"):
            shutil.copy(os.path.join(args.out, name), os.path.join(res, name))
        shutil.copy(os.path.join(args.out, "global_optimum.png"),
                    os.path.join(ROOT, "docs", "figures", "global_optimum.png"))


def run_all(args):
    from pycaffe_alt.log import get_logger

    get_logger().setLevel("WARNING")
    lrs = (0.03, 0.1) if args.quick else (0.01, 0.03, 0.1)
    seeds = (1, 2) if args.quick else (1, 2, 3)
    runs = []
    admm_rows, sampled_rows = [], []
    for name in args.datasets.split(","):
        X, y, kind, rho = dataset(name)
        folder = os.path.join(args.out, name)
        t0 = time.perf_counter()
        r, check, _ = run_convex(folder, X, y, kind, rho, hidden=2000)
        wall = time.perf_counter() - t0
        opt = r.objective
        print(f"{name}: optimum {opt:.8g} (net re-evaluated {check:.8g}), lower bound "
              f"{r.lower_bound:.8g}, gap {r.gap:.2e}, {r.patterns} patterns, {r.units} units, "
              f"{r.iterations} ADMM iterations in {r.seconds:.2f} s (+{r.setup_seconds:.2f} s "
              f"setup, {wall:.1f} s with certificates)", flush=True)
        runs.append(dict(dataset=name, arm="convex", hidden=r.units, lr="", seed="",
                         objective=check, rel_gap=0.0, lower_bound=r.lower_bound,
                         certified_gap=r.gap, iterations=r.iterations, seconds=r.seconds,
                         patterns=r.patterns))
        for h in r.history:
            admm_rows.append(dict(dataset=name, **h))
        if y.shape[1] > 1:
            # The stacked programs' optimum is the best net whose units each feed one output; a
            # full net shares units. Splitting a shared unit costs at most sqrt(C) in penalty, so
            # the stacked program at weight_decay / sqrt(C) bounds every full net from below.
            fr, _, _ = run_convex(os.path.join(folder, "full_bound"), X, y, kind, rho,
                                  hidden=2000, display=0, wd=WD / np.sqrt(y.shape[1]))
            runs.append(dict(dataset=name, arm="full_net_bound", hidden="", lr="", seed="",
                             objective="", rel_gap="", lower_bound=fr.lower_bound,
                             iterations=fr.iterations, seconds=fr.seconds,
                             patterns=fr.patterns))
            print(f"  full-net lower bound (stacked program at weight_decay/sqrt(C)): "
                  f"{fr.lower_bound:.8g}", flush=True)
        for hidden in (8, 32, 128):
            relu_net = write_case(folder, X, y, kind, hidden)
            for lr in lrs:
                for seed in seeds:
                    t = time.perf_counter()
                    params = sgd_run(X, y, kind, hidden, lr, seed, args.iters)
                    value = objective(relu_net, X, y, params)
                    runs.append(dict(dataset=name, arm="sgd", hidden=hidden, lr=lr, seed=seed,
                                     objective=value, rel_gap=(value - opt) / opt,
                                     iterations=args.iters, seconds=time.perf_counter() - t))
            best = min(x["rel_gap"] for x in runs
                       if x["arm"] == "sgd" and x["dataset"] == name and x["hidden"] == hidden)
            print(f"  sgd hidden {hidden}: best rel gap {best:.3e}", flush=True)
        best_lr = min((x for x in runs if x["arm"] == "sgd" and x["dataset"] == name),
                      key=lambda x: x["objective"])["lr"]
        arms = [("ialt", False)] + ([("exact_step", True)] if exact_step_available() else [])
        if not integer_labels(y):
            print(f"  alternation arms skipped: {name}'s targets are not one integer per "
                  "example, and I-alternation reads Data/ImageData (Datum labels are int32)")
            arms = []
        for arm, exact in arms:
            for seed in seeds:
                t = time.perf_counter()
                value = run_alternation(os.path.join(folder, arm), X, y, kind, 32, best_lr,
                                        seed, args.iters, exact)
                runs.append(dict(dataset=name, arm=arm, hidden=32, lr=best_lr, seed=seed,
                                 objective=value, rel_gap=(value - opt) / opt,
                                 iterations=args.iters, seconds=time.perf_counter() - t))
            gaps = [round(x["rel_gap"], 4) for x in runs if x["arm"] == arm and x["dataset"] == name]
            print(f"  {arm}: rel gaps {gaps}", flush=True)
        _save(args.out, runs, admm_rows, sampled_rows)
        if name == "teacher":
            for method in ("ADMM", "SAMPLED"):
                for count in (8, 32, 128, 512):
                    sr, value, _ = run_convex(os.path.join(folder, f"s_{method}_{count}"), X, y,
                                              kind, rho, hidden=2000, display=0,
                                              extra=f"method: {method} num_patterns: {count}")
                    sampled_rows.append(dict(dataset=name, method=method, num_patterns=count,
                                             patterns=sr.patterns, objective=value,
                                             rel_gap=(value - opt) / opt, units=sr.units,
                                             iterations=sr.iterations, seconds=sr.seconds))
                    print(f"  sampled {method} {count}: rel gap {(value - opt) / opt:.3e}",
                          flush=True)
    _save(args.out, runs, admm_rows, sampled_rows)
    if not exact_step_available():
        print("exact_step arm skipped: this checkout's AlternationParameter has no weight_step "
              "(issue 9's exact weight step); rerun after it is merged")


def _save(out, runs, admm_rows, sampled_rows):
    _write(os.path.join(out, "global_optimum_runs.csv"), runs)
    _write(os.path.join(out, "global_optimum_admm.csv"), admm_rows)
    _write(os.path.join(out, "global_optimum_sampled.csv"), sampled_rows)


def _write(path, rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def plot(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _read(os.path.join(out, "global_optimum_runs.csv"))
    admm = _read(os.path.join(out, "global_optimum_admm.csv"))
    sampled = _read(os.path.join(out, "global_optimum_sampled.csv"))
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    ax = axes[0]
    names = list(dict.fromkeys(r["dataset"] for r in runs))
    arms = [a for a in ("convex", "sgd", "ialt", "exact_step") if any(r["arm"] == a for r in runs)]
    jitter = np.random.default_rng(0)
    for i, name in enumerate(names):
        # Several outputs: the bound for every full net (units shared between outputs).
        bound = next(float(r["lower_bound"]) for r in runs if r["dataset"] == name and
                     r["arm"] in ("full_net_bound", "convex") and
                     (r["arm"] == "full_net_bound" or not any(
                         q["arm"] == "full_net_bound" and q["dataset"] == name for q in runs)))
        for j, arm in enumerate(arms):
            vals = [max((float(r["objective"]) - bound) / bound, 1e-7) for r in runs
                    if r["dataset"] == name and r["arm"] == arm]
            xs = i + 0.2 * (j - 1.5) + jitter.uniform(-0.04, 0.04, len(vals))
            ax.scatter(xs, vals, s=40 if arm == "convex" else 12, marker="*" if arm == "convex"
                       else "o", label=arm if i == 0 else None, color=f"C{j}")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("(objective - certified lower bound) / bound")
    ax.set_title("final objectives above the certified bound")
    ax.legend(fontsize=8)
    for k, xkey in enumerate(("iter", "seconds")):
        ax = axes[1 + k]
        for i, name in enumerate(names):
            rows = [r for r in admm if r["dataset"] == name and r["gap"] not in ("", "None")]
            if rows:
                ax.plot([float(r[xkey]) for r in rows], [max(float(r["gap"]), 1e-9) for r in rows],
                        label=name, color=f"C{i}")
        ax.set_yscale("log")
        ax.set_xlabel("ADMM iterations" if xkey == "iter" else "ADMM seconds")
        ax.set_ylabel("certified relative gap")
        ax.set_title("ADMM: (objective - lower bound) / objective")
        ax.legend()
    ax = axes[3]
    for j, method in enumerate(("ADMM", "SAMPLED")):
        rows = [r for r in sampled if r["method"] == method]
        if not rows:
            continue
        ax.plot([int(r["num_patterns"]) for r in rows],
                [float(r["rel_gap"]) for r in rows], "o-", label=method)
    ax.set_xscale("log")
    # Negative: below the exact run's written net, possible within its certified gap.
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("num_patterns (sampled directions)")
    ax.set_ylabel("relative objective gap to the exact optimum")
    ax.set_title("teacher: sampled vs every pattern")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "global_optimum.png"), dpi=90)


if __name__ == "__main__":
    main()
