"""Run configuration: model, optimisation and data settings, presets, and ``--set`` overrides.

A preset is a JSON file shipped in ``zoomnet/configs/`` (so a plain ``pip install`` has
them); ``--config`` also takes a path to such a file. ``--set key=value`` overrides any
field, e.g. ``--set model.samples=30 train.lr=3e-4 model.kind=ats``; values are JSON
(``[32, 32]``, ``true``, ``1e-4``) or plain strings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from zoomnet.errors import UserError
from zoomnet.model import LevelConfig, ModelConfig
from zoomnet.train import TrainConfig


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
        """Refuse, naming the field and the fix, a value of the wrong type or range."""
        import math

        if not isinstance(self.fill, (int, float)) or isinstance(self.fill, bool) or not 0 <= self.fill <= 255:
            raise ValueError(f"data.fill={self.fill!r}: give a raw pixel value from 0 to 255 (255: white, bright-field slides)")
        if self.target_mpp is not None and (
            isinstance(self.target_mpp, bool) or not isinstance(self.target_mpp, (int, float))
            or not math.isfinite(self.target_mpp) or self.target_mpp <= 0
        ):
            raise ValueError(f"data.target_mpp={self.target_mpp!r}: give microns per pixel (e.g. 0.5), or null")
        if not isinstance(self.augment_strength, (int, float)) or not 0 <= self.augment_strength < 1:
            raise ValueError(f"data.augment_strength={self.augment_strength!r}: give a number in [0, 1)")
        if self.classes is not None and (
            not isinstance(self.classes, list) or len(set(map(str, self.classes))) != len(self.classes) or len(self.classes) < 2
        ):
            raise ValueError(f"data.classes={self.classes!r}: give a list of at least two distinct names, or null")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1_000_000:
            raise ValueError(f"data.max_pixels={self.max_pixels!r}: give a whole number of pixels >= 1000000")
        for name in ("augment", "class_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name}={getattr(self, name)!r}: give true or false")


@dataclass
class RunConfig:
    """Everything a run needs; written to ``config.json`` in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ats_scale: float | None = None  # view scale of ATS when model.kind is switched to ats

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def available_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("zoomnet") / "configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _read_json(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"{name_or_path}: no such config file; give a preset ({', '.join(available_presets())}) or a JSON file")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{name_or_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if name_or_path not in available_presets():
        raise UserError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(available_presets())}, or a JSON file")
    return json.loads((resources.files("zoomnet") / "configs" / f"{name_or_path}.json").read_text())


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` pairs (dotted keys, list indices allowed) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. --set model.samples=20")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = _parse_value(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if part not in node:
                    raise UserError(f"--set {key}: unknown field {part!r}; known: {', '.join(sorted(node))}")
                if last:
                    node[part] = _parse_value(value)
                else:
                    node = node[part]
            else:
                raise UserError(f"--set {key}: {'.'.join(parts[:i])} is not a group of fields")
    return data


def _build(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from None


def defaults() -> dict:
    """The full default configuration as a dict (every field present)."""
    return RunConfig().to_dict()


def _merge(base: dict, update: dict, where: str) -> dict:
    for key, value in update.items():
        if key not in base:
            raise UserError(f"{where}: unknown field {key!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key != "feature_kwargs":
            _merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value
    return base


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """A preset or JSON file, merged over the defaults, with ``--set`` overrides applied.

    Raises:
        UserError: unknown preset, unknown field, impossible setting.
    """
    data = _merge(defaults(), _read_json(name_or_path), name_or_path)
    apply_overrides(data, overrides or [])
    return config_from_dict(data, name_or_path)


def config_from_dict(data: dict, where: str = "config") -> RunConfig:
    """Build and check a :class:`RunConfig` from plain data."""
    model = dict(data.get("model", {}))
    ats_scale = data.get("ats_scale")
    levels = model.get("levels", [])
    if model.get("kind") == "ats" and len(levels) > 1:
        # ATS as published: one dense level at its own view scale, patches of the sub-tile size
        last = levels[-1]
        scale = ats_scale or last["scale"]
        model["levels"] = [{"scale": scale, "region": last["region"], "stride": "dense", "attention": "conv"}]
    for i, lv in enumerate(model.get("levels", []), start=1):
        if isinstance(lv, dict):
            unknown = set(lv) - {f.name for f in dataclasses.fields(LevelConfig)}
            if unknown:
                raise UserError(f"{where}: model.levels[{i}]: unknown field {sorted(unknown)[0]!r}")
    return RunConfig(
        model=_build(ModelConfig, model, f"{where}: model"),
        train=_build(TrainConfig, dict(data.get("train", {})), f"{where}: train"),
        data=_build(DataConfig, dict(data.get("data", {})), f"{where}: data"),
        ats_scale=ats_scale,
    )
