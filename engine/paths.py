"""Checks of paths Sieve is asked to write to, made before any work."""

from __future__ import annotations

from pathlib import Path


def nearest_existing_parent(path: Path) -> Path | None:
    """The closest ancestor of ``path`` that exists (as given: relative stays relative), or None. A file there
    means ``path`` can never be created; a directory is where it would be written."""
    return next((parent for parent in path.parents if parent.exists()), None)
