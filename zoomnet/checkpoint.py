"""Checkpoints: weights as safetensors (no code runs on load), with their description (the
model config and the training state) inside the same file's metadata, so that weights and
description are replaced together by one rename: a crash at any instant leaves either the
old checkpoint or the new one, never a mix. A readable copy of the description is written
beside it as ``.json`` (checkpoints from before the metadata are read from that copy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zoomnet.errors import UserError
from zoomnet.model import ModelConfig, build_model, with_legacy_fields


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_to_dict(config) -> dict:
    """A dataclass config as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_checkpoint(model: torch.nn.Module, path: str | Path, state: dict | None = None) -> Path:
    """Write ``path`` (``.safetensors``) and ``path`` with ``.json`` (config and ``state``)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a checkpoint that cannot predict anything must never replace a good one
        raise ValueError(f"not saving {path}: weights {bad[0]} are not finite")
    meta = {"model": config_to_dict(model.config), "state": state or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"zoomnet": json.dumps(meta)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # weights and description together
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())  # the readable copy
    return path


def refresh_readable_copy(path: str | Path) -> None:
    """Rewrite the ``.json`` beside a checkpoint from the description inside it, where a
    crash came between the two renames and left the copy one epoch behind."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        meta = read_description(path)
    except (OSError, ValueError, KeyError):
        return
    copy = path.with_suffix(".json")
    try:
        current = json.loads(copy.read_text())
    except (OSError, ValueError):
        current = None
    if current != meta:
        atomic_write_bytes(copy, json.dumps(meta, indent=2).encode())


def read_description(path: str | Path) -> dict:
    """``{"model": ..., "state": ...}`` of a checkpoint: from its own metadata, or from the
    ``.json`` beside it for checkpoints written before the metadata held it.

    Raises:
        OSError, ValueError, KeyError: unreadable (the caller words the error).
    """
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as fh:
            embedded = (fh.metadata() or {}).get("zoomnet")
    except Exception:  # not a safetensors file: load_checkpoint says so when it reads the weights
        embedded = None
    if embedded is not None:
        return json.loads(embedded)
    return json.loads(path.with_suffix(".json").read_text())


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from ``path`` (``.safetensors``) and its JSON; returns ``(model, state)``.

    Only tensors and JSON are read: a file carrying anything else (a pickle, say) is refused.

    Raises:
        UserError: an unreadable, foreign or mismatched checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; give a run folder's best.safetensors or last.safetensors")
    try:
        meta = read_description(path)
        recorded = with_legacy_fields(dict(meta["model"]))  # as earlier releases trained it
        model = build_model(ModelConfig(**recorded))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: no zoomnet checkpoint description in it or in {path.with_suffix('.json').name} "
                        f"({type(exc).__name__}: {exc}); retrain or restore it") from None
    try:
        tensors = load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error types for any foreign content
        raise UserError(
            f"{path}: refused: not a safetensors file ({type(exc).__name__}); zoomnet loads weights only "
            "from safetensors, never from pickles, which can run code"
        ) from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{path}: weights {bad[0]} hold NaN or infinite values; this checkpoint cannot predict: use "
                        "the run's other checkpoint (best or last) or retrain")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not fit the model of its config ({str(exc).splitlines()[0]})") from None
    return model.to(device), meta.get("state", {})


def load_tensors_only(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers, never code.

    Raises:
        UserError: the file holds anything else.
    """
    try:
        return torch.load(path, weights_only=True, map_location=device)
    except Exception as exc:  # UnpicklingError for code, RuntimeError or EOFError for damage
        raise UserError(
            f"{path}: refused: it holds more than tensors ({type(exc).__name__}); delete it and resume "
            "from an earlier run folder, or retrain"
        ) from None
