"""Muon: the optimizer for the transformer blocks' weight matrices.

Muon (Keller Jordan, 2024) is momentum SGD whose update for each weight matrix is replaced by the
nearest semi-orthogonal matrix (the update's singular values all set to about 1), found with a few
Newton-Schulz iterations. Every direction of the update then moves at the same rate, where Adam's
update is dominated by a few large ones. On this project's bundled data it learned the answers in
half the epochs AdamW needed at the same batch size (bench/README.md, "Muon"). Embeddings, the output head and norm
scales stay with AdamW, as in the original.

Imports only torch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import Tensor

#: Coefficients of the quintic Newton-Schulz iteration (from the original Muon): they push every
#: singular value of a normalised matrix into about [0.7, 1.2] in five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(updates: Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> Tensor:
    """For each matrix ``updates[i]`` of a ``(n, rows, cols)`` stack, about the nearest
    semi-orthogonal matrix (``U Vᵀ`` of its SVD ``U S Vᵀ``), by ``steps`` Newton-Schulz iterations
    computed in ``dtype`` (default: the input's). Returns the input's dtype and shape.

    Each iteration is ``X ← a·X + (b·G + c·G²)·X`` with ``G = X·Xᵀ``, on the wide orientation
    (``m x n``, ``m <= n``). In float32 and wider, a matrix wider than 1.5 m runs the same
    iteration on its ``m x m`` Gram matrix instead (:func:`_orthogonalize_by_gram`): 38% fewer
    products for the default model's matrices. bf16 keeps the direct form, whose rounding errors
    do not compound (through the Gram matrix they did: twice the error against float64)."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype or updates.dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # every singular value <= 1
    if x.element_size() >= 4 and x.shape[-1] * 2 > x.shape[-2] * 3:
        x = _orthogonalize_by_gram(x, steps)
    else:
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
            x = torch.baddbmm(x, poly, x, beta=a)  # a·X + (b·G + c·G²)·X
    if tall:
        x = x.mT
    return x.to(updates.dtype)


def _orthogonalize_by_gram(x: Tensor, steps: int) -> Tensor:
    """The Newton-Schulz iteration of :func:`orthogonalize` for a normalised wide stack ``x``
    (``m x n``), with every product but two of size ``m x m``: each step multiplies ``X`` on the
    left by ``M = a·I + b·G + c·G²``, so ``X_k = Q·X_0`` with ``Q`` the product of the ``M``s, and
    ``G`` follows as ``M·G·M`` (the step's ``M`` commutes with its ``G``)."""
    a, b, c = NS_COEFFICIENTS
    gram = torch.bmm(x, x.mT)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    q = None
    for step in range(steps):
        m = torch.baddbmm(gram, gram, gram, beta=b, alpha=c).add_(eye, alpha=a)
        q = m if q is None else torch.bmm(m, q)
        if step + 1 < steps:
            gram = torch.bmm(m, torch.bmm(gram, m))
    return torch.bmm(q, x)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum SGD with orthogonalised updates, for 2-D weights only.

    Per step and matrix ``W`` (``out x in``): ``m = momentum·m + g``; the update ``g + momentum·m``
    is orthogonalised, scaled by ``sqrt(max(1, out/in))`` (so tall matrices move as much per
    element as square ones), and ``W ← W·(1 - lr·weight_decay) - lr·update``. Matrices of the same
    shape are orthogonalised together in one batched product. ``ns_dtype``: the dtype of the
    Newton-Schulz products (the trainer passes its autocast dtype; None = the weights').
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, ns_dtype: torch.dtype | None = None) -> None:
        if not 0 < lr:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates matrices only, got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=group["momentum"])  # Nesterov
                directions = orthogonalize(torch.stack(updates), dtype=self.ns_dtype).unbind(0)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, directions, alpha=-group["lr"] * scale)
        return loss
