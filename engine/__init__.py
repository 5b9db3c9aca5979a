"""Sieve engine: compiles YAML pipelines into validated DAGs, runs them, and traces every query.

Importing ``engine`` is cheap: it never imports torch, transformers, FlagEmbedding, spaCy or
faiss (a test checks). Heavy libraries are imported by the stages that need them, at warm-up.
"""

import sys

if sys.platform == "win32":  # fcntl locks, POSIX signals and descriptors: nothing would run, and not clearly
    raise ImportError("Sieve runs on Linux and macOS (POSIX systems) only; on Windows, run it under WSL")

__version__ = "0.13.0"

__all__ = ["__version__"]
