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


def tissue_threshold(view: torch.Tensor, minimum: float = 0.05) -> float | None:
    """The saturation above which a pixel of this image is tissue: Otsu's threshold on the
    ``(C, h, w)`` raw RGB view of the whole image (at least ``minimum``); None where the view
    has no contrast in saturation (all tissue or all glass): everything is then tissue, so
    the mask never hides a whole image. Deeper levels apply the image's threshold to their
    own views (Otsu on a tile of tissue alone would cut the tissue in two).

    >>> view = torch.full((3, 8, 8), 240.0); view[0, :4] = 120.0  # a coloured half
    >>> 0.05 <= tissue_threshold(view) < 0.5, tissue_threshold(torch.full((3, 8, 8), 240.0))
    (True, None)
    """
    s = saturation(view.float())
    t = max(otsu_threshold(s), minimum)
    mask = s > t
    if not mask.any() or mask.float().mean() > 0.995:
        return None
    return t


def tissue_map(view: torch.Tensor, minimum: float = 0.05) -> torch.Tensor:
    """``(C, h, w)`` raw RGB view -> ``(h, w)`` bool, True on tissue (all True where the view
    has no contrast: :func:`tissue_threshold`)."""
    t = tissue_threshold(view, minimum)
    s = saturation(view.float())
    return torch.ones_like(s, dtype=torch.bool) if t is None else s > t


def tissue_of_views(views: torch.Tensor, thresholds: list[float | None]) -> torch.Tensor:
    """``(M, C, h, w)`` raw views -> ``(M, h, w)`` bool: each view's pixels above its image's
    threshold (everything where the threshold is None)."""
    top = views.float().amax(dim=1)
    s = (top - views.float().amin(dim=1)) / top.clamp_min(1e-6)  # (M, h, w)
    t = torch.tensor([-1.0 if v is None else v for v in thresholds], dtype=s.dtype, device=s.device)
    return s > t[:, None, None]
