"""``boost.recency``: a decay factor from a document's date relative to the query's ``as_of``.

Decay functions follow Elasticsearch's ``function_score`` decay semantics. With ``origin`` = the
query's ``as_of`` (recorded in the trace, so a replay sees the same time), ``age`` = days between
the document's date and ``as_of``, and ``x = max(0, age - offset)``::

    exp:     factor = exp(ln(decay) / scale * x)           (decay=0.5: scale is the half-life)
    linear:  factor = max(0, (s - x) / s),  s = scale / (1 - decay)
    gauss:   factor = exp(-x^2 / (2 sigma^2)),  sigma^2 = -scale^2 / (2 ln(decay))

so every function gives ``decay`` at ``age = offset + scale`` and 1 within ``offset``. Documents
are never touched: the factor goes into a new ledger entry (signal ``recency``). With
``combine: signal`` (default) that entry's value *is* the factor and the input order is kept —
``fuse.weighted`` combines it with the other signals; with ``combine: multiply`` the value is the
current score times the factor and the list is re-ordered (scores must then be non-negative, e.g.
after a min-max ``fuse.weighted``; a negative one is an error, since scaling a negative score
towards 0 would *raise* an old document).

Explicit policies: ``missing`` (no date, or an unparseable one): ``neutral`` (factor 1, as
Elasticsearch does), ``oldest`` (the lowest factor among this list's dated candidates), ``fixed``
(``missing_factor``) or ``drop``; ``future`` (date after ``as_of``): ``clamp`` (age 0, factor 1),
``symmetric`` (Elasticsearch's |distance|) or ``drop`` (e.g. embargoed until then).
Dates are read once per index at warm-up, by the rules' own parser (:func:`rules.expressions.parse_date`,
so an access rule and this stage never disagree on what a date is): ISO 8601 dates or datetimes (a date is
midnight UTC; a naive datetime is UTC; ``Z`` or ``z`` is UTC), and, here only, numbers as Unix seconds
(a rule compares dates written as text). A ``field`` no document of the index has, where its documents have
others, is an error at warm-up (a misspelt field made every document undated and the signal constant); a
corpus with no metadata fields at all, many undated documents, values that are not dates, and undated
documents ranked as newest (``missing: neutral`` with ``combine: signal``) are warm-up warnings.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from difflib import get_close_matches
from typing import Any, Literal

from pydantic import Field, model_validator

from engine.cache import LRUCache
from engine.errors import SieveIndexError, StageError
from engine.model import Candidate, Decision, Drop, Query, ScoreEntry
from engine.registry import register_stage
from engine.stage import Explanation, Port, RecentNotes, Resources, Stage, StageContext, StageParams, StageResult
from rules.expressions import parse_date as parse_rule_date

SECONDS_PER_DAY = 86_400.0
DecayFunction = Literal["exp", "linear", "gauss"]


def decay_factor(function: str, age_days: float, scale_days: float, offset_days: float, decay: float) -> float:
    """Elasticsearch decay of a distance ``age_days`` (>= 0) from the origin; see the module docstring."""
    x = max(0.0, age_days - offset_days)
    if function == "exp":
        return math.exp(math.log(decay) / scale_days * x)
    if function == "linear":
        s = scale_days / (1.0 - decay)
        return max(0.0, (s - x) / s)
    if function == "gauss":
        sigma_squared = -(scale_days ** 2) / (2.0 * math.log(decay))
        return math.exp(-(x ** 2) / (2.0 * sigma_squared))
    raise ValueError(f"unknown decay function '{function}'; known: exp, linear, gauss")


def decay_formula(function: str, scale_days: float, offset_days: float, decay: float) -> str:
    x = f"max(0, age - {offset_days:g})"
    if function == "exp":
        return f"exp(ln({decay:g}) / {scale_days:g} * {x})"
    if function == "linear":
        return f"max(0, (s - {x}) / s), s = {scale_days:g} / (1 - {decay:g})"
    return f"exp(-{x}^2 / (2 sigma^2)), sigma^2 = -{scale_days:g}^2 / (2 ln({decay:g}))"


# Unix seconds of 0001-01-01 and of the end of 9999-12-31: the dates Python can hold (a number beyond them, e.g. a
# millisecond timestamp read as seconds, is no date: it failed every query that recalled the document)
EARLIEST_SECONDS = -62135596800.0
LATEST_SECONDS = 253402300799.0


def parse_date(value: Any) -> float | None:
    """Unix seconds (UTC) of a metadata date value, or None if it is not one: what the rules read as a date
    (:func:`rules.expressions.parse_date`: ISO 8601 date or date-time, ``Z``/``z`` or an offset, naive = UTC),
    or a number of Unix seconds within years 1-9999 (which rules do not read as a date)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        parsed = parse_rule_date(value)
        if parsed is None:
            return None
        seconds = parsed.timestamp()  # 9999-12-31T23:59:59.99999Z rounds up to 253402300800.0: out of range too
    return seconds if math.isfinite(seconds) and EARLIEST_SECONDS <= seconds <= LATEST_SECONDS else None


UNDATED_WARNING_SHARE = 0.5  # a warm-up warning when at least this share of the index's documents is undated


def _rules_table(resources: Resources, index: Any, field_name: str) -> Any:
    """The rule stages' table of this index, when one warmed up before this stage and can read ``field_name``
    (None otherwise). ``Resources`` has no look-up that does not create, hence its private dict."""
    from stages.rules import TABLE_KEY

    table = resources.peek(TABLE_KEY.format(index=index.path))
    return table if table is not None and DateColumn.table_path(field_name) is not None else None


class DateColumn:
    """One metadata field of every index row as Unix seconds (NaN: missing), plus the raw unparseable values
    and how many documents carry each metadata field (for a did-you-mean when none carries this one)."""

    def __init__(self, index: Any, field_name: str, table: Any = None):
        """Read from ``table`` (the rule stages' :class:`rules.corpus.DocumentTable` of this index) when given: its
        column of the field, each distinct value parsed once; else in one pass over the index's documents."""
        import numpy as np

        self.field = field_name
        self.seconds = np.full(index.doc_count, np.nan, dtype=np.float64)
        self.invalid: dict[int, str] = {}  # row -> the raw value that is not a date
        self.invalid_ids: dict[int, str] = {}  # row -> doc id, for the first few invalid values (warnings)
        self.fields: Counter[str] = Counter()  # metadata field -> documents with a (non-null) value
        if table is not None:
            self._from_table(table)
        else:
            self._from_documents(index)
        self.size = len(self.seconds)
        self.dated = int((~np.isnan(self.seconds)).sum())
        self._stamps: LRUCache[int, str] = LRUCache(100_000)

    @staticmethod
    def table_path(field_name: str) -> str | None:
        """The rules' ``doc.<...>`` path that reads the top-level metadata key ``field_name``; None when there is
        none (a key with a dot is read nested by the rules, ``id``/``title``/``text`` are the document's own)."""
        if "." in field_name or field_name in ("id", "title", "text"):
            return None
        return f"doc.{field_name}"

    def _from_table(self, table: Any) -> None:
        import numpy as np

        from rules.conditions import MISSING

        codes, uniques = table.factorized(self.table_path(self.field))
        parsed = [None if v is MISSING or v is None else parse_date(v) for v in uniques]
        seconds = np.fromiter((math.nan if p is None else p for p in parsed), dtype=np.float64, count=len(parsed))
        self.seconds = seconds[codes]
        bad = np.fromiter((p is None and v is not MISSING and v is not None for p, v in zip(parsed, uniques)),
                          dtype=bool, count=len(parsed))
        shown = [str(v)[:64] for v in uniques]
        for row in np.flatnonzero(bad[codes]).tolist():
            self.invalid[row] = shown[int(codes[row])]
            if len(self.invalid_ids) < 3:
                self.invalid_ids[row] = table.doc_ids[row]
        self.fields = Counter(table.metadata_counts)

    def _from_documents(self, index: Any) -> None:
        for row, doc in enumerate(index.documents.iter_documents()):
            self.fields.update(k for k, v in doc.metadata.items() if v is not None)
            raw = doc.metadata.get(self.field)
            if raw is None:
                continue
            parsed = parse_date(raw)
            if parsed is None:
                self.invalid[row] = str(raw)[:64]
                if len(self.invalid_ids) < 3:
                    self.invalid_ids[row] = doc.doc_id
            else:
                self.seconds[row] = parsed

    def stamps(self, rows: list[int]) -> dict[int, str]:
        """ISO 8601 (UTC) of the dated ones among ``rows``: formatted once per row, not once per query."""
        found = self._stamps.get_many(rows)
        for row in rows:
            if row not in found and not math.isnan(self.seconds[row]):
                found[row] = datetime.fromtimestamp(float(self.seconds[row]), tz=timezone.utc).isoformat()
                self._stamps.put(row, found[row])
        return found


class RecencyParams(StageParams):
    field: str = Field("date", min_length=1, description="metadata field holding the document's date")
    function: DecayFunction = Field("exp", description="decay shape (Elasticsearch semantics): exp, linear, gauss")
    # bounds: from about a minute to 10,000 years (beyond them the formulas give NaN or overflow: 1e-320 days gave a
    # NaN factor, a gauss scale of 1e-170 divided by zero)
    half_life_days: float | None = Field(
        None, ge=0.001, le=3_650_000, allow_inf_nan=False,
        description="shorthand for function exp, scale = half-life, decay 0.5"
    )
    scale_days: float | None = Field(None, ge=0.001, le=3_650_000, allow_inf_nan=False,
                                     description="age beyond offset at which factor = decay")
    offset_days: float = Field(0.0, ge=0, le=3_650_000, allow_inf_nan=False, description="ages up to this are not decayed")
    decay: float = Field(0.5, ge=1e-9, le=0.999999, description="the factor at age offset + scale")
    missing: Literal["neutral", "oldest", "fixed", "drop"] = Field(
        "neutral", description="no (valid) date: neutral = factor 1; oldest = the list's lowest factor; "
        "fixed = missing_factor; drop = remove the document"
    )
    missing_factor: float | None = Field(None, ge=0, le=1, description="the factor for `missing: fixed`")
    future: Literal["clamp", "symmetric", "drop"] = Field(
        "clamp", description="date after as_of: clamp = age 0; symmetric = |distance| (Elasticsearch); drop = remove"
    )
    combine: Literal["signal", "multiply"] = Field(
        "signal", description="signal: the ledger value is the factor, input order kept (feed fuse.weighted); "
        "multiply: current score x factor, re-ordered (scores must be >= 0)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "RecencyParams":
        if self.half_life_days is not None:
            if self.scale_days is not None:
                raise ValueError("give half_life_days or scale_days, not both")
            if self.function != "exp" or self.decay != 0.5:
                raise ValueError("half_life_days means function exp with decay 0.5; use scale_days with other settings")
        elif self.scale_days is None:
            raise ValueError("give half_life_days (exponential half-life) or scale_days (with function and decay)")
        if self.missing == "fixed" and self.missing_factor is None:
            raise ValueError("missing: fixed needs missing_factor (between 0 and 1)")
        if self.missing != "fixed" and self.missing_factor is not None:
            raise ValueError(f"missing_factor applies to missing: fixed only (missing is '{self.missing}')")
        return self

    @property
    def scale(self) -> float:
        return self.half_life_days if self.half_life_days is not None else float(self.scale_days)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RecencyNote:
    """What the stage worked out for one document: its date, age and factor, and why."""

    date: str | None
    age_days: float | None
    factor: float
    how: str  # "decayed", "future_clamped", "future_symmetric", "missing", "invalid"


@register_stage
class RecencyBoost(Stage):
    """Decay by document age relative to the query's as_of: exp (half-life), linear or gauss."""

    type_name = "boost.recency"
    version = 1
    Params = RecencyParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES, Port.QUERY, Port.MASK})
    signal = "recency"
    summary = "recency decay by a document date relative to the query's as_of (Elasticsearch decay functions)"
    params: RecencyParams

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._dates: DateColumn | None = None
        self._warnings: list[str] = []
        self._notes = RecentNotes()  # query -> (doc_id -> note, doc_id -> score)

    def warm_up(self, resources: Resources) -> None:
        index = resources.require_index(self.id)
        dates: DateColumn = resources.shared(f"dates:{index.path}:{self.params.field}",
                                             lambda: DateColumn(index, self.params.field, _rules_table(resources, index,
                                                                                                      self.params.field)))
        field = self.params.field
        if dates.fields and not dates.fields.get(field):  # a misspelt field: every document undated, signal constant
            known = sorted(dates.fields)
            hint = get_close_matches(field, known, n=1)
            raise SieveIndexError(
                f"stage '{self.id}' ({self.qualified_name()}): params.field '{field}': no document of the index at "
                f"{index.path} has this field, so every document would be undated and the recency signal constant"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; the fields its documents have: {', '.join(known)}"
            )
        self._dates = dates
        self._warnings = self._findings(dates)

    def _findings(self, dates: DateColumn) -> list[str]:
        """What warm-up found about the index's dates that changes what the stage does, without stopping it."""
        p = self.params
        undated = dates.size - dates.dated
        warnings = []
        if dates.size and not dates.fields:  # a corpus of id, title and text only (a BEIR set): nothing misspelt
            return [f"the index's documents have no metadata fields (only id, title, text), so none has '{p.field}': "
                    f"every document is undated (missing policy '{p.missing}') and the recency signal is constant"]
        if dates.invalid:
            examples = ", ".join(f"'{doc_id}': {dates.invalid[row]!r}" for row, doc_id in dates.invalid_ids.items())
            warnings.append(f"{len(dates.invalid)} of {dates.size} documents have a '{p.field}' that is not a date "
                            f"(e.g. {examples}); they are undated (missing policy '{p.missing}')")
        if undated and undated >= UNDATED_WARNING_SHARE * dates.size:
            warnings.append(f"{undated} of {dates.size} documents have no valid '{p.field}' "
                            f"({undated - len(dates.invalid)} without the field); missing policy '{p.missing}'")
        if undated and p.missing == "neutral" and p.combine == "signal":
            warnings.append(f"missing: neutral with combine: signal gives the {undated} undated documents factor 1, "
                            "the best recency there is: they rank as the newest; use missing: oldest (or fixed "
                            "with missing_factor) if that is not wanted")
        return warnings

    def warm_up_warnings(self) -> list[str]:
        return list(self._warnings)

    def factor(self, age_days: float) -> float:
        p = self.params
        return decay_factor(p.function, age_days, p.scale, p.offset_days, p.decay)

    def run(self, ctx: StageContext) -> StageResult:
        if self._dates is None:
            raise StageError(self.id, self.qualified_name(), "the stage was not warmed up")
        p = self.params
        (incoming,) = ctx.inputs
        origin = ctx.query.as_of.timestamp()
        notes: dict[str, RecencyNote] = {}
        drops: list[Drop] = []
        kept: list[Candidate] = []
        undated: list[Candidate] = []
        future_ids: list[str] = []
        stamps = self._dates.stamps([c.row for c in incoming])
        for candidate in incoming:
            seconds = float(self._dates.seconds[candidate.row])
            if math.isnan(seconds):
                invalid = self._dates.invalid.get(candidate.row)
                if p.missing == "drop":
                    reason = f"'{p.field}' is not a date ({invalid!r})" if invalid is not None else f"no '{p.field}'"
                    drops.append(Drop(candidate.doc_id, "no_date", f"{reason}; missing policy 'drop'"))
                else:
                    undated.append(candidate)
                    notes[candidate.doc_id] = RecencyNote(invalid, None, math.nan, "invalid" if invalid is not None else "missing")
                continue
            age = (origin - seconds) / SECONDS_PER_DAY
            stamp = stamps[candidate.row]
            how = "decayed"
            if age < 0:
                future_ids.append(candidate.doc_id)
                if p.future == "drop":
                    drops.append(Drop(candidate.doc_id, "future_date", f"dated {stamp}, after as_of "
                                      f"{ctx.query.as_of.isoformat()}; future policy 'drop'"))
                    continue
                how = "future_clamped" if p.future == "clamp" else "future_symmetric"
            distance = max(age, 0.0) if p.future == "clamp" else abs(age)
            notes[candidate.doc_id] = RecencyNote(stamp, age, self.factor(distance), how)
            kept.append(candidate)
        decisions: list[Decision] = []
        dated_factors = [n.factor for n in notes.values() if n.how not in ("missing", "invalid")]
        if undated:
            if p.missing == "neutral":
                missing_factor = 1.0
            elif p.missing == "fixed":
                missing_factor = float(p.missing_factor)  # type: ignore[arg-type]
            else:  # oldest
                missing_factor = min(dated_factors) if dated_factors else 0.0
            for candidate in undated:
                note = notes[candidate.doc_id]
                notes[candidate.doc_id] = RecencyNote(note.date, None, missing_factor, note.how)
            invalid_ids = sorted(c.doc_id for c in undated if notes[c.doc_id].how == "invalid")
            decisions.append(Decision(
                "undated", f"{len(undated)} candidates have no valid '{p.field}'; missing policy '{p.missing}' "
                f"gives them factor {missing_factor:.6g}",
                {"doc_ids": sorted(c.doc_id for c in undated), "invalid": invalid_ids},
            ))
        if future_ids:
            decisions.append(Decision("future_dates", f"{len(future_ids)} candidates are dated after as_of; "
                                      f"future policy '{p.future}'", {"doc_ids": sorted(future_ids)}))
        survivors = [c for c in incoming if c.doc_id in notes]
        if p.combine == "multiply":
            negative = [c.doc_id for c in survivors if c.score < 0]
            if negative:
                raise StageError(self.id, self.qualified_name(),
                                 f"combine: multiply needs non-negative scores, but {len(negative)} candidates score "
                                 f"below 0 (e.g. '{negative[0]}': {next(c.score for c in survivors if c.score < 0):.6g}); "
                                 "normalise first (fuse.weighted with minmax) or use combine: signal")
            values = {c.doc_id: c.score * notes[c.doc_id].factor for c in survivors}
            order = sorted(survivors, key=lambda c: (-values[c.doc_id], c.doc_id))
            output = [c.with_score(ScoreEntry(self.id, "recency", values[c.doc_id], rank))
                      for rank, c in enumerate(order, start=1)]
        else:
            factors = {c.doc_id: notes[c.doc_id].factor for c in survivors}
            ranks = {d: r for r, d in enumerate(sorted(factors, key=lambda d: (-factors[d], d)), start=1)}
            output = [c.with_score(ScoreEntry(self.id, "recency", factors[c.doc_id], ranks[c.doc_id])) for c in survivors]
        details = {
            "as_of": ctx.query.as_of.isoformat(),
            "field": p.field,
            "function": p.function,
            "scale_days": p.scale,
            "offset_days": p.offset_days,
            "decay": p.decay,
            "combine": p.combine,
            "documents": {
                doc_id: {"date": n.date, "age_days": None if n.age_days is None else round(n.age_days, 4),
                         "factor": n.factor, "how": n.how}
                for doc_id, n in notes.items()
            },
        }
        self._notes.put_for(ctx.query, (notes, {c.doc_id: c.score for c in survivors}))
        return StageResult(candidates=output, drops=drops, decisions=decisions, details=details)

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        p = self.params
        formula = decay_formula(p.function, p.scale, p.offset_days, p.decay)
        description = (f"recency ({p.function}) of '{p.field}' relative to as_of {query.as_of.isoformat()}: "
                       f"factor = {formula}" + ("; multiplied into the current score" if p.combine == "multiply" else "")
                       + f"; rank {rank} in stage '{self.id}'")
        found = self._notes.get_for(query)
        note = found[0].get(candidate.doc_id) if found is not None else None
        if note is None:
            return Explanation(value, description)
        if note.age_days is None:
            what = f"'{p.field}' is not a date ({note.date!r})" if note.how == "invalid" else f"no '{p.field}'"
            inner = Explanation(note.factor, f"{what}: missing policy '{p.missing}'")
        else:
            future = ""
            if note.how == "future_clamped":
                future = " (after as_of: age clamped to 0)"
            elif note.how == "future_symmetric":
                future = " (after as_of: distance |age| used)"
            inner = Explanation(note.factor, f"dated {note.date}, age {note.age_days:.4g} days{future}: factor {note.factor:.6g}")
        details = [inner]
        if p.combine == "multiply":
            details.append(Explanation(found[2][candidate.doc_id], "current score before this stage"))  # type: ignore[index]
        return Explanation(value, description, tuple(details))
