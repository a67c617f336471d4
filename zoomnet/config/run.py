"""A run's configuration: model, optimisation and data settings, the presets, and overrides.

A preset is a JSON file shipped in ``zoomnet/config/presets/`` (so a plain ``pip install``
has them); a path to such a file works too. An override ``key=value`` (``--set`` on the
command line) changes any field, e.g. ``model.samples=30``, ``train.lr=3e-4``,
``model.kind=ats``; values are JSON (``[32, 32]``, ``true``, ``1e-4``) or plain strings,
checked against the field's type when the configuration is built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from zoomnet.config import fields
from zoomnet.config.data import DataConfig
from zoomnet.config.model import LevelConfig, ModelConfig
from zoomnet.config.train import TrainConfig
from zoomnet.errors import UserError, override_option


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
    folder = resources.files("zoomnet.config") / "presets"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _read_json(name_or_path: str) -> dict:
    """The JSON of a preset or of a file. A preset's name wins over a folder of the same name
    in the working directory (a data set written by ``make-data colon-cancer`` is one)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or (path.exists() and not (path.is_dir() and name_or_path in available_presets())):
        if not path.is_file():
            raise UserError(f"{name_or_path}: no such config file; give a preset ({', '.join(available_presets())}) or a JSON file")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{name_or_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if name_or_path not in available_presets():
        raise UserError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(available_presets())}, or a JSON file")
    return json.loads((resources.files("zoomnet.config") / "presets" / f"{name_or_path}.json").read_text())


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` pairs (dotted keys, list indices allowed) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError("{set}: expected key=value, e.g. model.samples=20", set=override_option(item))
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise UserError(f"{{set}}: {part!r} is not an index of a list of {len(node)}", set=override_option(item))
                if last:
                    node[int(part)] = _parse_value(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if part not in node:
                    raise UserError(f"{{set}}: unknown field {part!r}; known: {', '.join(sorted(node))}",
                                    set=override_option(item))
                if last:
                    node[part] = _parse_value(value)
                else:
                    node = node[part]
            else:
                raise UserError(f"{{set}}: {'.'.join(parts[:i])} is not a group of fields", set=override_option(item))
    return data


def _build(cls, data: dict, where: str, group: str):
    """``cls(**data)``, its ``ValueError`` (which names the field) as one line from ``where``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: {group}: unknown field {unknown[0]!r}; known: {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except (ValueError, TypeError) as exc:
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
    """Build and check a :class:`RunConfig` from plain data.

    Raises:
        UserError: a group or field of the wrong shape, type or range, naming it.
    """
    for group in ("model", "train", "data"):
        if not isinstance(data.get(group, {}), dict):
            raise UserError(f"{where}: {group}={data[group]!r}: give an object of fields")
    model = dict(data.get("model", {}))
    ats_scale = data.get("ats_scale")
    if ats_scale is not None:
        try:
            ats_scale = fields.number("ats_scale", ats_scale, positive=True, high=1.0)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
    levels = model.get("levels", [])
    if not isinstance(levels, list) or not all(isinstance(lv, (dict, LevelConfig)) for lv in levels):
        raise UserError(f"{where}: model.levels={levels!r}: give a list of levels, each an object with scale, "
                        "region, stride and attention")
    for i, lv in enumerate(levels, start=1):
        if isinstance(lv, dict):
            unknown = set(lv) - {f.name for f in dataclasses.fields(LevelConfig)}
            if unknown:
                raise UserError(f"{where}: model.levels[{i}]: unknown field {sorted(unknown)[0]!r}")
    if model.get("kind") == "ats" and len(levels) > 1:
        # ATS as published: one dense level at its own view scale, patches of the sub-tile size
        last = levels[-1] if isinstance(levels[-1], dict) else dataclasses.asdict(levels[-1])
        if "scale" not in last or "region" not in last:
            raise UserError(f"{where}: model.levels[{len(levels)}]: give its scale and region")
        model["levels"] = [{"scale": ats_scale or last["scale"], "region": last["region"], "stride": "dense",
                            "attention": "conv"}]
    return RunConfig(
        model=_build(ModelConfig, model, where, "model"),
        train=_build(TrainConfig, dict(data.get("train", {})), where, "train"),
        data=_build(DataConfig, dict(data.get("data", {})), where, "data"),
        ats_scale=ats_scale,
    )
