"""Errors a user can fix: the command line prints their message on one line, no traceback.

The engine speaks the API's language: a message that points to an option of the call
names it as a ``{placeholder}`` with an :class:`Option`, which reads ``resume=True`` in
``str(error)`` (what a Python caller sees) and ``--resume`` in :meth:`UserError.for_cli`
(what the command line prints).
"""

from __future__ import annotations

from typing import NamedTuple


class Option(NamedTuple):
    """One option of a call, as the Python API and the command line write it."""

    api: str
    cli: str


RESUME = Option("resume=True", "--resume")
FORCE = Option("force=True", "--force")
OUT = Option("out_dir", "--out")
OUT_CSV = Option("out_csv", "--out")
TENSORBOARD = Option("tensorboard=True", "--tensorboard")


def device_option(value: str) -> Option:
    """The ``device`` option with ``value``."""
    return Option(f"device={value!r}", f"--device {value}")


def epochs_option(value) -> Option:
    """The ``epochs`` option with ``value``."""
    return Option(f"epochs={value!r}", f"--epochs {value}")


def override_option(text: str) -> Option:
    """A ``key=value`` override (``overrides=[...]`` in Python, ``--set`` on the command line)."""
    return Option(f"override {text!r}", f"--set {text}")


class UserError(Exception):
    """Bad input: the message names the file or field and says how to fix it.

    Args:
        message: the text, with ``{name}`` where an option of the call is named.
        options: the :class:`Option` of each ``{name}``.

    >>> err = UserError("{out}: holds a run already; continue it with {resume}", out=OUT, resume=RESUME)
    >>> str(err), err.for_cli()
    ('out_dir: holds a run already; continue it with resume=True', '--out: holds a run already; continue it with --resume')
    """

    def __init__(self, message: str, **options: Option):
        self.template, self.options = message, options
        super().__init__(self._render("api"))

    def _render(self, side: str) -> str:
        text = self.template
        for key, option in self.options.items():
            text = text.replace("{" + key + "}", getattr(option, side))
        return text

    def for_cli(self) -> str:
        """The message with the options as command-line flags."""
        return self._render("cli")


class ImageError(UserError):
    """An image that cannot be opened or read."""
