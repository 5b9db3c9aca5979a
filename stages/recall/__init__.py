"""Recall stages: find the first candidates for a query in the index."""
