"""zoomnet.train, .objective and .dynamics: the training step, the epoch, the loss terms a batch gets and when they start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoomnet import (
    ArraySource,
    LevelConfig,
    ModelConfig,
    ZoomIn,
)
from zoomnet.data.generators.tiny_objects import make_shapes
from zoomnet.errors import UserError
from zoomnet.objective import training_loss
from zoomnet.train import TrainConfig, evaluate, fit

from helpers import _config, _copy_run


def test_a_training_step_under_autocast_takes_its_loss_outside_it():
    # as train_epoch does on CUDA: the forward under bfloat16 autocast, the loss (which runs
    # the classifier on the sub-tiles' features for the instance term) after it
    from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn
    from zoomnet.config import TrainConfig
    from zoomnet.data.examples import Example
    from zoomnet.objective import training_loss

    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))], samples=4))
    rng = np.random.default_rng(0)
    batch = [Example(ArraySource(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), y, None, f"i{y}") for y in (0, 1)]
    cfg = TrainConfig(instance_weight=1.0, distill_weight=1.0, reference_class=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([e.source for e in batch], contrastive=True, generator=torch.Generator().manual_seed(0))
    assert out.leaf_features.dtype == torch.float32
    loss, terms = training_loss(model, out, batch, torch.tensor([0, 1]), cfg, True)
    loss.backward()
    assert torch.isfinite(loss) and terms["instance"] > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.feature.parameters())


def test_exploding_gradients_stop_the_run_and_non_finite_weights_are_never_saved(data, run, tmp_path, monkeypatch):
    import zoomnet.train as train_mod
    from zoomnet.checkpoint import save_checkpoint
    from zoomnet.config import load_config
    from zoomnet.runs import load_run, train_run

    copy = _copy_run(run, tmp_path / "run")
    before = (copy / "best.safetensors").read_bytes()
    real = train_mod.training_loss

    class Blow(torch.autograd.Function):  # the value passes, the gradient becomes infinite
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def exploding(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        return Blow.apply(loss), terms

    monkeypatch.setattr(train_mod, "training_loss", exploding)
    with pytest.raises(UserError, match="gradients are not finite.*epoch 2.*last good checkpoint"):
        train_run(load_config(str(data / "tiny.json")), data / "set/train.csv", None, copy, resume=True,
                  progress=False, log=lambda s: None, epochs=2)
    assert (copy / "best.safetensors").read_bytes() == before
    model, _ = load_run(copy)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        save_checkpoint(model, copy / "best.safetensors")
    assert (copy / "best.safetensors").read_bytes() == before


@pytest.mark.slow  # a training of 15 epochs
def test_tiny_model_fits_a_separable_set():
    """Bright square (positive) vs none: a 2-level model reaches 100 % training accuracy."""
    from zoomnet.data.examples import Example
    from zoomnet.train import TrainConfig, evaluate, fit

    rng = np.random.default_rng(0)
    examples = []
    for i in range(16):
        img = rng.integers(60, 120, (64, 64, 3)).astype(np.uint8)
        if i % 2:
            y, x = rng.integers(4, 44, 2)
            img[y : y + 16, x : x + 16] = 250
        examples.append(Example(ArraySource(img), i % 2))
    cfg = ModelConfig(
        levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))],
        samples=4, feature_kwargs={"width": 8, "out_dim": 16},
    )
    torch.manual_seed(0)
    model = ZoomIn(cfg)
    fit(model, examples, [], TrainConfig(epochs=15, batch_size=8, lr=3e-3, contrastive_from=None, seed=0),
        log=lambda s: None, progress=False)
    assert evaluate(model, examples, deterministic=True)["accuracy"] == 1.0


@pytest.mark.parametrize("augment", [0.0, 0.2])
def test_views_read_ahead_train_the_same_weights(augment):
    """Reading the next batch's level-1 views in a thread changes nothing: the same pixels
    (colour jitter included) and the same draws give bit-identical weights."""
    from zoomnet.data.examples import Example
    from zoomnet.train import TrainConfig, make_optimizer, train_epoch

    rng = np.random.default_rng(0)
    examples = [Example(ArraySource(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), i % 2, None, f"i{i}")
                for i in range(6)]
    cfg = TrainConfig(epochs=1, batch_size=2, instance_weight=1.0, distill_weight=1.0, contrastive_from=1)
    states = []
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = ZoomIn(ModelConfig(levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))], samples=4))
        train_epoch(model, examples, cfg, make_optimizer(model, cfg), 1, torch.Generator().manual_seed(0),
                    progress=False, augment=augment, prefetch=prefetch)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_an_epoch_reports_what_it_decoded_and_read_from_its_files(tmp_path):
    """``pixels_decoded``, ``bytes_read`` and ``decoded_share`` of an epoch: PNGs decode whole
    as they open (every pixel, every byte, once), and the next epoch finds them open."""
    from PIL import Image

    from zoomnet.data.examples import Example
    from zoomnet.sources.lazy import LazyImage
    from zoomnet.train import make_optimizer, train_epoch

    rng = np.random.default_rng(0)
    examples = []
    for i in range(6):
        path = tmp_path / f"i{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
        examples.append(Example(LazyImage(path, path.name), i % 2, None, path.name))
    cfg = TrainConfig(epochs=2, batch_size=2)
    torch.manual_seed(0)
    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))], samples=4))
    optimizer, generator = make_optimizer(model, cfg), torch.Generator().manual_seed(0)
    first = train_epoch(model, examples, cfg, optimizer, 1, generator, progress=False)
    assert first["pixels_decoded"] == 6 * 64 * 96 and first["decoded_share"] == 1.0
    assert first["bytes_read"] == sum((tmp_path / f"i{i}.png").stat().st_size for i in range(6))
    second = train_epoch(model, examples, cfg, optimizer, 2, generator, progress=False)
    assert second["pixels_decoded"] == second["bytes_read"] == 0 and second["decoded_share"] == 0.0


def test_multiclass_terms_have_gradients_everywhere():
    torch.manual_seed(0)
    model = ZoomIn(_config())
    batch = make_shapes(4, classes=3, size=64, seed=1)
    labels = torch.tensor([e.label for e in batch])
    out = model([e.source for e in batch], contrastive=True, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(instance_weight=1.0, distill_weight=1.0, reference_class=None)
    loss, terms = training_loss(model, out, batch, labels, cfg, contrastive=True)
    assert {"ce", "instance", "distill", "contrastive"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
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
    from zoomnet.dynamics import flat_learning_warning

    stuck = {"epoch": 2, "train_accuracy": 0.1, "attention_entropy_1": 0.99, "attention_entropy_2": 0.98,
             "subtile_signal": 0.1}
    text = flat_learning_warning(stuck, 10, majority=0.12)
    assert "0.99/0.98" in text and "still uniform" in text and "train_samples" in text
    moving = {**stuck, "attention_entropy_1": 0.6}
    assert flat_learning_warning(moving, 10, 0.12) is None  # give f time once attention moves
    assert "tell nothing" in flat_learning_warning({**moving, "epoch": 5}, 10, 0.12)
    learning = {**stuck, "train_accuracy": 0.6}
    assert flat_learning_warning(learning, 10, 0.12) is None


@pytest.mark.parametrize("attention_from, frozen_epochs", [(3, 2), ("auto", None)])
def test_attention_learns_only_from_its_epoch(attention_from, frozen_epochs):
    """``train.attention_from``: the attention nets keep their built weights until their
    epoch (a number, or the epoch after the sampled sub-tiles first carry the label), while
    the feature net learns from the first step."""
    from zoomnet.dynamics import signal_started

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


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave", "masked_scatter"}


class _Syncs:
    """Counts what would make a GPU's host wait in a training step, on the CPU: operations
    whose result the host must read (``item``, ``float``, ``bool`` of a tensor all reach
    ``_local_scalar_dense``) or whose shape depends on the data (``nonzero``, boolean
    indexing), through a dispatch mode; ``tolist``, which reads a CPU tensor without one,
    by a patch; and the sanctioned reads of ``zoomnet.model.host.to_host``. The
    optimiser's update is left out: its step counters live on the host (PyTorch keeps them
    there unless ``capturable``)."""

    def __init__(self, monkeypatch, optimizer):
        from torch.utils._python_dispatch import TorchDispatchMode

        from zoomnet.model import host

        self.seen: list[str] = []
        self.host = host
        self.paused = True
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not counter.paused and func.__name__.split(".")[0] in SYNC_OPS:
                    counter.seen.append(func.__name__)
                return func(*args, **(kwargs or {}))

        self.mode = Mode
        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            if not counter.paused:
                counter.seen.append("tolist")
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        step = optimizer.step

        def uncounted_step(*args, **kwargs):
            counter.paused, was = True, counter.paused
            try:
                return step(*args, **kwargs)
            finally:
                counter.paused = was

        monkeypatch.setattr(optimizer, "step", uncounted_step)

    def count(self, fn):
        reads = self.host.reads
        self.seen, self.paused = [], False
        try:
            with self.mode():
                result = fn()
        finally:
            self.paused = True
        return result, self.seen, self.host.reads - reads


def test_a_training_step_waits_for_the_device_once_per_level_of_each_pass(monkeypatch):
    from zoomnet.data.examples import Example
    from zoomnet.train import _EpochStats, make_optimizer, training_step

    torch.manual_seed(0)
    model = ZoomIn(_config(96)).train()
    rng = np.random.default_rng(0)
    batch = [Example(ArraySource(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)), i % 3, None, f"i{i}")
             for i in range(3)]
    cfg = TrainConfig(instance_weight=1.0, distill_weight=1.0, entropy_weight=1e-5, reference_class=0)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(0)
    syncs = _Syncs(monkeypatch, optimizer)
    stats = _EpochStats()

    def step():
        out, labels, loss, terms = training_step(model, batch, cfg, optimizer, generator, contrastive=True,
                                                 check_finite=False)
        stats.add(model, out, batch, labels, terms, loss)

    step()  # warm-up: caches of the contrast prior and the chunk sizes
    _, seen, reads = syncs.count(step)
    levels, passes = len(model.config.levels), 2  # the ordinary and the contrastive pass
    assert seen == [] and reads == levels * passes, (seen, reads)
    # the epoch's figures are read every few steps, in one transfer
    stats.every = 1
    _, seen, reads = syncs.count(step)
    assert seen == ["tolist"] and reads == levels * passes, (seen, reads)
    assert stats.seen == 3 * 3 and "ce" in stats.sums  # the pending steps folded in
    # a step that checks itself waits twice more (its loss, its gradient norm)
    _, seen, _ = syncs.count(lambda: training_step(model, batch, cfg, optimizer, generator, contrastive=True))
    assert seen == ["_local_scalar_dense.default"] * 2, seen
