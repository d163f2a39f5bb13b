"""Mixed precision: the loss-scaling rule, unscaling, and BF16/FP16 solvers on the CPU."""
import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt.errors import SolverError
from pycaffe_alt.mixed_precision import next_scale, unscale_

NET = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 8 dim: 2 dim: 6 dim: 6 } shape { dim: 8 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def solver(tmp_path, extra=""):
    (tmp_path / "net.prototxt").write_text(NET)
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nmomentum: 0.9\n'
                    f'lr_policy: "fixed"\nmax_iter: 10\nrandom_seed: 3\nsolver_mode: CPU\n{extra}\n')
    return caffe.get_solver(str(path))


def test_next_scale_halves_on_overflow_and_doubles_after_a_clean_window():
    assert next_scale(1024.0, 5, True, 3) == (512.0, 0)
    assert next_scale(1024.0, 0, False, 3) == (1024.0, 1)
    assert next_scale(1024.0, 2, False, 3) == (2048.0, 0)
    assert next_scale(1.0, 0, True, 3) == (1.0, 0)  # never below 1


def test_unscale_divides_in_place_and_reports_overflow():
    a, b = torch.tensor([2.0, 4.0]), torch.tensor([[8.0]])
    assert unscale_([a, b], 2.0)
    assert a.tolist() == [1.0, 2.0] and b.item() == 4.0
    assert not unscale_([torch.tensor([1.0, float("inf")])], 4.0)
    assert not unscale_([torch.tensor([float("nan")])], 1.0)


def test_bf16_training_keeps_float32_weights_and_history_and_tracks_fp32(tmp_path):
    ref = solver(tmp_path)
    ref.step(5)  # DummyData draws from the seeded stream: one solver after the other
    bf = solver(tmp_path, "precision: BF16")
    bf.step(5)
    assert bf.precision.enabled and not ref.precision.enabled
    for p in bf.net.parameters():
        assert p.dtype == torch.float32
    assert all(h.dtype == torch.float32 for h in bf.history)
    for name in ("conv", "ip"):
        a, b = ref.net.params[name][0].data, bf.net.params[name][0].data
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()  # bf16: ~3 significant digits


def test_fp16_overflow_skips_the_update_and_halves_the_scale(tmp_path):
    s = solver(tmp_path, "precision: FP16\nloss_scale: 3e38\nloss_scale_window: 2")
    before = s.net.params["ip"][0].data.copy()
    s.step(1)
    assert s.iter == 1
    np.testing.assert_array_equal(s.net.params["ip"][0].data, before)  # skipped
    assert s.precision.scale == pytest.approx(1.5e38)
    assert all(float(h.abs().sum()) == 0.0 for h in s.history)  # history untouched


def test_fp16_clean_steps_update_and_grow_the_scale(tmp_path):
    s = solver(tmp_path, "precision: FP16\nloss_scale: 64\nloss_scale_window: 2")
    before = s.net.params["ip"][0].data.copy()
    s.step(2)
    assert not np.array_equal(s.net.params["ip"][0].data, before)
    assert s.precision.scale == 128.0


def test_bad_loss_scale_is_refused(tmp_path):
    with pytest.raises(SolverError, match="loss_scale"):
        solver(tmp_path, "precision: FP16\nloss_scale: 0.5")
