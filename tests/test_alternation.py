"""The alternation solver: warm-up switch, I-alternation (support pass, stored supports, weight
step), B-alternation, MaskT, the phase-switch log lines and bad configurations."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from alternation_case import DATA, RELU_NET, TRAIN_RECORDS, solver_param
from pycaffe_alt.alternation.mask_store import MaskStore
from pycaffe_alt.alternation.rules import batch_support, batch_support_sums, changed_fraction
from pycaffe_alt.alternation.solver import AlternationSolver
from pycaffe_alt.alternation.support_pass import BatchSupport, hard_threshold_layers
from pycaffe_alt.errors import SolverError
from pycaffe_alt.solver.solver import Solver, get_solver

I_ALT = 'mode: INSTANCE base_type: "SGD" warmup_iter: 3 gap_iter: 5'


class CountingStore(MaskStore):
    """Records which indices every put() received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.puts = []

    def put(self, layer_or_all, indices, masks):
        self.puts.append(np.asarray(indices).copy())
        return super().put(layer_or_all, indices, masks)


class CountingSolver(AlternationSolver):
    def _new_store(self):
        store = super()._new_store()
        return CountingStore(store.layout, store.num_records, path=store.path,
                             max_ram_bytes=store.max_ram_bytes)


def modes(net):
    return {n: l.mode for n, l in hard_threshold_layers(net)}


def test_warmup_runs_relu_bias_then_switches_to_threshold(tmp_path, caplog):
    s = AlternationSolver(solver_param(tmp_path, I_ALT))
    assert s.phase == "warmup" and s.mode == "INSTANCE" and s.store is None
    assert s.records == TRAIN_RECORDS and s.iters_per_epoch == TRAIN_RECORDS / 16
    assert set(modes(s.net).values()) == {"RELU_BIAS"}
    assert set(modes(s.test_nets[0]).values()) == {"RELU_BIAS"}
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        s.step(3)
        assert s.phase == "warmup" and s.support_steps == 0
        s.step(1)
    assert set(modes(s.net).values()) == {"THRESHOLD"}
    assert set(modes(s.test_nets[0]).values()) == {"THRESHOLD"}
    assert s.phase == "weights" and s.support_steps == 1 and s.last_support_iter == 3
    text = caplog.text
    assert "Iteration 3, alternation: warm-up done, HardThreshold layers switched to THRESHOLD " \
           "mode (thr1, thr2)" in text
    assert "Iteration 3, alternation: weight step with fixed supports" in text


def test_warmup_epochs_count_records_of_the_train_source(tmp_path):
    s = AlternationSolver(solver_param(tmp_path, "warmup_epochs: 0.5 gap_epochs: 1",
                                       extra="iter_size: 2"))
    # 512 records / (16 * 2) = 16 iterations per epoch.
    assert s.iters_per_epoch == 16 and s.warmup_iters == 8 and s.gap_iters == 16


def test_support_step_stores_every_record_once_and_matches_thresholding(tmp_path):
    s = CountingSolver(solver_param(tmp_path, I_ALT + " support_batch_size: 24"))
    s.step(4)  # warm-up, then support step 1
    puts = np.concatenate(s.store.puts)
    assert sorted(puts.tolist()) == list(range(TRAIN_RECORDS))  # each record exactly once
    assert s.store.filled.all()
    assert s.store.layout == [("thr1", (4, 12, 12)), ("thr2", (16,))]
    # A second support step (now, with the current weights) puts every record once more.
    s.store.puts.clear()
    stats = s.support_step()
    assert sorted(np.concatenate(s.store.puts).tolist()) == list(range(TRAIN_RECORDS))
    assert stats["records"] == TRAIN_RECORDS and stats["batches"] == 22  # ceil(512 / 24)
    assert stats["store_bytes"] == s.store.nbytes
    # The stored supports are the net's own eq. 12 supports (TEST-style transform: same here).
    idx = torch.arange(40, 72)
    stored = s.store.get(idx)
    from pycaffe_alt.layers.data import DbSource
    src = DbSource(str(DATA / "mnist_train_lmdb"), "lmdb", False, False, "test")
    data = torch.from_numpy(np.stack([src.load(int(i))[0] for i in idx]).astype(np.float32)
                            * np.float32(0.00390625))
    got = {}
    hts = hard_threshold_layers(s.net)
    for name, ht in hts:
        ht.record_support = (lambda n: lambda m: got.__setitem__(n, m))(name)
        ht.fixed_support = None
    with torch.no_grad():
        s.net.run({"data": data, "label": torch.zeros(len(idx))}, start=1)
    for name, ht in hts:
        ht.record_support = None
        assert torch.equal(got[name], stored[name]), name


def test_fixed_supports_make_the_net_linear_in_one_layers_weights(tmp_path):
    s = AlternationSolver(solver_param(tmp_path, I_ALT))
    s.step(6)  # into the weight step
    assert s.phase == "weights"
    net = s.net
    data_layer = net.layer_modules["mnist"]
    data_layer.last_indices = torch.arange(100, 116)
    data_layer.last_mirrored = None
    batch = torch.rand(16, 1, 28, 28)
    conv = net.layer_modules["conv1"]

    def out():
        with torch.no_grad():
            return net.run({"data": batch, "label": torch.zeros(16)}, start=1)["ip2"].clone()

    f1 = out()
    with torch.no_grad():
        conv.weight.mul_(2)
    f2 = out()
    assert torch.equal(f2, 2 * f1)  # with fixed supports the output is linear in W1
    # Control: thresholding (supports follow the weights) is not linear in W1.
    for _, ht in hard_threshold_layers(net):
        ht.fixed_support = None
    g2 = out()
    with torch.no_grad():
        conv.weight.div_(2)
    g1 = out()
    assert not torch.equal(g2, 2 * g1)


def test_mirrored_samples_get_mirrored_spatial_supports(tmp_path):
    s = AlternationSolver(solver_param(tmp_path, I_ALT, mirror=True))
    s.step(5)
    layer = s.net.layer_modules["mnist"]
    assert layer.last_mirrored is not None and layer.last_mirrored.dtype == torch.bool
    idx = torch.arange(16)
    layer.last_indices = idx
    layer.last_mirrored = torch.tensor([True, False] * 8)
    plain = s.store.get(idx)
    given = s._stored.masks()
    assert torch.equal(given["thr1"][0], plain["thr1"][0].flip(-1))
    assert torch.equal(given["thr1"][1], plain["thr1"][1])
    assert torch.equal(given["thr2"], plain["thr2"])  # (N, C) supports are not flipped


def test_stored_masks_come_in_the_activations_layout(tmp_path):
    # A mask in another layout than the activations it multiplies is transposed every batch
    # (inside a compiled graph too); the store's NCHW rows are laid out like the activations.
    s = AlternationSolver(solver_param(tmp_path, I_ALT))
    s.step(5)
    assert s.net.memory_format is torch.channels_last  # "auto" on the CPU: a conv net
    given = s._stored.masks()
    assert given["thr1"].stride() == torch.empty(given["thr1"].shape,
                                                 memory_format=torch.channels_last).stride()
    assert given["thr2"].dim() == 2
    plain = s.store.get(s.net.batch_indices)
    assert torch.equal(given["thr1"], plain["thr1"])  # same values, other layout


def test_changed_fraction_log_line(tmp_path, caplog):
    s = AlternationSolver(solver_param(tmp_path, I_ALT))
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        s.step(4)
        before = s.store.rows.copy()
        s.step(5)  # the gap ends at iteration 8: support step 2
    assert s.support_steps == 2
    line = [r.getMessage() for r in caplog.records if "support step 2 (I)" in r.getMessage()][0]
    m = re.fullmatch(r"Iteration 8, alternation: support step 2 \(I\), [\d.]+ s, support bits "
                     r"changed ([\d.]+)% \(thr1 ([\d.]+)%, thr2 ([\d.]+)%\); mask store "
                     r"[\d.]+ MiB", line)
    assert m, line
    total = s.store.total_units * TRAIN_RECORDS
    expected = changed_fraction(before, s.store.rows, total)
    assert s.last_support_stats["changed_overall"] == pytest.approx(expected)
    assert float(m.group(1)) == pytest.approx(100 * expected, abs=0.006)
    assert 0 < expected < 1
    first = [r.getMessage() for r in caplog.records if "support step 1 (I)" in r.getMessage()][0]
    assert "first supports" in first


def test_patience_ends_a_weight_step(tmp_path):
    # No gap: only patience (windows of 1 iteration, any loss that does not drop by 1e9 is
    # "no improvement") ends the weight step.
    s = AlternationSolver(solver_param(
        tmp_path, 'warmup_iter: 1 gap_iter: 0 gap_epochs: 0 patience: 2 min_improvement: 1e9',
        extra="display: 1"))
    s.step(2)
    assert s.support_steps == 1 and s.best_loss is not None
    s.step(2)  # windows 2 and 3 do not improve: support step at iteration 4
    assert s.phase == "support"
    s.step(1)
    assert s.support_steps == 2 and s.last_support_iter == 4


def test_batch_alternation(tmp_path):
    s = AlternationSolver(solver_param(tmp_path, 'mode: BATCH warmup_iter: 2 support_beta: 0.01'))
    calls = []
    s.reduce_sums = lambda stats: (calls.append(stats.shape), stats * 2)[1]
    s.step(2)
    assert s.phase == "warmup" and not calls
    s.step(3)
    assert s.phase == "weights" and s.store is None
    assert len(calls) == 3 * 2  # one reduction per HardThreshold layer per iteration
    assert calls[0] == (4 * 12 * 12 + 1,)  # the sums and the example count
    sup = s.last_batch_supports
    assert sup["thr1"].shape == (4, 12, 12) and sup["thr2"].shape == (16,)
    with pytest.raises(SolverError, match="B-alternation"):
        s.support_step()
    # The layer applies one mask for the whole batch: eq. 41 of its own thresholded signal.
    ht = dict(hard_threshold_layers(s.net))["thr2"]
    q = torch.randn(8, 16)
    z = ht(q)
    x = torch.where(q > ht.beta, q, torch.zeros(()))
    m = batch_support(batch_support_sums(x), 0.01 * 8)
    assert torch.equal(z, q * m)
    assert np.isfinite(s.smoother.value())


def test_batch_support_beta_is_per_example():
    from pycaffe_alt.layers.support import HardThreshold  # noqa: F401 - registered layer
    from layer_check import make_layer
    ht = make_layer('type: "HardThreshold"', [(4, 3)], "TRAIN")
    q = torch.tensor([[1.0, 0.1, -1.0]] * 4)
    # mean x^2 per unit = [1, 0.01, 0]; beta per example 0.05 keeps unit 0 only, for any N.
    assert BatchSupport(ht, "t", 0.05)(q).tolist() == [[True, False, False]]
    assert BatchSupport(ht, "t", 0.05)(q[:2]).tolist() == [[True, False, False]]


def test_maskt_testing(tmp_path, caplog):
    s = AlternationSolver(solver_param(tmp_path, I_ALT + " test_with_masks: true"))
    s.step(6)
    net = s.test_nets[0]
    before = net.layer_modules["mnist"].state()
    plain = s.test(0, masked=False)
    after_plain = net.layer_modules["mnist"].state()
    net.layer_modules["mnist"].load_state(before)
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        both = s.test(0)
    # Same batches as a plain test, and the cursor ends where a plain test leaves it.
    assert net.layer_modules["mnist"].state() == after_plain
    assert both["accuracy"] == plain["accuracy"]
    assert "accuracy (MaskT)" in both
    assert re.search(r"Test net output #0 \(MaskT\): accuracy = [\d.]+", caplog.text)
    assert re.search(r"Test net output #0: accuracy = [\d.]+", caplog.text)
    # MaskT really applies masks: one support for the whole test batch, not thresholding.
    net.layer_modules["mnist"].load_state(before)
    masked = s.test(0, masked=True)
    assert set(masked) == {"accuracy", "loss"}
    assert masked["accuracy"] == both["accuracy (MaskT)"]
    assert masked["loss"] != plain["loss"]
    assert all(ht.fixed_support is None for _, ht in hard_threshold_layers(net))


def test_get_solver_picks_the_alternation_solver(tmp_path):
    from google.protobuf import text_format
    p = solver_param(tmp_path, I_ALT)
    path = tmp_path / "solver.prototxt"
    path.write_text(text_format.MessageToString(p))
    assert type(get_solver(str(path))) is AlternationSolver
    assert type(get_solver(p)) is AlternationSolver
    with pytest.raises(SolverError, match="get_solver"):
        Solver(p)


def test_unknown_base_type(tmp_path):
    with pytest.raises(SolverError, match='base_type "Adamax" is not a known update rule'):
        AlternationSolver(solver_param(tmp_path, 'base_type: "Adamax"'))


def test_other_base_rules_work(tmp_path):
    s = AlternationSolver(solver_param(tmp_path, 'base_type: "Adam" warmup_iter: 1 gap_iter: 2',
                                       extra="momentum2: 0.999"))
    s.step(3)
    assert s.type == "Alternation" and len(s.history) == 2 * len(s._datas)


def test_net_without_hard_threshold(tmp_path):
    p = solver_param(tmp_path, I_ALT, net=RELU_NET % {"train": DATA / "mnist_train_lmdb"},
                     extra="")
    p.ClearField("test_iter")
    p.net = str(tmp_path / "relu_net.prototxt")
    from google.protobuf import text_format
    (tmp_path / "relu_net.prototxt").write_text(text_format.MessageToString(p.net_param))
    p.ClearField("net_param")
    with pytest.raises(SolverError) as e:
        AlternationSolver(p)
    msg = str(e.value)
    assert "relu_net.prototxt has no HardThreshold layer" in msg and "tools/convert_relu" in msg


def test_instance_mode_needs_an_end_to_its_weight_steps(tmp_path):
    with pytest.raises(SolverError, match="gap"):
        AlternationSolver(solver_param(tmp_path, "gap_iter: 0 gap_epochs: 0"))
