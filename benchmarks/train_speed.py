#!/usr/bin/env python3
"""Benchmark: training iterations/s through tools/train against the best hand-written PyTorch loop.

The issue's target (15): `tools/train` trains LeNet on an MNIST LMDB and All-CNN-C on a CIFAR-sized
LMDB at batch 64 at >= 0.95x the speed of the best hand-written PyTorch training loop of the same
net on the same data (SGD, momentum 0.9, weight decay 5e-4), and `tools/train --compile` runs
faster than the hand-written eager loop.

- ours: `tools/train --solver S` (and `--compile`) in a subprocess; the rate is taken from the log
  timestamps of the `Iteration N, loss` lines after a warm-up (start-up, net building and
  compiling excluded), so it includes the data layer, the solver update and the logging, as a
  user sees it;
- hand-written: an nn.Module of the same architecture and `torch.optim.SGD`, reading each batch
  from the same LMDB in the loop (lmdb + Datum parsing + numpy, what a hand-written loop over a
  Caffe LMDB does), in NCHW and in channels-last layout (model and batches converted with
  `memory_format=torch.channels_last`); "+keep" is the same with the malloc policy tools/train
  applies to itself (pycaffe_alt/host_memory.py: freed activation memory is kept for the next
  iteration, as Caffe reuses its blobs), i.e. the same process conditions. The best of these
  four is the reference. `--ram` adds a loop on batches preloaded in RAM (pays nothing for
  data: an upper bound no data-reading trainer can reach).
Every run is a fresh process (this script re-invoked with --worker), as a user runs either
script: a loop timed inside a long-lived parent process would be measured under different
conditions (warm allocator and caches) than tools/train in its own process. Runs alternate,
round after round; the medians are compared and every round is printed, since this shared
machine drifts by +-20% between runs.

usage: python3 benchmarks/train_speed.py [--nets lenet,allcnn_c] [--iters 300] [--rounds 5]
       [--no-compile] [--ram]
"""
import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from net_overhead import HAND  # noqa: E402

from pycaffe_alt.data.datum import array_to_datum, datum_to_array, parse_datum  # noqa: E402
from pycaffe_alt.data.db import LMDBWriter, open_db  # noqa: E402
from pycaffe_alt.prototxt import read_net  # noqa: E402

SHAPES = {"lenet": (1, 28, 28), "allcnn_c": (3, 32, 32)}
SCALE = {"lenet": 0.00390625, "allcnn_c": 0.0157}


def make_lmdb(name, folder, n=2048):
    """An MNIST LMDB (the embedded digits) or a random CIFAR-sized one; returns its path."""
    if name == "lenet":
        from pycaffe_alt.data.mnist5k import ensure_mnist5k_lmdb

        return os.path.abspath(ensure_mnist5k_lmdb(os.path.join(ROOT, "data", "mnist5k"))[0])
    path = os.path.join(folder, "cifar_like_lmdb")
    rng = np.random.default_rng(0)
    with LMDBWriter(path) as w:
        for i in range(n):
            img = rng.integers(0, 256, SHAPES[name], dtype=np.uint8)
            w.put(f"{i:08d}", array_to_datum(img, int(rng.integers(0, 10))).SerializeToString())
    return path


def load_records(path):
    db = open_db(path)
    xs, ys = [], []
    for i in range(len(db)):
        d = parse_datum(db.value(i), path)
        xs.append(datum_to_array(d))
        ys.append(d.label)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def write_solver(name, folder, source, iters, batch):
    net = read_net(os.path.join(ROOT, "benchmarks", "nets", name + ".prototxt"))
    inputs = [l for l in net.layer if l.type == "Input"]
    data = net.layer.add()
    data.CopyFrom(inputs[0])
    data.name, data.type = "data", "Data"
    data.ClearField("input_param")
    data.ClearField("top")
    data.top.extend(["data", "label"])
    data.data_param.source = source
    data.data_param.batch_size = batch
    data.data_param.backend = data.data_param.LMDB
    data.transform_param.scale = SCALE[name]
    layers = [data] + [l for l in net.layer if l.type != "Input" and l is not data]
    kept = [type(data)() for _ in layers]
    for k, l in zip(kept, layers):
        k.CopyFrom(l)
    del net.layer[:]
    net.layer.extend(kept)
    net_path = os.path.join(folder, name + "_train.prototxt")
    with open(net_path, "w") as f:
        f.write(str(net))
    solver_path = os.path.join(folder, name + "_solver.prototxt")
    with open(solver_path, "w") as f:
        f.write(f'net: "{net_path}"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\n'
                f'lr_policy: "fixed"\ndisplay: 10\nmax_iter: {iters}\nsnapshot_after_train: false\n'
                f'solver_mode: CPU\nrandom_seed: 1\n')
    return solver_path


_LINE = re.compile(r"^I(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*Iteration (\d+), loss = ")


def ours_ms_per_iter(solver_path, warmup, iters, compile_net=False):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # same threads as hand
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train"), "--solver",
                           solver_path] + (["--compile"] if compile_net else []),
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    stamps = {}
    for line in proc.stderr.splitlines():
        m = _LINE.match(line)
        if m:
            t = datetime.datetime.strptime(m.group(2), "%H:%M:%S.%f")
            stamps[int(m.group(3))] = t
    # The line at max_iter comes after Caffe's extra display forward (which, compiled, traces a
    # no-grad graph once): it is not a training iteration.
    its = sorted(i for i in stamps if warmup <= i < iters)
    first, last = its[0], its[-1]
    return (stamps[last] - stamps[first]).total_seconds() * 1000.0 / (last - first)


def hand_ms_per_iter(name, source, iters, warmup, batch, worker, fmt):
    """ms/iter of a hand-written loop in a fresh process (this script with ``--worker``)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", worker,
                           "--format", fmt, "--nets", name, "--source", source,
                           "--iters", str(iters), "--warmup", str(warmup), "--batch", str(batch)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return float(proc.stdout.split()[-1])


def hand_loop(name, x, y, iters, warmup, batch, source=None, fmt="contiguous"):
    """ms/iter of a hand-written loop; with ``source`` it reads each batch from that LMDB;
    ``fmt`` "channels_last" converts the model and every batch to that layout."""
    from pycaffe_alt.proto import caffe_pb2

    torch.manual_seed(1)
    layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = HAND[name][0]().to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    xt = torch.from_numpy(x * SCALE[name])
    yt = torch.from_numpy(y)
    n = len(xt)
    # The process already has the LMDB open (py-lmdb allows one handle per process): read
    # values through that handle, the rest (Datum parsing, numpy) is the hand loop's own.
    db = open_db(source) if source else None
    datum = caffe_pb2.Datum()
    start = None
    for it in range(iters):
        if it == warmup:
            start = time.perf_counter()
        lo = (it * batch) % (n - batch)
        if db is None:
            xb, yb = xt[lo:lo + batch], yt[lo:lo + batch]
        else:
            imgs, labels = [], []
            for i in range(lo, lo + batch):
                datum.ParseFromString(db.value(i))
                imgs.append(np.frombuffer(datum.data, np.uint8))
                labels.append(datum.label)
            xb = torch.from_numpy(np.stack(imgs).reshape((batch,) + SHAPES[name])
                                  .astype(np.float32) * np.float32(SCALE[name]))
            yb = torch.tensor(labels)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb.contiguous(memory_format=layout)), yb)
        loss.backward()
        opt.step()
        if it % 10 == 0:
            float(loss.detach())  # what a display line costs
    return (time.perf_counter() - start) * 1000.0 / (iters - warmup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--nets", default="lenet,allcnn_c")
    ap.add_argument("--iters", type=int, default=0, help="iterations per run (default per net)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="skip tools/train --compile")
    ap.add_argument("--ram", action="store_true", help="also time a loop on batches in RAM")
    ap.add_argument("--worker", choices=("lmdb", "lmdb+keep", "ram"), help=argparse.SUPPRESS)
    ap.add_argument("--format", default="contiguous", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # one hand-written run in this fresh process; prints its ms/iter
        if args.worker == "lmdb+keep":  # the malloc policy tools/train applies to itself
            from pycaffe_alt.host_memory import keep_freed_memory

            keep_freed_memory()
        x, y = load_records(args.source)
        print(hand_loop(args.nets, x, y, args.iters, args.warmup, args.batch,
                        None if args.worker == "ram" else args.source, args.format))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    hands = [(w, f) for w in ("lmdb", "lmdb+keep") for f in ("contiguous", "channels_last")]
    if args.ram:
        hands.append(("ram", "channels_last"))
    folder = tempfile.mkdtemp(prefix="train_speed_")
    try:
        for name in args.nets.split(","):
            iters = args.iters or (300 if name == "lenet" else 30)
            warmup = 20 if name == "lenet" else 10
            source = make_lmdb(name, folder)
            solver = write_solver(name, folder, source, iters, args.batch)
            times = {f"hand+{w} {f}": [] for w, f in hands}
            times["tools/train"] = []
            if not args.no_compile:
                times["tools/train --compile"] = []
            for _ in range(args.rounds):
                for w, f in hands:
                    times[f"hand+{w} {f}"].append(
                        hand_ms_per_iter(name, source, iters, warmup, args.batch, w, f))
                times["tools/train"].append(ours_ms_per_iter(solver, warmup, iters))
                if not args.no_compile:
                    times["tools/train --compile"].append(
                        ours_ms_per_iter(solver, warmup, iters, True))
                print("  round: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in times.items())
                      + " ms/iter", flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            lmdb_keys = [k for k in med if k.startswith("hand+lmdb")]
            best_key = min(lmdb_keys, key=med.get)
            print(f"{name} batch {args.batch} (medians, ms/iter): " +
                  ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
            print(f"  best hand-written loop on the LMDB: {best_key} {med[best_key]:.1f}")
            print(f"  best hand / tools/train: {med[best_key] / med['tools/train']:.3f}")
            if not args.no_compile:
                print(f"  best hand (eager) / tools/train --compile: "
                      f"{med[best_key] / med['tools/train --compile']:.3f}")
            if args.ram:
                ram = med["hand+ram channels_last"]
                print(f"  hand on RAM data / tools/train: {ram / med['tools/train']:.3f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
