"""Checks of single setting values, shared by every settings class: each refuses a value of
the wrong type or range with a ``ValueError`` that names the field and what to give.

Values come from JSON files and ``--set`` (where ``false`` and ``3`` are typed, but a user
may also write ``False``, ``no`` or ``"3"``): :func:`boolean` and :func:`whole` accept the
unambiguous spellings and return the typed value, so a run never stores the string
``"False"`` where it reads a truth value.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def boolean(name: str, value: Any) -> bool:
    """``value`` as a bool (``true``/``false``, ``yes``/``no``, ``on``/``off``, 1/0).

    >>> boolean("model.tissue_mask", "False"), boolean("x", 1)
    (False, True)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name}={value!r}: give true or false")


def whole(name: str, value: Any, low: int | None = None, high: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int in ``[low, high]`` (None allowed with ``optional``).

    >>> whole("model.samples", "30", low=1)
    30
    """
    if optional and value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (
        high is not None and value > high
    ):
        span = f"from {low} to {high}" if low is not None and high is not None else f">= {low}" if low is not None else ""
        raise ValueError(f"{name}={value!r}: give a whole number {span}{', or null' if optional else ''}".rstrip())
    return value


def number(name: str, value: Any, low: float = 0.0, positive: bool = False, high: float | None = None,
           optional: bool = False, below: bool = False) -> float | None:
    """``value`` as a finite float ``>= low`` (``> low`` with ``positive``), ``<= high``
    (``< high`` with ``below``), or None with ``optional``.

    >>> number("train.lr", "1e-3", positive=True)
    0.001
    """
    if optional and value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if positive else value >= low)
    ok = ok and (high is None or (value < high if below else value <= high))
    if not ok:
        lo = f"> {low:g}" if positive else f">= {low:g}"
        hi = "" if high is None else f" and {'<' if below else '<='} {high:g}"
        raise ValueError(f"{name}={value!r}: give a finite number {lo}{hi}{', or null' if optional else ''}")
    return float(value) if isinstance(value, float) else value


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def pair(name: str, value: Any, kind=int) -> tuple:
    """Two numbers ``(h, w)`` (a list or tuple of two)."""
    what = "whole numbers" if kind is int else "numbers"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name}={value!r}: give two {what} [height, width]")
    try:
        ok = not any(isinstance(v, bool) for v in value) and all(kind(v) == float(v) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r}: give two {what} [height, width]")
    return tuple(kind(v) for v in value)
