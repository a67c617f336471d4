"""Optimisation settings of a run (docs/design.md, "Losses" and "Training dynamics")."""

from __future__ import annotations

from dataclasses import dataclass

from zoomnet.config import fields


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step (same-sized images are batched together).
        lr: Adam learning rate of the feature net and classifier (authors: 1e-4).
        attention_lr: learning rate of the attention nets (None: ``lr``). A larger one
            gets attention moving while it still sees the objects rarely.
        weight_decay: Adam weight decay (authors: 1e-5).
        clip: gradient-norm clipping (authors: 5).
        lr_step: epochs between learning-rate decays (None: constant).
        lr_gamma: decay factor.
        entropy_weight: lambda of the entropy regularizer (paper: 1e-5).
        contrastive_from: first epoch (1-based) with the contrastive term (None: never;
            paper: 10), or ``"auto"``: from the epoch after the first one in which the
            attention has left uniform and the sampled sub-tiles carry the label
            (:func:`attention_started`). Earlier, the complementary sample of an image looks
            like its ordinary one, and "not this class" fights the cross-entropy.
        contrastive_weight: weight of the contrastive term.
        attention_from: first epoch (1-based) in which the attention nets learn (None or 1:
            from the start), or ``"auto"``: from the epoch after the first one in which the
            sampled sub-tiles carry the label (``subtile_signal`` halfway from chance to
            certainty; :func:`signal_started`). Until then the attention stays as built
            (its contrast prior) and ``f`` learns on what it samples. Where detail is
            everywhere (street scenes), an attention that learns before ``f`` sees the
            object is pulled by the early, noisy scores onto the wrong detail and stops
            sampling the object (docs/design.md, "Starting by itself").
        instance_weight: weight of the instance (MIL) loss on sampled sub-tiles (0: off).
        mask_weight: weight of attention supervision by masks (0: off; masks needed).
        distill_weight: weight of attention distillation from the sub-tiles' own object
            scores (0: off; see ``losses.attention_distillation_loss``).
        reference_class: index of the negative class of the contrastive, instance and
            distillation terms (None: no class is "empty"; their multi-class forms).
        one_class_per_image: without a reference class, whether every object of an image
            is of the image's class (fMoW: copies of one structure), so that the instance
            loss also gives each bag's sub-tile most like any class the image's class
            (``losses.instance_loss``). Off for sets whose images also hold other classes'
            objects (Megapixel MNIST's minority digits, which it would call the majority's).
            A reference class's object bags always take that part.
        reference_share: share of the training images in the reference class (a run sets
            it from its training manifest): the instance loss gives the reference bags and
            the others half the weight each (``losses.instance_loss``). None: unweighted.
        seed: seed of shuffling and sampling.
        bf16: bfloat16 autocast of the nets when training on CUDA (the estimator and losses
            stay float32). It halves activation memory, but for nets as narrow as the
            shipped ones it does not speed a step up, and with one image per batch each
            step's new shapes cost more than it saves: off unless memory is short.
    """

    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    attention_lr: float | None = None
    weight_decay: float = 1e-5
    clip: float = 5.0
    lr_step: int | None = None
    lr_gamma: float = 0.5
    entropy_weight: float = 1e-5
    contrastive_from: int | str | None = 10
    contrastive_weight: float = 1.0
    attention_from: int | str | None = None
    instance_weight: float = 0.0
    mask_weight: float = 0.0
    distill_weight: float = 0.0
    reference_class: int | None = 0
    reference_share: float | None = None
    one_class_per_image: bool = False
    seed: int = 0
    bf16: bool = False
    samples_tolerance: float = 0.1

    def __post_init__(self) -> None:
        """Normalise the field types and refuse, naming the field and the fix, a value of
        the wrong type or range."""
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            setattr(self, name, fields.whole(f"train.{name}", getattr(self, name), low=low))
        self.lr_step = fields.whole("train.lr_step", self.lr_step, low=1, optional=True)
        self.lr = fields.number("train.lr", self.lr, positive=True)
        self.attention_lr = fields.number("train.attention_lr", self.attention_lr, positive=True, optional=True)
        self.lr_gamma = fields.number("train.lr_gamma", self.lr_gamma, positive=True)
        for name in ("weight_decay", "clip", "entropy_weight", "contrastive_weight", "instance_weight",
                     "mask_weight", "distill_weight"):
            setattr(self, name, fields.number(f"train.{name}", getattr(self, name)))
        self.reference_share = fields.number("train.reference_share", self.reference_share, high=1.0, optional=True)
        self.reference_class = fields.whole("train.reference_class", self.reference_class, low=0, optional=True)
        self.one_class_per_image = fields.boolean("train.one_class_per_image", self.one_class_per_image)
        self.bf16 = fields.boolean("train.bf16", self.bf16)
        self.samples_tolerance = fields.number("train.samples_tolerance", self.samples_tolerance, positive=True)
        if self.lr > 10 or (self.attention_lr or 0) > 10:
            raise ValueError(f"train.lr={self.lr}, attention_lr={self.attention_lr}: a learning rate above 10 "
                             "diverges; Adam takes 1e-4 to 1e-2")
        for name in ("contrastive_from", "attention_from"):
            value = getattr(self, name)
            if value not in (None, "auto"):
                try:
                    value = fields.whole(f"train.{name}", value, low=1)
                except ValueError:
                    raise ValueError(f"train.{name}={value!r}: give an epoch (>= 1), \"auto\" or null") from None
            setattr(self, name, value)
