"""The convex program over arrangement patterns, as linear operators (torch, float64).

Pilanci & Ergen (2020), eq. for the two-layer ReLU net with weight decay; with C outputs, C scalar
programs side by side (column c of every tensor below is program c; docs/global_optimum.md says
why)::

    min_{V}  1/2 || S (F V - y) ||^2 + beta sum_{s,p,c} ||V[s,p,:,c]||
    s.t.     (2 D_p - I) Z V[s,p,:,c] >= 0         (every patch of every example)

    F V = sum_p Phi_p (V[0,p] - V[1,p]),   Phi_p[n] = sum_k D_p[n,k] Z[n,k]   (n, d)

``V[0]`` are the units with a positive output weight (the papers' v_i), ``V[1]`` the negative
ones (u_i); ``S = I - s 11^T`` removes an output bias (``s = 0`` without one; see
:mod:`.net_fit`). ``G V = (2 D - I) (Z V)`` is the constraint operator; ``G^T G`` is block
diagonal with the same block ``Z^T Z`` for every pattern (``(2D - I)^2 = I``), which is what makes
ADMM's linear system cheap (:mod:`.admm`).
"""
from __future__ import annotations

from typing import Optional

import torch


class ConvexProgram:
    """The program's data and operators. ``Z`` (n, K, d), ``D`` (P, n, K) bool (or (P, n*K)),
    ``y`` (n, C), ``beta``, ``ridge`` gamma of the output bias (None: no output bias).

    Shapes: units ``V`` (2, P, d, C); outputs (n, C); constraint values (2, P, n, K, C).
    """

    def __init__(self, Z: torch.Tensor, D: torch.Tensor, y: torch.Tensor, beta: float,
                 ridge: Optional[float] = None, device: Optional[torch.device] = None):
        device = device or torch.device("cpu")
        self.Z = Z.to(device, torch.float64)
        n, K, d = self.Z.shape
        self.D = D.reshape(D.shape[0], n, K).to(device)
        self.sgn = self.D.to(torch.float64) * 2 - 1
        self.y = y.to(device, torch.float64)
        self.beta = float(beta)
        self.ridge = ridge
        self.Phi = torch.einsum("pnk,nkd->pnd", self.D.to(torch.float64), self.Z)
        if ridge is None:
            self.s = 0.0
        else:
            self.s = (1 - (ridge / (n + ridge)) ** 0.5) / n
        self.device = device

    @property
    def shape(self):
        """(P, n, K, d, C)."""
        P = self.D.shape[0]
        n, K, d = self.Z.shape
        return P, n, K, d, self.y.shape[1]

    def zeros(self) -> torch.Tensor:
        P, _, _, d, C = self.shape
        return torch.zeros(2, P, d, C, dtype=torch.float64, device=self.device)

    # ---------------------------------------------------------------- operators
    def S(self, r: torch.Tensor) -> torch.Tensor:
        """``S r`` (S symmetric)."""
        return r - self.s * r.sum(0, keepdim=True) if self.s else r

    def F(self, V: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pnd,pdc->nc", self.Phi, V[0] - V[1])

    def FT(self, R: torch.Tensor) -> torch.Tensor:
        W = torch.einsum("pnd,nc->pdc", self.Phi, R)
        return torch.stack([W, -W])

    def G(self, V: torch.Tensor) -> torch.Tensor:
        return self.sgn[None, ..., None] * torch.einsum("nkd,spdc->spnkc", self.Z, V)

    def GT(self, W: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nkd,spnkc->spdc", self.Z, W * self.sgn[None, ..., None])

    # ---------------------------------------------------------------- values
    def loss(self, g: torch.Tensor) -> float:
        """``1/2 ||S (g - y)||^2`` (the output bias minimized out)."""
        r = self.S(g - self.y)
        return 0.5 * float((r * r).sum())

    def penalty(self, V: torch.Tensor) -> float:
        return self.beta * float(V.norm(dim=2).sum())

    def objective(self, V: torch.Tensor) -> float:
        """The program's objective (constraints not checked)."""
        return self.loss(self.F(V)) + self.penalty(V)

    def relu_output(self, V: torch.Tensor) -> torch.Tensor:
        """The net's output with the units of V as ReLU neurons: ``sum_k (Z_k v)_+`` per unit,
        signed by output sign (what the recovered net computes before its output bias)."""
        act = torch.einsum("nkd,spdc->spnkc", self.Z, V).clamp_min(0).sum(3)   # (2, P, n, C)
        return act[0].sum(0) - act[1].sum(0)

    def net_objective(self, V: torch.Tensor) -> float:
        """The objective of the net recovered from V (ReLU exactly, the best output bias):
        an upper bound on the optimum for any V."""
        return self.loss(self.relu_output(V)) + self.penalty(V)

    def output_bias(self, g: torch.Tensor) -> torch.Tensor:
        """The optimal output bias (C,) for outputs g: ``1^T (y - g) / (n + gamma)``."""
        if self.ridge is None:
            return torch.zeros(self.y.shape[1], dtype=torch.float64, device=self.device)
        return (self.y - g).sum(0) / (self.y.shape[0] + self.ridge)


def group_norms(V: torch.Tensor) -> torch.Tensor:
    """``||V[s,p,:,c]||`` (2, P, C)."""
    return V.norm(dim=2)


def group_soft_threshold(X: torch.Tensor, tau: float) -> torch.Tensor:
    """The prox of ``tau sum ||X[s,p,:,c]||``: each group shrunk by tau (zero if shorter)."""
    norms = X.norm(dim=2, keepdim=True)
    return X * (1 - tau / norms.clamp_min(1e-300)).clamp_min(0)


__all__ = ["ConvexProgram", "group_norms", "group_soft_threshold"]
