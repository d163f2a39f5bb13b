"""Hyperplane-arrangement patterns ``D = diag(1[Z h >= 0])`` of a set of feature rows.

Every row z (an example, or a patch of one) is a hyperplane ``{h : z.h = 0}`` through the origin
of R^d; a pattern is the sign vector of one cell of this central arrangement (one h for all rows,
so a CNN's unit has one pattern over all patches of all examples).

* :func:`enumerate_patterns`: all of them, exactly. For rows in general position every cell is a
  pointed cone with an extreme ray where d-1 hyperplanes meet: the ray is the null direction h of
  those d-1 rows, and the cells around it take every sign combination on those rows (their
  normals are independent) and ``sign(z.h)`` on the others, for +h and -h. The count must be
  ``2 sum_{k<d} C(m-1, k)`` for m distinct hyperplanes (Cover 1965; Pilanci & Ergen 2020) —
  checked; rows that are not in general position are reported (use sampled patterns then).
* :func:`sample_patterns`: ``N`` Gaussian directions h ~ N(0, I_d), as the papers sample,
  seeded, duplicates dropped.

Both return ``(D, H)``: D (P, rows) bool and H (P, d), a direction inside each pattern's cell
(``D == (Z H^T >= 0)``); :mod:`.sampled` uses H to split gated units into ReLU units.
"""
from __future__ import annotations

import itertools
import math
from typing import Tuple

import numpy as np
import torch

from ..errors import SolverError

# Rows whose cosine differs from 1 by less than this are the same hyperplane.
_SAME = 1e-10


def arrangement_count(m: int, d: int) -> int:
    """Cells of a central arrangement of m hyperplanes in general position in R^d."""
    if m <= 0:
        return 1
    return 2 * sum(math.comb(m - 1, k) for k in range(min(d, m)))


def distinct_hyperplanes(rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(normals, which, sign)``: the distinct hyperplanes (unit normals, first nonzero entry
    positive), and for every row the index of its hyperplane and the sign relating them
    (0 for a zero row, which is no hyperplane)."""
    norms = np.linalg.norm(rows, axis=1)
    nonzero = norms > 0
    unit = np.zeros_like(rows)
    unit[nonzero] = rows[nonzero] / norms[nonzero, None]
    first = np.argmax(np.abs(unit) > 1e-12, axis=1)
    sign = np.sign(unit[np.arange(len(unit)), first])
    sign[~nonzero] = 0
    canon = unit * np.where(sign == 0, 1, sign)[:, None]
    keys = np.round(canon[nonzero] / _SAME ** 0.5).astype(np.int64)
    _, first_of, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    which = np.full(len(rows), -1, dtype=np.int64)
    which[nonzero] = inverse.reshape(-1)
    normals = canon[nonzero][first_of]
    return normals, which, sign


def _expand(cell_signs: np.ndarray, which: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Per-row patterns 1[z.h >= 0] from the strict signs of the distinct hyperplanes."""
    out = np.ones((cell_signs.shape[0], len(which)), dtype=bool)   # zero rows: 1[0 >= 0]
    rows = which >= 0
    out[:, rows] = cell_signs[:, which[rows]] * sign[rows] > 0
    return out


def enumerate_patterns(Z: torch.Tensor, max_patterns: int, where: str = "",
                       max_work: float = 5e8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every arrangement pattern of the rows of ``Z`` (..., d), exactly (see module doc).

    Refuses (SolverError with the count) when there would be more than ``max_patterns``, or when
    the enumeration would take more than ``max_work`` row evaluations; refuses when the rows are
    not in general position (the count check fails)."""
    rows = Z.reshape(-1, Z.shape[-1]).detach().cpu().double().numpy()
    normals, which, sign = distinct_hyperplanes(rows)
    m = len(normals)
    if m == 0:
        D = torch.ones(1, rows.shape[0], dtype=torch.bool)
        return D, torch.zeros(1, rows.shape[1], dtype=torch.float64)
    # Work in the span of the normals: directions orthogonal to it change no sign.
    _, sv, vt = np.linalg.svd(normals, full_matrices=False)
    r = int((sv > sv[0] * 1e-10).sum())
    basis = vt[:r]                                 # (r, d)
    A = normals @ basis.T                          # (m, r)
    expected = arrangement_count(m, r)
    subsets = math.comb(m, r - 1)
    if expected > max_patterns:
        raise SolverError(f"exact enumeration: {m} distinct hyperplanes in dimension {r} have "
                          f"{expected} arrangement patterns, more than max_exact_patterns "
                          f"({max_patterns})", where,
                          "sample patterns instead (convex_param { num_patterns: N }), use fewer "
                          "examples or features, or raise max_exact_patterns")
    if subsets * 2 ** r * m > max_work:
        raise SolverError(f"exact enumeration: {subsets} vertex rays of {m} hyperplanes in "
                          f"dimension {r} are too many to visit", where,
                          "sample patterns instead (convex_param { num_patterns: N })")
    if r == 1:
        cells = np.array([[1.0], [-1.0]]) @ A.T  # h = +-basis
        dirs = np.array([[1.0], [-1.0]])
        signs = np.sign(cells)
    else:
        signs, dirs = _vertex_cells(A, r)
    signs, first = np.unique(signs, axis=0, return_index=True)
    dirs = dirs[first]
    if len(signs) != expected:
        raise SolverError(f"exact enumeration found {len(signs)} arrangement patterns where rows "
                          f"in general position give 2 sum_{{k<d}} C(m-1,k) = {expected} "
                          f"(m = {m} distinct hyperplanes, d = {r}): the features are not in "
                          "general position (e.g. several examples on one hyperplane)", where,
                          "use sampled patterns (convex_param { num_patterns: N }); they need "
                          "no general position")
    D = _expand(signs, which, sign)
    H = dirs @ basis
    return torch.from_numpy(D), torch.from_numpy(H)


def _vertex_cells(A: np.ndarray, r: int) -> Tuple[np.ndarray, np.ndarray]:
    """Strict sign vectors (+-1) of the cells around every vertex ray of the rows of A (m, r),
    with one interior direction per cell."""
    m = A.shape[0]
    combos = np.array(list(itertools.product((1.0, -1.0), repeat=r - 1)))   # (2^(r-1), r-1)
    all_signs, all_dirs = [], []
    for subset in itertools.combinations(range(m), r - 1):
        sub = A[list(subset)]                               # (r-1, r)
        _, s, vt = np.linalg.svd(sub)
        if s[-1] < 1e-10 * s[0]:
            continue                                        # not independent: no vertex ray
        h = vt[-1]
        rest = A @ h
        others = np.ones(m, dtype=bool)
        others[list(subset)] = False
        margin = np.abs(rest[others]).min() if others.any() else 1.0
        if margin < 1e-12:
            continue                                        # degenerate: caught by the count
        # Directions that give the subset's rows the wanted signs (least-norm solutions).
        deltas = np.linalg.lstsq(sub, combos.T, rcond=None)[0].T             # (2^(r-1), r)
        step = 0.5 * margin / max(np.abs(A[others] @ deltas.T).max(), 1e-300) \
            if others.any() else 1.0
        for sgn in (1.0, -1.0):
            dirs = sgn * h[None, :] + step * deltas
            signs = np.sign(dirs @ A.T)
            all_signs.append(signs)
            all_dirs.append(dirs)
    if not all_signs:
        return np.zeros((0, m)), np.zeros((0, r))
    return np.concatenate(all_signs), np.concatenate(all_dirs)


def sample_patterns(Z: torch.Tensor, count: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patterns of ``count`` Gaussian directions (seeded by ``seed``), duplicates dropped."""
    rows = Z.reshape(-1, Z.shape[-1]).detach().cpu().double()
    gen = torch.Generator().manual_seed(int(seed))
    H = torch.randn(count, rows.shape[1], generator=gen, dtype=torch.float64)
    D = (H @ rows.T) >= 0
    packed = np.packbits(D.numpy(), axis=1)
    _, first = np.unique(packed, axis=0, return_index=True)
    first = torch.from_numpy(np.sort(first))
    return D[first], H[first]


__all__ = ["arrangement_count", "distinct_hyperplanes", "enumerate_patterns", "sample_patterns"]
