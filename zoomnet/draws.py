"""How many draws to train with, chosen from the data (``model.train_samples: "auto"``).

The estimator is unbiased for any N (docs/design.md); N sets how noisy each step's gradient
is. At the start of a run, for N = 8, 16, 32, ... the untrained model's gradient is computed
``draws`` times on the same first batches, each time with new draws; its relative standard
error over the draws,

    rse(N) = sqrt( sum_r ||g_r - mean g||^2 / (R - 1) ) / ||mean g||,

averaged over the batches, falls about as 1 / sqrt(N). The smallest N with rse <= the
tolerance (``train.samples_tolerance``) is the run's training N: more draws would
mostly cost time. The choice and every N's measurement go to the run's log and
``config.json`` (``model.train_samples`` holds the number chosen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from zoomnet.config.train import TrainConfig
from zoomnet.data.examples import Example
from zoomnet.objective import training_loss

CANDIDATES = (8, 16, 32, 64, 128, 256, 512)


@dataclass
class SamplesChoice:
    """The training N chosen, and the relative standard error measured at each N tried."""

    samples: int
    tolerance: float
    measured: dict[int, float]

    def describe(self) -> str:
        tried = ", ".join(f"{n}: {rse:.3f}" for n, rse in self.measured.items())
        met = self.measured[self.samples] <= self.tolerance
        why = f"<= {self.tolerance:g}" if met else f"none <= {self.tolerance:g}: the largest tried"
        return f"training draws: N = {self.samples} (gradient relative standard error {why}; by N: {tried})"


def gradient_rse(model: torch.nn.Module, batches: list[list[Example]], cfg: TrainConfig, samples: int,
                 draws: int = 4) -> float:
    """The relative standard error of one step's gradient over ``draws`` independent draw
    sets at ``samples`` draws, averaged over ``batches`` (the loss of ``zoomnet train``
    without the contrastive term; the weights are not changed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    rses = []
    for i, batch in enumerate(batches):
        labels = torch.tensor([e.label for e in batch], device=device)
        grads = []
        for r in range(draws):
            generator = torch.Generator().manual_seed(1000 * i + r)
            out = model([e.source for e in batch], samples=samples, generator=generator)
            loss, _ = training_loss(model, out, batch, labels, cfg, False)
            grad = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                    for g, p in zip(grad, params)]))
        stacked = torch.stack(grads)  # (R, P)
        mean = stacked.mean(0)
        spread = float(((stacked - mean) ** 2).sum()) / (draws - 1)
        rses.append(math.sqrt(spread) / max(float(mean.norm()), 1e-12))
    return sum(rses) / len(rses)


def choose_train_samples(model: torch.nn.Module, train: list[Example], cfg: TrainConfig, batches: int = 2,
                         draws: int = 4, candidates: tuple[int, ...] = CANDIDATES,
                         log: Callable[[str], None] | None = None) -> SamplesChoice:
    """The smallest N of ``candidates`` whose gradient's relative standard error (over
    ``draws`` draw sets, on the first ``batches`` batches of ``train``) is at most
    ``cfg.samples_tolerance`` (else the largest). Leaves the weights, the model's mode and
    the global random state as they were."""
    size = max(1, cfg.batch_size)
    firsts = [train[i * size:(i + 1) * size] for i in range(batches)]
    firsts = [b for b in firsts if b and len({(e.source.height, e.source.width) for e in b}) == 1] or [train[:1]]
    was_training, rng = model.training, torch.get_rng_state()
    measured: dict[int, float] = {}
    try:
        model.train()
        for n in candidates:
            measured[n] = gradient_rse(model, firsts, cfg, n, draws)
            if log:
                log(f"  draws N = {n}: gradient relative standard error {measured[n]:.3f}")
            if measured[n] <= cfg.samples_tolerance:
                break
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    return SamplesChoice(next((n for n, v in measured.items() if v <= cfg.samples_tolerance), n),
                         cfg.samples_tolerance, measured)
