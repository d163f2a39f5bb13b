#!/usr/bin/env python3
"""Benchmark: the mask store for ALL-CNN-C's supports over CIFAR-10's 50,000 training records.

The layout is taken from the net itself: models/allcnn_c/deploy.prototxt converted to the
hard-threshold form (tools/convert_relu), every HardThreshold layer's top shape is one support.
Measured, for a store in RAM and one memory-mapped on disk (the 1 GiB default RAM limit decides
which one a trainer gets): bits per unit (<= 1 plus header), file size, RAM, the time to fill the
store batch by batch (put: pack on the device, one device->host copy), to read it back (get),
and to save it atomically; and, for scale, one forward pass of the net over a batch on the same
device (the support step must cost about one forward pass over the training set).

usage: python3 benchmarks/mask_store.py [--records 50000] [--batch 128] [--device cpu]
                                         [--dir DIR] [--modes ram,memmap]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pycaffe_alt as caffe  # noqa: E402
from pycaffe_alt.alternation.mask_store import MaskStore  # noqa: E402
from pycaffe_alt.prototxt import read_net  # noqa: E402
from pycaffe_alt.tools.convert_relu import convert_net  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def allcnn_c_net(batch: int, device: str):
    """ALL-CNN-C in hard-threshold form, batch ``batch``; returns (net, [(name, unit_shape)])."""
    param = read_net(os.path.join(ROOT, "models", "allcnn_c", "deploy.prototxt"))
    param, _ = convert_net(param, mode="THRESHOLD")
    param.layer[0].input_param.shape[0].dim[0] = batch
    net = caffe.Net(param, phase=caffe.TEST, device=device)
    # He-scaled random weights and small biases: realistic, about half-dense supports.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = torch.Size(p.shape[1:]).numel() if p.dim() > 1 else 1
            std = (2.0 / fan_in) ** 0.5 if p.dim() > 1 else 0.05
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device))
    layout = [(name, tuple(net.blobs[net.top_names[name][0]].shape[1:]))
              for name, m in net.layer_modules.items() if m.type == "HardThreshold"]
    return net, layout


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(mode: str, layout, records: int, batch: int, device: str, folder: str, net) -> dict:
    max_ram = (1 << 40) if mode == "ram" else 0
    work = os.path.join(folder, f"{mode}.work.masks")
    t0 = time.perf_counter()
    store = MaskStore(layout, records, path=work, max_ram_bytes=max_ram)
    create_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    # Realistic supports: the net's own eq. 12 masks on random inputs (about half the units on).
    x = torch.randn(net.blobs["data"].shape, generator=gen).to(device)
    supports = {}
    hooks = []
    for name, _ in layout:
        layer = net.layer_modules[name]
        layer.record_support = lambda m, name=name: supports.__setitem__(name, m)
        hooks.append(layer)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        net(data=x)
        sync(device)
        forward_s = time.perf_counter() - t0
    for layer in hooks:
        layer.record_support = None
    on_fraction = sum(int(m.sum()) for m in supports.values()) / sum(m.numel() for m in supports.values())
    order = torch.randperm(records)
    t0 = time.perf_counter()
    changed = 0
    for lo in range(0, records, batch):
        idx = order[lo:lo + batch]
        masks = {n: m[: len(idx)] for n, m in supports.items()}
        changed += store.put(None, idx, masks)
    sync(device)
    put_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lo in range(0, records, batch):
        got = store.get(order[lo:lo + batch], device=device)
    sync(device)
    get_s = time.perf_counter() - t0
    ok = all(torch.equal(got[n], supports[n][: len(got[n])]) for n, _ in layout)
    snap = os.path.join(folder, f"{mode}_iter_0.masks")
    t0 = time.perf_counter()
    store.save(snap)
    save_s = time.perf_counter() - t0
    file_bytes = os.path.getsize(snap)
    t0 = time.perf_counter()
    MaskStore.load(snap, expect_layout=layout, expect_records=records, max_ram_bytes=max_ram,
                   work_path=os.path.join(folder, f"{mode}.load.masks"))
    load_s = time.perf_counter() - t0
    batches = (records + batch - 1) // batch
    row = dict(mode=mode, repr=repr(store), bits_per_unit=store.bits_per_unit,
               file_mib=file_bytes / 2**20, ram_mib=(store.rows.nbytes / 2**20) if store.in_ram else 0.0,
               header_bytes=len(store.header), create_s=create_s, put_s=put_s, get_s=get_s,
               save_s=save_s, load_s=load_s, put_rec_s=records / put_s, get_rec_s=records / get_s,
               forward_batch_s=forward_s, forward_epoch_s=forward_s * batches, on=on_fraction,
               roundtrip_ok=ok)
    for f in os.listdir(folder):
        os.unlink(os.path.join(folder, f))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=50000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", default=None, help="folder for the memmap and snapshot files")
    p.add_argument("--modes", default="ram,memmap")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    net, layout = allcnn_c_net(args.batch, args.device)
    units = sum(torch.Size(s).numel() for _, s in layout)
    print(f"ALL-CNN-C supports: {len(layout)} HardThreshold layers, {units} units/record "
          f"({units / 8 / 1024:.1f} KiB packed), {args.records} records, batch {args.batch}, "
          f"device {args.device}")
    for n, s in layout:
        print(f"  {n:8s} {'x'.join(map(str, s)):>10s}  {torch.Size(s).numel():7d} units")
    folder = args.dir or tempfile.mkdtemp(prefix="maskbench")
    os.makedirs(folder, exist_ok=True)
    rows = []
    try:
        for mode in args.modes.split(","):
            rows.append(bench(mode, layout, args.records, args.batch, args.device, folder, net))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    cols = [("mode", "{:>7s}"), ("bits_per_unit", "{:>10.5f}"), ("file_mib", "{:>9.1f}"),
            ("ram_mib", "{:>8.1f}"), ("put_s", "{:>7.2f}"), ("put_rec_s", "{:>9.0f}"),
            ("get_s", "{:>7.2f}"), ("get_rec_s", "{:>9.0f}"), ("save_s", "{:>7.2f}"),
            ("load_s", "{:>7.2f}"), ("forward_epoch_s", "{:>10.1f}"), ("roundtrip_ok", "{!s:>5s}")]
    print()
    print(" ".join(f"{c:>{len(f.format(rows[0][c]))}s}" for c, f in cols))
    for r in rows:
        print(" ".join(f.format(r[c]) for c, f in cols))
    for r in rows:
        print(f"{r['mode']}: {r['repr']}; header {r['header_bytes']} B; support density "
              f"{r['on']:.3f}; one forward batch {r['forward_batch_s'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
