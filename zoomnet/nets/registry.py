"""A small registry mapping ``(kind, name)`` to network builders (as timm's ``register_model``).

A name may also be an import path, ``package.module:callable``: the callable is imported
and called like a registered builder; a feature net may also be ``torchvision/<arch>`` or
``timm/<arch>`` (:mod:`zoomnet.nets.encoders`). A run records the name in its configuration, so
``zoomnet predict`` and ``evaluate`` import the same net in a fresh process, as long as the
module is importable there (installed, or on ``PYTHONPATH``).
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from zoomnet.nets.encoders import build_hub_net, hub_of

_BUILDERS: dict[str, dict[str, Callable[..., nn.Module]]] = {}


def register(kind: str, name: str) -> Callable:
    """Decorator: make ``builder`` available as ``build(kind, name, **kwargs)``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS.setdefault(kind, {})[name] = builder
        return builder

    return wrap


def resolve(kind: str, name: str) -> Callable[..., nn.Module]:
    """The builder of a registered name or of an import path ``package.module:callable``.

    Raises:
        ValueError: an unknown name, or an import path that does not import.
    """
    if kind == "feature" and hub_of(name):
        return functools.partial(build_hub_net, name)
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(
                f"{kind} net {name!r} does not import ({exc}); install its package or put it on PYTHONPATH"
            ) from None
        if not callable(builder):
            raise ValueError(f"{kind} net {name!r} is not callable")
        return builder
    try:
        return _BUILDERS[kind][name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} net {name!r}; choose one of: {', '.join(available(kind))}, or package.module:callable"
            + (", torchvision/<arch> or timm/<arch>" if kind == "feature" else "")
        ) from None


def available(kind: str) -> list[str]:
    """Registered names of one kind (``attention``, ``feature``, ``classifier``)."""
    return sorted(_BUILDERS.get(kind, {}))


def build(kind: str, name: str, **kwargs) -> nn.Module:
    """Instantiate a registered (or imported) net; unknown names raise a ``ValueError``
    listing the choices. A feature net must have an ``out_dim`` attribute (its feature size)."""
    net = resolve(kind, name)(**kwargs)
    if kind == "feature" and not isinstance(getattr(net, "out_dim", None), int):
        raise ValueError(f"feature net {name!r} has no integer out_dim (its feature size); set one")
    return net
