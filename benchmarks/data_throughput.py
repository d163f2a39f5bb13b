#!/usr/bin/env python3
"""Data-layer throughput (images/s), not a test.

Two synthetic LMDBs are made in a temporary folder with pycaffe_alt's own writer:
  (a) raw 28x28 grey Datum records (MNIST-like), read with scale 1/256;
  (b) JPEG-encoded 256x256 colour records (as convert_imageset --encoded writes them), read in
      TRAIN phase with crop_size 227 and mirror, mean_value 104/117/123.
Each is read by a Data layer with 0 (background thread), 1 and 2 worker processes. For scale, the
training speed of LeNet (Caffe's examples/mnist net, SGD step, plain torch) on this CPU is
measured too: data must outrun it by a wide margin.

Usage: python3 benchmarks/data_throughput.py [--seconds 3] [--records-a 5000] [--records-b 600]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cv2  # noqa: E402
import torch  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from pycaffe_alt.data.datum import array_to_datum  # noqa: E402
from pycaffe_alt.data.db import open_db  # noqa: E402
from pycaffe_alt.layers import LAYERS, TRAIN, LayerContext  # noqa: E402
from pycaffe_alt.proto import caffe_pb2  # noqa: E402


def make_raw_grey(path: str, n: int) -> None:
    rng = np.random.default_rng(0)
    with open_db(path, "lmdb", "w") as db:
        for i in range(n):
            img = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
            db.put(f"{i:08d}_{i}.png", array_to_datum(img, i % 10).SerializeToString())


def make_jpeg_colour(path: str, n: int) -> None:
    rng = np.random.default_rng(1)
    # Smooth images with some texture, so the JPEGs have realistic sizes (~20-40 KB).
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    with open_db(path, "lmdb", "w") as db:
        for i in range(n):
            f = rng.uniform(0.01, 0.08, 3)
            img = np.stack([127 + 100 * np.sin(f[c] * xx + f[(c + 1) % 3] * yy + i)
                            for c in range(3)], axis=2)
            img += rng.normal(0, 12, img.shape)
            ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8),
                                   [cv2.IMWRITE_JPEG_QUALITY, 90])
            datum = caffe_pb2.Datum(data=buf.tobytes(), label=i % 1000, encoded=True)
            db.put(f"{i:08d}_{i}.jpg", datum.SerializeToString())


def data_layer(source: str, batch_size: int, transform: str):
    param = caffe_pb2.LayerParameter()
    text_format.Parse(f'name: "data" type: "Data" top: "data" top: "label" '
                      f'transform_param {{ {transform} }} data_param {{ source: "{source}" '
                      f'batch_size: {batch_size} backend: LMDB }}', param)
    return LAYERS.get("Data")(param, [], LayerContext(phase=TRAIN))


def images_per_second(layer, batch_size: int, seconds: float) -> float:
    for _ in range(3):  # start-up (thread / worker processes) and warm caches
        layer()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        layer()
        n += batch_size
    return n / (time.perf_counter() - start)


def lenet_train_images_per_second(seconds: float, batch_size: int = 64) -> float:
    """LeNet (conv20-pool-conv50-pool-ip500-relu-ip10, softmax loss) SGD steps on random data."""
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(),
                        nn.Linear(500, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += batch_size
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per configuration")
    ap.add_argument("--records-a", type=int, default=5000)
    ap.add_argument("--records-b", type=int, default=600)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="pycaffe_alt_bench_") as tmp:
        raw, jpeg = os.path.join(tmp, "raw_lmdb"), os.path.join(tmp, "jpeg_lmdb")
        make_raw_grey(raw, args.records_a)
        make_jpeg_colour(jpeg, args.records_b)
        cases = [("(a) raw 28x28 grey, batch 64", raw, 64, "scale: 0.00390625"),
                 ("(b) JPEG 256x256 colour, crop 227 + mirror, batch 32", jpeg, 32,
                  "crop_size: 227 mirror: true mean_value: 104 mean_value: 117 mean_value: 123")]
        print(f"CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")
        print(f"{'dataset':<56}{'workers':>8}{'images/s':>12}")
        results = {}
        for title, path, bs, transform in cases:
            for workers in (0, 1, 2):
                layer = data_layer(path, bs, transform)
                layer.set_pipeline(workers=workers)
                rate = images_per_second(layer, bs, args.seconds)
                layer.close()
                results[(title, workers)] = rate
                print(f"{title:<56}{workers:>8}{rate:>12.0f}", flush=True)
        lenet = lenet_train_images_per_second(args.seconds)
        print(f"\nLeNet training on this CPU (batch 64, plain torch): {lenet:.0f} images/s")
        best_a = max(v for (t, _), v in results.items() if t.startswith("(a)"))
        print(f"(a) best / LeNet training = {best_a / lenet:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
