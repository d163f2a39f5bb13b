#!/usr/bin/env python3
"""Benchmark: I-alternation's support step against one plain forward pass over the training set.

Both read every training record once, in key order, with the TEST-style transform, in batches
of the train batch size, without gradients and with the layers in test mode, on the same device:

* forward: the whole train net (up to the loss), nothing stored;
* support step: ``AlternationSolver.support_step()`` — the layers up to the last HardThreshold,
  each record's supports packed on the device and stored in the MaskStore (first pass: fill;
  second pass: also counts the changed bits per layer).

Nets: ``lenet`` (solvers/lenet_alt.prototxt on the embedded 4,000 mnist5k digits) or ``allcnn_c``
(models/allcnn_c in hard-threshold form on a synthetic CIFAR-sized LMDB of ``--records`` random
3x32x32 images, so it runs without CIFAR-10; the cost does not depend on the pixel values).

usage: python3 benchmarks/support_step.py [--net lenet|allcnn_c] [--records 2000]
                                          [--device cpu|cuda] [--repeat 2]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pycaffe_alt.alternation.solver import AlternationSolver  # noqa: E402
from pycaffe_alt.alternation.support_pass import data_steps, first_data_layer  # noqa: E402
from pycaffe_alt.data.datum import array_to_datum  # noqa: E402
from pycaffe_alt.data.db import LMDBWriter  # noqa: E402
from pycaffe_alt.prototxt import read_solver  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_lmdb(path: str, records: int) -> None:
    rng = np.random.default_rng(0)
    with LMDBWriter(path) as db:
        for i in range(records):
            img = rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
            db.put("%05d" % i, array_to_datum(img, int(i % 10)).SerializeToString())


def solver_param(name: str, workdir: str, records: int):
    if name == "lenet":
        p = read_solver(os.path.join(ROOT, "solvers", "lenet_alt.prototxt"))
        p.net = os.path.join(ROOT, p.net)
    else:
        from pycaffe_alt.prototxt import read_net
        p = read_solver(os.path.join(ROOT, "solvers", "allcnn_c_alt.prototxt"))
        net = read_net(os.path.join(ROOT, p.net))
        db = os.path.join(workdir, "cifar_like_lmdb")
        synthetic_lmdb(db, records)
        for layer in net.layer:
            if layer.type == "Data":
                layer.data_param.source = db
        p.ClearField("net")
        p.net_param.CopyFrom(net)
    p.snapshot_prefix = os.path.join(workdir, "bench")
    p.snapshot = 0
    return p


def plain_forward_pass(solver) -> float:
    """Seconds for one forward pass of the whole train net over the training set, fed exactly
    as the support pass feeds it."""
    import dataclasses
    import math
    import pickle

    from pycaffe_alt.data.pipeline import BatchMaker, InputPipeline, Ordering

    net = solver.net
    layer = first_data_layer(net)
    maker = layer.pipeline.maker
    n = maker.ordering.num_records
    source = pickle.loads(pickle.dumps(maker.source))
    spec = dataclasses.replace(maker.spec, train=False, mirror=False)
    pipe = InputPipeline(BatchMaker(source, spec, maker.batch_size, Ordering(n), maker.seed,
                                    layer.where), workers=0, depth=2)
    tops = net.top_names[data_steps(net)[0].name]
    start = max(s.index for s in data_steps(net)) + 1
    from pycaffe_alt.alternation.support_pass import hard_threshold_layers

    for _, ht in hard_threshold_layers(net):
        ht.fixed_support = None  # plain thresholding, as the support pass itself does
    t0 = time.perf_counter()
    net.eval()
    with torch.no_grad():
        for _ in range(math.ceil(n / maker.batch_size)):
            batch = pipe.next_batch(net.device)
            net.run({tops[0]: batch["data"], tops[1]: batch["label"]}, start=start)
        if net.device.type == "cuda":
            torch.cuda.synchronize()
    net.train()
    pipe.close()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=("lenet", "allcnn_c"), default="lenet")
    ap.add_argument("--records", type=int, default=2000, help="synthetic records (allcnn_c)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="support_step_")
    try:
        torch.manual_seed(0)
        solver = AlternationSolver(solver_param(args.net, workdir, args.records),
                                   device=args.device)
        solver._end_warmup()  # THRESHOLD mode, as at a real support step
        print(f"net {args.net}, device {args.device}, {solver.records} records, batch "
              f"{solver.batch_size}, torch threads {torch.get_num_threads()}")
        plain_forward_pass(solver)  # warm-up (allocator, kernels, page cache)
        fwd, sup = [], []
        for r in range(args.repeat):
            fwd.append(plain_forward_pass(solver))
            stats = solver.support_step()
            sup.append(stats["seconds"])
            print(f"  round {r + 1}: forward pass {fwd[-1]:.2f} s, support step "
                  f"{sup[-1]:.2f} s ({'fill' if stats['first'] else 'update + changed bits'})")
        store = solver.store
        print(f"forward pass (best of {args.repeat}): {min(fwd):.2f} s; support step: "
              f"{min(sup):.2f} s (first) / {sup[-1]:.2f} s (last); ratio support/forward "
              f"{min(sup) / min(fwd):.2f} (best) {sup[-1] / min(fwd):.2f} (last)")
        print(f"mask store: {store.nbytes} bytes ({store.nbytes / 2**20:.2f} MiB) for "
              f"{store.num_records} records x {store.total_units} units, "
              f"{store.bits_per_unit:.6f} bits/unit, {'RAM' if store.in_ram else 'memmap'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
