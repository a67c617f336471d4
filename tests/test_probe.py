"""zoomnet.probe: sub-tiles cut on and off the objects and what f calls them."""

from __future__ import annotations

import torch
from zoomnet.data.generators.tiny_objects import make_shapes
from zoomnet.model import ZoomIn

from helpers import _config


def test_probe_cuts_subtiles_on_and_off_the_objects_and_counts_them_by_row():
    import numpy as np
    from zoomnet.probe import crops, probe

    data = make_shapes(6, classes=4, size=64, seed=2, empty_class=True)
    region = (24, 24)
    for e in data:
        for box, on_object in crops(e, region, 3, np.random.default_rng(0)):
            assert 0 <= box.top <= 64 - 24 and 0 <= box.left <= 64 - 24 and (box.height, box.width) == region
            assert bool(e.mask.read(box).gt(0).any()) == on_object
    torch.manual_seed(0)
    config = _config()
    config.num_classes = 4
    classes = ["empty", "ring", "disc", "cross"]
    result = probe(ZoomIn(config), data, classes, per_image=3, seed=0)
    counts = np.array(result["counts"])
    assert result["rows"] == [*classes, "off objects"] and counts.shape == (5, 4) and result["images"] == 6
    assert counts[0].sum() == 0  # images of the empty class hold no object to cut
    objects = sum(e.label != 0 for e in data)
    assert counts[1:4].sum() == 3 * objects and counts[4].sum() == 3 * len(data)
    assert result["object_accuracy"] == np.trace(counts[:4]) / counts[:4].sum()
