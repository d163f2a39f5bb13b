"""A tiny hard-threshold net on the golden MNIST LMDBs (512 train / 128 test records) and solver
parameters for the alternation tests."""
from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from pycaffe_alt.proto import caffe_pb2

DATA = Path(__file__).parent / "fixtures" / "golden" / "data"
TRAIN_RECORDS = 512

NET = """
name: "TinyHT"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 %(train_transform)s }
  data_param { source: "%(train)s" batch_size: %(batch)d backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 %(test_transform)s }
  data_param { source: "%(test)s" batch_size: 32 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 5 stride: 2 bias_term: false
    weight_filler { type: "xavier" } } }
layer { name: "thr1" type: "HardThreshold" bottom: "conv1" top: "conv1"
  hard_threshold_param { beta_filler { type: "constant" value: 0.05 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 16 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "thr2" type: "HardThreshold" bottom: "ip1" top: "ip1"
  hard_threshold_param { beta_filler { type: "constant" value: 0.05 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

RELU_NET = """
name: "NoHT"
layer { name: "mnist" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00390625 }
  data_param { source: "%(train)s" batch_size: 16 backend: LMDB } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""


def net_text(batch: int = 16, mirror: bool = False, crop: int = 0) -> str:
    train_t = ("mirror: true " if mirror else "") + (f"crop_size: {crop}" if crop else "")
    test_t = f"crop_size: {crop}" if crop else ""
    return NET % {"train": DATA / "mnist_train_lmdb", "test": DATA / "mnist_test_lmdb",
                  "batch": batch, "train_transform": train_t, "test_transform": test_t}


def solver_param(tmp_path, alternation: str, extra: str = "", net: str = None,
                 **net_kwargs) -> caffe_pb2.SolverParameter:
    """A solver parameter of type Alternation around ``alternation`` (alternation_param body)."""
    p = caffe_pb2.SolverParameter()
    text_format.Parse(net or net_text(**net_kwargs), p.net_param)
    text_format.Parse(f"""
      type: "Alternation" base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005
      lr_policy: "fixed" test_iter: 2 test_interval: 1000 display: 0 max_iter: 20
      random_seed: 3 snapshot_after_train: false
      alternation_param {{ {alternation} }}""", p)
    text_format.Merge(extra, p)  # extra settings override the defaults above
    p.snapshot_prefix = str(tmp_path / "tiny")
    return p
