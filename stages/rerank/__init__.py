"""Rerank stages (``rerank.cross_encoder``) and the cross-encoder trainer (``sieve train-reranker``)."""
