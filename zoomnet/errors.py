"""Errors a user can fix: the command line prints their message on one line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file or field and says how to fix it."""


class ImageError(UserError):
    """An image that cannot be opened or read."""
