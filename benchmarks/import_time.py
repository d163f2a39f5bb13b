#!/usr/bin/env python3
"""Benchmark: how long ``import pycaffe_alt`` takes in a fresh interpreter, against ``import torch``.

pycaffe_alt imports lazily: the package, its proto module and the database readers load without
torch (scripts that only read LMDBs or convert prototxts start fast); torch loads with the first
net or solver. Each variant runs in its own fresh process, alternating, many rounds; medians.

- ``python -c pass``: the interpreter alone (subtracted from the others);
- ``import pycaffe_alt`` (+ ``pycaffe_alt.data.db``, ``caffe_pb2``): the light import;
- ``import torch``: what any PyTorch program pays;
- ``import pycaffe_alt.net``: the full import a training script makes (torch included).

usage: python3 benchmarks/import_time.py [--rounds 9]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "python -c pass": "pass",
    "import pycaffe_alt (light)": "import pycaffe_alt, pycaffe_alt.data.db\n"
                                  "from pycaffe_alt.proto import caffe_pb2",
    "import torch": "import torch",
    "import pycaffe_alt.net (full)": "import pycaffe_alt.net",
}


def run_once(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    times = {k: [] for k in VARIANTS}
    for _ in range(args.rounds):
        for name, code in VARIANTS.items():
            times[name].append(run_once(code))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["python -c pass"]
    for name, t in med.items():
        print(f"{name:32s} {1000 * t:8.1f} ms  ({1000 * (t - base):7.1f} ms over the interpreter)")
    light = med["import pycaffe_alt (light)"] - base
    torch_t = med["import torch"] - base
    full = med["import pycaffe_alt.net (full)"] - base
    print(f"light import / import torch: {light / torch_t:.3f}")
    print(f"full import / import torch:  {full / torch_t:.3f}")


if __name__ == "__main__":
    main()
