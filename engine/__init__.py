"""Sieve engine: compiles YAML pipelines into validated DAGs, runs them, and traces every query.

Importing ``engine`` is cheap: it never imports torch, transformers, FlagEmbedding, spaCy or
faiss (a test checks). Heavy libraries are imported by the stages that need them, at warm-up.
"""

__version__ = "0.11.0"

__all__ = ["__version__"]
