"""zoomnet.metrics: rank correlation, the probabilities of sampled sub-tiles."""

from __future__ import annotations

import math

import numpy as np
import torch
from zoomnet.metrics import leaf_probabilities, spearman


def test_spearman_ranks_ties_by_their_average():
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> Pearson of the ranks
    x, y = [0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert math.isclose(spearman(x, y), np.corrcoef(rx, ry)[0, 1])
    assert math.isclose(spearman(np.exp(y), y), 1.0)  # monotone: 1
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_leaf_probabilities_multiply_along_the_path():
    from zoomnet.model import LevelConfig, ModelConfig, ZoomIn
    from zoomnet.sources import ArraySource

    torch.manual_seed(0)
    cfg = ModelConfig(levels=[LevelConfig(0.25, (16, 16), "tiled"), LevelConfig(0.5, (4, 4), "tiled")], samples=6)
    model = ZoomIn(cfg)
    src = ArraySource(torch.rand(3, 32, 32) * 255)
    out = model.predict([src], generator=torch.Generator().manual_seed(0))
    probs = leaf_probabilities(out)
    assert len(probs) == len(out.leaf_boxes) > 0
    for path, p in zip(out.leaf_paths, probs):
        (b, box1, c1), (_, box2, c2) = path
        alpha = out.log_maps[0][b][out.parents[0][b].index(box1)].exp().flatten()[c1]
        beta = out.log_maps[1][b][out.parents[1][b].index(box2)].exp().flatten()[c2]
        assert math.isclose(p, float(alpha * beta), rel_tol=1e-5)
