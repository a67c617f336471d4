"""When each part of training starts, and when training sits at chance (docs/design.md,
"Training dynamics").

The attention nets learn only through sampled locations: while no sampled sub-tile holds an
object they get no signal. An epoch's row of statistics (``train.train_epoch``) tells
whether the sampled sub-tiles carry the label yet (:func:`signal_started`) and whether the
attention has left uniform (:func:`attention_started`); ``"auto"`` schedules start the
attention's learning and the contrastive term from those, and :func:`flat_learning_warning`
says what to try when neither happens.
"""

from __future__ import annotations

import math

from zoomnet.config.train import TrainConfig


def attention_started(row: dict, num_classes: int) -> bool:
    """Whether an epoch's statistics show the attention at work: some level's maps have left
    uniform (mean entropy at most 0.9 of a uniform map's) and the sampled sub-tiles carry the
    label (``subtile_signal`` at least halfway from chance to certainty).

    >>> attention_started({"attention_entropy_1": 0.7, "subtile_signal": 0.9}, 2)
    True
    >>> attention_started({"attention_entropy_1": 0.99, "subtile_signal": 0.9}, 2)
    False
    """
    levels = [v for k, v in row.items() if k.startswith("attention_entropy_") and math.isfinite(v)]
    return bool(levels) and min(levels) <= 0.9 and signal_started(row, num_classes)


def signal_started(row: dict, num_classes: int) -> bool:
    """Whether an epoch's sampled sub-tiles carry the label: ``subtile_signal`` at least
    halfway from chance to certainty.

    >>> signal_started({"subtile_signal": 0.7}, 4), signal_started({"subtile_signal": 0.5}, 4)
    (True, False)
    """
    signal = row.get("subtile_signal")
    return signal is not None and signal >= (1 + 1 / num_classes) / 2


def attention_active(cfg: TrainConfig, epoch: int, history: list[dict], num_classes: int) -> bool:
    """Whether the attention nets learn in epoch ``epoch`` (``history``: earlier epochs).

    >>> cfg = TrainConfig(attention_from="auto")
    >>> attention_active(cfg, 2, [{"subtile_signal": 0.3}], 4), attention_active(cfg, 3, [{"subtile_signal": 0.7}], 4)
    (False, True)
    """
    if cfg.attention_from is None:
        return True
    if cfg.attention_from == "auto":
        return any(signal_started(row, num_classes) for row in history)
    return epoch >= cfg.attention_from


def contrastive_active(cfg: TrainConfig, epoch: int, history: list[dict], num_classes: int) -> bool:
    """Whether epoch ``epoch`` trains with the contrastive term (``history``: earlier epochs)."""
    if cfg.contrastive_from is None:
        return False
    if cfg.contrastive_from == "auto":
        return any(attention_started(row, num_classes) for row in history)
    return epoch >= cfg.contrastive_from


def flat_learning_warning(row: dict, num_classes: int, majority: float) -> str | None:
    """A warning, with the measured numbers and what to try, when an epoch shows training
    at chance: accuracy near the majority class's share, and the attention still uniform
    or the sampled sub-tiles telling nothing of the label (None otherwise)."""
    if "subtile_signal" not in row or attention_started(row, num_classes):
        return None
    chance = 1 / num_classes
    entropy = [v for k, v in sorted(row.items()) if k.startswith("attention_entropy_")]
    flat = row["train_accuracy"] <= majority + 0.05
    uniform = all(v >= 0.95 for v in entropy)
    blind = row["subtile_signal"] < chance + 0.15 * (1 - chance)
    if not flat or not (uniform or (blind and row["epoch"] >= 5)):
        return None
    what = ("the attention is still uniform, so sampling has not found where to look" if uniform else
            "the attention has moved, but the sampled sub-tiles still tell nothing of the label")
    return (
        f"after epoch {row['epoch']} training accuracy is {row['train_accuracy']:.3f} (majority class "
        f"{majority:.3f}), attention entropy {'/'.join(f'{v:.2f}' for v in entropy)} of uniform per level, "
        f"best sampled sub-tile p(label) {row['subtile_signal']:.2f} (chance {chance:.2f}): {what}. Try more "
        "training draws (model.train_samples=...), sub-tiles that hold a whole object "
        "(model.levels.-1.region), the instance and distillation terms (train.instance_weight=4 "
        "train.distill_weight=1), or a mask column in the manifest to see hit rates; docs/design.md, "
        "'When accuracy is flat'"
    )
