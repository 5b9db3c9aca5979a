"""The document fields a stage's params name: whether the index's documents have them at all.

A misspelt field (``sourc`` for ``source``) reads as missing on every document, which a stage then handles
quietly as it handles a missing value (a cap that caps nothing, a text that is empty): warm-up reads the index's
first documents and says so, with a did-you-mean, rather than a whole pass over a large corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import get_close_matches
from typing import Any

FIELD_SAMPLE = 2000  # documents read at warm-up to see that a field exists at all


def absent_fields(index: Any, fields: Sequence[str], sample: int = FIELD_SAMPLE) -> tuple[dict[str, str], list[str], int]:
    """({field: " (did you mean 'x'?)" or ""} for each of ``fields`` (metadata keys, dotted for nested ones, or
    ``title``/``text``/``id``) that none of the index's first ``sample`` documents has; the field names those
    documents have (their metadata keys, and id, title, text); how many were read). A field with a value (not null,
    not empty text) in one of them is present. The documents are read once."""
    from rules.conditions import MISSING, doc_field

    count = min(index.doc_count, sample)
    documents = list(index.documents.get(list(range(count))).values()) if count else []
    names = sorted({key for d in documents for key in d.metadata} | {"id", "title", "text"})
    absent = {}
    for name in fields:
        if not any(doc_field(d, f"doc.{name}") not in (MISSING, None, "") for d in documents):
            hint = get_close_matches(name, names, n=1)
            absent[name] = f" (did you mean '{hint[0]}'?)" if hint else ""
    return absent, names, len(documents)
