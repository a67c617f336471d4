"""zoomnet.core.expectation: the estimator, exactly unbiased in value and gradient (checked by enumerating every draw)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from zoomnet.core import expectation

TOL = 1e-10


@pytest.fixture(autouse=True)
def float64():
    """Every tensor of these tests in float64 (restored afterwards for the other tests)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def inclusive_cumsum_weights(log_p, draws):
    """Wrong variant 1: the remaining mass includes the m-th draw (value biased)."""
    k = draws.shape[1]
    log_b = torch.gather(log_p, 1, draws)
    beta = log_b.exp()
    remaining = (1.0 - torch.cumsum(beta.detach(), dim=1)).clamp_min(0.0)
    later = torch.arange(k - 1, -1, -1, dtype=log_p.dtype)
    return (later * beta + remaining * torch.exp(log_b - log_b.detach())) / k


def plain_weights(log_p, draws):
    """Wrong variant 2: plain weights without the stop-gradient surrogate (gradient biased).

    The value is the same as the right estimator's; only the score-function term is lost.
    """
    k = draws.shape[1]
    beta = torch.gather(log_p, 1, draws).exp()
    remaining = (1.0 - (torch.cumsum(beta, dim=1) - beta)).clamp_min(0.0)
    later = torch.arange(k - 1, -1, -1, dtype=log_p.dtype)
    return (later * beta + remaining) / k


def successive_probability(p: torch.Tensor, draws: tuple[int, ...]) -> float:
    prob, left = 1.0, 1.0
    for s in draws:
        prob *= float(p[s]) / left
        left -= float(p[s])
    return prob


class Tree:
    """Attention logits for every parent of a K-level hierarchy and a feature per leaf."""

    def __init__(self, sizes: list, dim: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.logits: dict[tuple, torch.Tensor] = {}
        self.features: dict[tuple, torch.Tensor] = {}

        def grow(path: tuple, level: int):
            size = sizes[level] if isinstance(sizes[level], int) else sizes[level][path[-1] % len(sizes[level])]
            self.logits[path] = (2 * torch.randn(size, generator=gen)).requires_grad_()
            for c in range(size):
                if level + 1 < len(sizes):
                    grow(path + (c,), level + 1)
                else:
                    self.features[path + (c,)] = torch.randn(dim, generator=gen).requires_grad_()

        grow((), 0)
        self.levels = len(sizes)

    def log_p(self, path):
        return torch.log_softmax(self.logits[path], dim=0)

    def leaves(self):
        return list(self.logits.values()) + list(self.features.values())

    def exact(self, path=()):
        """The exact aggregate of the subtree at ``path``."""
        if path in self.features:
            return self.features[path]
        p = self.log_p(path).exp()
        return sum(p[c] * self.exact(path + (c,)) for c in range(p.numel()))

    def inner(self, path, k, weights_fn):
        """Yield ``(probability, estimate)`` for every outcome below an inner parent drawn k times."""
        if path in self.features:
            yield 1.0, self.features[path]
            return
        log_p = self.log_p(path)
        G = log_p.numel()
        if k >= G:
            options = [(tuple(range(G)), 1.0, expectation.exact_weights(log_p))]
        else:
            options = []
            for draws in itertools.permutations(range(G), k):
                w = weights_fn(log_p[None], torch.tensor([draws]))[0]
                options.append((draws, successive_probability(log_p.detach().exp(), draws), w))
        for draws, prob, w in options:
            subtrees = [list(self.inner(path + (c,), 1, weights_fn)) for c in draws]
            for combo in itertools.product(*subtrees):
                p = prob * math.prod(q for q, _ in combo)
                yield p, sum(w[j] * v for j, (_, v) in enumerate(combo))

    def outcomes(self, n, outer_fn, weights_fn):
        """Every outcome of the whole hierarchy with N level-1 draws."""
        log_alpha = self.log_p(())
        G = log_alpha.numel()
        alpha = log_alpha.detach().exp()
        for seq in itertools.product(range(G), repeat=n):
            counts = torch.bincount(torch.tensor(seq), minlength=G)
            prob = math.prod(float(alpha[c]) for c in seq)
            w1 = outer_fn(log_alpha, counts)
            cells = [c for c in range(G) if counts[c] > 0]
            subtrees = [list(self.inner((c,), int(counts[c]), weights_fn)) for c in cells]
            for combo in itertools.product(*subtrees):
                p = prob * math.prod(q for q, _ in combo)
                yield p, sum(w1[c] * v for c, (_, v) in zip(cells, combo))


def plain_outer(log_alpha, counts):
    """Wrong outer weights without the surrogate: no gradient reaches alpha."""
    return counts.to(log_alpha.dtype) / counts.sum()


def expected_and_exact(tree: Tree, n: int, outer_fn, weights_fn):
    w = torch.linspace(-1.0, 1.0, next(iter(tree.features.values())).numel())
    total_p, expected = 0.0, 0.0
    for p, z in tree.outcomes(n, outer_fn, weights_fn):
        total_p += p
        expected = expected + p * (w @ z)
    assert total_p == pytest.approx(1.0, abs=1e-12)
    params = tree.leaves()
    e_grads = torch.autograd.grad(expected, params, allow_unused=True)
    exact = w @ tree.exact()
    x_grads = torch.autograd.grad(exact, params)
    value_err = abs(float((expected - exact).detach()))
    grad_err = max(
        float((e if e is not None else torch.zeros_like(x)).sub(x).abs().max())
        for e, x in zip(e_grads, x_grads)
    )
    return value_err, grad_err


# Level 1: 3 cells and N = 3 draws; level 2: parents with 2, 3 and 4 cells, so a parent can be
# drawn more often than it has cells (3 > 2: exact sum), exactly as often (3 = 3), and less.
TWO_LEVELS = [3, [2, 3, 4]]


THREE_LEVELS = [2, [2, 3], 2]


@pytest.mark.parametrize("sizes,n", [(TWO_LEVELS, 3), (TWO_LEVELS, 2), (THREE_LEVELS, 2), ([4], 3)])
def test_estimator_is_exactly_unbiased(sizes, n):
    tree = Tree(sizes, dim=3, seed=0)
    value_err, grad_err = expected_and_exact(
        tree, n, expectation.with_replacement_weights, expectation.without_replacement_weights
    )
    assert value_err < TOL
    assert grad_err < TOL


def test_inclusive_cumsum_variant_is_value_biased():
    tree = Tree(TWO_LEVELS, dim=3, seed=0)
    value_err, _ = expected_and_exact(tree, 3, expectation.with_replacement_weights, inclusive_cumsum_weights)
    assert value_err > 1e-3


def test_plain_weights_variant_is_gradient_biased():
    tree = Tree(TWO_LEVELS, dim=3, seed=0)
    value_err, grad_err = expected_and_exact(tree, 3, expectation.with_replacement_weights, plain_weights)
    assert value_err < TOL  # right value ...
    assert grad_err > 1e-3  # ... wrong gradient
    _, grad_err_outer = expected_and_exact(tree, 3, plain_outer, expectation.without_replacement_weights)
    assert grad_err_outer > 1e-3


def test_inner_weights_sum_to_one():
    """Each draw's weights sum to one in value (sum_m [sum_{j<m} beta + R_m] / k = 1), so the
    estimate is a weighted mean of the drawn features."""
    gen = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(5, 6, generator=gen), dim=1)
    for k in (1, 2, 5):
        draws = torch.stack([torch.randperm(6, generator=gen)[:k] for _ in range(5)])
        w = expectation.without_replacement_weights(log_p, draws)
        assert torch.allclose(w.sum(dim=1), torch.ones(5), atol=1e-12)
