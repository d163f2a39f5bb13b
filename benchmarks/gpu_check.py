#!/usr/bin/env python3
"""One prepared check for a machine with CUDA: parity on the GPU, training speed, data pipeline.

Runs, and prints as one table:
1. parity: every golden case shipped in tests/fixtures/golden (layers/ and nets/, made by the
   reference Caffe) run on the device with the project's tolerances (forward 1e-4, gradients
   1e-3 relative to the largest reference magnitude), as tests/test_golden.py does on the CPU;
2. training steps (forward + backward + SGD step, batch B) of LeNet, All-CNN-C and ResNet-50:
   our Net built from a prototxt against a hand-written nn.Module of the same architecture, in
   img/s, in float32 and under autocast (BF16 where the device supports it, else FP16 with a
   GradScaler). Both sides get their best layout (channels-last for 4-D convolutions) and the
   same data; medians of interleaved rounds;
3. the data pipeline: a Data layer over a CIFAR-sized LMDB delivering batches to the device
   (pinned host memory and non-blocking copies on CUDA), in img/s.

``--cpu`` runs the same on the CPU with small sizes (CI runs it once with tiny settings, see
tests/test_gpu_check.py); ``--quick`` shrinks everything further.

usage: python3 benchmarks/gpu_check.py [--cpu] [--batch 64] [--rounds 5] [--cases all]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import pycaffe_alt as caffe  # noqa: E402
from golden_compare import compare_case, golden_cases  # noqa: E402
from net_overhead import HAND  # noqa: E402
from pycaffe_alt.proto import caffe_pb2  # noqa: E402
from pycaffe_alt.prototxt import parse_text, read_net  # noqa: E402



# ----------------------------------------------------------------------------- parity
def golden_case(case: str, device: torch.device) -> float:
    """The worst error/tolerance ratio of one golden case on ``device`` (<= 1 passes)."""
    return max((e / tol for _, e, tol in compare_case(case, device)), default=0.0)


def parity(device: torch.device, limit: int):
    cases = golden_cases()
    cases = cases[:limit] if limit else cases
    failed = []
    for case in cases:
        try:
            ratio = golden_case(case, device)
        except Exception as e:  # a crash is a failure to report, not the end of the check
            failed.append(f"{os.path.basename(case)} ({type(e).__name__}: {e})"[:120])
            continue
        if ratio > 1.0:
            failed.append(f"{os.path.basename(case)} (error {ratio:.1f}x tolerance)")
    return len(cases), failed


# ----------------------------------------------------------------------------- ResNet-50
# (blocks, bottleneck width) per stage: He et al. 2016, Table 1.
RESNET50 = [(3, 64), (4, 128), (6, 256), (3, 512)]


def resnet50_prototxt(batch: int, size: int, classes: int = 10) -> str:
    """ResNet-50 as Caffe writes it (conv, BatchNorm, Scale, ReLU; projection shortcuts)."""
    out = [f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} '
           f'dim: 3 dim: {size} dim: {size} }} }} }}',
           f'layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ dim: {batch} }} }} }}']

    def conv(name, bottom, n, k, s, relu=True):
        p = k // 2
        out.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                   f'convolution_param {{ num_output: {n} kernel_size: {k} stride: {s} pad: {p} '
                   f'bias_term: false weight_filler {{ type: "msra" }} }} }}')
        out.append(f'layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" top: "{name}" }}')
        out.append(f'layer {{ name: "{name}_scale" type: "Scale" bottom: "{name}" top: "{name}" '
                   f'scale_param {{ bias_term: true }} }}')
        if relu:
            out.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        return name

    x = conv("conv1", "data", 64, 7, 2)
    out.append(f'layer {{ name: "pool1" type: "Pooling" bottom: "{x}" top: "pool1" '
               f'pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}')
    x = "pool1"
    for stage, (blocks, width) in enumerate(RESNET50):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 0 else 1
            n = f"res{stage + 2}{chr(97 + b)}"
            short = x
            if b == 0:
                short = conv(n + "_proj", x, width * 4, 1, stride, relu=False)
            y = conv(n + "_a", x, width, 1, stride)
            y = conv(n + "_b", y, width, 3, 1)
            y = conv(n + "_c", y, width * 4, 1, 1, relu=False)
            out.append(f'layer {{ name: "{n}" type: "Eltwise" bottom: "{short}" bottom: "{y}" top: "{n}" }}')
            out.append(f'layer {{ name: "{n}_relu" type: "ReLU" bottom: "{n}" top: "{n}" }}')
            x = n
    out.append(f'layer {{ name: "pool5" type: "Pooling" bottom: "{x}" top: "pool5" '
               f'pooling_param {{ pool: AVE global_pooling: true }} }}')
    out.append(f'layer {{ name: "fc" type: "InnerProduct" bottom: "pool5" top: "fc" '
               f'inner_product_param {{ num_output: {classes} weight_filler {{ type: "msra" }} }} }}')
    out.append('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }')
    return "\n".join(out)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
        self.c = nn.Sequential(nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4))
        self.proj = (nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))
                     if cin != width * 4 or stride != 1 else nn.Identity())

    def forward(self, x):
        return F.relu(self.proj(x) + self.c(self.b(self.a(x))))


class ResNet50(nn.Module):
    """The hand-written counterpart of resnet50_prototxt (torchvision's layout, Caffe's padding)."""

    def __init__(self, classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
                  nn.MaxPool2d(3, 2, ceil_mode=True)]
        cin = 64
        for stage, (blocks, width) in enumerate(RESNET50):
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, 2 if b == 0 and stage > 0 else 1))
                cin = width * 4
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


# ----------------------------------------------------------------------------- training speed
def _net(name: str, batch: int, size: int, device: torch.device):
    if name == "resnet50":
        param = parse_text(resnet50_prototxt(batch, size), caffe_pb2.NetParameter())
    else:
        param = read_net(os.path.join(ROOT, "benchmarks", "nets", name + ".prototxt"))
        for layer in param.layer:
            if layer.type == "Input":
                layer.input_param.shape[0].dim[0] = batch
    return caffe.Net(param, caffe.TRAIN, device=device)


def _amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def train_speed(name: str, batch: int, size: int, device: torch.device, rounds: int, iters: int):
    """img/s of ours and hand-written, float32 and autocast: {(who, precision): img/s}."""
    ours = _net(name, batch, size, device)
    hand = (ResNet50() if name == "resnet50" else HAND[name][0]()).to(device)
    layout = ours.memory_format  # the same layout for both: the one the rule picks here
    hand = hand.to(memory_format=layout)
    shape = ours.blobs["data"].shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    yf = y.float()
    amp = _amp_dtype(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = {}
    for who, model in (("hand", hand), ("ours", ours)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        for precision in ("fp32", "amp"):
            def step(model=model, opt=opt, scaler=scaler, precision=precision, who=who):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp, enabled=precision == "amp"):
                    loss = (ours.loss(ours.run({"data": x, "label": yf})) if who == "ours"
                            else F.cross_entropy(model(x), y))
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            steps[(who, precision)] = step
    times = {k: [] for k in steps}
    for step in steps.values():  # warm-up
        step()
    sync()
    for _ in range(rounds):
        for k, step in steps.items():
            start = time.perf_counter()
            for _ in range(iters):
                step()
            sync()
            times[k].append((time.perf_counter() - start) / iters)
    return {k: batch / statistics.median(v) for k, v in times.items()}, amp, layout


# ----------------------------------------------------------------------------- data pipeline
def data_speed(device: torch.device, batch: int, n_batches: int) -> float:
    """img/s of a Data layer over a CIFAR-sized LMDB delivering batches to ``device``."""
    from pycaffe_alt.data.datum import array_to_datum
    from pycaffe_alt.data.db import LMDBWriter

    folder = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        source = os.path.join(folder, "lmdb")
        rng = np.random.default_rng(0)
        with LMDBWriter(source) as w:
            for i in range(batch * 4):
                img = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
                w.put(f"{i:08d}", array_to_datum(img, int(i % 10)).SerializeToString())
        text = (f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
                f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} '
                f'transform_param {{ scale: 0.0039 mirror: true crop_size: 28 }} }}')
        net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN, device=device)
        net.run()  # start-up: first batch, threads
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        for _ in range(n_batches):
            net.run()
        sync()
        return batch * n_batches / (time.perf_counter() - start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU with small sizes")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--batch", type=int, default=0, help="training batch (default 64; CPU 8)")
    ap.add_argument("--size", type=int, default=0, help="ResNet-50 input size (default 224; CPU 64)")
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds (default 5; CPU 3)")
    ap.add_argument("--iters", type=int, default=0, help="steps per round (default 10; CPU 1)")
    ap.add_argument("--cases", type=int, default=0, help="golden cases to run (default all)")
    ap.add_argument("--nets", default="lenet,allcnn_c,resnet50")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    small = args.cpu or args.quick
    batch = args.batch or (2 if args.quick else 8 if small else 64)
    size = args.size or (32 if args.quick else 64 if small else 224)
    rounds = args.rounds or (1 if args.quick else 3 if small else 5)
    iters = args.iters or (1 if small else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, batch {batch}, ResNet-50 input {size}")
    rows = []
    n, failed = parity(device, args.cases)
    rows.append(("parity", f"{n - len(failed)}/{n} golden cases within tolerance", ""))
    for f in failed:
        rows.append(("  failed", f, ""))
    for net_name in args.nets.split(","):
        speeds, amp, layout = train_speed(net_name, batch, size, device, rounds, iters)
        amp_name = "bf16" if amp == torch.bfloat16 else "fp16"
        layout_name = "channels_last" if layout is torch.channels_last else "NCHW"
        for precision in ("fp32", "amp"):
            h, o = speeds[("hand", precision)], speeds[("ours", precision)]
            label = precision if precision == "fp32" else f"amp {amp_name}"
            rows.append((f"train {net_name} {label}", f"ours {o:9.1f} img/s, hand {h:9.1f} img/s",
                         f"ours/hand {o / h:.2f} ({layout_name})"))
    pipe = data_speed(device, batch, 4 if small else 50)
    pinned = "pinned, non-blocking" if device.type == "cuda" else "host"
    rows.append(("data pipeline", f"{pipe:9.1f} img/s to {device.type} ({pinned})", ""))
    width = max(len(r[0]) for r in rows)
    print("-" * 78)
    for a, b, c in rows:
        print(f"{a:<{width}}  {b}  {c}".rstrip())
    print("-" * 78)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
