"""Property: whatever the documents, ACLs, users and rules, no returned document violates the
user's access — pins included. Real BM25 index, real pipeline, access decided by an independent
oracle written here in plain Python."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.index import build_index
from engine.model import UserContext
from engine.pipeline import Pipeline

WORDS = ["metformin", "insulin", "trial", "risk", "dose", "kidney", "notice", "bond", "rate", "equity"]
GROUPS = ["g1", "g2", "g3", "public"]
PLACES = ["US", "UK", "EU", "global"]
AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)

documents = st.lists(
    st.fixed_dictionaries(
        {"text": st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)},
        optional={
            "acl": st.one_of(st.lists(st.sampled_from(GROUPS), max_size=3), st.sampled_from(GROUPS), st.none()),
            "jurisdiction": st.one_of(st.sampled_from(PLACES), st.none()),
            "classification": st.sampled_from(["secret", "internal"]),
        },
    ),
    min_size=1,
    max_size=25,
)
access_settings = st.fixed_dictionaries({
    "default_deny": st.booleans(),
    "public": st.lists(st.sampled_from(GROUPS), max_size=2, unique=True),
    "acl_missing": st.sampled_from([None, "allow", "deny"]),
    "jurisdiction": st.booleans(),
    "jurisdiction_missing": st.sampled_from(["allow", "deny"]),
    "global": st.lists(st.sampled_from(PLACES), max_size=2, unique=True),
    "secret_rule": st.booleans(),
})
users = st.builds(
    lambda groups, places, cleared: UserContext(groups=tuple(groups), jurisdictions=tuple(places),
                                                roles=("cleared",) if cleared else ()),
    st.lists(st.sampled_from(GROUPS), max_size=3, unique=True),
    st.lists(st.sampled_from(PLACES), max_size=2, unique=True),
    st.booleans(),
)
override_rules = st.lists(
    st.one_of(
        st.builds(lambda docs, pos, inject, prio: {"action": "pin", "docs": docs, "position": pos, "inject": inject,
                                                   "priority": prio},
                  st.lists(st.integers(0, 30).map(lambda i: f"d{i}"), min_size=1, max_size=3, unique=True),
                  st.integers(1, 6), st.booleans(), st.integers(0, 3)),
        st.builds(lambda action, docs: {"action": action, "docs": docs},
                  st.sampled_from(["exclude", "bury"]),
                  st.lists(st.integers(0, 30).map(lambda i: f"d{i}"), min_size=1, max_size=3, unique=True)),
        st.builds(lambda factor: {"action": "boost", "factor": factor, "match": {"field": "doc.classification", "op": "eq", "value": "secret"}},
                  st.floats(1.0, 50.0, exclude_min=True)),  # factor 1 changes nothing: refused
    ),
    max_size=5,
)


def visible(doc: dict, user: UserContext, access: dict) -> bool:
    """The oracle: what the access rules mean, written independently of the engine."""
    acl = doc.get("acl")
    if acl is None:
        missing = access["acl_missing"] or ("deny" if access["default_deny"] else "allow")
        if missing == "deny":
            return False
    else:
        values = set(acl) if isinstance(acl, list) else {acl}
        if not (values & set(user.groups) or values & set(access["public"])):
            return False
    if access["jurisdiction"]:
        place = doc.get("jurisdiction")
        if place is None:
            if access["jurisdiction_missing"] == "deny":
                return False
        elif place not in user.jurisdictions and place not in access["global"]:
            return False
    if access["secret_rule"] and doc.get("classification") == "secret" and "cleared" not in user.roles:
        return False
    return True


def write_pack(root: Path, docs: list[dict], access: dict, overrides: list[dict], top_k: int) -> Path:
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for i, doc in enumerate(docs):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", **doc}) + "\n")
    rules = [{"id": "acl", "action": "acl", "public": access["public"]}]
    if access["acl_missing"] is not None:
        rules[0]["missing"] = access["acl_missing"]
    if access["jurisdiction"]:
        rules.append({"id": "places", "action": "jurisdiction", "global": access["global"],
                      "missing": access["jurisdiction_missing"]})
    if access["secret_rule"]:
        rules.append({"id": "secret", "action": "exclude",
                      "when": {"not": {"field": "user.roles", "op": "contains", "value": "cleared"}},
                      "match": {"field": "doc.classification", "op": "eq", "value": "secret"}})
    (root / "access.yaml").write_text(json.dumps(
        {"version": 1, "kind": "prefilter", "strictness": "lenient", "default_deny": access["default_deny"], "rules": rules}))
    (root / "overrides.yaml").write_text(json.dumps(
        {"version": 1, "kind": "override", "strictness": "lenient",
         "rules": [{"id": f"r{i}", **rule} for i, rule in enumerate(overrides)]}))
    config = root / "pipeline.yaml"
    config.write_text(json.dumps({
        "version": 1, "index": "index", "trace": {"log": None},
        "stages": [
            {"id": "access", "type": "rules.prefilter", "params": {"rules": "access.yaml"}},
            {"id": "bm25", "type": "recall.bm25", "inputs": ["access"], "params": {"top_k": top_k}},
            {"id": "rules", "type": "rules.override", "inputs": ["bm25"], "params": {"rules": "overrides.yaml"}},
            {"id": "final", "type": "select.top_k", "inputs": ["rules"], "params": {"k": 8}},
        ],
    }))
    return config


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents, access_settings, override_rules, st.lists(users, min_size=1, max_size=4),
       st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join), st.integers(1, 10))
def test_no_returned_document_violates_access(docs, access, overrides, people, text, top_k):
    with tempfile.TemporaryDirectory(prefix="sieve-prop-") as scratch:
        root = Path(scratch)
        config = write_pack(root, docs, access, overrides, top_k)
        build_index(root / "corpus.jsonl", root / "index", {"bm25": {}})
        pipeline = Pipeline(compile_file(config))
        unknown = [f for f in ("acl", "jurisdiction") if (f == "acl" or access["jurisdiction"])
                   and all(doc.get(f) is None for doc in docs)]
        # the exclude rule on doc.classification too: any access rule on a field no document has is refused
        secret_unknown = access["secret_rule"] and all(doc.get("classification") is None for doc in docs)
        if unknown or secret_unknown:  # refused at warm-up, whatever the strictness (fail closed)
            with pytest.raises(ConfigError) as caught:
                pipeline.warm_up()
            assert all(f"reads the field '{f}', which no document of the index has" in str(caught.value) for f in unknown)
            if secret_unknown:
                assert "reads 'doc.classification', which no document of the index has" in str(caught.value)
            return
        for user in people:
            result = pipeline.run(pipeline.make_query(text, user=user, as_of=AS_OF))
            returned = [c.doc_id for c in result.results]
            assert len(returned) == len(set(returned))
            for doc_id in returned:
                doc = docs[int(doc_id[1:])]
                assert visible(doc, user, access), (doc_id, doc, user, access, overrides)
            allowed = {f"d{i}" for i, doc in enumerate(docs) if visible(doc, user, access)}
            mask = next(s for s in result.trace["stages"] if s["id"] == "access")["mask"]
            assert mask["allowed"] == len(allowed)  # the engine's mask is exactly the oracle's
            for decision in next(s for s in result.trace["stages"] if s["id"] == "rules").get("decisions", []):
                if decision["code"] == "pin_forbidden":
                    assert decision["data"]["doc_id"] not in allowed
