"""The unconstrained ("gated") program over sampled patterns by accelerated proximal gradient.

Bai et al.'s sampled convex program drops the cone constraints::

    min_W  1/2 || S (sum_p Phi_p W_p - y) ||^2 + beta sum_{p,c} ||W[p,:,c]||

FISTA (Beck & Teboulle 2009) with step 1/L, ``L = ||S Phi||_2^2`` (power iteration), and
O'Donoghue & Candes' function-value restart; stops when the relative objective change stays below
``rel_tol`` for 10 iterations, or at ``max_iter``.

Its units are gated, not ReLU, neurons: ``D_p Z W_p`` equals ``(Z W_p)_+`` only if W_p lies in
the pattern's cone. :func:`split_into_cones` turns each W_p into two cone members with the same
gated output, ``W_p = (W_p + t h_p) - t h_p`` with h_p inside the cell (``(2D_p - I) Z h_p > 0``)
and the least t that puts ``W_p + t h_p`` in the cone; then ``D_p Z W_p = (Z v)_+ - (Z u)_+``
exactly. The penalty grows by at most ``2 t ||h_p||``: the recovered net's objective (always an
upper bound on the optimum) is reported next to the gated value.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .program import ConvexProgram, group_soft_threshold


def _apply(prog: ConvexProgram, W: torch.Tensor) -> torch.Tensor:
    return torch.einsum("pnd,pdc->nc", prog.Phi, W)


def _apply_t(prog: ConvexProgram, R: torch.Tensor) -> torch.Tensor:
    return torch.einsum("pnd,nc->pdc", prog.Phi, R)


def lipschitz(prog: ConvexProgram, iters: int = 50, seed: int = 0) -> float:
    """``||S Phi||_2^2`` by power iteration (slightly enlarged to be safe)."""
    gen = torch.Generator().manual_seed(seed)
    P, _, _, d, _ = prog.shape
    x = torch.randn(P, d, 1, generator=gen, dtype=torch.float64).to(prog.device)
    value = 0.0
    for _ in range(iters):
        x = x / x.norm().clamp_min(1e-300)
        x = _apply_t(prog, prog.S(prog.S(_apply(prog, x))))
        value = float(x.norm())
    return 1.02 * value


def gated_objective(prog: ConvexProgram, W: torch.Tensor) -> float:
    return prog.loss(_apply(prog, W)) + prog.beta * float(W.norm(dim=1).sum())


def fista(prog: ConvexProgram, max_iter: int, rel_tol: float = 1e-6,
          callback: Optional[Callable[[int, torch.Tensor, float], bool]] = None) -> torch.Tensor:
    """Solve the gated program; ``callback(iter, W, objective)`` may return True to stop.
    Returns W (P, d, C)."""
    P, _, _, d, C = prog.shape
    L = lipschitz(prog)
    W = torch.zeros(P, d, C, dtype=torch.float64, device=prog.device)
    Y, k, f_old, quiet = W.clone(), 1.0, gated_objective(prog, W), 0
    Qy = prog.S(prog.S(prog.y))
    for it in range(1, max_iter + 1):
        grad = _apply_t(prog, prog.S(prog.S(_apply(prog, Y))) - Qy)
        W_new = group_soft_threshold((Y - grad / L).unsqueeze(0), prog.beta / L)[0]
        f_new = gated_objective(prog, W_new)
        if f_new > f_old:                      # function restart: momentum off
            k, Y = 1.0, W.clone()
            continue
        k_new = (1 + math.sqrt(1 + 4 * k * k)) / 2
        Y = W_new + ((k - 1) / k_new) * (W_new - W)
        change = abs(f_old - f_new) / max(abs(f_new), 1e-300)
        W, k, f_old = W_new, k_new, f_new
        quiet = quiet + 1 if change < rel_tol else 0
        if callback is not None and callback(it, W, f_new):
            break
        if quiet >= 10:
            break
    return W


def split_into_cones(prog: ConvexProgram, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """ReLU units (2, P, d, C) with the same outputs on the training set as the gated W."""
    A_h = torch.einsum("pnk,nkd,pd->pnk", prog.sgn, prog.Z, H.to(prog.device))   # > 0
    A_w = prog.sgn[..., None] * torch.einsum("nkd,pdc->pnkc", prog.Z, W)
    need = (-A_w / A_h[..., None].clamp_min(1e-300)).clamp_min(0)
    t = need.reshape(need.shape[0], -1, need.shape[-1]).amax(1)                  # (P, C)
    shift = t[:, None, :] * H.to(prog.device)[:, :, None]                          # (P, d, C)
    return torch.stack([W + shift, shift])


__all__ = ["fista", "split_into_cones", "gated_objective", "lipschitz"]
