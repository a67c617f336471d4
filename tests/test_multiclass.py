"""Multi-class learning without a reference class: the instance and distillation terms in
their multi-class form train a Zoom-In model on a tiny set of shapes to 100 % training
accuracy."""

from __future__ import annotations

import pytest
import torch

from zoomnet.data.synthetic import make_shapes
from zoomnet.model import LevelConfig, ModelConfig, ZoomIn
from zoomnet.train import TrainConfig, evaluate, fit, training_loss


def _config(size: int = 64) -> ModelConfig:
    return ModelConfig(
        levels=[LevelConfig(0.25, (size // 2, size // 2), "tiled"), LevelConfig(0.5, (24, 24), (8, 8))],
        num_classes=3, samples=8, train_samples=16, smooth=0.1,
        feature_kwargs={"width": 16, "out_dim": 16, "pool": "max"},
    )


def test_multiclass_terms_have_gradients_everywhere():
    torch.manual_seed(0)
    model = ZoomIn(_config())
    batch = make_shapes(4, classes=3, size=64, seed=1)
    labels = torch.tensor([e.label for e in batch])
    out = model([e.source for e in batch], contrastive=True, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(instance_weight=1.0, distill_weight=1.0, reference_class=None)
    loss, terms = training_loss(model, out, batch, labels, cfg, contrastive=True)
    assert {"ce", "instance", "distill", "contrastive"} <= set(terms)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    loss.backward()
    for name in ("attention.0", "attention.1", "feature", "classifier"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


@pytest.mark.slow  # a training of 20 epochs
def test_tiny_multiclass_set_reaches_full_training_accuracy():
    torch.manual_seed(0)
    train = make_shapes(12, classes=3, size=64, seed=0)
    model = ZoomIn(_config())
    cfg = TrainConfig(epochs=20, batch_size=4, lr=3e-3, attention_lr=1e-2, contrastive_from="auto",
                      instance_weight=4.0, distill_weight=1.0, reference_class=None, seed=0)
    history = fit(model, train, [], cfg, log=lambda _: None, progress=False)
    accuracy = [r["train_accuracy"] for r in history]
    assert accuracy[-1] == 1.0 and accuracy[0] < 0.8, accuracy  # learnt, not given
    assert history[-1]["subtile_signal"] > 0.9 > history[0]["subtile_signal"]  # sub-tiles show the class
    assert evaluate(model, train, batch_size=8, deterministic=True)["accuracy"] >= 0.9


def test_contrast_prior_draws_untrained_attention_to_objects():
    """Before any training the prior alone multiplies how often sub-tiles hit the shapes
    (fixed seeds; 8 images x 16 draws; measured 2.5x and more)."""
    from zoomnet.train import object_hits

    batch = make_shapes(8, classes=3, size=128, object_size=(10, 12), seed=3)
    rates = {}
    for prior in (0.0, 5.0):
        torch.manual_seed(0)
        cfg = _config(128)
        cfg.attention_prior = prior
        model = ZoomIn(cfg)
        out = model.predict([e.source for e in batch], samples=16, generator=torch.Generator().manual_seed(0))
        hit, tiles, *_ = object_hits(out, batch)
        rates[prior] = hit / tiles
    assert rates[5.0] > 2 * rates[0.0], rates


def test_distillation_trains_the_learnt_logits_not_the_prior():
    torch.manual_seed(0)
    model = ZoomIn(_config())
    batch = make_shapes(4, classes=3, size=64, seed=2)
    labels = torch.tensor([e.label for e in batch])
    out = model([e.source for e in batch], generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(entropy_weight=0.0, instance_weight=0.0, distill_weight=1.0, reference_class=None)
    terms = training_loss(model, out, batch, labels, cfg, contrastive=False)[1]
    from zoomnet.core import losses
    scores = losses.leaf_scores(model.classifier(out.leaf_features), out.leaf_image, labels, None)
    losses.attention_distillation_loss(out.cell_logits, out.leaf_paths, scores).backward()
    assert "distill" in terms
    for net in model.attention:
        assert net.prior_gain.grad is None or float(net.prior_gain.grad) == 0.0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.net.parameters())


def test_flat_learning_warning_names_what_is_stuck():
    from zoomnet.train import flat_learning_warning

    stuck = {"epoch": 2, "train_accuracy": 0.1, "attention_entropy_1": 0.99, "attention_entropy_2": 0.98,
             "subtile_signal": 0.1}
    text = flat_learning_warning(stuck, 10, majority=0.12)
    assert "0.99/0.98" in text and "still uniform" in text and "train_samples" in text
    moving = {**stuck, "attention_entropy_1": 0.6}
    assert flat_learning_warning(moving, 10, 0.12) is None  # give f time once attention moves
    assert "tell nothing" in flat_learning_warning({**moving, "epoch": 5}, 10, 0.12)
    learning = {**stuck, "train_accuracy": 0.6}
    assert flat_learning_warning(learning, 10, 0.12) is None


@pytest.mark.parametrize("shape", [(4, 3, 40, 33), (2, 1, 5, 9), (1, 3, 1, 1), (3, 3, 7, 2)])
def test_local_contrast_matches_the_mean_of_pixels_inside_each_neighbourhood(shape):
    """The fast neighbourhood mean (running sums along each axis divided by the pixels
    inside) is the 7x7 average pool that leaves the padding out, at the border and on tiny
    views; the FLOP count sees the running sums' additions by formula."""
    from zoomnet.core.geometry import count_pooling_flops
    from zoomnet.nets.attention import local_contrast

    view = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2
    mean = torch.nn.functional.avg_pool2d(view, 7, stride=1, padding=3, count_include_pad=False)
    expected = (view - mean).abs().mean(dim=1).clamp(max=3.0)
    with count_pooling_flops() as tally:
        got = local_contrast(view)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    m, c, h, w = shape  # padded by 4 before and 3 after on each axis: running sum, then differences
    assert tally[0] == m * c * ((h + 7) * (w + 7) + (h + 7) * w + (h + 7) * w + h * w)


@pytest.mark.parametrize("attention_from, frozen_epochs", [(3, 2), ("auto", None)])
def test_attention_learns_only_from_its_epoch(attention_from, frozen_epochs):
    """``train.attention_from``: the attention nets keep their built weights until their
    epoch (a number, or the epoch after the sampled sub-tiles first carry the label), while
    the feature net learns from the first step."""
    from zoomnet.train import signal_started

    torch.manual_seed(0)
    train = make_shapes(8, classes=3, size=64, seed=0)
    model = ZoomIn(_config())
    cfg = TrainConfig(epochs=6, batch_size=4, lr=3e-3, attention_lr=1e-2, contrastive_from=None,
                      instance_weight=4.0, distill_weight=1.0, reference_class=None, seed=0,
                      attention_from=attention_from)
    weights = []
    fit(model, train, [], cfg, log=lambda _: None, progress=False,
        on_epoch=lambda epoch, row: weights.append(({n: p.detach().clone() for n, p in model.named_parameters()}, row)))
    if frozen_epochs is None:  # auto: frozen through the first epoch whose signal is halfway, learning after
        started = [signal_started(row, 3) for _, row in weights]
        assert any(started[:-1]), [row["subtile_signal"] for _, row in weights]
        frozen_epochs = started.index(True) + 1
    torch.manual_seed(0)  # the initial weights: the same seed, the same build
    start = {n: p.detach() for n, p in ZoomIn(_config()).named_parameters()}
    for epoch, (after, _) in enumerate(weights, 1):
        moved = {n for n in after if not torch.equal(after[n], start[n])}
        attention_moved = any(n.startswith("attention.") for n in moved)
        assert any(n.startswith("feature.") for n in moved)
        assert attention_moved == (epoch > frozen_epochs), (epoch, frozen_epochs)


@pytest.mark.slow  # a training of 15 epochs
def test_tiny_set_with_an_empty_class_and_three_shapes_reaches_full_training_accuracy():
    """The traffic-sign layout in small: class 0 holds nothing (the reference class), classes
    1-3 one shape each. The reference-class terms, with the object-class part of the instance
    loss, must tell the three shapes apart, not only find them."""
    torch.manual_seed(0)
    train = make_shapes(16, classes=4, size=64, seed=0, empty_class=True)
    share = sum(e.label == 0 for e in train) / len(train)
    config = _config()
    config.num_classes = 4
    model = ZoomIn(config)
    cfg = TrainConfig(epochs=15, batch_size=4, lr=3e-3, attention_lr=1e-2, contrastive_from="auto",
                      instance_weight=4.0, distill_weight=1.0, reference_class=0, reference_share=share, seed=0)
    history = fit(model, train, [], cfg, log=lambda _: None, progress=False)
    accuracy = [r["train_accuracy"] for r in history]
    assert accuracy[-1] == 1.0 and accuracy[0] < 0.8, accuracy
    assert evaluate(model, train, batch_size=8, deterministic=True)["accuracy"] >= 0.9


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
