#!/usr/bin/env python3
"""Benchmark: inference time of each export runtime against our eager Net, side by side.

For each model (random weights) and batch size, in one process on one CPU thread, the runtimes
are timed in alternation, several rounds, and the median of each is reported with its ratio
to the eager Net. The time is the process's CPU time (``time.process_time``), not wall time: with
one thread per runtime the two agree on an idle machine, and CPU time is not inflated by waiting
for a core on a shared one (``--wall`` measures wall time instead). The reference is the eager
Net (``net(data=x)``, the tensor form of pycaffe's forward; ratio > 1 = faster than it):

* ``net``: our eager Net (reference);
* ``pytorch``: the generated standalone module (eager PyTorch, the hand-written equivalent);
* ``torchscript``: ``torch.jit.load`` of the torchscript file;
* ``export``: ``torch.export.load(...).module()`` of the .pt2 file (eager execution of the graph);
* ``onnxruntime``: the .onnx file in onnxruntime (CPU provider, 1 intra-op thread);
* ``export+compile`` (with ``--compile``): ``torch.compile`` of the loaded ExportedProgram's module
  (inductor; compiled during the warm-up, not timed).

Every runtime's output is also compared with the Net's (max relative difference printed).

usage: python3 benchmarks/export_speed.py [--models resnet18,googlenet] [--batches 1,16]
                                          [--rounds 5] [--csv OUT.csv] [--wall] [--compile]
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pycaffe_alt import Net  # noqa: E402
from pycaffe_alt.export import convert  # noqa: E402
from pycaffe_alt.host_memory import keep_freed_memory  # noqa: E402
from pycaffe_alt.export import onnx as onnx_format  # noqa: E402
from pycaffe_alt.export import pytorch_code  # noqa: E402
from pycaffe_alt.phase import TEST  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "export": ".pt2", "pytorch": ".py"}


def randomize(net: Net, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.layer_modules.values():
            if m.type == "BatchNorm":
                m.mean.copy_(torch.randn(m.mean.shape, generator=gen))
                m.variance.copy_(torch.rand(m.variance.shape, generator=gen) + 0.5)
                m.scale_factor.fill_(1.0)
                continue
            for p in m.blobs:
                fan_in = p[0].numel() if p.dim() >= 2 else 1
                std = (2.0 / fan_in) ** 0.5 if p.dim() >= 2 else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def runners(model: str, tmp: str, compile_export: bool = False):
    """name -> callable(x) for each runtime, and the Net."""
    proto = os.path.join(ROOT, "models", model, "deploy.prototxt")
    net = Net(proto, TEST)
    randomize(net)
    weights = os.path.join(tmp, f"{model}.caffemodel")
    net.save(weights)
    out = {"net": lambda x: net(data=x)["prob"]}
    for fmt in ("pytorch", "torchscript", "export", "onnx"):
        path = os.path.join(tmp, f"{model}_{fmt}{SUFFIX[fmt]}")
        convert(proto, weights, fmt, path, outputs=["prob"], verify=False)
        if fmt == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            out["onnxruntime"] = (lambda s: lambda x: torch.from_numpy(
                s.run(["prob"], {"data": x.numpy()})[0]))(sess)
        elif fmt == "torchscript":
            out["torchscript"] = torch.jit.load(path)
        elif fmt == "export":
            out["export"] = torch.export.load(path).module()
            if compile_export:
                out["export+compile"] = torch.compile(torch.export.load(path).module())
        else:
            out["pytorch"] = pytorch_code.import_generated(path).load()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,googlenet")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--csv", default="")
    ap.add_argument("--wall", action="store_true", help="measure wall time instead of CPU time")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the .pt2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    # One malloc policy for every runtime: freed memory is kept for reuse (what the training
    # tools set, pycaffe_alt/host_memory.py). With glibc's default, large activations freed
    # early are unmapped and re-faulted on every call, which penalises whichever runtime frees
    # them first (the generated eager module measured 0.5x the Net at batch 16 that way).
    print("malloc keeps freed memory:", keep_freed_memory())
    print(f"torch {torch.__version__}, 1 thread; onnxruntime "
          f"{__import__('onnxruntime').__version__ if onnx_format.onnxruntime_available() else 'missing'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            run = runners(model, tmp, args.compile)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 3, 224, 224)
                with torch.no_grad():
                    ref = run["net"](x).numpy()
                    errs = {}
                    for name, f in run.items():  # check, and two warm-up calls (allocators)
                        y = f(x).numpy()
                        errs[name] = float(np.abs(y - ref).max() / np.abs(ref).max())
                        f(x)
                    clock = time.perf_counter if args.wall else time.process_time
                    times = {name: [] for name in run}
                    for _ in range(args.rounds):
                        for name, f in run.items():
                            t0 = clock()
                            f(x)
                            times[name].append(clock() - t0)
                base = statistics.median(times["net"])
                what = "wall" if args.wall else "CPU"
                print(f"\n{model}, batch {batch} ({what} time, median of {args.rounds}):")
                print(f"  {'runtime':<12} {'ms':>9} {'vs net':>7} {'max rel diff':>13}")
                for name, ts in times.items():
                    med = statistics.median(ts)
                    print(f"  {name:<12} {med * 1e3:9.1f} {base / med:6.2f}x {errs[name]:13.1e}")
                    rows.append(dict(model=model, batch=batch, runtime=name, ms=round(med * 1e3, 2),
                                     speedup_vs_net=round(base / med, 3), max_rel_diff=errs[name]))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
