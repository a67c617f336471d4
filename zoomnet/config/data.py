"""How images and labels are read: classes, fill, augmentation, resolution, read limits."""

from __future__ import annotations

from dataclasses import dataclass

from zoomnet.config import fields


@dataclass
class DataConfig:
    """How images and labels are read.

    Attributes:
        classes: class names in index order (None: sorted labels of the training CSV).
        reference_class: the negative class of the contrastive, instance and distillation
            terms: a class whose images hold no object. None: a class named ``negative``,
            ``normal``, ``background``, ``empty``, ``no-sign`` or ``no-object`` when there
            is one (or ``0`` with two classes); otherwise (and with ``"none"``) the
            multi-class forms of those terms, which need no such class.
        fill: raw pixel value outside the image (0; 255 suits bright-field slides).
        class_weights: weight the cross-entropy by inverse class frequency (imbalanced sets).
        augment: colour jitter of the sampled sub-tiles in training (brightness, contrast
            and a per-channel gain of up to ``augment_strength``, one draw per image).
        augment_strength: size of the jitter.
        target_mpp: microns per pixel the model works at (None: native pixels). Each slide
            is seen at this resolution (its own must be recorded in the file), so a model
            trained at 0.5 um/px applies to a slide scanned at 0.25 um/px.
        max_pixels: the most pixels one read of an image may decode (the tiles or strips
            it touches; a plain PNG or JPEG: the whole image, at most 100 million), checked
            before decoding, so a hostile header or a badly tiled file gets an error
            instead of filling the memory. The default (256 million, 768 MB as RGB) is what
            a laptop holds.
    """

    classes: list[str] | None = None
    reference_class: str | None = None
    fill: float = 0.0
    class_weights: bool = False
    augment: bool = False
    augment_strength: float = 0.1
    target_mpp: float | None = None
    max_pixels: int = 256_000_000

    def __post_init__(self) -> None:
        """Normalise the field types and refuse, naming the field and the fix, a value of
        the wrong type or range."""
        if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)) or not 0 <= self.fill <= 255:
            raise ValueError(f"data.fill={self.fill!r}: give a raw pixel value from 0 to 255 (255: white, bright-field slides)")
        try:
            self.target_mpp = fields.number("data.target_mpp", self.target_mpp, positive=True, optional=True)
        except ValueError:
            raise ValueError(f"data.target_mpp={self.target_mpp!r}: give microns per pixel (e.g. 0.5), or null") from None
        self.augment_strength = fields.number("data.augment_strength", self.augment_strength, high=1.0, below=True)
        if self.classes is not None and (
            not isinstance(self.classes, list) or len(set(map(str, self.classes))) != len(self.classes) or len(self.classes) < 2
        ):
            raise ValueError(f"data.classes={self.classes!r}: give a list of at least two distinct names, or null")
        self.max_pixels = fields.whole("data.max_pixels", self.max_pixels, low=1_000_000)
        for name in ("augment", "class_weights"):
            setattr(self, name, fields.boolean(f"data.{name}", getattr(self, name)))
