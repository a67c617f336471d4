"""The unbiased Monte-Carlo estimator of the attention-weighted feature (docs/design.md, "The estimator").

The exact aggregate of a K-level hierarchy is ``z = sum_c alpha_c sum_c' beta^c_c' f(c, c')``
(paper, eq. 5). Sampling replaces each sum by a weighted sum over the drawn cells; the
weights below make both the value and the gradient of ``z`` unbiased, with plain autograd:

inner level, one parent with ordered draws ``s_1..s_k`` from ``beta`` (no replacement)::

    R_m = 1 - sum_{j<m} beta[s_j]                                   (exclusive cumsum)
    est = (1/k) sum_m [ sum_{j<m} beta[s_j] f[s_j] + sg(R_m) (beta[s_m]/sg(beta[s_m])) f[s_m] ]

Collecting the terms of each ``f[s_j]`` gives the weight of the ``j``-th draw (1-indexed)::

    w_j = ( (k - j) beta[s_j] + sg(R_j) beta[s_j] / sg(beta[s_j]) ) / k

outer level, counts ``k_c`` of ``N`` draws with replacement from ``alpha``::

    w_c = (k_c / N) alpha[c] / sg(alpha[c])

A parent whose multiplicity reaches its cell count takes every cell with ``w = beta`` (the
exact sum). Because the estimator is linear in the features, a leaf's weight in ``z`` is the
product of the weights along its path. ``sg`` is ``.detach()``; ``beta / sg(beta)`` is
computed as ``exp(log beta - sg(log beta))`` (value 1, gradient ``d log beta``).
"""

from __future__ import annotations

import torch


def _times_unit_ratio(x: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``x * p / sg(p)``: the value of ``x``, gradient ``x d log p`` (the score-function
    surrogate); ``x`` itself where ``log_p`` carries no gradient (inference: four operations
    fewer)."""
    if not log_p.requires_grad:
        return x
    return x * torch.exp(log_p - log_p.detach())


def with_replacement_weights(log_p: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Weights of the level-1 (with replacement) estimator.

    Args:
        log_p: ``(G,)`` or ``(B, G)`` log-probabilities ``log alpha``.
        counts: same shape, how often each cell was drawn (``N`` in all per row).

    Returns:
        Weights of the same shape, ``(k_c / N) * alpha_c / sg(alpha_c)``; zero where
        ``k_c = 0``.

    >>> la = torch.log(torch.tensor([0.5, 0.5]))
    >>> with_replacement_weights(la, torch.tensor([3, 1])).tolist()
    [0.75, 0.25]
    """
    n = counts.sum(dim=-1, keepdim=True).clamp_min(1).to(log_p.dtype)
    return _times_unit_ratio(counts.to(log_p.dtype) / n, log_p)


def without_replacement_weights(
    log_p: torch.Tensor, draws: torch.Tensor, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Weights of the inner (without replacement) estimator of one or many parents.

    Args:
        log_p: ``(M, G)`` log-probabilities ``log beta`` of ``M`` parents.
        draws: ``(M, K)`` cell indices in draw order (``K < G`` where used).
        counts: ``(M,)`` draws ``k_i <= K`` of each parent (None: ``K`` for all): row ``i``
            uses the prefix ``draws[i, :k_i]``, a draw of size ``k_i`` (Gumbel-top-k), so
            parents drawn different numbers of times are weighted in one pass.

    Returns:
        ``(M, K)`` weights ``w_j`` of the drawn cells, in draw order; zero past ``k_i``.

    >>> lb = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> [round(w, 4) for w in without_replacement_weights(lb, torch.tensor([[0, 2]]))[0].tolist()]
    [0.75, 0.25]
    >>> lb2 = lb.expand(2, 3)
    >>> w = without_replacement_weights(lb2, torch.tensor([[0, 2], [0, 2]]), torch.tensor([2, 1]))
    >>> [[round(v, 4) for v in row] for row in w.tolist()]
    [[0.75, 0.25], [1.0, 0.0]]
    """
    k_max = draws.shape[1]
    log_b = torch.gather(log_p, 1, draws.to(log_p.device))  # (M, K)
    beta = log_b.exp()
    taken = torch.cumsum(beta.detach(), dim=1) - beta.detach()  # exclusive cumsum, (M, K)
    remaining = (1.0 - taken).clamp_min(0.0)  # sg(R_m)
    j = torch.arange(k_max, device=log_p.device)
    if counts is None:
        k = torch.full((log_p.shape[0], 1), k_max, dtype=log_p.dtype, device=log_p.device)
    else:
        k = counts.to(device=log_p.device, dtype=log_p.dtype)[:, None]  # (M, 1)
    later = (k - 1 - j).clamp_min(0)  # k - j for the 1-indexed j-th draw, (M, K)
    w = (later * beta + _times_unit_ratio(remaining, log_b)) / k
    return w if counts is None else w * (j < k)


def exact_weights(log_p: torch.Tensor) -> torch.Tensor:
    """Weights when a parent's multiplicity reaches its cell count: every cell, ``w = beta``."""
    return log_p.exp()
