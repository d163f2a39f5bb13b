"""A local polish of the recovered units: L-BFGS on the net's own (smooth away from kinks)
objective, started at the convex solution.

ADMM finds the optimal units' directions (the support of the group lasso) quickly but reaches
high accuracy slowly. Started from its units, the two-layer net's objective in program units,

    1/2 || S (sum_j (Z theta_j)_+ alpha_j - y) ||^2 + beta/2 sum_j (||theta_j||^2 + alpha_j^2),

is minimized by L-BFGS (torch.optim.LBFGS, strong-Wolfe line search, float64) over the kept
units only. This never changes what is certified: the objective reported is the one of the net
written, and the lower bound is computed from its residual (usually a tighter one); the polished
units are kept only if the objective went down. Units come back as blocks ``v = theta |alpha|``
(after balancing ``||theta|| = |alpha|``), the form :mod:`.recover` reads.
"""
from __future__ import annotations

import torch

from .program import ConvexProgram


def _blocks_to_units(V: torch.Tensor):
    """(theta (J, d), alpha (J,), column (J,)) of the nonzero blocks of V (2, P, d, C)."""
    norms = V.norm(dim=2)                                  # (2, P, C)
    s, p, c = (norms > 0).nonzero(as_tuple=True)
    v = V[s, p, :, c]                                      # (J, d)
    r = norms[s, p, c].sqrt()
    theta = v / r[:, None]
    alpha = torch.where(s == 0, r, -r)
    return theta, alpha, c


def polish(prog: ConvexProgram, V: torch.Tensor, iters: int) -> torch.Tensor:
    """V with its nonzero blocks locally refined (see module doc); V itself if no better."""
    theta, alpha, col = _blocks_to_units(V)
    if iters <= 0 or theta.shape[0] == 0:
        return V
    C = prog.y.shape[1]
    onehot = torch.nn.functional.one_hot(col, C).to(torch.float64)        # (J, C)
    theta = theta.clone().requires_grad_(True)
    alpha = alpha.clone().requires_grad_(True)
    Zf = prog.Z

    def objective():
        act = torch.einsum("nkd,jd->nkj", Zf, theta).clamp_min(0).sum(1)  # (n, J)
        out = act @ (alpha[:, None] * onehot)
        r = prog.S(out - prog.y)
        return 0.5 * (r * r).sum() + prog.beta / 2 * ((theta ** 2).sum() + (alpha ** 2).sum())

    with torch.no_grad():
        start = float(objective())
    opt = torch.optim.LBFGS([theta, alpha], lr=1, max_iter=iters, tolerance_grad=1e-14,
                            tolerance_change=1e-16, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        if not float(objective()) < start:
            return V
        # Balance each unit (||theta|| = |alpha| minimizes the penalty for the same function).
        scale = (alpha.abs() / theta.norm(dim=1).clamp_min(1e-300)).sqrt()
        th, al = theta * scale[:, None], alpha / scale
        J, d = th.shape
        out = torch.zeros(2, J, d, C, dtype=torch.float64, device=V.device)
        j = torch.arange(J, device=V.device)
        sign = (al < 0).long()
        out[sign, j, :, col] = th * al.abs()[:, None]
    return out


__all__ = ["polish"]
