"""Caffe's DataTransformer as pure functions: order of operations, crops, mirror, mean, scale."""
import os

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_alt.caffe_rng import CaffeRNG
from pycaffe_alt.data.transformer import (TransformSpec, draw_params, load_mean_file,
                                          needs_random, output_shape, rand_from, spec_from_param,
                                          transform, transform_into)
from pycaffe_alt.errors import DataError
from pycaffe_alt.proto import caffe_pb2

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data")


def caffe_reference(image, spec, mirror, h_off, w_off):
    """Caffe's per-pixel loop (data_transformer.cpp, Transform(Datum)), written out literally."""
    c, h, w = image.shape
    oh = ow = spec.crop_size or None
    oh, ow = (oh, ow) if oh else (h, w)
    out = np.zeros((c, oh, ow), np.float32)
    for ch in range(c):
        for y in range(oh):
            for x in range(ow):
                pixel = np.float32(image[ch, y + h_off, x + w_off])
                if spec.mean is not None:
                    v = (pixel - spec.mean[ch, y + h_off, x + w_off]) * spec.scale
                elif spec.mean_values:
                    mv = spec.mean_values[0] if len(spec.mean_values) == 1 else spec.mean_values[ch]
                    v = (pixel - mv) * spec.scale
                else:
                    v = pixel * spec.scale
                out[ch, y, (ow - 1 - x) if mirror else x] = v
    return out


def parse_tp(text):
    tp = caffe_pb2.TransformationParameter()
    text_format.Parse(text, tp)
    return tp


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (3, 9, 11), dtype=np.uint8)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("offsets", [(0, 0), (2, 3), (4, 6)])
def test_mean_file_is_cropped_with_the_data_offsets_and_not_mirrored(image, mirror, offsets):
    mean = np.random.default_rng(1).uniform(0, 255, image.shape).astype(np.float32)
    spec = TransformSpec(scale=np.float32(0.0125), crop_size=5, mean=mean)
    out = np.empty((3, 5, 5), np.float32)
    transform_into(out, image, spec, mirror, *offsets)
    np.testing.assert_array_equal(out, caffe_reference(image, spec, mirror, *offsets))


@pytest.mark.parametrize("values", [(100.5,), (10.0, 20.0, 30.0)])
def test_mean_value_one_or_per_channel(image, values):
    spec = TransformSpec(scale=np.float32(0.5), mean_values=tuple(np.float32(v) for v in values))
    out = transform(image, spec, None)
    np.testing.assert_array_equal(out, caffe_reference(image, spec, False, 0, 0))
    expected = (image.astype(np.float32) - np.float32(values[-1])) * np.float32(0.5)
    np.testing.assert_array_equal(out[2], expected[2])


def test_mean_is_subtracted_before_scaling():
    image = np.full((1, 2, 2), 10, np.uint8)
    spec = TransformSpec(scale=np.float32(2), mean_values=(np.float32(4),))
    assert transform(image, spec, None).ravel().tolist() == [12.0] * 4  # (10-4)*2, not 10*2-4


def test_float_records_are_transformed_in_float32():
    image = np.random.default_rng(2).normal(size=(2, 6, 6)).astype(np.float32)
    spec = TransformSpec(scale=np.float32(3), crop_size=4, mean_values=(np.float32(0.25),))
    np.testing.assert_array_equal(transform(image, spec, None),
                                  caffe_reference(image, spec, False, 1, 1))


def _rand(seed):
    """Caffe's Rand(n) over a seeded mt19937 (the transformer's generator)."""
    return rand_from(CaffeRNG(seed).raw(100000).tolist())


def test_test_phase_crops_the_centre_and_draws_nothing():
    spec = TransformSpec(crop_size=4, train=False)
    assert not needs_random(spec)
    assert draw_params(spec, None, 9, 12) == (False, 2, 4)  # (9-4)//2, (12-4)//2


def test_train_phase_random_crop_covers_every_offset_and_repeats_with_the_seed():
    spec = TransformSpec(crop_size=5, train=True)
    draws = [draw_params(spec, _rand(7), 9, 8) for _ in range(1)]
    rng = _rand(7)
    seq = [draw_params(spec, rng, 9, 8) for _ in range(2000)]
    assert seq[0] == draws[0]
    hs = {h for _, h, _ in seq}
    ws = {w for _, _, w in seq}
    assert hs == set(range(5)) and ws == set(range(4))
    assert not any(m for m, _, _ in seq)  # mirror off: never flipped
    rng2 = _rand(7)
    assert seq == [draw_params(spec, rng2, 9, 8) for _ in range(2000)]


@pytest.mark.parametrize("train", [True, False])
def test_mirror_flips_about_half_of_the_samples_in_either_phase(train):
    # Caffe draws the mirror coin whenever mirror is set, whatever the phase.
    spec = TransformSpec(mirror=True, train=train)
    rng = _rand(3)
    flips = sum(draw_params(spec, rng, 4, 4)[0] for _ in range(4000))
    assert 1800 < flips < 2200


def test_mirror_reverses_columns(image):
    spec = TransformSpec(mirror=True)
    out = np.empty(image.shape, np.float32)
    transform_into(out, image, spec, True, 0, 0)
    np.testing.assert_array_equal(out, image[:, :, ::-1].astype(np.float32))


def test_spec_from_param_and_golden_mean_file(monkeypatch):
    monkeypatch.chdir(GOLDEN)
    spec = spec_from_param(parse_tp('mean_file: "mnist_mean.binaryproto" crop_size: 24 '
                                    'scale: 0.00390625'), train=False, where="t")
    assert spec.mean.shape == (1, 28, 28) and spec.mean.dtype == np.float32
    assert spec.crop_size == 24 and spec.scale == np.float32(0.00390625)
    assert output_shape(spec, (1, 28, 28), "t") == (1, 24, 24)
    np.testing.assert_array_equal(load_mean_file("photos_mean.binaryproto", "t").shape,
                                  (3, 36, 40))


@pytest.mark.parametrize("text, needle", [
    ('mean_file: "m.binaryproto" mean_value: 3', "both mean_file and mean_value"),
    ("force_color: true force_gray: true", "force_color and force_gray"),
    ('mean_file: "no_such_mean.binaryproto"', "compute_image_mean"),
    ("crop_h: 4", "SSD"),
])
def test_bad_transform_params(text, needle):
    with pytest.raises(DataError, match=needle):
        spec_from_param(parse_tp(text), train=True, where="layer 'x'")


def test_corrupt_mean_file(tmp_path):
    bad = tmp_path / "bad.binaryproto"
    bad.write_bytes(b"\xff\xff\xff\xff not a proto")
    with pytest.raises(DataError, match="bad.binaryproto"):
        load_mean_file(str(bad), "t")


@pytest.mark.parametrize("spec, shape, needle", [
    (TransformSpec(crop_size=30), (1, 28, 28), "crop_size 30 is larger"),
    (TransformSpec(mean=np.zeros((1, 28, 28), np.float32)), (3, 28, 28), "mean_file has shape"),
    (TransformSpec(mean_values=(np.float32(1), np.float32(2))), (3, 4, 4), "2 mean_value"),
])
def test_shape_checks(spec, shape, needle):
    with pytest.raises(DataError, match=needle):
        output_shape(spec, shape, "record 3")
