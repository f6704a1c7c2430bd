"""Typed exceptions: every failure a user can cause raises a subclass of `BitfluxError`.

The CLI turns these into a one-line message and a non-zero exit; the API lets callers catch them.
"""

from __future__ import annotations


class BitfluxError(Exception):
    """Base class for errors caused by input (paths, files, options), not by bugs."""


class ModelError(BitfluxError):
    """The path is missing, unreadable, or not a model bitflux knows how to handle."""


class CheckpointError(BitfluxError):
    """A quantised checkpoint is corrupt, truncated, or disagrees with its config.json."""


class FormatError(CheckpointError):
    """Unknown packing format or version, or packed data holding invalid codes."""


class OutputExistsError(BitfluxError):
    """The output path already exists; bitflux never overwrites."""
