"""Tissue detection on a low-resolution view, for bright-field slides.

Stained tissue is coloured, glass and background are grey or white: the saturation
``(max - min) / max`` of a pixel separates them, with the threshold chosen per image by
Otsu's method (the one that maximises the between-class variance of the histogram).
"""

from __future__ import annotations

import torch


def saturation(view: torch.Tensor) -> torch.Tensor:
    """``(C, h, w)`` raw RGB -> ``(h, w)`` saturation in [0, 1]."""
    top = view.amax(dim=0)
    return (top - view.amin(dim=0)) / top.clamp_min(1e-6)


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1].

    >>> v = torch.cat([torch.full((100,), 0.05), torch.full((50,), 0.6)])
    >>> 0.05 < otsu_threshold(v) < 0.6
    True
    """
    hist = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0).double()
    p = hist / hist.sum().clamp_min(1)
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = torch.cumsum(p, 0)
    mu = torch.cumsum(p * centres, 0)
    between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    k = int(torch.argmax(between[:-1]))
    return float((k + 1) / bins)


def tissue_map(view: torch.Tensor, minimum: float = 0.05) -> torch.Tensor:
    """``(C, h, w)`` raw RGB view -> ``(h, w)`` bool, True on tissue.

    A view with no contrast in saturation (all tissue or all glass) is taken as all tissue,
    so the mask never hides a whole image.
    """
    s = saturation(view.float())
    t = max(otsu_threshold(s), minimum)
    mask = s > t
    if not mask.any() or mask.float().mean() > 0.995:
        return torch.ones_like(mask)
    return mask
