"""Neurons from the program's solution, written into the net's first and last layers.

Pilanci & Ergen's recovery: every nonzero block v (positive output) gives the unit
``w1 = v / sqrt||v||``, ``w2 = sqrt||v||``; u (negative output) the same with ``w2 = -sqrt||u||``.
Its penalty ``beta/2 (||w1||^2 + w2^2) = beta ||v||`` is the block's, and ``(Z w1)_+ w2 =
(Z v)_+`` when v is in its cone. Then the net's own parameterization (:mod:`.net_fit`): the row
is scaled by ``(b/a)^{1/4}`` and the output weight by its inverse (equal decay_mult: 1), the
bias feature's coefficient times t is the first-layer bias, and the output bias is the optimal
one for these units. Units beyond the ones used are zero (weights, bias and output weight).
With C outputs, unit k feeds only the output whose program it came from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from ..errors import SolverError
from .net_fit import ConvexProblem
from .program import ConvexProgram


@dataclass
class Units:
    """Recovered units in the net's parameterization: ``W1`` (h, d_in), ``b1`` (h,) or None,
    ``W2`` (C, h), ``b2`` (C,) or None."""

    W1: np.ndarray
    b1: object
    W2: np.ndarray
    b2: object

    @property
    def count(self) -> int:
        return int(self.W1.shape[0])


# Blocks shorter than this fraction of the longest are dropped: an iterative solver leaves many
# tiny ones that would each cost a hidden unit; the objective is recomputed without them.
PRUNE = 1e-4


def active_blocks(V: torch.Tensor, rel: float = PRUNE) -> List[tuple]:
    """``(s, p, c)`` of the blocks kept (norm above ``rel`` x the largest one)."""
    norms = V.norm(dim=2)
    top = float(norms.max()) if norms.numel() else 0.0
    if top == 0.0:
        return []
    idx = (norms > rel * top).nonzero().tolist()
    return [tuple(i) for i in idx]


def pruned(V: torch.Tensor, rel: float = PRUNE) -> torch.Tensor:
    """V without the blocks :func:`active_blocks` drops."""
    norms = V.norm(dim=2, keepdim=True)
    top = float(norms.max()) if norms.numel() else 0.0
    return V * (norms > rel * top) if top > 0 else V


def fewest_units(prog: ConvexProgram, V: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """V with at most ``rank`` (<= n) nonzero blocks per output column and an objective no
    larger: the papers' pruning (Pilanci & Ergen 2020, Carathéodory's theorem).

    A block ``v = c u`` (``||u|| = 1``, c >= 0) adds ``c sign (Z u)_+`` to its output column and
    ``beta c`` to the penalty. When a column's k unit outputs ``q_b = sign (Z u_b)_+`` are linearly
    dependent (always when k > n), a null vector t (``sum t_b q_b = 0``, signed so that
    ``sum t_b >= 0``) moves the coefficients to ``c - a t`` without changing the output; the
    largest step that keeps them >= 0 zeroes a block and does not raise the penalty. An iterative
    solver stops at points with many small blocks (more than the n + 1 an optimum needs), which
    would otherwise not fit the hidden layer. Blocks keep their pattern positions.
    """
    V = V.clone()
    norms = V.norm(dim=2)                                       # (2, P, C)
    for c in range(V.shape[3]):
        while True:
            s, p = (norms[:, :, c] > 0).nonzero(as_tuple=True)
            k = len(s)
            if k <= 1:
                break
            coef = norms[s, p, c]
            u = V[s, p, :, c] / coef[:, None]                   # (k, d)
            q = torch.einsum("nkd,jd->njk", prog.Z, u).clamp_min(0).sum(2)   # (n, k)
            q = q * torch.where(s == 0, 1.0, -1.0).to(q)[None, :]
            _, sv, vh = torch.linalg.svd(q, full_matrices=True)
            rank = int((sv > tol * max(float(sv[0]), 1e-300)).sum()) if len(sv) else 0
            if rank >= k:
                break
            t = vh[-1]                                          # q t = 0 (up to rounding)
            if float(t.sum()) < 0:
                t = -t
            pos = t > 0
            if not bool(pos.any()):
                break
            ratio = torch.where(pos, coef / t.clamp_min(1e-300), torch.full_like(coef, math.inf))
            hit = int(ratio.argmin())
            new = (coef - float(ratio[hit]) * t).clamp_min(0)
            new[hit] = 0.0                                      # the block the step zeroes
            V[s, p, :, c] = u * new[:, None]
            norms[s, p, c] = new
    return V


def recover_units(prog: ConvexProgram, problem: ConvexProblem, V: torch.Tensor) -> Units:
    """The units of every nonzero block of V in the net's parameterization (see module doc);
    prune V first (:func:`pruned`) to drop tiny blocks."""
    blocks = active_blocks(V, rel=0.0)   # every nonzero block: V is already pruned
    C = prog.y.shape[1]
    d_in = problem.d_in
    rows, out = [], []
    for s, p, c in blocks:
        v = V[s, p, :, c].double().cpu()
        norm = float(v.norm())
        theta = v / norm ** 0.5 * problem.unit_scale
        alpha = (1 if s == 0 else -1) * norm ** 0.5 / problem.unit_scale
        rows.append(theta.numpy())
        w2 = np.zeros(C)
        w2[c] = alpha
        out.append(w2)
    h = len(rows)
    d = prog.Z.shape[2]
    theta = np.array(rows).reshape(h, d)
    W1 = theta[:, :d_in]
    b1 = theta[:, d_in] * problem.bias_feature if problem.bias_feature is not None else None
    W2 = np.array(out).reshape(h, C).T
    b2 = None
    if problem.out_bias_ridge is not None:
        g = prog.relu_output(V)
        b2 = prog.output_bias(g).cpu().numpy()
    return Units(W1, b1, W2, b2)


def write_into_net(net, problem: ConvexProblem, units: Units) -> None:
    """Put the units into the net's first and last layers (zeros for unused units); refuses
    (SolverError) when the first layer has fewer units than needed."""
    roles = problem.roles
    if units.count > roles.hidden:
        raise SolverError(f"the optimum found needs {units.count} hidden units but layer "
                          f"'{roles.first}' has num_output {roles.hidden}; nothing was written",
                          net.source, f"set num_output: {units.count} (or more) in layer "
                          f"'{roles.first}' and run again (the optimum does not depend on "
                          "the width once it is enough)")
    first = net.layer_dict[roles.first].module
    last = net.layer_dict[roles.last].module
    h = units.count
    with torch.no_grad():
        w = torch.zeros(first.weight.shape, dtype=torch.float64)
        w.reshape(roles.hidden, -1)[:h] = torch.from_numpy(units.W1)
        first.weight.copy_(w.to(first.weight.dtype))
        if roles.first_bias:
            b = torch.zeros(roles.hidden, dtype=torch.float64)
            b[:h] = torch.from_numpy(units.b1)
            first.bias.copy_(b.to(first.bias.dtype))
        w2 = torch.zeros(roles.outputs, roles.hidden, dtype=torch.float64)
        w2[:, :h] = torch.from_numpy(units.W2)
        if last.transpose:
            w2 = w2.T
        last.weight.copy_(w2.reshape(last.weight.shape).to(last.weight.dtype))
        if roles.last_bias:
            last.bias.copy_(torch.from_numpy(units.b2).to(last.bias.dtype))


__all__ = ["Units", "active_blocks", "pruned", "PRUNE", "fewest_units", "recover_units",
           "write_into_net"]
