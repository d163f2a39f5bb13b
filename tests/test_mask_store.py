"""MaskStore: bit-exact round trips, changed-bit counts, RAM vs memmap, files, mismatches, size."""
import os

import numpy as np
import pytest
import torch

from pycaffe_alt.alternation import rules
from pycaffe_alt.alternation.mask_store import MAGIC, MaskStore, pack_bits, unpack_bits
from pycaffe_alt.errors import SolverError

LAYOUT = [("ht1", (3, 5, 5)), ("ht2", (7,)), ("ht3", (2, 2, 2))]  # 75, 7, 8 units: padding in 1, 2


def random_masks(b: int, gen: torch.Generator, layout=LAYOUT):
    return {n: torch.rand((b,) + s, generator=gen) > 0.5 for n, s in layout}


def test_pack_matches_numpy_packbits_and_round_trips():
    m = torch.rand(4, 3, 7) > 0.3
    p = pack_bits(m)
    assert p.dtype == torch.uint8 and p.shape == (4, 3)
    assert np.array_equal(p.numpy(), np.packbits(m.reshape(4, -1).numpy(), axis=1))
    assert torch.equal(unpack_bits(p, 21).reshape(4, 3, 7), m)


@pytest.mark.parametrize("max_ram", [1 << 30, 0])
def test_put_get_round_trip(tmp_path, max_ram):
    gen = torch.Generator().manual_seed(1)
    store = MaskStore(LAYOUT, 20, path=str(tmp_path / "work.masks"), max_ram_bytes=max_ram)
    assert store.in_ram == (max_ram > 0)
    assert store.row_bytes == 10 + 1 + 1
    idx = torch.tensor([3, 17, 0, 9])
    masks = random_masks(4, gen)
    assert store.put(None, idx, masks) == 0  # first support of these records: nothing "changed"
    got = store.get(idx, device="cpu")
    for n, _ in LAYOUT:
        assert got[n].dtype == torch.bool and torch.equal(got[n], masks[n])
    # Order of indices is respected.
    got = store.get(torch.tensor([9, 3]))
    assert torch.equal(got["ht1"], masks["ht1"][[3, 0]])


def test_changed_bits_counted_against_previous_support():
    gen = torch.Generator().manual_seed(2)
    store = MaskStore(LAYOUT, 10)
    idx = torch.tensor([1, 2, 5])
    old = random_masks(3, gen)
    store.put("all", idx, old)
    new = {n: m.clone() for n, m in old.items()}
    new["ht1"][0, 0, 0, 0] ^= True
    new["ht2"][2, 6] ^= True
    new["ht3"][1] = ~new["ht3"][1]  # 8 bits
    before = np.array(store.rows[[1, 2, 5]])
    assert store.put(None, idx, new) == 10
    assert rules.changed_fraction(before, store.rows[[1, 2, 5]],
                                  num_bits=3 * store.total_units) == 10 / (3 * 90)
    # A batch mixing filled and new records counts only the filled ones.
    assert list(store.is_filled([1, 3])) == [True, False]
    both = random_masks(2, gen)
    want = int((both["ht2"][0] != new["ht2"][0]).sum())
    assert store.put("ht2", torch.tensor([1, 3]), {"ht2": both["ht2"]}) == want


def test_put_one_layer_leaves_others():
    gen = torch.Generator().manual_seed(3)
    store = MaskStore(LAYOUT, 4)
    a = random_masks(2, gen)
    store.put(None, [0, 1], a)
    b = random_masks(2, gen)
    store.put("ht2", [0, 1], {"ht2": b["ht2"]})
    got = store.get([0, 1])
    assert torch.equal(got["ht2"], b["ht2"]) and torch.equal(got["ht1"], a["ht1"])
    assert torch.equal(got["ht3"], a["ht3"])


def test_save_load_ram_and_memmap(tmp_path):
    gen = torch.Generator().manual_seed(4)
    store = MaskStore(LAYOUT, 30)
    idx = torch.arange(0, 30, 2)
    masks = random_masks(len(idx), gen)
    store.put(None, idx, masks)
    path = str(tmp_path / "snap_iter_10.masks")
    store.save(path)
    assert open(path, "rb").read(8) == MAGIC
    assert os.path.getsize(path) == store.nbytes
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # temp file replaced
    for max_ram in (1 << 30, 0):
        back = MaskStore.load(path, expect_layout=LAYOUT, expect_records=30, max_ram_bytes=max_ram,
                              work_path=str(tmp_path / "work.masks"))
        assert back.in_ram == (max_ram > 0)
        assert np.array_equal(back.filled, store.filled)
        got = back.get(idx)
        assert all(torch.equal(got[n], masks[n]) for n, _ in LAYOUT)
        with pytest.raises(SolverError, match="record 1 has no stored support"):
            back.get([0, 1])
    # Writing into the mapped copy never touches the snapshot file.
    snap = open(path, "rb").read()
    back.put(None, idx, {n: ~m for n, m in masks.items()})
    assert open(path, "rb").read() == snap
    back.save(str(tmp_path / "again.masks"))  # memmap store: streamed save
    again = MaskStore.load(str(tmp_path / "again.masks"))
    assert torch.equal(again.get(idx)["ht1"], ~masks["ht1"])


def test_memmap_store_needs_path():
    with pytest.raises(SolverError, match="exceeds the RAM limit.*no file"):
        MaskStore(LAYOUT, 100, max_ram_bytes=10)


def test_load_mismatches_name_both_numbers(tmp_path):
    path = str(tmp_path / "m.masks")
    MaskStore(LAYOUT, 30).save(path)
    with pytest.raises(SolverError, match="holds 30 records but the training set has 50000"):
        MaskStore.load(path, expect_records=50000)
    other = [("ht1", (3, 5, 5)), ("ht2", (8,)), ("ht3", (2, 2, 2))]
    with pytest.raises(SolverError, match=r"supports \[.*ht2 7.*\] do not match the net's \[.*ht2 8"):
        MaskStore.load(path, expect_layout=other)
    bad = tmp_path / "bad.masks"
    bad.write_bytes(b"NOTAMASKFILE" * 4)
    with pytest.raises(SolverError, match="not a pycaffe_alt mask store"):
        MaskStore.load(str(bad))
    trunc = tmp_path / "trunc.masks"
    trunc.write_bytes(open(path, "rb").read()[:-5])
    with pytest.raises(SolverError, match="truncated"):
        MaskStore.load(str(trunc))


def test_bad_indices_and_shapes():
    store = MaskStore(LAYOUT, 5)
    gen = torch.Generator().manual_seed(5)
    with pytest.raises(SolverError, match="record index 5 is outside the mask store's 5 records"):
        store.put(None, [5], random_masks(1, gen))
    with pytest.raises(SolverError, match="support of 'ht2' has shape"):
        store.put("ht2", [0], {"ht2": torch.zeros(1, 6, dtype=torch.bool)})
    with pytest.raises(SolverError, match="lacks the support of ht3"):
        store.put(None, [0], {n: m for n, m in random_masks(1, gen).items() if n != "ht3"})
    with pytest.raises(SolverError, match="no layer 'nope'"):
        store.put("nope", [0], {"nope": torch.zeros(1, 1, dtype=torch.bool)})


def test_size_is_one_bit_per_unit_plus_header():
    layout = [("a", (96, 32, 32)), ("b", (10, 6, 6))]
    store = MaskStore(layout, 1000)
    units = 96 * 32 * 32 + 360
    assert store.row_bytes == units // 8
    assert store.nbytes == len(store.header) + 1000 * units // 8
    assert 1.0 <= store.bits_per_unit < 1.001
    assert "bits/unit" in repr(store) and "1000 records" in repr(store)


def test_working_files_are_private_to_each_store(tmp_path):
    # The ranks of a data-parallel job on one machine derive the same working path: each store
    # must map its own file (a shared one was truncated under the other's mapping: SIGBUS),
    # and no file stays behind.
    path = str(tmp_path / "job_masks.bin")
    gen = torch.Generator().manual_seed(5)
    idx = torch.arange(10)
    a = MaskStore(LAYOUT, 10, path=path, max_ram_bytes=0)
    assert os.listdir(tmp_path) == []  # mapped and already unlinked
    b = MaskStore(LAYOUT, 10, path=path, max_ram_bytes=0)
    ma, mb = random_masks(10, gen), random_masks(10, gen)
    a.put(None, idx, ma)
    b.put(None, idx, mb)
    assert all(torch.equal(a.get(idx)[n], ma[n]) and torch.equal(b.get(idx)[n], mb[n])
               for n, _ in LAYOUT)
    snap = str(tmp_path / "snap.masks")
    a.save(snap)
    c = MaskStore.load(snap, max_ram_bytes=0, work_path=path)
    d = MaskStore.load(snap, max_ram_bytes=0, work_path=path)
    c.put(None, idx, mb)
    assert torch.equal(d.get(idx)["ht1"], ma["ht1"]) and torch.equal(c.get(idx)["ht1"], mb["ht1"])
    assert sorted(os.listdir(tmp_path)) == ["snap.masks"]


def test_working_folder_is_made_or_refused_with_a_solver_error(tmp_path):
    store = MaskStore(LAYOUT, 10, path=str(tmp_path / "new" / "m.bin"), max_ram_bytes=0)
    assert not store.in_ram and os.listdir(tmp_path / "new") == []
    (tmp_path / "file").write_text("")
    with pytest.raises(SolverError, match="working file in .*file"):
        MaskStore(LAYOUT, 10, path=str(tmp_path / "file" / "m.bin"), max_ram_bytes=0)
