"""Caffe's fillers: the distributions and exact kernels of filler.hpp."""
import math

import numpy as np
import pytest
import torch

from pycaffe_alt.errors import UnknownTypeError
from pycaffe_alt.fillers import fill
from pycaffe_alt.proto import caffe_pb2


def filled(shape, **kw):
    t = torch.empty(shape)
    return fill(t, caffe_pb2.FillerParameter(**kw))


def test_constant_default_is_zero_and_value():
    assert torch.all(filled((3, 4)) == 0)
    assert torch.all(filled((3, 4), type="constant", value=0.25) == 0.25)


def test_uniform_range():
    t = filled((200, 50), type="uniform", min=-0.3, max=0.7)
    assert t.min() >= -0.3 and t.max() <= 0.7 and abs(float(t.mean()) - 0.2) < 0.02


def test_gaussian_and_sparse():
    t = filled((400, 100), type="gaussian", mean=1.0, std=0.5)
    assert abs(float(t.mean()) - 1.0) < 0.02 and abs(float(t.std()) - 0.5) < 0.02
    # sparse: each weight kept with probability sparse / num_outputs (shape[0]).
    s = filled((100, 400), type="gaussian", std=1.0, sparse=20)
    kept = float((s != 0).float().mean())
    assert abs(kept - 0.2) < 0.02


def test_positive_unitball_rows_sum_to_one():
    t = filled((5, 3, 2, 2), type="positive_unitball")
    assert torch.all(t >= 0)
    np.testing.assert_allclose(t.view(5, -1).sum(1).numpy(), np.ones(5), rtol=1e-5)


@pytest.mark.parametrize("norm,n", [(0, 3 * 3 * 3), (1, 64 * 3 * 3), (2, (27 + 576) / 2)])
def test_xavier_bound_follows_variance_norm(norm, n):
    t = filled((64, 3, 3, 3), type="xavier", variance_norm=norm)
    bound = math.sqrt(3.0 / n)
    assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.9 * bound


@pytest.mark.parametrize("norm,n", [(0, 16 * 9), (1, 256 * 9)])
def test_msra_std_follows_variance_norm(norm, n):
    t = filled((256, 16, 3, 3), type="msra", variance_norm=norm)
    assert abs(float(t.std()) - math.sqrt(2.0 / n)) < 0.05 * math.sqrt(2.0 / n)


def test_bilinear_kernel_is_caffes_upsampling_kernel():
    t = filled((2, 1, 4, 4), type="bilinear")
    # f = ceil(4/2) = 2, c = (w - 1) / (2f) = 0.75: weights (1 - |x/f - c|) per axis.
    axis = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(t[0, 0].numpy(), np.outer(axis, axis), rtol=1e-6)
    assert torch.equal(t[0], t[1])
    # The reference Caffe's c = (2f - 1 - f % 2) / (2f): w = 3 has f = 2, c = 0.75, so the
    # kernel sits off centre (BVLC master's later (w - 1) / (2f) = 0.5 would centre it) ...
    odd = np.array([0.25, 0.75, 0.75])
    np.testing.assert_allclose(filled((1, 1, 3, 3), type="bilinear")[0, 0].numpy(),
                               np.outer(odd, odd), rtol=1e-6)
    # ... while w = 5 (f = 3, c = 2/3) is centred under both formulas.
    five = np.array([1, 2, 3, 2, 1]) / 3.0
    np.testing.assert_allclose(filled((1, 1, 5, 5), type="bilinear")[0, 0].numpy(),
                               np.outer(five, five), rtol=1e-6)


def test_unknown_filler_lists_known_ones():
    with pytest.raises(UnknownTypeError, match="xavier"):
        filled((2, 2), type="glorot")


@pytest.mark.parametrize("bounds", [dict(min=1, max=-1), dict(min=float("nan"), max=1),
                                    dict(min=float("-inf"), max=float("inf")),
                                    dict(min=-3e38, max=3e38)])
def test_uniform_bounds_caffe_refuses_are_refused_not_looped_on(bounds):
    # Every draw fell outside [min, max] and the rejection loop never ended (a hang).
    from pycaffe_alt.fillers import FillerError
    with pytest.raises(FillerError, match="finite min <= max"):
        filled((3, 4), type="uniform", **bounds)


@pytest.mark.parametrize("kw,match", [
    (dict(type="bilinear"), "4-axis blob with a square kernel"),
    (dict(type="gaussian", sparse=-2), "sparse -2"),
    (dict(type="xavier", sparse=3), "sparse 3"),
])
def test_filler_checks_of_caffes_filler_hpp(kw, match):
    from pycaffe_alt.fillers import FillerError
    with pytest.raises(FillerError, match=match):
        filled((4, 3), **kw)
    with pytest.raises(FillerError, match="square"):
        filled((2, 2, 3, 4), type="bilinear")


def test_a_bad_filler_names_the_file_and_layer(tmp_path):
    import pycaffe_alt as caffe
    from pycaffe_alt.errors import CaffeError
    path = tmp_path / "net.prototxt"
    for body in ('layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param '
                 '{ num_output: 2 weight_filler { type: "uniform" min: 1 max: -1 } } }',
                 'layer { name: "d2" type: "DummyData" top: "z" dummy_data_param { shape { dim: 2 } '
                 'data_filler { type: "uniform" min: 5 max: 1 } } }'):
        path.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                        + body)
        with pytest.raises(CaffeError) as info:
            caffe.Net(str(path), caffe.TEST)
        assert str(info.value).startswith(f"{path}: layer '") and "finite min <= max" in str(info.value)
