"""Parity with the reference Caffe: every golden layer/net case, forward and backward.

Each case folder (made by real BVLC Caffe, see fixtures/golden/README.md) holds a net, its
weights, the inputs, every blob after forward, the top diffs and the resulting parameter and
input gradients. Tolerances are those of the project: forward 1e-4, gradients 1e-3, relative to
the largest reference magnitude.
"""
import os

import pytest

from golden_compare import GOLDEN as ROOT
from golden_compare import compare_case, golden_cases

CASES = golden_cases()


@pytest.mark.parametrize("case", CASES, ids=[os.path.relpath(c, ROOT) for c in CASES])
def test_golden_case(case):
    errors = [f"{what}: rel {e:.2e}" for what, e, tol in compare_case(case) if e > tol]
    assert not errors, "; ".join(errors)
