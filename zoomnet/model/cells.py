"""The bookkeeping of one pass: each level's geometry for parents of one size, the maps of
every distinct parent as rows of one table, and the regions drawn at a level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from zoomnet.core import sampling
from zoomnet.core.geometry import AxisPool, Box


def restrict(log_p: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Renormalise ``(B, G)`` log-probabilities over the allowed cells.

    Excluded cells get :data:`sampling.LEFT_OUT` before renormalising: very negative but
    finite, so that the surrogate ``p / sg(p)`` stays 1 (not NaN) where they are never
    drawn.
    """
    masked = log_p.masked_fill(~allowed, sampling.LEFT_OUT)
    return masked - torch.logsumexp(masked, dim=1, keepdim=True)


class LevelGrid(NamedTuple):
    """The geometry of one level for parents of one size.

    Attributes:
        view: ``(h, w)`` of a parent's view.
        grid: ``(g_h, g_w)`` cells.
        rows, cols: how view pixels pool into cells, per axis (None: one pixel a cell).
        rel: ``(G, 4)`` cell boxes relative to the parent's top-left corner.
    """

    view: tuple[int, int]
    grid: tuple[int, int]
    rows: AxisPool | None
    cols: AxisPool | None
    rel: torch.Tensor


class CellTable:
    """Per-parent rows of one level, ``{(image, parent box): (G,) tensor}``, stored as the
    ``(M, G)`` blocks the attention net produced, so that many rows are gathered with one
    tensor operation (:meth:`rows`, :meth:`flat_index`) instead of one per row. Reads like
    a dict: ``key in table``, ``table[key]``, iteration over the keys in insertion order."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, Box], int] = {}
        self._blocks: list[torch.Tensor] = []
        self._table: torch.Tensor | None = None

    def add(self, keys: Sequence[tuple[int, Box]], block: torch.Tensor) -> None:
        """Append the rows of ``block`` ``(len(keys), G)`` under new keys."""
        for key in keys:
            self.index[key] = len(self.index)
        self._blocks.append(block)
        self._table = None

    def table(self) -> torch.Tensor:
        """Every row, ``(M, G)``, in insertion order."""
        if not self._blocks:
            raise KeyError("no rows yet")
        if self._table is None:
            self._table = self._blocks[0] if len(self._blocks) == 1 else torch.cat(self._blocks)
        return self._table

    def rows(self, keys: Sequence[tuple[int, Box]]) -> torch.Tensor:
        """``(len(keys), G)``: the rows of ``keys``, gathered in one operation."""
        positions = [self.index[k] for k in keys]
        if positions == list(range(len(self.index))):  # every row, in order: the table itself
            return self.table()
        idx = torch.tensor(positions, dtype=torch.long, device=self.table().device)
        return self.table().index_select(0, idx)

    def flat_index(self, cells: Sequence[tuple[tuple[int, Box], int]]) -> torch.Tensor:
        """Positions in ``table().flatten()`` of ``(key, cell)`` pairs."""
        width = self.table().shape[1]
        return torch.tensor([self.index[key] * width + cell for key, cell in cells], device=self.table().device)

    def __contains__(self, key) -> bool:
        return key in self.index

    def __getitem__(self, key) -> torch.Tensor:
        return self.table()[self.index[key]]

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class Nodes:
    """The regions drawn at one level, as parallel lists and one tensor of path weights."""

    image: list[int]
    box: list[Box]
    weight: torch.Tensor  # (M,) path weights, with gradient
    count: list[int]
    cell: list[int]
    path: list[tuple[tuple[int, Box, int], ...]]  # (image, parent box, cell) at each level
