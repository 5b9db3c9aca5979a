"""The analyst workbench: ``sieve eval``, ``compare``, ``explain``, ``report`` and ``schema``.

Each module is imported lazily by the CLI; none of them imports torch or a model library (the
pipeline's stages load those in their own warm-up, as everywhere else).
"""
