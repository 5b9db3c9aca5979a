"""Untrusted-artifacts audit: files that come from someone else (a rule file being deployed, an index built by another
team, a trace a customer sends for replay). Each test says what happened before ("before:")."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import engine.yamlsource
from rules.ruleset import load_rule_file
from stages.entities import load_gazetteer
from stages.rewrite.glossary import load_glossary

ROOT = Path(__file__).resolve().parents[2]

# Audit F4: a rule file (gazetteer, glossary) was parsed from one read and hashed from a second: a file renamed into
# its place between the two (a deploy, an editor's save) left the trace naming the approved file's sha256 while the
# other file's rules were in force, and `rule_file_changed` silent. The race is made certain here: the next version
# is renamed into place just after the file was read, before it is parsed.
LOADERS = {
    "rules": (load_rule_file, ROOT / "configs" / "medical" / "access.yaml", lambda r: [rule.id for rule in r.rules]),
    "gazetteer": (load_gazetteer, ROOT / "configs" / "medical" / "entities.yaml", lambda g: g.text),
    "glossary": (load_glossary, ROOT / "configs" / "glossary.yaml", lambda g: [e.id for e in g.entries]),
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_file_replaced_as_it_is_loaded_is_hashed_as_the_bytes_that_were_parsed(kind, tmp_path, monkeypatch):
    load, shipped, content = LOADERS[kind]
    approved = shipped.read_bytes()
    path = tmp_path / shipped.name
    path.write_bytes(approved)
    other = tmp_path / "next.yaml"
    other.write_bytes(approved + b"\n# the next version, deployed by a rename\n")
    parse = engine.yamlsource.load_yaml_text

    def parse_then_deploy(*args, **kwargs):
        if other.exists():
            os.replace(other, path)
        return parse(*args, **kwargs)

    monkeypatch.setattr(engine.yamlsource, "load_yaml_text", parse_then_deploy)
    loaded = load(path)
    monkeypatch.undo()
    assert not other.exists()  # the race happened
    assert loaded.sha256 == hashlib.sha256(approved).hexdigest()  # before: the next version's sha256
    assert content(loaded) == content(load(shipped))
