"""Grid geometry of one level of the hierarchy (docs/design.md, "The hierarchy").

A level cuts its parent region (full-resolution pixels) into cells of stride ``(t_h, t_w)``;
cell ``(i, j)`` is centred at ``cy = top + (i + 0.5) * t_h`` and owns the region of size
``(h_l, w_l)`` whose top-left corner is ``(floor(cy) - h_l // 2, floor(cx) - w_l // 2)``.
Regions may stick out of the parent (those pixels are real image pixels) and out of the
image (those read as the source's fill value).

The attention net gives one logit per view pixel; the logits of the view pixels that fall in
a cell are pooled by logsumexp, so the cell's probability is the dense softmax mass of its
pixels (paper, eq. 1; averaging would wash out a small object).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Box(NamedTuple):
    """A rectangle in full-resolution pixel coordinates (may extend past the image)."""

    top: int
    left: int
    height: int
    width: int

    def intersects(self, other: "Box") -> bool:
        return (
            self.top < other.top + other.height
            and other.top < self.top + self.height
            and self.left < other.left + other.width
            and other.left < self.left + self.width
        )


def grid_shape(height: int, width: int, stride: tuple[float, float]) -> tuple[int, int]:
    """Number of cells ``(g_h, g_w)`` covering a ``height x width`` region.

    >>> grid_shape(500, 500, (250, 250))
    (2, 2)
    >>> grid_shape(500, 510, (250, 250))   # the last column sticks out of the region
    (2, 3)
    """
    return max(1, math.ceil(height / stride[0] - 1e-9)), max(1, math.ceil(width / stride[1] - 1e-9))


def cell_boxes(
    parent: Box, stride: tuple[float, float], region: tuple[int, int]
) -> torch.Tensor:
    """Full-resolution boxes of every cell of ``parent``, row-major.

    Args:
        parent: the parent region (for level 1, the whole image).
        stride: cell stride ``(t_h, t_w)`` in full-resolution pixels.
        region: region size ``(h_l, w_l)`` in full-resolution pixels.

    Returns:
        ``(G, 4)`` int64 tensor of ``(top, left, height, width)``, ``G = g_h * g_w``.

    >>> cell_boxes(Box(0, 0, 500, 500), (250, 250), (250, 250)).tolist()
    [[0, 0, 250, 250], [0, 250, 250, 250], [250, 0, 250, 250], [250, 250, 250, 250]]
    """
    g_h, g_w = grid_shape(parent.height, parent.width, stride)
    cy = parent.top + (torch.arange(g_h, dtype=torch.float64) + 0.5) * stride[0]  # (g_h,)
    cx = parent.left + (torch.arange(g_w, dtype=torch.float64) + 0.5) * stride[1]  # (g_w,)
    tops = torch.floor(cy).long() - region[0] // 2
    lefts = torch.floor(cx).long() - region[1] // 2
    tt, ll = torch.meshgrid(tops, lefts, indexing="ij")  # (g_h, g_w)
    hh = torch.full_like(tt, region[0])
    ww = torch.full_like(tt, region[1])
    return torch.stack([tt, ll, hh, ww], dim=-1).reshape(-1, 4)  # (G, 4)


def cells_in_image(
    parents: torch.Tensor, rel: torch.Tensor, grid: tuple[int, int], height: int, width: int
) -> torch.Tensor:
    """Which cells of each parent may be drawn: ``(M, G)`` bool.

    A cell whose region lies mostly in the fill outside the image (its centre outside)
    shows the fill, not the image: it is left out, unless it is the only cell that
    reaches some image pixels (the last tile of a tiled grid that sticks out of the image,
    which holds the image's last rows or columns). Decided axis by axis; every image
    pixel that some cell covers stays covered.

    Args:
        parents: ``(M, 2)`` full-resolution top-left corners of the parents.
        rel: ``(G, 4)`` cell boxes relative to the parent, row-major over ``grid``.
        grid: ``(g_h, g_w)``.
        height, width: the image's size.

    >>> rel = cell_boxes(Box(0, 0, 600, 600), (500, 500), (500, 500))  # 2x2 tiles
    >>> cells_in_image(torch.tensor([[0, 0]]), rel, (2, 2), 600, 600).tolist()  # all reach the image
    [[True, True, True, True]]
    >>> rel = cell_boxes(Box(0, 0, 500, 500), (50, 50), (50, 50))  # 10x10 cells
    >>> allowed = cells_in_image(torch.tensor([[500, 0]]), rel, (10, 10), 600, 600)  # a tile from row 500
    >>> allowed.view(10, 10)[:, 0].tolist()  # rows 500-599 only
    [True, True, False, False, False, False, False, False, False, False]
    """
    g_h, g_w = grid
    boxes = rel.view(g_h, g_w, 4)

    def axis(offset: torch.Tensor, start: torch.Tensor, size: torch.Tensor, extent: int) -> torch.Tensor:
        lo = offset[:, None] + start[None, :]  # (M, g) absolute start of each cell
        hi = lo + size[None, :]
        inside_lo, inside_hi = lo.clamp(0, extent), hi.clamp(0, extent)
        reaches = inside_hi > inside_lo  # covers some image pixel
        centred = (2 * lo + size[None, :] >= 0) & (2 * lo + size[None, :] < 2 * extent)  # centre inside
        big = extent + 1
        covered_lo = torch.where(centred, inside_lo, big).amin(dim=1, keepdim=True)  # (M, 1)
        covered_hi = torch.where(centred, inside_hi, -1).amax(dim=1, keepdim=True)
        needed = reaches & ((inside_lo < covered_lo) | (inside_hi > covered_hi))
        allowed = centred & reaches | needed
        return torch.where(centred.any(dim=1, keepdim=True), allowed, reaches)

    rows = axis(parents[:, 0], boxes[:, 0, 0], boxes[:, 0, 2], height)  # (M, g_h)
    cols = axis(parents[:, 1], boxes[0, :, 1], boxes[0, :, 3], width)  # (M, g_w)
    return (rows[:, :, None] & cols[:, None, :]).reshape(parents.shape[0], g_h * g_w)


def edge_indices(boxes: torch.Tensor, view_hw: tuple[int, int], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For views of ``boxes`` that stick out of the image: the view rows and columns to
    read each view pixel from so that the fill outside the image repeats the image's edge
    instead, ``((M, v_h), (M, v_w))`` long; None when every view lies inside the image.

    A view pixel is inside when its centre is. Repeating the edge keeps the attention net
    (and its contrast prior) from seeing the image's border as detail: a black fill
    against a field is the strongest edge of a tile.

    Args:
        boxes: ``(M, 4)`` full-resolution ``(top, left, height, width)``.
        view_hw: the views' size.
        height, width: the image's size.

    >>> rows, cols = edge_indices(torch.tensor([[0, 500, 500, 500]]), (5, 5), 1000, 600)
    >>> rows.tolist(), cols.tolist()   # columns from 600 on repeat the last one inside
    ([[0, 1, 2, 3, 4]], [[0, 0, 0, 0, 0]])
    """
    def axis(start: torch.Tensor, size: torch.Tensor, n: int, extent: int) -> torch.Tensor:
        centre = start[:, None].double() + (torch.arange(n, dtype=torch.float64)[None, :] + 0.5) * size[:, None].double() / n
        inside = (centre >= 0) & (centre < extent)  # (M, n)
        idx = torch.arange(n).expand_as(inside)
        first = torch.where(inside, idx, n).amin(dim=1, keepdim=True).clamp(max=n - 1)
        last = torch.where(inside, idx, -1).amax(dim=1, keepdim=True).clamp(min=0)
        return torch.minimum(torch.maximum(idx, first), torch.maximum(last, first))

    boxes = boxes.view(-1, 4)
    if bool(((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 0] + boxes[:, 2] <= height)
             & (boxes[:, 1] + boxes[:, 3] <= width)).all()):
        return None
    return axis(boxes[:, 0], boxes[:, 2], view_hw[0], height), axis(boxes[:, 1], boxes[:, 3], view_hw[1], width)


def cell_of_point(parent: Box, stride: tuple[float, float], y: float, x: float) -> tuple[int, int]:
    """Grid cell ``(i, j)`` that contains the full-resolution point ``(y, x)`` (inverse map)."""
    return int((y - parent.top) // stride[0]), int((x - parent.left) // stride[1])


def _membership(view_len: int, parent_len: int, stride: float, grid_len: int) -> torch.Tensor:
    """``(grid_len, view_len)`` 0/1 matrix: which view pixels pool into which cell.

    A view pixel belongs to the cell that holds its centre; a cell that holds no pixel
    centre (a stride below one view pixel) takes its nearest pixel, so no cell is empty.
    """
    member = torch.zeros(grid_len, view_len)
    px = torch.arange(view_len, dtype=torch.float64)
    centre = (px + 0.5) * (parent_len / view_len)  # full-res offset of each view pixel
    cell = torch.clamp(torch.floor(centre / stride).long(), 0, grid_len - 1)
    member[cell, torch.arange(view_len)] = 1.0
    cells = torch.arange(grid_len, dtype=torch.float64)
    nearest = torch.floor((cells + 0.5) * stride * view_len / parent_len).long()
    member[torch.arange(grid_len), torch.clamp(nearest, 0, view_len - 1)] = 1.0
    return member


def pooling_matrix(
    view_hw: tuple[int, int], parent_hw: tuple[int, int], stride: tuple[float, float]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row and column membership matrices ``(g_h, v_h)`` and ``(g_w, v_w)`` for a level.

    Returns ``(None, None)`` when every cell is exactly one view pixel (the dense form).
    """
    g_h, g_w = grid_shape(parent_hw[0], parent_hw[1], stride)
    if (g_h, g_w) == tuple(view_hw) and all(
        abs(parent_hw[i] / view_hw[i] - stride[i]) < 1e-9 for i in (0, 1)
    ):  # dense form, exactly one view pixel per cell: no (V, V) matrices for huge views
        return None, None
    rows = _membership(view_hw[0], parent_hw[0], stride[0], g_h)
    cols = _membership(view_hw[1], parent_hw[1], stride[1], g_w)
    if rows.shape[0] == rows.shape[1] and cols.shape[0] == cols.shape[1]:
        if torch.equal(rows, torch.eye(g_h)) and torch.equal(cols, torch.eye(g_w)):
            return None, None
    return rows, cols


class AxisPool(NamedTuple):
    """How the view pixels of one axis pool into its grid cells, in time linear in the view.

    ``matrix`` is the ``(g, v)`` membership of :func:`pooling_matrix` (the definition);
    ``segment`` (``(v,)``, the cell of each pixel) is set when the cells partition the pixels,
    ``pick`` (``(g,)``, the one pixel of each cell) when every cell holds one pixel. Either
    sums the same members as the matrix product; the product is the fallback.

    >>> ax = AxisPool.of(pooling_matrix((4, 4), (8, 8), (4.0, 4.0))[0])
    >>> ax.segment.tolist(), ax.pick
    ([0, 0, 1, 1], None)
    """

    matrix: torch.Tensor
    segment: torch.Tensor | None
    pick: torch.Tensor | None
    block: int | None = None  # b when cell i is pixels i b .. (i + 1) b - 1, covering the axis

    @classmethod
    def of(cls, member: torch.Tensor) -> "AxisPool":
        per_pixel, per_cell = member.sum(dim=0), member.sum(dim=1)
        segment = member.argmax(dim=0) if bool((per_pixel == 1).all() and (per_cell >= 1).all()) else None
        pick = member.argmax(dim=1) if bool((per_cell == 1).all()) else None
        g, v = member.shape
        block = None
        if segment is not None and v % g == 0 and torch.equal(segment, torch.arange(v) // (v // g)):
            block = v // g
        return cls(member, segment, pick, block)

    def apply(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum the pixels of each cell along ``dim`` of ``x``."""
        if self.block is not None:  # equal blocks covering the axis (tiles): a reshape and a sum
            return x.unflatten(dim, (self.matrix.shape[0], self.block)).sum(dim + 1)
        if self.segment is not None:
            shape = list(x.shape)
            shape[dim] = self.matrix.shape[0]
            return x.new_zeros(shape).index_add(dim, self.segment.to(x.device), x)
        if self.pick is not None:
            return x.index_select(dim, self.pick.to(x.device))
        return torch.movedim(torch.movedim(x, dim, -1) @ self.matrix.to(x).T, -1, dim)  # counted as a matmul


def pooling_plan(
    view_hw: tuple[int, int], parent_hw: tuple[int, int], stride: tuple[float, float]
) -> tuple[AxisPool | None, AxisPool | None]:
    """:func:`pooling_matrix` as :class:`AxisPool` per axis (``(None, None)``: the dense form)."""
    rows, cols = pooling_matrix(view_hw, parent_hw, stride)
    if rows is None:
        return None, None
    return AxisPool.of(rows), AxisPool.of(cols)


def sum_to_grid(x: torch.Tensor, rows: AxisPool | torch.Tensor, cols: AxisPool | torch.Tensor) -> torch.Tensor:
    """``(M, v_h, v_w)`` -> ``(M, g_h, g_w)``: the sum of each cell's view pixels."""
    rows = rows if isinstance(rows, AxisPool) else AxisPool.of(rows)
    cols = cols if isinstance(cols, AxisPool) else AxisPool.of(cols)
    return cols.apply(rows.apply(x, 1), 2)


def pool_to_grid(
    logits: torch.Tensor, rows: AxisPool | torch.Tensor | None, cols: AxisPool | torch.Tensor | None
) -> torch.Tensor:
    """Logsumexp-pool per-pixel logits into grid cells.

    Args:
        logits: ``(M, v_h, v_w)`` attention logits, one per view pixel.
        rows: ``(g_h, v_h)`` membership from :func:`pooling_matrix`, or its
            :class:`AxisPool` from :func:`pooling_plan` (None with ``cols`` None: the dense
            form, one cell per view pixel).
        cols: ``(g_w, v_w)`` membership, or its :class:`AxisPool`.

    Returns:
        ``(M, g_h * g_w)`` cell logits (``log sum exp`` of the member pixels).
    """
    if rows is None and cols is None:
        return logits.flatten(1)  # dense form: one cell per view pixel
    peak = logits.detach().amax(dim=(1, 2), keepdim=True)  # (M, 1, 1) for a stable exp
    mass = torch.exp(logits - peak)  # (M, v_h, v_w)
    cell_mass = sum_to_grid(mass, rows, cols)  # (M, g_h, g_w)
    tiny = torch.finfo(logits.dtype).tiny
    return (torch.log(cell_mass.clamp_min(tiny)) + peak).flatten(1)  # (M, G)
