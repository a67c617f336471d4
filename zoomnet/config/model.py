"""What defines a model: the levels of the hierarchy, the draws, the nets
(docs/design.md, "The hierarchy"). Saved with every run and checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from zoomnet.config import fields
from zoomnet.nets.registry import available, resolve

KINDS = ("zoomin", "ats", "cnn", "mil")
ATTENTION_HEADS = ("3x3", "1x1")
MAX_CELLS = 4_000_000  # cells of one parent at a deeper level: each is a row of every level table
MAX_VIEW_PIXELS = 64_000_000  # one parent's view at a deeper level (its activations are several times more)

# What a recorded model configuration that lacks these fields was trained with: runs and
# checkpoints of earlier releases (the contrast prior came later; 0.1.0's attention net had
# a 1x1 head) are read as they were trained.
LEGACY_MODEL_FIELDS = {"attention_prior": 0.0, "attention_head": "1x1", "attention_depth": 3}


def with_legacy_fields(model: dict) -> dict:
    """A recorded model configuration (a run's ``config.json`` or a checkpoint's), with the
    fields it lacks set to what it was trained with (``LEGACY_MODEL_FIELDS``).

    >>> with_legacy_fields({"attention_prior": 5.0})["attention_head"]
    '1x1'
    """
    return {**LEGACY_MODEL_FIELDS, **model}


def _statistics(name: str, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel input statistics ``name_mean``/``name_std``, checked (0-255 scale)."""
    try:
        means, stds = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        ok = len(means) == len(stds) >= 1 and all(map(math.isfinite, means + stds))
        ok = ok and min(stds) > 0 and not any(isinstance(v, bool) for v in (*mean, *std))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{name}_mean={mean!r}, {name}_std={std!r}: give one finite mean and one positive standard "
            "deviation per channel (0-255 scale)"
        )
    return means, stds


@dataclass
class LevelConfig:
    """One level of the hierarchy.

    Attributes:
        scale: view scale ``s_l`` relative to full resolution (a 256 px parent at 0.5 gives
            a 128 px view).
        region: region size ``(h_l, w_l)`` in full-resolution pixels: tiles at level 1,
            sub-tiles at the last level. Fixed in pixels so that a model trained on small
            images reads the same regions on large ones.
        stride: ``"tiled"`` (stride = region: non-overlapping tiles, the authors' code),
            ``"dense"`` (stride = 1 / scale: one cell per view pixel, the paper's
            equations), or an explicit ``(t_h, t_w)`` in full-resolution pixels.
        attention: registered attention net name.
    """

    scale: float
    region: tuple[int, int]
    stride: str | tuple[float, float] = "tiled"
    attention: str = "conv"

    def cell_stride(self) -> tuple[float, float]:
        """The cell stride ``(t_h, t_w)`` in full-resolution pixels."""
        if self.stride == "tiled":
            return float(self.region[0]), float(self.region[1])
        if self.stride == "dense":
            return 1.0 / self.scale, 1.0 / self.scale
        return float(self.stride[0]), float(self.stride[1])

    def check(self, where: str) -> None:
        """Normalise the field types and refuse an impossible level (``where``: its name)."""
        self.scale = fields.number(f"{where}.scale", self.scale, positive=True, high=1.0)
        self.region = fields.pair(f"{where}.region", self.region)
        if min(self.region) < 1:
            raise ValueError(f"{where}.region={list(self.region)}: give positive sizes in pixels")
        if isinstance(self.stride, str):
            fields.choice(f"{where}.stride", self.stride, ("tiled", "dense"))
        else:
            self.stride = fields.pair(f"{where}.stride", self.stride, float)
            if min(self.stride) < 1:
                raise ValueError(f"{where}.stride={list(self.stride)}: a stride below one pixel makes cells "
                                 "smaller than a pixel; give 'tiled', 'dense' or [t_h, t_w] >= 1")
        if self.attention not in available("attention"):
            raise ValueError(f"{where}.attention={self.attention!r}: choose one of: {', '.join(available('attention'))}")
        t_h, t_w = self.cell_stride()
        if self.region[0] < t_h or self.region[1] < t_w:
            raise ValueError(
                f"{where}.region={self.region} is smaller than its cell stride ({t_h:g}, {t_w:g}): regions "
                "would leave gaps; enlarge the region"
            )


@dataclass
class ModelConfig:
    """Everything that defines a model; saved with every run and checkpoint.

    Attributes:
        kind: ``zoomin`` (K >= 2 levels), ``ats`` (one level), ``cnn`` (the CNN baseline)
            or ``mil`` (the attention-MIL baseline; level 1's scale finds the tissue).
        levels: the hierarchy, level 1 first.
        num_classes: number of classes.
        samples: draws N at level 1 at inference.
        train_samples: draws in training (None: ``samples``). More draws early help the
            attention find rare objects; the estimator is unbiased for any N.
        feature: registered feature net (``lenet``, ``resnet``) or an import path
            ``package.module:callable`` (called with ``in_channels`` and ``feature_kwargs``;
            the net needs an ``out_dim``), recorded in the run so prediction imports it.
            A feature net may also be ``torchvision/<arch>`` or ``timm/<arch>`` (random
            weights, head removed; that package installed): ``zoomnet.nets.encoders``.
        feature_kwargs: extra arguments for the feature net.
        feature_weights: a local weight file loaded into the feature net when training
            starts (``.safetensors``, or a weights-only ``torch.save`` of its state dict);
            the run's checkpoints carry the weights after that. Never downloaded.
        feature_frozen: the feature net keeps its weights (no gradients through it, no
            optimiser state, its normalisation layers in eval mode): only the attention
            nets and the classifier learn.
        feature_size: ``[h, w]`` (or one side) every sub-tile is resampled to before the
            feature net; None: the net's declared ``input_size`` (torchvision's and timm's
            nets declare theirs), else as read. Recorded in the run when training starts.
        feature_mean, feature_std: the feature net's input statistics (0-255 scale);
            None: the net's declared ``pixel_mean``/``pixel_std``, else ``pixel_mean`` and
            ``pixel_std``. Recorded in the run when training starts.
        classifier_scale: input scale of the linear classifier (features are unit vectors).
        attention_width: hidden channels of the attention nets (8 in the paper).
        attention_depth: 3x3 convolutions of the attention nets (3 in the paper).
        attention_head: ``"3x3"``: the last 3x3 convolution gives the logit (the authors'
            net, 864 multiply-adds per view pixel); ``"1x1"``: a 1x1 convolution after
            ``attention_depth`` convolutions of ``attention_width`` channels (zoomnet 0.1.0's
            net, 1,376). A run that does not record it was trained with ``"1x1"``.
        attention_prior: initial gain of the attention nets' contrast prior (0: none): the
            untrained attention is drawn to local detail rather than uniform, so the first
            epochs sample the places where a small object can be (``nets/attention.py``).
        smooth: uniform mass mixed into every attention map (exploration; 0 = none).
        pixel_mean: raw pixel mean subtracted before every net (0-255 scale; ImageNet
            statistics, for a feature net trained with them: ``[123.7, 116.3, 103.5]``).
        pixel_std: raw pixel standard deviation divided out before every net (ImageNet:
            ``[58.4, 57.1, 57.4]``).
        chunk: sub-tiles per chunk of ``f`` at inference (memory of one chunk); on a GPU at
            least 256 (``ZoomIn.inference_chunks``).
        view_chunk: parent views per batch of a deeper level's attention net at inference
            (training runs a level's views in one batch: their activations are kept for the
            backward pass anyway); on a GPU at least 64, on a CPU no more than keep the net's
            widest layer under 8 MB (``ZoomIn._views_per_call``: four of a slide's 256^2 views).
        tissue_mask: cells without tissue get no attention mass, at every level, in the
            ordinary and the contrastive sample alike (bright-field slides): Otsu's threshold
            on the saturation of each image's level-1 view, applied to every view of it.
        strip_rows: level-1 view rows per strip (None: the whole view at once); for
            gigapixel images, whose level-1 view alone can be thousands of pixels high.
        cnn_scale: input scale of the CNN baseline (1 = full resolution).
        mil_tile: tile side in full-resolution pixels of the attention-MIL baseline
            (``kind = "mil"``: every tissue tile embedded by ``f``, gated attention pooling).
        mil_scale: the scale the MIL baseline reads its tiles at (0.25: a 256 px tile is
            embedded as 64 px).
    """

    kind: str = "zoomin"
    levels: list[LevelConfig] = field(
        default_factory=lambda: [
            LevelConfig(0.1, (250, 250), "tiled"),
            LevelConfig(0.2, (27, 27), "dense"),
        ]
    )
    num_classes: int = 2
    samples: int = 10
    train_samples: int | str | None = None
    feature: str = "lenet"
    feature_kwargs: dict = field(default_factory=dict)
    feature_weights: str | None = None
    feature_frozen: bool = False
    feature_size: tuple[int, int] | None = None
    feature_mean: tuple[float, ...] | None = None
    feature_std: tuple[float, ...] | None = None
    classifier_scale: float = 10.0
    attention_width: int = 8
    attention_depth: int = 3
    attention_head: str = "3x3"
    attention_prior: float = 5.0
    smooth: float = 0.0
    pixel_mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    pixel_std: tuple[float, float, float] = (64.0, 64.0, 64.0)
    chunk: int = 256
    view_chunk: int = 64
    strip_rows: int | None = None
    tissue_mask: bool = False
    cnn_scale: float = 1.0
    mil_tile: int = 256
    mil_scale: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.levels, (list, tuple)) or not self.levels:
            raise ValueError(f"model.levels={self.levels!r}: give a list of levels, level 1 first")
        try:
            self.levels = [lv if isinstance(lv, LevelConfig) else LevelConfig(**lv) for lv in self.levels]
        except TypeError as exc:
            raise ValueError(f"model.levels: {exc}; a level has scale, region, stride and attention") from None
        self.validate()

    def validate(self) -> None:
        """Normalise the field types and raise ``ValueError`` naming the field and the fix
        for an impossible setting."""
        self._check_numbers()
        self._check_nets()
        for i, lv in enumerate(self.levels, start=1):
            lv.check(f"model.levels[{i}]")
        self._check_hierarchy()

    def _check_numbers(self) -> None:
        self.kind = fields.choice("model.kind", self.kind, KINDS)
        for name in ("samples", "chunk", "view_chunk"):
            setattr(self, name, fields.whole(f"model.{name}", getattr(self, name), low=1))
        if self.train_samples != "auto":
            self.train_samples = fields.whole("model.train_samples", self.train_samples, low=1, optional=True)
        self.strip_rows = fields.whole("model.strip_rows", self.strip_rows, low=1, optional=True)
        self.num_classes = fields.whole("model.num_classes", self.num_classes, low=2)
        self.classifier_scale = fields.number("model.classifier_scale", self.classifier_scale, positive=True)
        self.attention_prior = fields.number("model.attention_prior", self.attention_prior)
        self.cnn_scale = fields.number("model.cnn_scale", self.cnn_scale, positive=True, high=1.0)
        self.mil_tile = fields.whole("model.mil_tile", self.mil_tile, low=1)
        self.mil_scale = fields.number("model.mil_scale", self.mil_scale, positive=True, high=1.0)
        self.smooth = fields.number("model.smooth", self.smooth, high=1.0, below=True)
        self.tissue_mask = fields.boolean("model.tissue_mask", self.tissue_mask)
        self.pixel_mean, self.pixel_std = _statistics("model.pixel", self.pixel_mean, self.pixel_std)

    def _check_nets(self) -> None:
        self.attention_width = fields.whole("model.attention_width", self.attention_width, low=1)
        self.attention_depth = fields.whole("model.attention_depth", self.attention_depth, low=1, high=16)
        self.attention_head = fields.choice("model.attention_head", self.attention_head, ATTENTION_HEADS)
        if not isinstance(self.feature_kwargs, dict):
            raise ValueError(f"model.feature_kwargs={self.feature_kwargs!r}: give an object of arguments, e.g. {{}}")
        try:
            resolve("feature", self.feature)
        except ValueError as exc:
            raise ValueError(f"model.feature={self.feature!r}: {exc}") from None
        self.feature_frozen = fields.boolean("model.feature_frozen", self.feature_frozen)
        if self.feature_weights is not None and (not isinstance(self.feature_weights, str) or not self.feature_weights):
            raise ValueError(f"model.feature_weights={self.feature_weights!r}: give the path of a local weight file")
        if isinstance(self.feature_size, int) and not isinstance(self.feature_size, bool):
            self.feature_size = (self.feature_size, self.feature_size)
        if self.feature_size is not None:
            self.feature_size = fields.pair("model.feature_size", self.feature_size)
            if min(self.feature_size) < 1:
                raise ValueError(f"model.feature_size={list(self.feature_size)}: give positive sizes in pixels")
        if (self.feature_mean is None) != (self.feature_std is None):
            raise ValueError("model.feature_mean and model.feature_std: give both or neither")
        if self.feature_mean is not None:
            self.feature_mean, self.feature_std = _statistics("model.feature", self.feature_mean, self.feature_std)
            if len(self.feature_mean) != len(self.pixel_mean):
                raise ValueError(f"model.feature_mean={list(self.feature_mean)}: give one value per channel "
                                 f"({len(self.pixel_mean)})")
        if self.kind in ("cnn", "mil") and (self.feature_frozen or self.feature_weights):
            raise ValueError(f"model.feature_frozen/feature_weights: the {self.kind} baseline does not take them; "
                             "use them with zoomin or ats")

    def _check_hierarchy(self) -> None:
        if self.kind == "ats" and len(self.levels) != 1:
            raise ValueError(f"model.levels: ats has one level, got {len(self.levels)}")
        if self.kind == "zoomin" and len(self.levels) < 2:
            raise ValueError("model.levels: zoomin needs at least two levels (one is ats)")
        for i in range(1, len(self.levels)):
            parent, lv = self.levels[i - 1].region, self.levels[i]
            view = (math.floor(parent[0] * lv.scale), math.floor(parent[1] * lv.scale))
            where = f"model.levels[{i + 1}]"
            if min(view) < 1:
                raise ValueError(f"{where}.scale={lv.scale}: the view of a {parent} region is empty")
            t_h, t_w = lv.cell_stride()
            cells = math.ceil(parent[0] / t_h - 1e-9) * math.ceil(parent[1] / t_w - 1e-9)
            if cells > MAX_CELLS or view[0] * view[1] > MAX_VIEW_PIXELS:
                raise ValueError(
                    f"{where}: a {parent[0]}x{parent[1]} parent gives {cells:,} cells and a {view[0]}x{view[1]} view "
                    f"(at most {MAX_CELLS:,} cells and {MAX_VIEW_PIXELS:,} view pixels); use a coarser stride or "
                    "scale, or a smaller parent region"
                )
