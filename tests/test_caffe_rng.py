"""Caffe's random stream (pycaffe_alt/caffe_rng.py) and the fillers that follow it."""
import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt import caffe_rng
from pycaffe_alt.caffe_rng import CaffeRNG
from pycaffe_alt.fillers import fill
from pycaffe_alt.proto import caffe_pb2


def test_the_stream_is_mt19937_seeded_like_boost():
    # Published values of the standard mt19937 (which boost::mt19937 is): the default seed
    # 5489 gives 3499211612 first, and 4123659995 as the 10000th output (C++ [rand.predef]).
    rng = CaffeRNG(5489)
    first = rng.raw(10000)
    assert first[0] == 3499211612 and first[-1] == 4123659995
    assert CaffeRNG(2**32 + 5489).raw(1)[0] == 3499211612  # Caffe's seed is an unsigned int


class Scripted(CaffeRNG):
    """A stream that returns given 32-bit draws."""

    def __init__(self, draws):
        super().__init__(0)
        self.draws = list(draws)

    def raw(self, n):
        out, self.draws = self.draws[:n], self.draws[n:]
        return np.array(out, dtype=np.uint32)


def test_uniform_is_boosts_formula_and_redraws_at_the_top():
    # float(u) / 2^32 * (b' - a) + a in float32, b' = nextafter(b); 0xFFFFFFFF rounds to 2^32,
    # which gives b' itself: boost rejects it and the next draw takes its place.
    rng = Scripted([0xFFFFFFFF, 0, 1 << 31, 3 << 30])
    values = rng.uniform(3, 0.0, 1.0)
    assert values.dtype == np.float32
    top = np.nextafter(np.float32(1), np.float32(2))  # the span is b' - a, a hair above 1
    np.testing.assert_array_equal(values, np.float32([0.0, 0.5, 0.75]) * top)
    assert rng.draws == []


def test_uniform_values_lie_in_the_closed_interval():
    values = CaffeRNG(7).uniform(100000, -0.25, 0.5)
    assert values.min() >= -0.25 and values.max() <= 0.5
    assert abs(float(values.mean()) - 0.125) < 0.005


def filler(kind, **fields):
    p = caffe_pb2.FillerParameter(type=kind)
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def test_fillers_take_caffes_values():
    caffe_rng.seed(3)
    w = fill(torch.empty(4, 3, 2, 2), filler("xavier"))
    rng = CaffeRNG(3)
    scale = np.sqrt(np.float32(3) / np.float32(12))
    np.testing.assert_array_equal(w.numpy().ravel(), rng.uniform(48, -scale, scale))
    u = fill(torch.empty(5), filler("uniform", min=-2.0, max=3.0))
    np.testing.assert_array_equal(u.numpy(), rng.uniform(5, -2.0, 3.0))
    b = fill(torch.empty(2, 3), filler("positive_unitball"))
    raw = rng.uniform(6, 0.0, 1.0).reshape(2, 3)
    np.testing.assert_array_equal(b.numpy(), raw / np.cumsum(raw, axis=1, dtype=np.float32)[:, -1:])
    np.testing.assert_allclose(b.numpy().sum(axis=1), 1.0, rtol=1e-6)


NET = """
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ {transform} }} data_param {{ source: "{source}" batch_size: 2 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
"""


@pytest.mark.parametrize("transform, draws", [("scale: 0.5", 2), ("mirror: true", 4)])
def test_data_layers_take_caffes_setup_draws(tmp_path, transform, draws):
    """A Data layer uses up Caffe's set-up draws (reader and prefetch thread seeds, plus two
    transformer seeds when it mirrors or crops) before the next layer's filler draws."""
    from pycaffe_alt.data.datum import array_to_datum
    from pycaffe_alt.data.db import open_db

    with open_db(str(tmp_path / "db"), "lmdb", "w") as db:
        for i in range(4):
            db.put(f"{i:08d}", array_to_datum(np.full((1, 2, 2), i, np.uint8), i).SerializeToString())
    path = tmp_path / "net.prototxt"
    path.write_text(NET.format(transform=transform, source=tmp_path / "db"))
    caffe.set_random_seed(11)
    net = caffe.Net(str(path), caffe.TRAIN)
    rng = CaffeRNG(11)
    rng.skip(draws)
    scale = np.sqrt(np.float32(3) / np.float32(4))
    np.testing.assert_array_equal(net.params["ip"][0].data.ravel(), rng.uniform(12, -scale, scale))


def test_same_seed_same_net_different_seed_other_weights(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 5 } } }\n'
                    'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
                    'inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }\n')
    weights = []
    for seed in (5, 5, 6):
        caffe.set_random_seed(seed)
        weights.append(caffe.Net(str(path), caffe.TEST).params["ip"][0].data.copy())
    assert np.array_equal(weights[0], weights[1]) and not np.array_equal(weights[0], weights[2])


def test_draws_equal_boosts():
    """What boost 1.85 itself draws for Caffe's calls (fixtures/boost_rng, made by real boost)."""
    from pathlib import Path

    ref = (Path(__file__).parent / "fixtures" / "boost_rng" / "mt19937_seed5.txt").read_text().split()
    rng = CaffeRNG(5)
    np.testing.assert_array_equal(rng.uniform(300, -0.3, 0.3), np.float32(ref[:300]))
    rng.skip(300)  # the reference's 300 bernoulli draws take one raw draw each
    assert rng.raw(5).tolist() == [int(v) for v in ref[600:]]


def test_set_random_seed_takes_any_integer_form():
    import numpy as np
    import torch

    import pycaffe_alt as caffe
    from pycaffe_alt import caffe_rng

    for seed in (np.array(3), torch.tensor(3), np.int64(3), 3):
        caffe.set_random_seed(seed)
        assert caffe_rng.stream().raw(1)[0] == caffe_rng.CaffeRNG(3).raw(1)[0]
    for bad in (True, 2.5, -1, "3"):
        with pytest.raises(TypeError):
            caffe.set_random_seed(bad)


BOOST_RNG = __import__("pathlib").Path(__file__).parent / "fixtures" / "boost_rng"


def _bits(values):
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def test_gaussian_draws_equal_boosts_normal_distribution():
    """caffe_rng_gaussian<float> and caffe_rng_bernoulli<float> as boost (>= 1.64) draws them
    (fixtures/boost_rng/normal_reference.cpp); both seeds' runs include tail samples, whose
    extra draws would shift everything after them."""
    lines = (BOOST_RNG / "normal_seeds_1_42.txt").read_text().split()
    per_seed = 2000 + 200 + 200 + 3
    for k, seed in enumerate((1, 42)):
        ref = lines[k * per_seed:(k + 1) * per_seed]
        rng = CaffeRNG(seed)
        assert _bits(rng.gaussian(2000, 0.0, 1.0)).tolist() == [int(h, 16) for h in ref[:2000]]
        assert _bits(rng.gaussian(200, 0.5, 0.01)).tolist() == [int(h, 16) for h in ref[2000:2200]]
        assert rng.bernoulli_float(200, 0.2).astype(int).tolist() == [int(v) for v in ref[2200:2400]]
        assert rng.raw(3).tolist() == [int(v) for v in ref[2400:]]


def test_a_long_gaussian_run_equals_boosts_and_uses_its_draws():
    import hashlib

    ref = dict(line.split() for line in
               (BOOST_RNG / "normal_seed1701_200000.txt").read_text().splitlines())
    rng = CaffeRNG(1701)
    values = rng.gaussian(200000, 0.0, 1.0)
    assert hashlib.sha256(values.astype("<f4").tobytes()).hexdigest() == ref["sha256"]
    assert rng.raw(1)[0] == int(ref["next_raw"])


@pytest.mark.parametrize("seed", [0, 3, 99, 2024])
def test_vectorized_ziggurat_equals_the_scalar_reference(seed):
    from pycaffe_alt.boost_random import ziggurat

    raw = CaffeRNG(seed).raw(21000)
    values, used = ziggurat.unit_normals(raw, 20000)
    pos, ref = 0, []
    for _ in range(20000):
        v, pos = ziggurat.unit_normal_at(raw, pos)
        ref.append(v)
    assert used == pos
    assert _bits(values).tolist() == _bits(ref).tolist()


def test_a_short_buffer_asks_for_more_draws_and_gaussian_supplies_them():
    from pycaffe_alt.boost_random import ziggurat

    raw = CaffeRNG(42).raw(64)
    need = next(n for n in range(1, 64)
                if ziggurat.unit_normals(raw, n)[1] > n)  # a value that took 2+ draws
    with pytest.raises(ziggurat.NeedMoreDraws):
        ziggurat.unit_normals(raw[:need], need)
    # CaffeRNG.gaussian starts with a margin of draws; with many slow values it asks again.
    a = CaffeRNG(42).gaussian(need, 0, 1)
    assert _bits(a).tolist() == _bits(ziggurat.unit_normals(raw, need)[0]).tolist()


def test_gaussian_msra_and_sparse_fillers_draw_caffes_values():
    caffe_rng.seed(42)
    t = fill(torch.empty(10, 200), caffe_pb2.FillerParameter(type="gaussian", std=1.0))
    lines = (BOOST_RNG / "normal_seeds_1_42.txt").read_text().split()
    assert _bits(t.numpy()).ravel().tolist() == [int(h, 16) for h in lines[2403:4403]]
    # msra: std = sqrt(Dtype(2) / fan_in) in float, the same draws.
    caffe_rng.seed(7)
    m = fill(torch.empty(8, 4, 3, 3), caffe_pb2.FillerParameter(type="msra"))
    std = np.sqrt(np.float32(2) / np.float32(36))
    assert np.array_equal(m.numpy().ravel(), CaffeRNG(7).gaussian(288, 0, std))
    # sparse: the values first, then one bernoulli<float> draw per weight, p = 3 / 10.
    caffe_rng.seed(9)
    s = fill(torch.empty(10, 40), caffe_pb2.FillerParameter(type="gaussian", std=1.0, sparse=3))
    rng = CaffeRNG(9)
    values = rng.gaussian(400, 0, 1)
    keep = rng.bernoulli_float(400, np.float32(3) / np.float32(10))
    assert np.array_equal(s.numpy().ravel(), values * keep)
    assert caffe_rng.stream().raw(1)[0] == rng.raw(1)[0]


@pytest.mark.parametrize("kw,shape,needle", [
    (dict(type="gaussian", std=0.0), (4, 3), "std > 0"),
    (dict(type="gaussian", std=-1.0), (4, 3), "std > 0"),
    (dict(type="gaussian", std=float("nan")), (4, 3), "std > 0"),
    (dict(type="gaussian", sparse=5), (4, 3), "sparse 5 exceeds the blob's 4 outputs"),
    (dict(type="gaussian", sparse=1), (), "sparse needs a blob with an output axis"),
])
def test_gaussian_filler_refuses_what_caffe_aborts_on(kw, shape, needle):
    from pycaffe_alt.fillers import FillerError

    with pytest.raises(FillerError, match=needle):
        fill(torch.empty(shape), caffe_pb2.FillerParameter(**kw))


def test_ziggurat_tables_are_what_their_equations_give():
    pytest.importorskip("mpmath")
    from pycaffe_alt.boost_random import generate_tables, tables

    fresh = generate_tables.tables()
    for name, values in fresh.items():
        assert tuple(values) == getattr(tables, name), name
    # The layers' defining properties, in double: equal areas, top at 0, y = f(x).
    assert tables.NORMAL_X[-1] == 0 and tables.NORMAL_Y[-1] == 1 and len(tables.NORMAL_X) == 129
    assert tables.EXPONENTIAL_X[0] == pytest.approx(tables.EXPONENTIAL_X[1] + 1, abs=4e-15)  # x0 = v / f(r) = r + 1


@pytest.mark.parametrize("kw,needle", [
    (dict(type="gaussian", std=float("inf")), "finite mean and std"),
    (dict(type="gaussian", std=1e39), "finite mean and std"),  # inf as a float
    (dict(type="gaussian", mean=float("nan")), "finite mean and std"),
    (dict(type="constant", value=float("nan")), "constant filler needs a finite value"),
    (dict(type="constant", value=float("-inf")), "constant filler needs a finite value"),
])
def test_fillers_refuse_non_finite_values(kw, needle):
    from pycaffe_alt.fillers import FillerError

    with pytest.raises(FillerError, match=needle):
        fill(torch.empty(4, 3), caffe_pb2.FillerParameter(**kw))
