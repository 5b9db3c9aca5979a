"""The rule language analysts write: conditions, actions, rule sets, checks and rule tests.

- :mod:`rules.expressions` — sandboxed Jinja2 expressions (``expr: "..."``);
- :mod:`rules.conditions` — the declarative ``{field, op, value}`` form, compiled once and
  evaluated per document (Python) or over many at once (numpy);
- :mod:`rules.ruleset` — rule files (prefilter / override), validated with located errors;
- :mod:`rules.corpus` — per-field columns over the index that make prefilter rules cheap;
- :mod:`rules.conflicts` — conflicts, expired rules, fields no document has;
- :mod:`rules.testing` and :mod:`rules.cli` — ``sieve rules test`` / ``sieve rules check``.

The stages that run rules live in :mod:`stages.rules` (``rules.prefilter``, ``rules.override``)
and :mod:`stages.threshold` (``select.threshold``).
"""
