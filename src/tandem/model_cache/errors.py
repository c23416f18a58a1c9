"""Errors raised while finding and loading model weights."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model could not be found, read or converted; the message names the path or name and why."""
