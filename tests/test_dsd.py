"""DSD (Dense -> Sparse -> re-Dense): phases, magnitude and support pruning, pruned weights held at
zero, re-Dense, snapshot/resume, bad configurations. Tiny nets on the golden MNIST LMDB."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from alternation_case import DATA, RELU_NET, net_text
from pycaffe_alt.alternation import pruning
from pycaffe_alt.alternation.dsd import (DSDSolver, SupportDSDSolver, decode_masks,
                                         encode_masks)
from pycaffe_alt.errors import SolverError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.solver.solver import Solver, get_solver


def dsd_param(tmp_path, dsd: str, extra: str = "", net: str = None,
              max_iter: int = 12) -> caffe_pb2.SolverParameter:
    p = caffe_pb2.SolverParameter()
    text_format.Parse(net or net_text(), p.net_param)
    text_format.Parse(f"""
      type: "SGD" base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005 lr_policy: "fixed"
      test_iter: 1 test_interval: 1000 display: 1 max_iter: {max_iter} random_seed: 3
      snapshot_after_train: false solver_mode: CPU dsd_param {{ {dsd} }}""", p)
    text_format.Merge(extra, p)
    p.snapshot_prefix = str(tmp_path / "tiny")
    return p


MAG = "dense_iter: 4 sparse_iter: 4 redense_iter: 4 prune_by: MAGNITUDE sparsity: 0.5"
SUP = "dense_iter: 4 sparse_iter: 4 redense_iter: 4 prune_by: SUPPORT"
BATCH = "alternation_param { mode: BATCH }"


class Recorder:
    """Hook: the DSD phase seen by every iteration's forward, and a check after every update."""

    def __init__(self):
        self.phases, self.lrs, self.after = [], [], []

    def before_step(self, s):
        self.phases.append((s.iter, s.dsd_phase))
        self.lrs.append(s.lr)

    def after_step(self, s, loss):
        if s.dsd_phase == "sparse":
            n = len(s._params)
            bad = 0
            for p in s._pruned:
                bad += int((p.weight.detach()[p.pruned] != 0).sum())
                for k in range(s.rule.history_sets):
                    bad += int((s.history[k * n + p.index][p.pruned] != 0).sum())
            self.after.append((s.iter, bad, s.last_pruned_nonzero))


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def test_magnitude_mask_keeps_largest_and_breaks_ties_by_index():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    for s in (0.0, 0.3, 0.5, 0.9):
        keep = pruning.magnitude_mask(w, s)
        pruned = int((~keep).sum())
        assert pruned == int(s * w.numel() + 0.5)
        if 0 < pruned < w.numel():
            assert w.abs()[keep].min() >= w.abs()[~keep].max()
    ties = torch.tensor([[1.0, -1.0, 1.0, 2.0], [-1.0, 1.0, 0.5, -3.0]])
    keep = pruning.magnitude_mask(ties, 0.5)  # 4 go: 0.5, then the three first |1|s in C order
    assert keep.tolist() == [[False, False, False, True], [True, True, False, True]]


def test_connection_mask_conv_groups_and_inner_product_blocks():
    idx = pruning.input_channel_index((4, 2, 3, 3), channels=4, group=2)
    assert idx.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
    idx = pruning.input_channel_index((2, 6), channels=3)
    assert idx.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    keep = pruning.connection_mask((2, 6), torch.tensor([True, False]),
                                   torch.tensor([True, False, True]), idx)
    assert keep.tolist() == [[True, True, False, False, True, True], [False] * 6]
    assert pruning.input_channel_index((2, 7), channels=3) is None
    masks = {"a": keep, "b": torch.rand(3, 2, 5, 5) > 0.5}
    back = decode_masks(encode_masks(masks), "x")
    assert all(torch.equal(back[k], masks[k]) for k in masks)


# ---------------------------------------------------------------------------------------------
# schedule, masking, re-Dense
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["SGD", "Adam"])
def test_phases_masks_and_redense(tmp_path, rule):
    extra = 'type: "Adam" base_lr: 0.01 momentum: 0.9' if rule == "Adam" else ""
    s = get_solver(dsd_param(tmp_path, MAG, extra))
    assert type(s) is DSDSolver and s.rule.name == rule
    rec = Recorder()
    s.add_hook(rec)
    s.step(4)
    dense_weights = {n: s.net.layer_dict[n].module.weight.detach().clone()
                     for n in s.prune_layers}
    s.step(4)
    assert [p for _, p in rec.phases] == ["dense"] * 4 + ["sparse"] * 4
    # Magnitude masks of the weights at the start of Sparse, 50% per layer.
    for name, (pruned, total) in s.prune_stats.items():
        assert pruned == int(0.5 * total + 0.5)
        keep = pruning.magnitude_mask(dense_weights[name], 0.5)
        assert torch.equal(keep, s.masks[name])
    # Pruned weights and their history stay exactly zero after every Sparse update, and the
    # display-time check (before the final re-zeroing) finds none revived by the update rule.
    assert [it for it, _, _ in rec.after] == [5, 6, 7, 8]
    assert all(bad == 0 and nz == 0 for _, bad, nz in rec.after)
    pruned_before = {n: ~m for n, m in s.masks.items()}
    s.step(4)
    assert [p for _, p in rec.phases][8:] == ["redense"] * 4
    assert s.masks == {}
    base = np.float32(0.01 if rule == "Adam" else 0.05)
    assert rec.lrs[0] == pytest.approx(float(base))
    assert rec.lrs[-1] == pytest.approx(float(base) * 0.1, rel=1e-6)
    revived = sum(int((s.net.layer_dict[n].module.weight.detach()[m] != 0).sum())
                  for n, m in pruned_before.items())
    assert revived > 0  # trainable again in re-Dense


def test_weight_decay_alone_cannot_revive(tmp_path):
    # A huge weight decay and momentum 0.99: a pruned entry would move at once if the gradient,
    # update or history masking leaked.
    s = get_solver(dsd_param(tmp_path, "dense_iter: 0 sparse_iter: 5 redense_iter: 0 "
                             "prune_by: MAGNITUDE sparsity: 0.7", "weight_decay: 5 momentum: 0.99",
                             max_iter=5))
    rec = Recorder()
    s.add_hook(rec)
    s.step(5)
    assert len(rec.after) == 5 and all(b == 0 and nz == 0 for _, b, nz in rec.after)


# ---------------------------------------------------------------------------------------------
# support pruning on a hand-built case
# ---------------------------------------------------------------------------------------------
HAND_NET = """
name: "Hand"
layer { name: "mnist" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00390625 }
  data_param { source: "%(train)s" batch_size: 64 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 5 stride: 2 bias_term: false } }
layer { name: "thr1" type: "HardThreshold" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 4 bias_term: false } }
layer { name: "thr2" type: "HardThreshold" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 bias_term: false } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
""" % {"train": DATA / "mnist_train_lmdb"}


def test_support_pruning_prunes_exactly_the_channels_without_support(tmp_path):
    s = get_solver(dsd_param(tmp_path, "dense_iter: 0 sparse_iter: 2 redense_iter: 0", BATCH,
                             net=HAND_NET, max_iter=2))
    assert type(s) is SupportDSDSolver and s.prune_layers == ["conv1", "ip1", "ip2"]
    w = {n: s.net.layer_dict[n].module.weight for n in s.prune_layers}
    with torch.no_grad():
        w["conv1"].copy_(torch.rand_like(w["conv1"]) + 0.01)
        w["conv1"][2] *= -1  # pixels >= 0: channel 2 is never above beta = 0
        w["ip1"].copy_(torch.rand_like(w["ip1"]) + 0.01)
        w["ip1"][[1, 3]] *= -1  # inputs >= 0: units 1 and 3 never on
        w["ip2"].copy_(torch.randn_like(w["ip2"]))
    s.step(1)
    assert s.channel_support["thr1"].tolist() == [True, True, False]
    assert s.channel_support["thr2"].tolist() == [True, False, True, False]
    keep = s.masks
    expect_conv = torch.ones(3, 1, 5, 5, dtype=torch.bool)
    expect_conv[2] = False
    assert torch.equal(keep["conv1"], expect_conv)
    expect_ip1 = torch.ones(4, 3 * 36, dtype=torch.bool)  # pool1 is 3 x 6 x 6, channel-major
    expect_ip1[[1, 3]] = False
    expect_ip1[:, 72:] = False
    assert torch.equal(keep["ip1"], expect_ip1)
    expect_ip2 = torch.ones(10, 4, dtype=torch.bool)
    expect_ip2[:, [1, 3]] = False
    assert torch.equal(keep["ip2"], expect_ip2)
    assert s.prune_stats["ip1"] == (int((~expect_ip1).sum()), 4 * 108)
    assert all(bool((w[n].detach()[~keep[n]] == 0).all()) for n in keep)


# ---------------------------------------------------------------------------------------------
# snapshot / resume in the middle of Sparse
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dsd,extra", [
    ("dense_iter: 2 sparse_iter: 6 redense_iter: 4 prune_by: MAGNITUDE sparsity: 0.4", ""),
    ("dense_iter: 2 sparse_iter: 6 redense_iter: 4 prune_by: SUPPORT", BATCH)])
def test_resume_in_sparse_is_bit_exact(tmp_path, dsd, extra):
    straight = get_solver(dsd_param(tmp_path / "a", dsd, extra + " display: 0"))
    straight.step(12)
    first = get_solver(dsd_param(tmp_path / "b", dsd, extra + " display: 0"))
    (tmp_path / "b").mkdir()
    first.step(5)
    assert first.dsd_phase == "sparse"
    _, state = first.snapshot()
    assert (tmp_path / "b" / "tiny_iter_5.dsdmask").is_file()
    resumed = get_solver(dsd_param(tmp_path / "b", dsd, extra + " display: 0"))
    resumed.restore(state)
    assert resumed.dsd_phase == "sparse"
    assert all(torch.equal(resumed.masks[n], first.masks[n]) for n in first.masks)
    resumed.step(7)
    for name in straight.net.layer_dict:
        for a, b in zip(straight.net.layer_dict[name].module.blobs,
                        resumed.net.layer_dict[name].module.blobs):
            assert torch.equal(a, b), name
    assert straight.dsd_phase == resumed.dsd_phase == "redense"
    assert resumed.param.base_lr == straight.param.base_lr


# ---------------------------------------------------------------------------------------------
# bad configurations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dsd,extra,net,words", [
    (SUP, BATCH, RELU_NET % {"train": DATA / "mnist_train_lmdb"},
     ["no", "HardThreshold", "convert_relu"]),
    (SUP, "", None, ["alternation_param { mode: BATCH }"]),
    (SUP + " sparsity: 0.3", BATCH, None, ["no sparsity"]),
    (MAG + " layer: 'nope'", "", None, ["'nope'"]),
    (MAG + " layer: 'thr1'", "", None, ["'thr1'", "no weights"]),
    ("dense_iter: 4 sparse_iter: 4 redense_iter: 4 prune_by: MAGNITUDE sparsity: 1", "", None,
     ["outside [0, 1)"]),
    ("dense_iter: 4 sparse_iter: 4 redense_iter: 4 prune_by: MAGNITUDE sparsity: 0.1 "
     "sparsity: 0.2", "", None, ["2 sparsity values for 3"]),
    ("dense_iter: 4 sparse_iter: 4 redense_iter: 3 prune_by: MAGNITUDE sparsity: 0.1", "", None,
     ["max_iter is 12", "= 11"]),
    ("dense_iter: 4 sparse_iter: 0 redense_iter: 8 prune_by: MAGNITUDE sparsity: 0.1", "", None,
     ["sparse_iter must be > 0"]),
    ("dense_iter: 4 sparse_iter: 8 redense_iter: 0 prune_by: MAGNITUDE", "", None,
     ["needs a sparsity"]),
    (MAG, 'type: "Alternation"', None, ["names the update rule"]),
])
def test_bad_configurations(tmp_path, dsd, extra, net, words):
    p = dsd_param(tmp_path, dsd, extra, net=net)
    with pytest.raises(SolverError) as e:
        get_solver(p)
    text = str(e.value)
    for w in words:
        assert w in text, text


def test_plain_solver_refuses_dsd_param(tmp_path):
    with pytest.raises(SolverError, match="get_solver"):
        Solver(dsd_param(tmp_path, MAG))
