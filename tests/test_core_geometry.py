"""zoomnet.core.geometry: grids, cell boxes, cells inside the image, pooling of view pixels into cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoomnet.core.geometry import (
    Box,
    cell_boxes,
    cell_of_point,
    grid_shape,
    pool_to_grid,
    pooling_matrix,
)
from zoomnet.sources import ArraySource


def test_tiled_boxes_cover_the_image():
    boxes = cell_boxes(Box(0, 0, 500, 500), (250, 250), (250, 250))
    assert boxes.tolist() == [[0, 0, 250, 250], [0, 250, 250, 250], [250, 0, 250, 250], [250, 250, 250, 250]]


def test_boxes_are_centred_on_cells():
    parent = Box(100, 40, 250, 250)
    stride = (5.0, 5.0)  # dense form at scale 0.2
    boxes = cell_boxes(parent, stride, (27, 27))
    g_h, g_w = grid_shape(250, 250, stride)
    assert (g_h, g_w) == (50, 50)
    for idx in (0, 7, 1234, g_h * g_w - 1):
        i, j = divmod(idx, g_w)
        cy, cx = parent.top + (i + 0.5) * 5, parent.left + (j + 0.5) * 5
        t, l, h, w = boxes[idx].tolist()
        assert (t, l, h, w) == (int(np.floor(cy)) - 13, int(np.floor(cx)) - 13, 27, 27)
        # round trip: the box centre lies in its own cell
        assert cell_of_point(parent, stride, t + h // 2, l + w // 2) == (i, j)


def test_grid_sticks_out_of_an_uneven_region():
    assert grid_shape(510, 500, (250, 250)) == (3, 2)
    boxes = cell_boxes(Box(0, 0, 510, 500), (250, 250), (250, 250))
    assert boxes[-1].tolist() == [500, 250, 250, 250]


def test_border_boxes_read_the_fill_value_and_real_pixels():
    image = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    src = ArraySource(image, fill=255)
    crop = src.read(Box(-2, 10, 4, 8))  # above the image and past its right edge
    assert crop.shape == (3, 4, 8)
    assert (crop[:, :2] == 255).all()  # rows above the image
    assert (crop[:, 2:, 6:] == 255).all()  # columns past the right edge
    assert torch.equal(crop[0, 2:, :6], torch.from_numpy(image[0:2, 10:16]).float())


def test_region_outside_its_parent_reads_real_pixels():
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    src = ArraySource(image)
    parent = Box(16, 16, 16, 16)
    box = Box(*cell_boxes(parent, (8.0, 8.0), (12, 12))[0].tolist())  # sticks out to the top-left
    assert box.top < parent.top and box.left < parent.left
    assert torch.equal(src.read(box), torch.from_numpy(image[box.top : box.top + 12, box.left : box.left + 12]).permute(2, 0, 1).float())


def test_logsumexp_pooling_is_the_dense_softmax_mass():
    logits = torch.randn(2, 8, 12)
    rows, cols = pooling_matrix((8, 12), (80, 120), (40.0, 40.0))
    cell = pool_to_grid(logits, rows, cols)  # (2, 6)
    assert cell.shape == (2, 6)
    dense = torch.softmax(logits.flatten(1), dim=1).view(2, 8, 12)
    mass = dense.view(2, 2, 4, 3, 4).sum(dim=(2, 4)).flatten(1)  # blocks of 4x4 view pixels
    assert torch.allclose(torch.softmax(cell, dim=1), mass, atol=1e-6)


def test_dense_form_is_identity():
    rows, cols = pooling_matrix((10, 10), (50, 50), (5.0, 5.0))
    assert rows is None and cols is None
    logits = torch.randn(1, 10, 10)
    assert torch.equal(pool_to_grid(logits, rows, cols), logits.flatten(1))


def test_no_cell_is_empty_when_the_stride_is_below_a_view_pixel():
    rows, cols = pooling_matrix((4, 4), (40, 40), (5.0, 5.0))  # 8 cells, 4 view pixels
    assert (rows.sum(dim=1) >= 1).all() and (cols.sum(dim=1) >= 1).all()


@pytest.mark.parametrize("view, parent, stride", [
    ((8, 12), (80, 120), (40.0, 40.0)),      # blocks of 4x4 pixels
    ((50, 37), (500, 371), (27.0, 13.5)),    # uneven cells, a partial last cell
    ((4, 4), (40, 40), (5.0, 5.0)),          # cells narrower than a pixel: one pixel each
    ((64, 48), (1000, 750), (250.0, 250.0)),
    ((30, 30), (100, 100), (3.0, 7.0)),      # mixed: rows one pixel a cell, columns blocks
])
def test_linear_pooling_sums_the_members_of_the_matrix(view, parent, stride):
    from zoomnet.core.geometry import pooling_plan, sum_to_grid

    rows, cols = pooling_matrix(view, parent, stride)
    plan_rows, plan_cols = pooling_plan(view, parent, stride)
    assert all(ax.segment is not None or ax.pick is not None for ax in (plan_rows, plan_cols))  # no matrix product
    x = torch.rand(3, *view, dtype=torch.float64)
    assert torch.allclose(sum_to_grid(x, plan_rows, plan_cols), rows.double() @ x @ cols.double().T)
    logits = (torch.randn(3, *view, dtype=torch.float64) * 4).requires_grad_()
    a = pool_to_grid(logits, plan_rows, plan_cols)
    (ga,) = torch.autograd.grad((a * torch.arange(a.shape[1])).sum(), logits)
    b = pool_to_grid(logits, rows, cols)  # the matrices, as the API took them
    (gb,) = torch.autograd.grad((b * torch.arange(b.shape[1])).sum(), logits)
    assert torch.allclose(a, b) and torch.allclose(ga, gb)


@pytest.mark.parametrize("seed", range(6))
def test_cells_in_image_keep_every_covered_pixel_and_drop_cells_centred_outside(seed):
    """Random parents, strides and image sizes: every image pixel that some cell covers is
    covered by a drawable cell; a drawable cell reaches the image; a cell centred inside the
    image is drawable; a cell centred outside is drawable only where it alone covers
    some image pixels."""
    from zoomnet.core.geometry import cells_in_image

    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(20, 90, 2))
    region = tuple(int(v) for v in rng.integers(4, 40, 2))
    stride = tuple(float(rng.integers(2, r + 1)) for r in region)
    parent = Box(int(rng.integers(-20, height)), int(rng.integers(-20, width)), 60, 60)
    rel = cell_boxes(Box(0, 0, 60, 60), stride, region)
    g = grid_shape(60, 60, stride)
    allowed = cells_in_image(torch.tensor([[parent.top, parent.left]]), rel, g, height, width)[0]

    def pixels(cells) -> np.ndarray:
        cover = np.zeros((height, width), dtype=bool)
        for t, l, h, w in rel[cells].tolist():
            t, l = t + parent.top, l + parent.left
            cover[max(t, 0) : max(t + h, 0), max(l, 0) : max(l + w, 0)] = True
        return cover

    every = torch.arange(rel.shape[0])
    assert (pixels(every) == pixels(every[allowed])).all()
    for c in every.tolist():
        t, l, h, w = rel[c].tolist()
        cy, cx = parent.top + t + h / 2, parent.left + l + w / 2
        centred = 0 <= cy < height and 0 <= cx < width
        if allowed[c]:
            assert pixels([c]).any()
        if centred:
            assert allowed[c]
        elif allowed[c]:
            others = every[allowed & (every != c)]
            assert (pixels([c]) & ~pixels(others)).any()


def test_tiles_that_cut_the_view_into_equal_blocks_pool_by_a_reshape():
    """Equal blocks covering the axis take the reshape path (whose sums the test above
    compares with the membership matrices); uneven cells keep the index form."""
    from zoomnet.core.geometry import pooling_plan

    rows, cols = pooling_plan((8, 12), (80, 120), (40.0, 40.0))
    assert (rows.block, cols.block) == (4, 4)
    assert all(ax.block is None for ax in pooling_plan((50, 37), (500, 371), (27.0, 13.5)))
    assert all(ax.block is None for ax in pooling_plan((4, 4), (40, 40), (5.0, 5.0)))  # one pixel a cell
