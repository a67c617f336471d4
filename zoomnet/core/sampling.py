"""Sampling from attention distributions (docs/design.md, "Sampling").

- level 1: ``N`` draws with replacement (``torch.multinomial``), summarised as counts;
- deeper levels: ``k`` draws without replacement per distinct parent, by Gumbel-top-k on
  ``log beta`` (noise on log-probabilities, not on probabilities), in draw order;
- deterministic inference: largest-remainder counts and top-k cells;
- the complementary distributions ``(1 - p) / sum(1 - p)`` of the contrastive pass.

All distributions are passed as log-probabilities.
"""

from __future__ import annotations

import math

import torch


MULTINOMIAL_LIMIT = 2**24  # categories torch.multinomial accepts (a dense grid of a gigapixel view has more)


LEFT_OUT = -1e4
"""The log-probability (before renormalising) of a cell a map leaves out: outside the
image, or off the tissue. Very negative but finite, so that the surrogate ``p / sg(p)``
stays 1 (not NaN) where it is never drawn."""


def drawable(log_p: torch.Tensor) -> torch.Tensor:
    """Which cells of a log-probability map may be drawn (not left out), bool."""
    return log_p > LEFT_OUT / 10


def smoothed_log_softmax(logits: torch.Tensor, smooth: float = 0.0) -> torch.Tensor:
    """``log((1 - smooth) * softmax(logits) + smooth / G)`` over the last dimension.

    Mixing a little uniform mass keeps sampling exploring while attention is untrained
    (as ATS's ``SampleSoftmax(smooth)``); the estimator stays unbiased for the mixture.

    >>> smoothed_log_softmax(torch.tensor([0.0, 0.0]), 0.5).exp().tolist()
    [0.5, 0.5]
    """
    log_p = torch.log_softmax(logits, dim=-1)
    if smooth <= 0.0:
        return log_p
    n = logits.shape[-1]
    # the uniform part as a broadcast scalar (made where log_p lives: no copy from the host)
    uniform = torch.full((), math.log(smooth / n), dtype=log_p.dtype, device=log_p.device)
    return torch.logaddexp(log_p + math.log1p(-smooth), uniform)


def complement_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """Log of ``(1 - p) / sum(1 - p)`` over the last dimension (the contrastive pass).

    Every cell but the largest has ``p <= 1/2``, where ``log1p(-p)`` is exact. The largest
    takes the log-sum-exp of the other cells' ``log p`` (the same number for a normalised
    map): where it holds all the mass to float precision (``p = 1.0`` in float32 once the
    others are below about 6e-8), ``log1p(-p)`` would be ``-inf`` with a ``0 / 0`` gradient;
    this way it stays the finite log of the others' mass. A map with a single cell has no
    complement; it is returned unchanged.

    >>> complement_log_probs(torch.log(torch.tensor([0.5, 0.25, 0.25]))).exp().tolist()
    [0.25, 0.375, 0.375]
    """
    if log_p.shape[-1] == 1:
        return log_p
    top = log_p.argmax(dim=-1, keepdim=True)  # (…, 1)
    rest = torch.logsumexp(log_p.scatter(-1, top, -math.inf), dim=-1, keepdim=True)  # log(1 - p_top)
    log_q = torch.log1p(-log_p.exp().clamp(max=0.5)).scatter(-1, top, rest)  # (…, G)
    return log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)


def _on_device(log_p: torch.Tensor, on_device: bool | None) -> bool:
    return log_p.device.type != "cpu" if on_device is None else on_device


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded from the host ``generator`` (one number drawn from
    it, on the host): draws made on a GPU are reproducible on that device and seed, and
    differ from the CPU's, which draws from the host generator itself."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def sample_with_replacement(
    log_p: torch.Tensor, n: int, generator: torch.Generator | None = None, on_device: bool | None = None,
) -> torch.Tensor:
    """Draw ``n`` cells with replacement; return the counts per cell.

    Args:
        log_p: ``(B, G)`` log-probabilities.
        n: draws per row.
        generator: random source (the host's; on a GPU it seeds a generator there).
        on_device: draw where ``log_p`` lives with :func:`device_generator` (None: where it
            is not on the CPU), so that only the drawn cells come back to the host.

    Returns:
        ``(B, G)`` int64 counts, each row summing to ``n``.
    """
    if _on_device(log_p, on_device) and log_p.shape[1] <= MULTINOMIAL_LIMIT:  # drawn where the map is
        p = log_p.detach().float().exp()
        draws = torch.multinomial(p, n, replacement=True, generator=device_generator(generator, p.device))
        return torch.zeros(p.shape, dtype=torch.long, device=p.device).scatter_add_(1, draws, torch.ones_like(draws))
    p = log_p.detach().float().cpu().exp()  # (B, G); sampled on the CPU with a CPU generator
    if p.shape[1] <= MULTINOMIAL_LIMIT:
        draws = torch.multinomial(p, n, replacement=True, generator=generator)  # (B, n)
    else:  # torch.multinomial takes at most 2^24 categories: invert the CDF instead
        cdf = torch.cumsum(p.double(), dim=1)  # (B, G)
        u = torch.rand(p.shape[0], n, generator=generator, dtype=torch.float64) * cdf[:, -1:]
        draws = torch.searchsorted(cdf, u, right=True).clamp(max=p.shape[1] - 1)  # (B, n)
    counts = torch.zeros(p.shape, dtype=torch.long)
    counts.scatter_add_(1, draws, torch.ones_like(draws))
    return counts


def largest_remainder_counts(log_p: torch.Tensor, n: int) -> torch.Tensor:
    """Deterministic counts: ``floor(n * p)`` plus one for the largest remainders.

    >>> largest_remainder_counts(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 4).tolist()
    [[2, 1, 1]]
    """
    expected = log_p.detach().double().cpu().exp() * n  # (B, G)
    # a probability that rounds to just below an exact share (0.45 -> 0.4499999) keeps it
    counts = torch.floor(expected + 1e-5).long()
    missing = n - counts.sum(dim=1)  # (B,)
    remainder = expected - counts
    order = torch.argsort(remainder, dim=1, descending=True, stable=True)  # (B, G)
    for b in range(counts.shape[0]):
        if missing[b] >= 0:
            counts[b, order[b, : int(missing[b])]] += 1
        else:  # the tolerance above gave one too many: take it from the smallest remainder
            counts[b, order[b, int(missing[b]) :]] -= 1
    return counts


def sample_without_replacement(
    log_p: torch.Tensor, k: int, generator: torch.Generator | None = None, on_device: bool | None = None,
) -> torch.Tensor:
    """Gumbel-top-k: ``k`` distinct cells per row, in draw order.

    Adding Gumbel noise to log-probabilities and sorting gives the same law as drawing one
    cell at a time from the renormalised remaining mass (successive sampling).

    Args:
        log_p: ``(M, G)`` log-probabilities.
        k: draws per row, ``k <= G``.
        generator: random source.
        on_device: draw the Gumbel keys where ``log_p`` lives (None: where it is not on
            the CPU), in float32, with :func:`device_generator`.

    Returns:
        ``(M, k)`` int64 cell indices; column ``m`` is the ``m``-th draw.
    """
    if _on_device(log_p, on_device):
        u = torch.rand(log_p.shape, generator=device_generator(generator, log_p.device), device=log_p.device)
        u.clamp_(torch.finfo(torch.float32).tiny, 1.0 - 1e-7)
        return torch.topk(u.log_().neg_().log_().neg_().add_(log_p.detach().float()), k, dim=1).indices
    u = torch.rand(log_p.shape, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    u.clamp_(tiny, 1.0 - 1e-16)  # no log(0) at either end
    # (M, G): log p plus Gumbel noise -log(-log u), in place: one buffer of keys, not two
    # (the level-2 draws of the colon preset peak there: 80 kB a buffer)
    keys = u.log_().neg_().log_().neg_().add_(log_p.detach().cpu())
    return torch.topk(keys, k, dim=1).indices


def top_k_children(log_p: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic counterpart of :func:`sample_without_replacement`: the ``k`` most likely
    cells, most likely first (ties broken by index)."""
    order = torch.argsort(log_p.detach().cpu(), dim=1, descending=True, stable=True)
    return order[:, :k]
