"""Bad input through the CLI (tools/test): each fails with one paragraph naming the place, no traceback."""
import os
import subprocess
import sys

import pytest

import pycaffe_alt as caffe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = os.path.join(ROOT, "tests", "fixtures", "bad")


def run_test_tool(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "test"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, f"{n!r} not in:\n{proc.stderr}"


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    net = caffe.Net(os.path.join(BAD, "small.prototxt"), caffe.TEST)
    good = str(d / "small.caffemodel")
    net.save(good)
    truncated = str(d / "truncated.caffemodel")
    with open(good, "rb") as f:
        raw = f.read()
    with open(truncated, "wb") as f:
        f.write(raw[: len(raw) // 2])
    return good, truncated


CASES = [
    ("syntax_error.prototxt", ["syntax_error.prototxt:3:"]),
    ("unknown_field.prototxt", ["unknown_field.prototxt:3:", "num_outputs", "num_output"]),
    ("unknown_type.prototxt", ["layer 'ip'", "InnerProdukt", "InnerProduct"]),
    ("missing_bottom.prototxt", ["layer 'ip'", "'dta'"]),
    ("shape_mismatch.prototxt", ["layer 'sum'", "(2, 3)", "(2, 4)"]),
    ("wrong_bottom_count.prototxt", ["layer 'relu'", "bottom"]),
    ("kernel_too_big.prototxt", ["layer 'conv'"]),
    ("does_not_exist.prototxt", ["does_not_exist.prototxt"]),
]


@pytest.mark.parametrize("name,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_model_fails_cleanly(name, needles):
    proc = run_test_tool("--model", os.path.join(BAD, name), "--iterations", "1")
    assert_clean_failure(proc, *needles)


def test_truncated_caffemodel(small_weights):
    _, truncated = small_weights
    proc = run_test_tool("--model", os.path.join(BAD, "small.prototxt"), "--weights", truncated,
                         "--iterations", "1")
    assert_clean_failure(proc, "truncated.caffemodel", "corrupt")


def test_weights_of_wrong_shape(small_weights):
    good, _ = small_weights
    proc = run_test_tool("--model", os.path.join(BAD, "small_wide.prototxt"), "--weights", good,
                         "--iterations", "1")
    assert_clean_failure(proc, "layer 'ip'", "(2, 3)", "(5, 3)")


def test_good_model_scores(small_weights):
    good, _ = small_weights
    proc = run_test_tool("--model", os.path.join(BAD, "small.prototxt"), "--weights", good,
                         "--iterations", "2")
    assert proc.returncode == 0, proc.stderr
    # caffe.cpp's test() names each of the output's two values by the bare blob name.
    assert proc.stderr.count("Batch 1, ip = ") == 2
