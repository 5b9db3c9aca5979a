"""Query rewriting stages: ``rewrite.coreference`` (pronouns, ellipsis, glossary synonyms).

Importing this package imports nothing heavy; spaCy and jieba load in the stage's ``warm_up``.
"""
