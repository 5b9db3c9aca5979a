"""The rule language (conditions, actions, rule sets, conflict checks) — see issue 4."""
