"""Audit of solver and data-layer corners against the reference Caffe's source (the SSD fork of
2016 the golden fixtures were made with; see tests/fixtures/golden/README.md)."""
import os

import numpy as np
import pytest

import pycaffe_alt as caffe
from layer_check import make_layer
from pycaffe_alt.layers import TEST
from pycaffe_alt.weights import write_binaryproto

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "data")


@pytest.fixture
def in_golden(monkeypatch):
    monkeypatch.chdir(GOLDEN)  # prototxt paths are relative to the current directory


def _batch(kind, source, transform, batch_size=8, seed=1):
    caffe.set_random_seed(seed)
    if kind == "Data":
        text = (f'type: "Data" top: "data" top: "label" transform_param {{ {transform} }} '
                f'data_param {{ source: "{source}" batch_size: {batch_size} backend: LMDB }}')
    else:
        text = (f'type: "ImageData" top: "data" top: "label" transform_param {{ {transform} }} '
                f'image_data_param {{ source: "{source}" root_folder: "digits/" '
                f'is_color: false batch_size: {batch_size} }}')
    layer = make_layer(text, [], TEST)
    data = layer()[0].numpy()
    layer.close()
    return data


@pytest.fixture
def ramp_mean(tmp_path):
    # A mean that changes along the width, so a flipped mean differs from an unflipped one.
    mean = np.tile(np.arange(28, dtype=np.float32) * 3, (1, 1, 28, 1))
    path = str(tmp_path / "ramp.binaryproto")
    write_binaryproto(mean, path)
    return mean[0], path


@pytest.mark.parametrize("kind,source,decoded", [
    ("Data", "mnist_test_lmdb", False),                # Datum path: the mean flips with the pixels
    ("Data", "mnist_test_encoded_lmdb", True),         # cv::Mat path: the mean stays put
    ("ImageData", "digits_test.txt", True),
])
def test_mirrored_mean_file_follows_the_path_caffe_transforms_by(in_golden, ramp_mean, kind,
                                                                  source, decoded):
    # The reference's DataTransformer::Transform(const cv::Mat&) reads the mean at the output
    # (mirrored) column; Transform(const Datum&) at the source column. Same seed, same flips.
    mean, path = ramp_mean
    flipped = _batch(kind, source, "mirror: true")
    plain = _batch(kind, source, "")
    got = _batch(kind, source, f'mirror: true mean_file: "{path}"')
    flips = [not np.array_equal(f, p) for f, p in zip(flipped, plain)]
    assert 0 < sum(flips) < len(flips)
    for f, g, m in zip(flipped, got, flips):
        used = mean[:, :, ::-1] if (m and not decoded) else mean
        np.testing.assert_array_equal(g, f - used)
