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

I-alternation's support pass (``--support-pass``; solvers/lenet_alt, the same LeNet with
HardThresholds, all 4,000 mnist5k records, pass batch B per rank), each a fresh job timing the
second of two support steps (the first also allocates the store):

- ``sp1r``: 1 process, 1 thread: the whole pass (what every rank did before the split);
- ``sp2r``: 2 gloo ranks, 1 thread each: half of the records each, then the all-gather of the
  packed rows (the whole store) and the sums of the statistics; "comm share" is that exchange's
  part of rank 0's pass time.

An exact weight step (``--exact-step``; the same LeNet, weight_step CONVEX with
``--lbfgs-iter`` L-BFGS iterations on ip1 and ip2, over all 4,000 records, pass batch B per
rank), each a fresh job timing the second of two exact iterations (support pass + solves):

- ``ex1r``: 1 process, 1 thread: every record (what every rank did before the split);
- ``ex2r``: 2 gloo ranks, 1 thread each: half of the records each, every sum all-reduced.

usage: python3 benchmarks/scaling.py [--iters 60] [--batch 64] [--rounds 3] [--support-pass]
       [--exact-step [--lbfgs-iter 2]]
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


def _solver_param(batch: int, solver: str = "lenet_sgd", lbfgs_iter: int = 0):
    import tempfile

    from pycaffe_alt.prototxt import read_net, read_solver

    param = read_solver(os.path.join(ROOT, "solvers", solver + ".prototxt"))
    # The mask store's working file (used only past its RAM limit) stays out of the repository.
    param.snapshot_prefix = os.path.join(tempfile.gettempdir(), "pycaffe_alt_scaling", solver)
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
    if lbfgs_iter:
        ap = param.alternation_param
        ap.weight_step = ap.CONVEX
        ap.lbfgs_iter = lbfgs_iter
        ap.exact_layer[:] = ["ip1", "ip2"]
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
    alternation = args.support_pass or args.exact_step
    solver = caffe.get_solver(_solver_param(args.batch, "lenet_alt" if alternation else "lenet_sgd",
                                            args.lbfgs_iter if args.exact_step else 0),
                              device="cpu")
    runner = solver
    dp = None
    if job is not None:
        dp = DataParallel(solver, overlap=not args.sync, bucket_bytes=args.bucket_kb << 10,
                          watchdog=False)
        runner = dp
    if args.support_pass:
        solver.support_step()
        stats = solver.support_step()
        if job is None or job.rank == 0:
            print(json.dumps({"seconds": stats["seconds"], "records": stats["records"],
                              "records_computed": stats["records_computed"],
                              "comm_share": stats["gather_seconds"] / stats["seconds"],
                              "exchange_seconds": stats["gather_seconds"],
                              "store_bytes": stats["store_bytes"]}), flush=True)
        _leave(dp)
        return
    if args.exact_step:
        solver.exact_iteration()
        solver.exact_iteration()
        stats = solver.last_exact_stats
        if job is None or job.rank == 0:
            print(json.dumps({"seconds": stats["seconds"], "records": solver.records,
                              "records_computed": stats["records_computed"], "comm_share": 0.0,
                              "loss": stats["loss"]}), flush=True)
        _leave(dp)
        return
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
    _leave(dp)


def _leave(dp) -> None:
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
                             "2r1t-sync": (2, 1, args.batch), "sp1r": (1, 1, args.batch),
                             "sp2r": (2, 1, args.batch), "ex1r": (1, 1, args.batch),
                             "ex2r": (2, 1, args.batch)}[name]
    bucket_kb = 256 if name.endswith("b256k") else DEFAULT_BUCKET_BYTES >> 10
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads),
           "--batch", str(batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--bucket-kb", str(bucket_kb)]
    if name.endswith("sync"):
        cmd.append("--sync")
    if name.startswith("sp"):
        cmd.append("--support-pass")
    if name.startswith("ex"):
        cmd += ["--exact-step", "--lbfgs-iter", str(args.lbfgs_iter)]
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
    parser.add_argument("--configs", default="",
                        help="default: 1r1t,1r2t,2r1t,2r1t-b256k,2r1t-sync "
                             "(with --support-pass: sp1r,sp2r)")
    parser.add_argument("--support-pass", action="store_true",
                        help="time I-alternation's support pass on 1 rank and split on 2")
    parser.add_argument("--exact-step", action="store_true",
                        help="time an exact weight step (CONVEX) on 1 rank and split on 2")
    parser.add_argument("--lbfgs-iter", type=int, default=2)
    parser.add_argument("--bucket-kb", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    configs = (args.configs or ("sp1r,sp2r" if args.support_pass else "ex1r,ex2r"
                                if args.exact_step
                                else "1r1t,1r2t,2r1t,2r1t-b256k,2r1t-sync")).split(",")
    results = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            results[c].append(run_config(c, args))
            last = results[c][-1]
            what = f"{last['seconds']:8.2f} s pass" if args.support_pass or args.exact_step \
                else f"{last['images_per_s']:8.1f} images/s"
            print(f"round {r}: {c:10s} {what}  comm share {last['comm_share']:.1%}", flush=True)
    if args.support_pass:
        _report_support_pass(configs, results, args)
        return
    if args.exact_step:
        _report_exact_step(configs, results, args)
        return
    print(f"\nLeNet, mnist5k, per-rank batch {args.batch}, {args.iters} iterations, "
          f"median of {args.rounds} rounds (os.cpu_count() = {os.cpu_count()})")
    base = statistics.median(x["images_per_s"] for x in results[configs[0]])
    print(f"{'config':10s} {'images/s':>9s} {'vs ' + configs[0]:>9s} {'comm share':>11s}")
    for c in configs:
        ips = statistics.median(x["images_per_s"] for x in results[c])
        share = statistics.median(x["comm_share"] for x in results[c])
        print(f"{c:10s} {ips:9.1f} {ips / base:8.2f}x {share:10.1%}")


def _report_passes(title: str, configs, results, args, columns) -> None:
    """A table of one-pass timings (support pass, exact step): ``columns`` are
    ``(header, width, format, key)`` of the extra fields, medians where numeric."""
    first = results[configs[0]][0]
    print(f"\n{title}, {first['records']} mnist5k records, pass batch {args.batch} per rank, "
          f"median of {args.rounds} rounds (os.cpu_count() = {os.cpu_count()})")
    base = statistics.median(x["seconds"] for x in results[configs[0]])
    print(f"{'config':10s} {'records/rank':>12s} {'seconds':>8s} {'speed-up':>9s} " +
          " ".join(f"{h:>{w}s}" for h, w, _, _ in columns))
    for c in configs:
        sec = statistics.median(x["seconds"] for x in results[c])
        extra = " ".join(format(statistics.median(x[k] for x in results[c]), f"{w}{f}")
                         for _, w, f, k in columns)
        print(f"{c:10s} {results[c][0]['records_computed']:12d} {sec:8.2f} {base / sec:8.2f}x "
              + extra)


def _report_support_pass(configs, results, args) -> None:
    store = results[configs[0]][0]["store_bytes"]
    _report_passes(f"I-alternation support pass, LeNet (solvers/lenet_alt), store {store} bytes",
                   configs, results, args, [("exchange s", 11, ".3f", "exchange_seconds"),
                                            ("comm share", 11, ".1%", "comm_share")])


def _report_exact_step(configs, results, args) -> None:
    _report_passes(f"Exact weight step (CONVEX, L-BFGS {args.lbfgs_iter} on ip1 and ip2), LeNet "
                   "(solvers/lenet_alt)", configs, results, args, [("loss", 9, ".5f", "loss")])

if __name__ == "__main__":
    main()
