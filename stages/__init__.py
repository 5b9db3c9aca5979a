"""Sieve's built-in stages. Importing this package registers them (entry point ``sieve.stages``).

Modules here import only cheap things at import time; models, indexes and heavy libraries load
in each stage's ``warm_up``.
"""

from stages import select  # noqa: F401  (registers select.*)
from stages.recall import bm25  # noqa: F401  (registers recall.bm25 and the bm25 index component)
from stages.recall import dense  # noqa: F401  (registers recall.dense and the dense index component)
from stages import fuse  # noqa: F401  (registers fuse.rrf and fuse.weighted)
from stages.rerank import cross_encoder  # noqa: F401  (registers rerank.cross_encoder)
from stages import rules, threshold  # noqa: F401  (registers rules.prefilter, rules.override, select.threshold)
from stages import dedup, entities, recency  # noqa: F401  (registers boost.entity_consistency, boost.recency, dedup.near_duplicate, the entities index component)
from stages.rewrite import coreference  # noqa: F401  (registers rewrite.coreference)
