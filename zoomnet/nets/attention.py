"""Attention nets ``a_l``: fully convolutional, one logit per view pixel.

The default is the authors' net (Kong & Henao, code for the colon set): three 3x3
convolutions, 3 -> 8 -> 8 -> 1 channels, with ReLU between them; the last convolution gives
the logit (864 multiply-adds per view pixel on RGB). ``head="1x1"`` is the variant of
zoomnet 0.1.0: ``depth`` 3x3 convolutions of ``width`` channels, then a 1x1 convolution to
the logit (1,376 multiply-adds per pixel at depth 3); a run folder that does not record the
head was trained with it. Either way the receptive field is ``2 depth + 1`` pixels (a halo
of ``depth`` on each side), which strip-wise evaluation of large views relies on.

An optional *contrast prior* adds ``gain * local contrast`` to the logits: how far each
view pixel is from the mean of its 7x7 neighbourhood (normalised units, mean over channels,
capped at 3). Untrained attention is then not uniform but drawn to detail — objects, tissue,
strokes — instead of flat background, which is where a tiny object can be at all; the gain
is learnt with the rest, so training can turn it down where detail is not what matters.
Its radius is 3, within the halo of the default depth.
"""

from __future__ import annotations

import torch
from torch import nn

from zoomnet.nets.registry import register

HEADS = ("3x3", "1x1")  # the authors' net; zoomnet 0.1.0's


class ConvAttention(nn.Module):
    """``depth`` 3x3 convolutions with ReLU between them, one logit per pixel.

    Args:
        in_channels: image channels.
        width: channels of the hidden convolutions (8 in the paper).
        depth: number of 3x3 convolutions (3 in the paper).
        head: ``"3x3"``: the last 3x3 convolution gives the logit (the authors' net);
            ``"1x1"``: all ``depth`` 3x3 convolutions have ``width`` channels and a 1x1
            convolution gives the logit.
        prior: initial gain of the contrast prior (0: none).
    """

    def __init__(self, in_channels: int = 3, width: int = 8, depth: int = 3, prior: float = 0.0, head: str = "3x3"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"attention head={head!r}: use one of {', '.join(HEADS)}")
        if depth < 1 or width < 1:
            raise ValueError(f"attention depth={depth}, width={width}: give at least 1 each")
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            out = 1 if head == "3x3" and i == depth - 1 else width
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if out != 1:
                layers.append(nn.ReLU(inplace=True))
            c = out
        if head == "1x1":
            layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)
        self.prior_gain = nn.Parameter(torch.tensor(float(prior))) if prior else None
        self.halo = max(depth, 3) if prior else depth  # receptive-field radius in view pixels

    def forward(self, view: torch.Tensor, split: bool = False):
        """``(M, C, h, w)`` normalised view -> ``(M, h, w)`` logits; with ``split`` also the
        learnt part alone (the logits without the prior), which attention distillation
        trains: anchoring the prior's large logits to sub-tile scores would undo it."""
        learned = self.net(view).squeeze(1)  # (M, h, w)
        logits = learned if self.prior_gain is None else torch.addcmul(learned, local_contrast(view), self.prior_gain)
        return (logits, learned) if split else logits


def local_contrast(view: torch.Tensor, radius: int = 3, cap: float = 3.0) -> torch.Tensor:
    """``(M, C, h, w)`` -> ``(M, h, w)``: mean over channels of ``|x - mean of its
    (2 radius + 1)^2 neighbourhood|``, capped (neighbourhoods cut by the border are averaged
    over the pixels inside).

    >>> v = torch.zeros(1, 1, 9, 9); v[0, 0, 4, 4] = 2.0
    >>> c = local_contrast(v)
    >>> round(float(c[0, 4, 4]), 3), float(c[0, 0, 0])
    (1.959, 0.0)
    """
    # the running sums go along rows and columns; on a channels-last view (what a large
    # view's convolutions take on a CPU) they would stride over the channels, so they run on
    # a copy in the default layout
    return _contrast(view.contiguous(), radius, cap)


def _contrast(view: torch.Tensor, radius: int, cap: float) -> torch.Tensor:
    """:func:`local_contrast` in the view's own memory layout."""
    m, c, h, w = view.shape
    # neighbourhood sums as a box filter, one axis at a time by differences of running sums
    # (linear in the view whatever the radius, where a convolution of ones is not; a row's
    # sum, never the whole view's, so float32 keeps its precision): S[i + 2r + 1] - S[i] of
    # the running sum S of the axis zero-padded by r + 1 before and r after; both axes are
    # padded at once, and the padded rows' sums along the first axis are zero
    n = 2 * radius + 1
    running = torch.nn.functional.pad(view, (radius + 1, radius, radius + 1, radius)).cumsum(3)
    running = (running[..., n:] - running[..., :w]).cumsum(2)  # (M, C, h + n, w)
    sums = running[:, :, n:] - running[:, :, :h]  # (M, C, h, w)
    # x - sums / count, the counts being how many pixels of each neighbourhood lie inside
    far = torch.addcdiv(view, sums, _inside_counts(h, w, radius, view.device, view.dtype), value=-1)
    return far.abs().mean(dim=1).clamp(max=cap)  # (M, h, w)


_COUNTS: dict[tuple, torch.Tensor] = {}


def _inside_counts(h: int, w: int, radius: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(h, w)``: how many pixels of each neighbourhood lie inside the view (cached: the
    same view sizes recur every step)."""
    key = (h, w, radius, str(device), dtype)
    if key not in _COUNTS:
        if len(_COUNTS) > 256:
            _COUNTS.clear()
        with torch.inference_mode(False), torch.no_grad():  # made in predict, saved for backward in training
            def inside(n: int) -> torch.Tensor:
                i = torch.arange(n, device=device)
                return ((i + radius).clamp(max=n - 1) - (i - radius).clamp(min=0) + 1).to(dtype)
            _COUNTS[key] = inside(h)[:, None] * inside(w)[None, :]
    return _COUNTS[key]


@register("attention", "conv")
def conv_attention(in_channels: int = 3, width: int = 8, depth: int = 3, prior: float = 0.0,
                   head: str = "3x3") -> ConvAttention:
    return ConvAttention(in_channels, width, depth, prior, head)
