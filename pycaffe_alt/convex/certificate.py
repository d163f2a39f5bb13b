"""A lower bound on the optimum from the dual of the convex program: the duality-gap certificate.

Weak duality (Fenchel): for every lambda (n,) and every feasible point,
``1/2||S(F V - y)||^2 >= lambda^T (F V - y) - 1/2 lambda^T Q^+ lambda``, so the objective is at
least ``-lambda^T y - 1/2 lambda^T Q^+ lambda`` as soon as every unit's terms are nonnegative:
``lambda^T Phi_p v + beta ||v|| >= 0`` and ``-lambda^T Phi_p u + beta ||u|| >= 0`` for all v, u
in the pattern's cone ``K_p = {v : (2 D_p - I) Z v >= 0}``, i.e.

    M(lambda) = max_p max(||Pi_{K_p}(Phi_p^T lambda)||, ||Pi_{K_p}(-Phi_p^T lambda)||) <= beta

(``max_{v in K, ||v|| <= 1} c.v = ||Pi_K(c)||`` for a closed convex cone). The projection on
the polyhedral cone is a non-negative least-squares problem (Moreau: ``Pi_K(c) = c + A^T mu``,
``mu = argmin_{mu >= 0} ||A^T mu + c||`` with ``A = (2 D_p - I) Z``), solved by
scipy.optimize.nnls (a well-kept active-set solver; the residual it returns is the norm).

We take ``lambda = t Q r`` with r the residual of the current net (the optimal lambda is
``Q r*``), ``t`` the best value in ``[0, beta / M]``: the bound is
``max_t -t (Qr)^T y - t^2/2 r^T Q r``. Each output column is its own program; bounds add up.

Over EVERY arrangement pattern this bounds the objective of any net of any width (any net maps to
a feasible point of the program with no larger objective); over sampled patterns it bounds only
the sampled program. ``cones=False`` drops the cones (the gated program's dual, ``||Phi_p^T
lambda|| <= beta``): looser, valid for the same reasons, no NNLS.
"""
from __future__ import annotations

import numpy as np
import torch

from .program import ConvexProgram


def cone_projection_norm(A: np.ndarray, c: np.ndarray) -> float:
    """``||Pi_K(c)||`` for ``K = {v : A v >= 0}``; falls back to ``||c||`` (an upper bound, so
    the certificate stays valid) if the NNLS solver gives up."""
    from scipy.optimize import nnls

    try:
        _, residual = nnls(A.T, -c, maxiter=50 * A.shape[0] + 100)
    except RuntimeError:
        return float(np.linalg.norm(c))
    return float(residual)


def dual_max(prog: ConvexProgram, lam: torch.Tensor, cones: bool = True) -> float:
    """``M(lambda)`` for one output column's ``lambda`` (n,)."""
    C = torch.einsum("pnd,n->pd", prog.Phi, lam).cpu().numpy()       # (P, d)
    norms = np.linalg.norm(C, axis=1)
    if not cones:
        return float(norms.max()) if len(norms) else 0.0
    Z = prog.Z.reshape(-1, prog.Z.shape[-1]).cpu().numpy()
    sgn = prog.sgn.reshape(prog.sgn.shape[0], -1).cpu().numpy()
    best = 0.0
    # Projections never exceed ||c||: visit patterns by decreasing ||c||, stop when none can win.
    for p in np.argsort(-norms):
        if norms[p] <= best:
            break
        A = sgn[p][:, None] * Z
        best = max(best, cone_projection_norm(A, C[p]), cone_projection_norm(A, -C[p]))
    return best


def lower_bound(prog: ConvexProgram, g: torch.Tensor, cones: bool = True) -> float:
    """A lower bound on the program's optimum from the net outputs ``g`` (n, C) of any point
    (see module doc); summed over output columns."""
    r = g - prog.y
    rho = prog.S(prog.S(r))                                           # Q r
    total = 0.0
    for c in range(r.shape[1]):
        a = float(rho[:, c] @ prog.y[:, c])
        b = float(rho[:, c] @ r[:, c])                                # r^T Q r >= 0
        if b <= 0:
            continue                                                  # zero residual: bound 0
        M = dual_max(prog, rho[:, c], cones)
        t_max = prog.beta / M if M > 0 else float("inf")
        t = min(max(-a / b, 0.0), t_max)
        total += -t * a - 0.5 * t * t * b
    return total


__all__ = ["lower_bound", "dual_max", "cone_projection_norm"]
