#!/usr/bin/env python3
"""Benchmark: data-parallel scaling on the CPU (images/s) and the communication share.

LeNet (models/lenet, solvers/lenet_sgd's SGD settings) on the embedded mnist5k LMDB, per-rank
batch B (default 64), no testing, no snapshots. Configurations, each a fresh job:

- ``1r1t``:   1 process, 1 torch thread, batch B;
- ``1r2t``:   1 process, 2 torch threads, batch 2B (the effective batch of two ranks);
- ``2r1t``:   2 gloo ranks (pycaffe_alt.distributed), 1 thread each, batch B each, gradients
  all-reduced during backward (buckets, overlap on);
- ``2r1t-b256k``: 2r1t with 256 KiB buckets (LeNet's 1.7 MB of gradients fit one default 4 MiB
  bucket, which can only start when backward ends: small buckets start earlier);
- ``2r1t-sync``: the same with the all-reduce after backward (overlap off).

images/s = ranks x B x iterations / seconds, timed on rank 0 after a warm-up. For the
data-parallel runs, "comm share" is the part of an iteration rank 0 spends waiting for the
gradient all-reduce and the per-iteration loss/request exchange (with overlap, only what backward
did not hide). Every job runs ``--rounds`` times, alternating configurations; medians are shown.

usage: python3 benchmarks/scaling.py [--iters 60] [--batch 64] [--rounds 3]
       (the machine's other load changes the numbers: compare the columns of one run)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _solver_param(batch: int):
    from pycaffe_alt.prototxt import read_net, read_solver

    param = read_solver(os.path.join(ROOT, "solvers", "lenet_sgd.prototxt"))
    net = read_net(os.path.join(ROOT, param.net))
    param.ClearField("net")
    param.ClearField("test_iter")
    param.test_interval = 0
    param.snapshot = 0
    param.display = 0
    param.snapshot_after_train = False
    param.random_seed = 1
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = batch
    param.train_net_param.CopyFrom(net)
    return param


def worker(args) -> None:
    """One rank (or the single process) of a configuration; rank 0 prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import pycaffe_alt as caffe
    from pycaffe_alt.distributed import DataParallel, join, launch_env

    os.chdir(ROOT)  # the net's data paths are relative to the repository
    job = launch_env()
    device = torch.device("cpu")
    if job is not None:
        join(job, device, start_timeout=120)
    solver = caffe.get_solver(_solver_param(args.batch), device="cpu")
    runner = solver
    dp = None
    if job is not None:
        dp = DataParallel(solver, overlap=not args.sync, bucket_bytes=args.bucket_kb << 10,
                          watchdog=False)
        runner = dp
    runner.step(args.warmup)
    comm0 = _comm_seconds(dp)
    t0 = time.perf_counter()
    runner.step(args.iters)
    seconds = time.perf_counter() - t0
    comm = _comm_seconds(dp) - comm0
    world = job.world_size if job is not None else 1
    if job is None or job.rank == 0:
        print(json.dumps({"images_per_s": world * args.batch * args.iters / seconds,
                          "comm_share": comm / seconds}), flush=True)
    if dp is not None:
        dp.close()
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _comm_seconds(dp) -> float:
    return 0.0 if dp is None else dp.reducer.comm_seconds_waited + dp.exchange_seconds


def run_config(name: str, args) -> dict:
    from pycaffe_alt.distributed.launch import free_port, rank_env
    from pycaffe_alt.distributed.reducer import DEFAULT_BUCKET_BYTES

    ranks, threads, batch = {"1r1t": (1, 1, args.batch), "1r2t": (1, 2, 2 * args.batch),
                             "2r1t": (2, 1, args.batch), "2r1t-b256k": (2, 1, args.batch),
                             "2r1t-sync": (2, 1, args.batch)}[name]
    bucket_kb = 256 if name.endswith("b256k") else DEFAULT_BUCKET_BYTES >> 10
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads),
           "--batch", str(batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--bucket-kb", str(bucket_kb)]
    if name.endswith("sync"):
        cmd.append("--sync")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = []
    port = free_port()
    for r in range(ranks):
        e = rank_env(r, ranks, port, base=env) if ranks > 1 else env
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{name}: a worker failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="1r1t,1r2t,2r1t,2r1t-b256k,2r1t-sync")
    parser.add_argument("--bucket-kb", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    configs = args.configs.split(",")
    results = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            results[c].append(run_config(c, args))
            print(f"round {r}: {c:10s} {results[c][-1]['images_per_s']:8.1f} images/s  "
                  f"comm share {results[c][-1]['comm_share']:.1%}", flush=True)
    print(f"\nLeNet, mnist5k, per-rank batch {args.batch}, {args.iters} iterations, "
          f"median of {args.rounds} rounds (os.cpu_count() = {os.cpu_count()})")
    base = statistics.median(x["images_per_s"] for x in results[configs[0]])
    print(f"{'config':10s} {'images/s':>9s} {'vs ' + configs[0]:>9s} {'comm share':>11s}")
    for c in configs:
        ips = statistics.median(x["images_per_s"] for x in results[c])
        share = statistics.median(x["comm_share"] for x in results[c])
        print(f"{c:10s} {ips:9.1f} {ips / base:8.2f}x {share:10.1%}")


if __name__ == "__main__":
    main()
