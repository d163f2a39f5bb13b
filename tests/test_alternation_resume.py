"""Snapshot/resume of the alternation solver: N + snapshot + restore + N == 2N bit for bit on the
CPU, from the middle of a weight step (with mirrored, cropped training data), and mask store files
that do not fit the net or the dataset fail clearly."""
from __future__ import annotations

import os

import pytest
import torch

from alternation_case import TRAIN_RECORDS, solver_param
from pycaffe_alt.alternation.mask_store import MaskStore
from pycaffe_alt.alternation.solver import AlternationSolver
from pycaffe_alt.errors import SolverError
from pycaffe_alt.solver.snapshot import read_solverstate

I_ALT = 'mode: INSTANCE warmup_iter: 3 gap_iter: 6'


def weights(s):
    return [p.detach().clone() for p in s._datas]


def make(tmp_path, alternation=I_ALT, **kw):
    os.makedirs(tmp_path, exist_ok=True)
    return AlternationSolver(solver_param(tmp_path, alternation, mirror=True, crop=24, **kw))


@pytest.mark.parametrize("alternation", [I_ALT, "mode: BATCH warmup_iter: 3 support_beta: 0.01"])
def test_resume_in_a_weight_step_is_bit_exact(tmp_path, alternation):
    straight = make(tmp_path / "a", alternation)
    straight.step(12)  # I: support steps at 3 and 9

    first = make(tmp_path / "b", alternation)
    first.step(6)  # in the middle of the first weight step
    assert first.phase == ("weights")
    _, state_path = first.snapshot()
    resumed = make(tmp_path / "b", alternation)
    resumed.restore(state_path)
    assert resumed.iter == 6 and resumed.phase == "weights"
    assert resumed.support_steps == first.support_steps
    resumed.step(6)

    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    assert resumed.support_steps == straight.support_steps
    if straight.store is not None:
        assert straight.support_steps == 2
        assert (straight.store.rows == resumed.store.rows).all()
        masks = str(tmp_path / "b" / "tiny_iter_6.masks")
        assert os.path.isfile(masks)
        alt = read_solverstate(state_path).resume_state["alternation"]
        assert alt["masks"] == masks and alt["phase"] == "weights"
        assert alt["last_support_iter"] == 3
    else:
        assert set(straight.last_batch_supports) == {"thr1", "thr2"}
        for k, v in straight.last_batch_supports.items():
            assert torch.equal(v, resumed.last_batch_supports[k])


def _snapshot_then_replace_masks(tmp_path, store: MaskStore):
    s = make(tmp_path)
    s.step(5)
    _, state_path = s.snapshot()
    store.save(str(tmp_path / "tiny_iter_5.masks"))
    return state_path


def test_resume_with_masks_of_another_dataset_size(tmp_path):
    state = _snapshot_then_replace_masks(
        tmp_path, MaskStore([("thr1", (4, 10, 10)), ("thr2", (16,))], 100))
    with pytest.raises(SolverError) as e:
        make(tmp_path).restore(state)
    assert f"holds 100 records but the training set has {TRAIN_RECORDS}" in str(e.value)


def test_resume_with_masks_of_another_net(tmp_path):
    state = _snapshot_then_replace_masks(
        tmp_path, MaskStore([("thr1", (4, 12, 12)), ("thr2", (16,))], TRAIN_RECORDS))
    with pytest.raises(SolverError) as e:
        make(tmp_path).restore(state)
    msg = str(e.value)
    assert "[thr1 4x12x12, thr2 16]" in msg and "[thr1 4x10x10, thr2 16]" in msg


def test_resume_without_the_masks_file(tmp_path):
    s = make(tmp_path)
    s.step(5)
    _, state = s.snapshot()
    os.remove(tmp_path / "tiny_iter_5.masks")
    with pytest.raises(SolverError, match="tiny_iter_5.masks"):
        make(tmp_path).restore(state)
