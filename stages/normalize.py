"""Score normalisation: pure functions mapping one signal's scores in one candidate list to a common scale.

Fusing a BM25 score (0..40), a cosine (-1..1) and a cross-encoder logit (-10..10) needs each
brought to a comparable range first. Every method is a function of the list's statistics
(:class:`SignalStats`) and one value (or rank), so a fused score can be explained term by term.

Methods and their guards (a guard never divides by zero):
- ``minmax``: ``(x - min) / (max - min)``; a one-element list or a list whose values are all equal
  maps every value to ``TIED_MINMAX`` = 1.0 (as OpenSearch's min_max normaliser does: all equally
  good means all as good as the best).
- ``zscore``: ``(x - mean) / std`` (population std); fewer than two values or std 0 maps to 0.0
  (the mean).
- ``sigmoid``: ``1 / (1 + exp(-x))``, for logits; computed without overflow.
- ``rank``: ``1 / rank``, the rank the signal's own stage gave the document (ties already broken
  on doc_id there).
- ``rank_linear``: ``(depth - rank + 1) / depth``, depth = the deepest rank present in the list.
- ``none``: the raw value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Method = Literal["minmax", "zscore", "sigmoid", "rank", "rank_linear", "none"]
METHODS: tuple[str, ...] = get_args(Method)
TIED_MINMAX = 1.0  # minmax of a one-element or all-tied list
FLAT_ZSCORE = 0.0  # zscore when the standard deviation is 0 (or one value)


@dataclass(frozen=True)
class SignalStats:
    """What a normalisation needs to know about the whole list."""

    count: int
    minimum: float
    maximum: float
    mean: float
    std: float  # population standard deviation
    depth: int  # deepest rank present

    @classmethod
    def of(cls, values: Sequence[float], ranks: Sequence[int] | None = None) -> "SignalStats":
        if not values:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0)
        count = len(values)
        low, high = min(values), max(values)
        if low == high:  # all equal: the mean is that value and the spread 0 (fsum / n can miss both by an ulp)
            return cls(count, low, high, low, 0.0, max(ranks) if ranks else count)
        mean = math.fsum(values) / count
        variance = math.fsum((v - mean) ** 2 for v in values) / count
        depth = max(ranks) if ranks else count
        return cls(count, low, high, mean, math.sqrt(variance), depth)

    @property
    def tied(self) -> bool:
        """True when min-max has nothing to spread (one value, or all equal)."""
        return self.count > 0 and self.maximum == self.minimum

    @property
    def flat(self) -> bool:
        """True when z-scores are undefined (fewer than two values, or std 0)."""
        return self.count > 0 and (self.count < 2 or self.std == 0.0)


def sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def apply(method: str, value: float, rank: int, stats: SignalStats) -> float:
    """Normalise one value (with its rank) given the list's statistics."""
    if method == "none":
        return value
    if method == "minmax":
        if stats.tied:
            return TIED_MINMAX
        return (value - stats.minimum) / (stats.maximum - stats.minimum)
    if method == "zscore":
        if stats.flat:
            return FLAT_ZSCORE
        return (value - stats.mean) / stats.std
    if method == "sigmoid":
        return sigmoid(value)
    if method == "rank":
        return 1.0 / rank
    if method == "rank_linear":
        depth = max(stats.depth, rank)
        return (depth - rank + 1) / depth
    raise ValueError(f"unknown normalisation '{method}'; known: {', '.join(METHODS)}")


def normalize(method: str, values: Sequence[float], ranks: Sequence[int] | None = None) -> list[float]:
    """Normalise a whole list (``ranks`` default to positions 1..n); an empty list gives []."""
    if ranks is None:
        ranks = list(range(1, len(values) + 1))
    if len(ranks) != len(values):
        raise ValueError("values and ranks differ in length")
    stats = SignalStats.of(values, ranks)
    return [apply(method, v, r, stats) for v, r in zip(values, ranks)]


def formula(method: str, value: float, rank: int, stats: SignalStats) -> str:
    """The normalisation of ``value`` written out with the list's numbers, for an explanation."""
    if method == "none":
        return f"none: raw value {value:.6g}"
    if method == "minmax":
        if stats.tied:
            what = "one value" if stats.count == 1 else f"all {stats.count} values equal"
            return f"minmax: {what} in the list, so the guard value {TIED_MINMAX:g}"
        return (f"minmax: (x - min) / (max - min) = ({value:.6g} - {stats.minimum:.6g}) / "
                f"({stats.maximum:.6g} - {stats.minimum:.6g}) over {stats.count} values")
    if method == "zscore":
        if stats.flat:
            return f"zscore: standard deviation 0 over {stats.count} value(s), so the guard value {FLAT_ZSCORE:g}"
        return (f"zscore: (x - mean) / std = ({value:.6g} - {stats.mean:.6g}) / {stats.std:.6g} "
                f"over {stats.count} values")
    if method == "sigmoid":
        return f"sigmoid: 1 / (1 + exp(-x)) with x = {value:.6g}"
    if method == "rank":
        return f"rank: 1 / rank = 1 / {rank}"
    if method == "rank_linear":
        depth = max(stats.depth, rank)
        return f"rank_linear: (depth - rank + 1) / depth = ({depth} - {rank} + 1) / {depth}"
    raise ValueError(f"unknown normalisation '{method}'")
