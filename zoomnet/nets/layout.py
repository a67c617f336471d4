"""The memory layout a network input runs fastest in, on the device it is on."""

from __future__ import annotations

import torch


def conv_layout(x: torch.Tensor) -> torch.Tensor:
    """A network input ``(M, C, h, w)`` in the memory layout its convolutions run fastest in.

    On a CPU, for inputs of at least 20,480 values, that is channels-last: oneDNN's
    convolutions, their backward pass and max pooling are fastest on it for the batches of
    small images and narrow nets here, with the same values to float rounding. Smaller
    inputs keep the default layout, on which PyTorch runs its own direct convolution, the
    faster one for a single small view (the experiment page "training-step" has the
    figures); ``LeNet`` turns any input channels-last itself, for its max pooling. Weights
    keep the default layout (a checkpoint stores them as they are). Elsewhere the input is
    left as it is.
    """
    if x.device.type == "cpu" and x.dim() == 4 and x.numel() >= 20480:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def standardized(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw pixels ``(M, C, h, w)`` minus ``mean``, over ``std`` (``(1, C, 1, 1)`` each), on
    their device and in their dtype: what every net is fed, before :func:`conv_layout`."""
    return ((pixels.to(mean.device) - mean) / std).to(mean.dtype)
