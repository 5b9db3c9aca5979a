"""From the README audit: rule files had no reference (their keys, each action's keys, the operators: `exists`,
`strictness: lenient`, `default_deny`, `inject` were findable only in code or example files). `sieve rules reference`
lists them, read from the models that validate rule files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

from rules.conditions import Op
from rules.ruleset import OVERRIDE_ACTIONS, PREFILTER_ACTIONS

ROOT = Path(__file__).resolve().parents[2]


def _sieve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "rules", "reference", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "160"}, timeout=120)


def test_the_reference_lists_every_key_every_action_takes_and_every_operator():
    done = _sieve("--json")
    assert done.returncode == 0, done.stderr
    reference = json.loads(done.stdout)
    assert set(reference["operators"]) == set(typing.get_args(Op))
    listed = {name for section in ("prefilter", "override") for names in reference[section] for name in names.split(", ")}
    assert listed == set(PREFILTER_ACTIONS) | set(OVERRIDE_ACTIONS)
    keys = {row["key"] for row in reference["file"]}
    assert {"version", "kind", "strictness", "default_deny", "rules"} <= keys
    every = {row["key"] for row in reference["every_rule"]}
    assert {"id", "priority", "enabled", "from", "until", "when"} <= every and "action" not in every
    pin = {row["key"]: row for row in reference["override"]["pin"]["keys"]}
    assert pin["position"]["required"] and pin["inject"]["default"] is True
    acl = {row["key"]: row for row in reference["prefilter"]["acl"]["keys"]}
    assert acl["field"]["default"] == "acl" and acl["user_field"]["type"] == "'groups' | 'roles'"


def test_the_reference_reads_as_tables():
    done = _sieve()
    assert done.returncode == 0, done.stderr
    for words in ("a rule file", "'strict' | 'default' | 'lenient'", "prefilter exclude, include", "override pin",
                  "override boost, demote", "operators", "exists", "value true: the field is present"):
        assert words in done.stdout, words
