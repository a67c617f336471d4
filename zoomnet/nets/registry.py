"""A small registry mapping ``(kind, name)`` to network builders (as timm's ``register_model``)."""

from __future__ import annotations

from typing import Callable

from torch import nn

_BUILDERS: dict[str, dict[str, Callable[..., nn.Module]]] = {}


def register(kind: str, name: str) -> Callable:
    """Decorator: make ``builder`` available as ``build(kind, name, **kwargs)``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS.setdefault(kind, {})[name] = builder
        return builder

    return wrap


def available(kind: str) -> list[str]:
    """Registered names of one kind (``attention``, ``feature``, ``classifier``)."""
    return sorted(_BUILDERS.get(kind, {}))


def build(kind: str, name: str, **kwargs) -> nn.Module:
    """Instantiate a registered net; unknown names raise a ``ValueError`` listing the choices."""
    try:
        builder = _BUILDERS[kind][name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} net {name!r}; choose one of: {', '.join(available(kind))}"
        ) from None
    return builder(**kwargs)
