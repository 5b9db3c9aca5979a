"""Condition semantics: every operator, missing values, case, relative dates, value_from, and
the vectorised (whole-corpus) evaluation agreeing with the per-document one."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from engine.index import Document
from engine.model import Query, UserContext
from rules.conditions import CompileError, Condition, QueryView, Subject, compile_condition, redact_query_evidence
from rules.corpus import DocumentTable

AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)


def query(text="metformin dosing", **user) -> Query:
    return Query(text=text, as_of=AS_OF, user=UserContext(**user),
                 entities=({"text": "Metformin", "label": "DRUG"}, {"text": "ORN", "label": "TICKER"}))


def doc(**metadata) -> Document:
    return Document("d1", metadata.pop("title", "Title"), metadata.pop("text", "Body text"), metadata)


def holds(spec: dict, document: Document | None = None, q: Query | None = None, scope="candidate") -> bool:
    node = compile_condition(Condition.model_validate(spec), scope)
    return node.evaluate(Subject(QueryView(q or query()), document))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"field": "doc.status", "op": "eq", "value": "Current"}, True),  # case-insensitive by default
        ({"field": "doc.status", "op": "eq", "value": "Current", "case_sensitive": True}, False),
        ({"field": "doc.status", "op": "ne", "value": "draft"}, True),
        ({"field": "doc.status", "op": "in", "value": ["draft", "current"]}, True),
        ({"field": "doc.status", "op": "not_in", "value": ["draft", "current"]}, False),
        ({"field": "doc.acl", "op": "contains", "value": "clinicians"}, True),  # list: element
        ({"field": "doc.text", "op": "contains", "value": "body"}, True),  # string: substring
        ({"field": "doc.text", "op": "not_contains", "value": "body"}, False),
        ({"field": "doc.acl", "op": "contains_any", "value": ["x", "public"]}, True),
        ({"field": "doc.acl", "op": "contains_all", "value": ["public", "clinicians"]}, True),
        ({"field": "doc.acl", "op": "contains_all", "value": ["public", "x"]}, False),
        ({"field": "doc.text", "op": "regex", "value": r"^bod"}, True),
        ({"field": "doc.status", "op": "exists"}, True),
        ({"field": "doc.nothing", "op": "exists", "value": False}, True),
        ({"field": "doc.year", "op": "ge", "value": 2020}, True),
        ({"field": "doc.year", "op": "lt", "value": 2020}, False),
        ({"field": "doc.date", "op": "before", "value": "2025-01-01"}, True),
        ({"field": "doc.date", "op": "after", "value": "as_of - 1y"}, False),  # 2024-05-01 is before 2024-06-01
        ({"field": "doc.date", "op": "after", "value": "as_of - 2y"}, True),
        ({"field": "doc.date", "op": "ge", "value": "as_of - 30d"}, False),
        ({"field": "doc.nested.owner", "op": "eq", "value": "ops"}, True),
        ({"field": "doc.id", "op": "eq", "value": "d1"}, True),
        ({"field": "doc.restricted", "op": "eq", "value": True}, True),
        ({"field": "doc.restricted", "op": "eq", "value": 1}, False),  # booleans are not numbers
    ],
)
def test_operators_on_documents(spec, expected):
    document = doc(status="current", acl=["public", "clinicians"], year=2021, date="2024-05-01",
                   nested={"owner": "ops"}, restricted=True)
    assert holds(spec, document) is expected


@pytest.mark.parametrize("op", ["eq", "in", "contains", "contains_any", "regex", "lt", "before"])
def test_missing_field_makes_positive_operators_false(op):
    value = {"in": ["a"], "contains_any": ["a"], "lt": 3, "before": "2025-01-01"}.get(op, "a")
    assert holds({"field": "doc.absent", "op": op, "value": value}, doc()) is False


@pytest.mark.parametrize("op", ["ne", "not_in", "not_contains"])
def test_missing_field_makes_negated_operators_true(op):
    value = ["a"] if op == "not_in" else "a"
    assert holds({"field": "doc.absent", "op": op, "value": value}, doc()) is True


def test_query_side_fields():
    q = query("What is the METFORMIN dose?", roles=("clinician",), groups=("g1",), jurisdictions=("US",),
              attributes={"desk": "rates"}, user_id="u7")
    assert holds({"field": "query.text", "op": "contains", "value": "metformin"}, q=q, scope="query")
    assert holds({"field": "query.entities", "op": "contains", "value": "metformin"}, q=q, scope="query")
    assert holds({"field": "query.entities.DRUG", "op": "contains", "value": "metformin"}, q=q, scope="query")
    assert not holds({"field": "query.entities.TICKER", "op": "contains", "value": "metformin"}, q=q, scope="query")
    assert holds({"field": "user.attributes.desk", "op": "eq", "value": "rates"}, q=q, scope="query")
    assert holds({"field": "user.id", "op": "eq", "value": "u7"}, q=q, scope="query")
    assert holds({"field": "as_of", "op": "after", "value": "2025-05-31"}, q=q, scope="query")
    assert holds({"field": "query.rewritten", "op": "exists", "value": False}, q=q, scope="query")


def test_value_from_reads_the_query():
    q = query(groups=("trial", "public"))
    spec = {"field": "doc.acl", "op": "contains_any", "value_from": "user.groups", "case_sensitive": True}
    assert holds(spec, doc(acl=["trial"]), q)
    assert not holds(spec, doc(acl=["Trial"]), q)
    assert not holds(spec, doc(acl=["other"]), q)


def test_evidence_names_what_matched():
    node = compile_condition(Condition.model_validate(
        {"any": [{"field": "query.text", "op": "contains_any", "value": ["insulin", "metformin"]},
                 {"field": "user.roles", "op": "contains", "value": "x"}]}), "query")
    evidence: list = []
    assert node.evaluate(Subject(QueryView(query())), evidence)
    assert evidence == [{"field": "query.text", "op": "contains_any", "matched": ["metformin"]}]


@pytest.mark.parametrize(
    "spec, scope, message",
    [
        ({"field": "doc.status", "op": "eq", "value": "x"}, "query", "cannot be used in a rule's `when`"),
        ({"field": "score.bm25", "op": "gt", "value": 1}, "document", "cannot be used in a prefilter rule"),
        ({"field": "query.txt", "op": "eq", "value": "x"}, "query", "unknown query field 'query.txt'"),
        ({"field": "user.group", "op": "eq", "value": "x"}, "query", "unknown user field"),
        ({"expr": "doc.x == 1"}, "query", "unknown name 'doc'"),
    ],
)
def test_scope_errors(spec, scope, message):
    with pytest.raises(CompileError, match=message):
        compile_condition(Condition.model_validate(spec), scope)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"field": "doc.a", "op": "in", "value": "x"}, "needs a non-empty list"),
        ({"field": "doc.a", "op": "regex", "value": "("}, "invalid regular expression"),
        ({"field": "doc.a", "op": "before", "value": "soon"}, "needs a date"),
        ({"field": "doc.a", "op": "eq"}, "exactly one of 'value' or 'value_from'"),
        ({"field": "doc.a", "op": "eq", "value": "x", "value_from": "user.groups"}, "exactly one of"),
        ({"field": "doc.a", "op": "eq", "value": "x", "all": [{"expr": "1"}]}, "exactly one of field/op/value"),
        ({"field": "a.b", "op": "eq", "value": "x"}, "not a field path"),
        ({"field": "doc.a", "op": "equals", "value": "x"}, "Input should be"),
        ({"field": "doc.a", "op": "eq", "value": "x", "value_from": None, "colour": 1}, "Extra inputs"),
    ],
)
def test_malformed_conditions(spec, message):
    with pytest.raises(ValidationError, match=message):
        Condition.model_validate(spec)


# ---------------------------------------------------------------- vectorised == per-document

VALUES = st.one_of(st.sampled_from(["a", "b", "A", "2024-01-05", "2026-03-01", ""]), st.integers(-3, 3),
                   st.lists(st.sampled_from(["a", "b", "c"]), max_size=3), st.none())
DOCS = st.lists(st.dictionaries(st.sampled_from(["f", "g"]), VALUES, max_size=2), min_size=1, max_size=12)
LEAVES = st.one_of(
    st.builds(lambda op, v: {"field": "doc.f", "op": op, "value": v},
              st.sampled_from(["eq", "ne", "contains", "not_contains"]), st.sampled_from(["a", "b", "A"])),
    st.builds(lambda op, v: {"field": "doc.f", "op": op, "value": v},
              st.sampled_from(["in", "not_in", "contains_any", "contains_all"]), st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2)),
    st.builds(lambda op, v: {"field": "doc.g", "op": op, "value": v},
              st.sampled_from(["lt", "ge"]), st.integers(-2, 2)),
    st.builds(lambda op, v: {"field": "doc.f", "op": op, "value": v},
              st.sampled_from(["before", "after", "ge"]), st.sampled_from(["as_of", "as_of - 400d", "2025-01-01"])),
    st.just({"field": "doc.f", "op": "contains_any", "value_from": "user.groups"}),
    st.just({"field": "doc.g", "op": "exists"}),
    st.just({"field": "user.roles", "op": "contains", "value": "r"}),
)
CONDITIONS = st.recursive(LEAVES, lambda children: st.one_of(
    st.builds(lambda c: {"all": c}, st.lists(children, min_size=1, max_size=3)),
    st.builds(lambda c: {"any": c}, st.lists(children, min_size=1, max_size=3)),
    st.builds(lambda c: {"not": c}, children),
), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(DOCS, CONDITIONS, st.lists(st.sampled_from(["a", "b", "c"]), max_size=2), st.booleans())
def test_vector_evaluation_matches_per_document_evaluation(metadata, spec, groups, has_role):
    documents = [Document(f"d{i}", "t", "x", m) for i, m in enumerate(metadata)]
    table = DocumentTable(documents)
    q = query(groups=tuple(groups), roles=("r",) if has_role else ())
    node = compile_condition(Condition.model_validate(spec), "document")
    view = QueryView(q)
    vector = node.vector(table, view)
    expected = np.array([node.evaluate(Subject(view, d)) for d in documents], dtype=bool)
    assert vector.tolist() == expected.tolist()


def test_a_condition_is_described_as_the_rule_file_writes_it():
    """Traces, `sieve search` and the server show a `when` by its description: YAML's quoting, not Python's repr
    (which doubled every backslash of a pattern and said `exists True`)."""
    def described(spec: dict, scope: str = "query") -> str:
        return compile_condition(Condition.model_validate(spec), scope).describe()  # type: ignore[arg-type]

    assert described({"field": "query.text", "op": "regex", "value": r"^\s*[A-Z]{1,5}\s*$"}) == \
        r"query.text regex '^\s*[A-Z]{1,5}\s*$'"
    assert described({"field": "query.entities", "op": "exists"}) == "query.entities exists"
    assert described({"field": "query.rewritten", "op": "exists", "value": False}) == "query.rewritten does not exist"
    assert described({"field": "user.roles", "op": "contains", "value": "O'Neil"}) == "user.roles contains 'O''Neil'"
    # (a user attribute is text: compared with true it is refused, so a document's field shows true)
    assert described({"field": "doc.withdrawn", "op": "eq", "value": True}, "document") == "doc.withdrawn eq true"
    assert described({"expr": "query.text | length > 3"}) == "expr 'query.text | length > 3'"
    assert described({"not": {"field": "user.groups", "op": "in", "value": ["a", "b"]}}) == \
        "not user.groups in ['a', 'b']"


def test_what_a_test_matched_of_an_operand_taken_from_the_query_is_redacted_without_query_text():
    """`doc.title contains` the query's text, `user.attributes.watchlist contains` its entities: what matched is the
    query's (audit); withheld as a test on a query.* field is, under include_query_text: false."""
    def evidence_of(spec: dict, document: Document | None, q: Query) -> list:
        found: list = []
        assert compile_condition(Condition.model_validate(spec), "candidate").evaluate(
            Subject(QueryView(q), document), found)
        return found

    text = query(text="lactic acidosis")
    in_title = evidence_of({"field": "doc.title", "op": "contains", "value_from": "query.effective"},
                           doc(title="Lactic acidosis and metformin"), text)
    assert in_title[0]["matched"] == "lactic acidosis"  # with query text allowed: as before
    assert redact_query_evidence(in_title, False) == [
        {"field": "doc.title", "op": "contains", "matched": "<redacted>", "value_from": "query.effective"}]
    watched = evidence_of({"field": "user.attributes.watchlist", "op": "contains",
                           "value_from": "query.entities.DRUG"}, None,
                          query(attributes={"watchlist": "metformin, insulin"}))
    assert watched[0]["matched"] == "metformin"
    assert redact_query_evidence(watched, False)[0]["matched"] == "<redacted>"
    plain = evidence_of({"field": "doc.title", "op": "contains", "value": "acidosis"}, doc(title="Lactic acidosis"),
                        text)
    assert redact_query_evidence(plain, False) == plain  # the rule's own value is not query text
