"""How sure a sampled prediction is: statistics of independent draw sets.

A prediction is a Monte Carlo estimate: ``z`` is unbiased for the exact aggregate, and the
classifier is linear, so the logits of one draw set are an unbiased estimate of the logits
of the exact aggregate, ``g(E[z])``, and the mean of R draw sets' logits is that of their
mean ``z``. Over R independent draw sets (R copies of the image in one batch, or rounds of
draws), this module gives

- the mean logits and the class probabilities they give (the prediction);
- each class probability's standard error (the delta method through the softmax, from the
  covariance of the draw sets' logits);
- the chance that another estimate of the same size would predict another class: the
  normal tail of the margin between the predicted class and the runner-up, its mean over
  its standard error (a t quantile with R - 1 degrees of freedom);
- whether the decision is settled: the margin's interval at ``level`` excludes zero.

Checked in tests/test_uncertainty.py against exact expectations enumerated on images small
enough (coverage of the nominal 95 % interval) and on simulated flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher from
    the normal quantile: within 1e-3 of the exact value for df >= 3).

    >>> round(t_quantile(0.975, 1000), 3), round(t_quantile(0.975, 9), 2)
    (1.962, 2.26)
    """
    if df <= 0:
        return float("inf")
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p)))
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def t_tail(x: float, df: int) -> float:
    """``P(T < x)`` for Student's t with ``df`` (whole) degrees of freedom, by the finite
    series of Abramowitz & Stegun 26.7.3-4.

    >>> round(t_tail(0.0, 5), 6), round(t_tail(2.262157, 9), 4), round(t_tail(-1.0, 1), 4)
    (0.5, 0.975, 0.25)
    """
    if df <= 0:
        return 0.5
    theta = math.atan(abs(x) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd
        term, total = math.cos(theta), 0.0
        if df > 1:
            total = term
            for k in range(3, df - 1, 2):  # 2 4 ... (k-1) / (1 3 ... k) cos^k
                term *= c2 * (k - 1) / k
                total += term
        inside = 2 / math.pi * (theta + s * total)
    else:  # even
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):  # 1 3 ... (k-1) / (2 4 ... k) cos^k
            term *= c2 * (k - 1) / k
            total += term
        inside = s * total
    return 0.5 + math.copysign(0.5 * inside, x)


@dataclass
class DrawSetStatistics:
    """What R draw sets say of one image.

    Attributes:
        probabilities: ``(C,)`` softmax of the mean logits.
        standard_error: ``(C,)`` standard error of each probability.
        predicted: index of the predicted class.
        margin: mean logit margin of the predicted class over the runner-up.
        margin_se: its standard error.
        flip: chance that another estimate of the same size predicts another class.
        settled: the margin's interval at the asked level excludes zero.
        sets: R.
    """

    probabilities: torch.Tensor
    standard_error: torch.Tensor
    predicted: int
    margin: float
    margin_se: float
    flip: float
    settled: bool
    sets: int


def draw_set_statistics(logits: torch.Tensor, level: float = 0.95) -> DrawSetStatistics:
    """Statistics of ``(R, C)`` logits of R independent draw sets of one image (R >= 2 for
    standard errors; with R = 1 they are NaN and nothing is settled).

    >>> stats = draw_set_statistics(torch.tensor([[0.0, 2.0], [0.0, 2.2], [0.0, 1.8]]))
    >>> stats.predicted, round(stats.margin, 2), stats.settled, stats.flip < 0.01
    (1, 2.0, True, True)
    """
    logits = logits.detach().double()
    R, C = logits.shape
    mean = logits.mean(0)
    probs = torch.softmax(mean, 0)
    order = torch.argsort(mean, descending=True)
    top, second = int(order[0]), int(order[1]) if C > 1 else int(order[0])
    margins = logits[:, top] - logits[:, second]  # (R,)
    margin = float(margins.mean())
    if R < 2:
        nan = float("nan")
        return DrawSetStatistics(probs.float(), torch.full((C,), nan), top, margin, nan, nan, False, R)
    cov = torch.cov(logits.T).reshape(C, C) / R  # of the mean logits
    jac = torch.diag(probs) - probs[:, None] * probs[None, :]  # d softmax / d logits
    se = torch.sqrt(torch.clamp(torch.diagonal(jac @ cov @ jac.T), min=0.0))
    margin_se = float(margins.std(unbiased=True)) / R**0.5
    if margin_se == 0.0:
        flip, settled = 0.0, margin > 0
    else:
        flip = t_tail(-margin / margin_se, R - 1)
        settled = margin - t_quantile(0.5 + level / 2, R - 1) * margin_se > 0
    return DrawSetStatistics(probs.float(), se.float(), top, margin, margin_se, flip, bool(settled), R)


def predict_draw_sets(model, source, views: torch.Tensor | None, sets: int, samples: int | None,
                      generator: torch.Generator | None):
    """``(R, C)`` logits of ``sets`` independent draw sets of one image (its copies in one
    batch: the model draws each row on its own), and the output (pictures show the first)."""
    if views is None and hasattr(model, "views_in_strips") and not model.views_in_strips(source.height, source.width):
        views = model.read_views([source])  # read once; the copies share it (and its level-1 maps)
    batch_views = None if views is None else views.expand(sets, *views.shape[1:])
    out = model.predict([source] * sets, views=batch_views, samples=samples, generator=generator)
    return out.logits, out


def predict_until_settled(model, source, views: torch.Tensor | None, samples: int, generator: torch.Generator | None,
                          max_rounds: int = 8, level: float = 0.95):
    """Draw sets of ``samples`` draws, two at first and then one at a time, until the
    predicted class's margin is settled at ``level`` or ``max_rounds`` sets are drawn;
    returns their ``(R, C)`` logits and the first set's output."""
    logits, first = predict_draw_sets(model, source, views, 2, samples, generator)
    while logits.shape[0] < max_rounds and not draw_set_statistics(logits, level).settled:
        more, _ = predict_draw_sets(model, source, views, 1, samples, generator)
        logits = torch.cat([logits, more])
    return logits, first
