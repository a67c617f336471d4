"""Optional TensorBoard logging of a run: every epoch's metrics and a heatmap of a validation
image (``zoomnet train --tensorboard``; needs the ``tensorboard`` package)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from zoomnet.data.examples import Example
from zoomnet.errors import TENSORBOARD, UserError


def open_board(out: Path):
    """A writer into ``out/tensorboard``.

    Raises:
        UserError: the tensorboard package is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("{tensorboard} needs the tensorboard package: pip install tensorboard",
                        tensorboard=TENSORBOARD) from None
    return SummaryWriter(str(out / "tensorboard"))


def log_epoch(board, model, row: dict, examples: list[Example], epoch: int) -> None:
    """Scalars of one epoch and the heatmap of a validation image."""
    from PIL import Image

    from zoomnet.outputs import render_batch

    for key, value in row.items():
        if isinstance(value, (int, float)) and key != "epoch" and math.isfinite(value):
            board.add_scalar(key, value, epoch)
    if examples and hasattr(model, "attention"):
        out = model.predict([e.source for e in examples[:1]], deterministic=True)
        with tempfile.TemporaryDirectory() as tmp:
            (path,) = render_batch(model, [examples[0].source], out, [Path(tmp) / "h.png"], [examples[0].name],
                                   display=512)
            board.add_image("heatmap", np.asarray(Image.open(path).convert("RGB")), epoch, dataformats="HWC")
    board.flush()
