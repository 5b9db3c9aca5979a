"""``sieve rules``: the analysts' commands — run rule tests, check rule files.

Mounted by the main CLI with ``app.add_typer(rules_app, name="rules")``. Every error a user can
cause (a broken rule, test or pipeline file) is printed as located messages with exit code 2;
failing test cases exit with 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.errors import ConfigError, SieveError
from engine.console import make_console, print_json, shown

rules_app = typer.Typer(
    help="Analyst rule files: run their tests, check them for conflicts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

out = make_console(highlight=False, soft_wrap=True, emoji=False)  # ":100:" in a message is a line number
err = make_console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


@rules_app.command("test")
def test(
    paths: Annotated[
        Optional[list[Path]], typer.Argument(help="test files (*.tests.yaml) or directories to search (default: configs)")
    ] = None,
    name: Annotated[Optional[str], typer.Option("-k", help="run only cases whose name contains this")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Run the analysts' rule tests: each case's query must return (or never return) what it says."""
    from rules.testing import discover, run_test_file

    files = discover(paths or [Path("configs")])
    if not files:
        err.print("[red]error:[/red] no rule test files (*.tests.yaml) found")
        raise typer.Exit(2)
    reports = []
    broken = False
    for path in files:
        try:
            reports.append(run_test_file(path, name))
        except SieveError as exc:
            broken = True
            err.print(f"[red]✗[/red] {shown(str(path))}: {shown(str(exc))}")
    failed = sum(r.failed for r in reports)
    total = sum(len(r.cases) for r in reports)
    if as_json:
        print_json([
            {"file": r.path, "cases": [
                {"name": c.name, "location": str(c.location), "passed": c.passed, "failures": c.failures,
                 "results": c.results} for c in r.cases]}
            for r in reports
        ])
    else:
        for report in reports:
            for case in report.cases:
                if case.passed:
                    out.print(f"[green]✓[/green] {shown(case.name)}")
                else:
                    out.print(f"[red]✗[/red] {shown(case.name)}  ({shown(str(case.location))})")
                    for failure in case.failures:
                        out.print(f"    {shown(failure)}")
        colour = "green" if failed == 0 and not broken else "red"
        could_not_run = len(files) - len(reports)
        out.print(
            f"[{colour}]{total - failed} passed, {failed} failed[/{colour}] in {len(reports)} file(s)"
            + (f"; [red]{could_not_run} file(s) could not be run[/red]" if could_not_run else "")
        )
    if broken:
        raise typer.Exit(2)
    if total == 0:  # a filter that selects nothing would otherwise pass
        err.print(f"[red]error:[/red] no test case matches {shown(repr(name))}" if name else "[red]error:[/red] no test cases")
        raise typer.Exit(2)
    if failed:
        raise typer.Exit(1)


@rules_app.command("check")
def check(
    files: Annotated[list[Path], typer.Argument(help="rule files to check")],
    index_dir: Annotated[
        Optional[Path], typer.Option("--index", help="also check against this index (fields, doc ids, values the rules cannot judge)")
    ] = None,
) -> None:
    """Validate rule files and look for conflicts, expired rules and (with --index) unknown fields (an error in a
    prefilter rule), documents a rule cannot judge (unparsable dates or numbers, malformed nested fields, values of
    another type than the rule's) and contains tests on a field that is a list on some documents, a string on
    others."""
    from rules.conflicts import check_against_corpus, check_query_entities, check_rule_file

    table = index = None
    if index_dir is not None:
        from engine.index import Index
        from rules.corpus import DocumentTable

        try:
            index = Index.open(index_dir)
            table = DocumentTable.from_index(index)
        except SieveError as exc:
            err.print(f"[red]error:[/red] {shown(str(exc))}")
            raise typer.Exit(2) from None
    failed = False
    for path in files:
        ruleset, issues = check_rule_file(path)  # the checks run on every rule that validated
        if ruleset is None:
            failed = True
            err.print(f"[red]✗[/red] {shown(str(path))}: {shown(str(ConfigError(issues)))}")
            continue
        if table is not None:
            issues = issues + check_against_corpus(ruleset, table) + check_query_entities(ruleset, index)
        errors = [i for i in issues if i.severity == "error"]
        for issue in issues:
            colour = "red" if issue.severity == "error" else "yellow"
            err.print(f"[{colour}]{shown(str(issue))}[/{colour}]")
        if errors:
            failed = True
            out.print(f"[red]✗[/red] {shown(str(path))}: {len(errors)} error(s)")
        else:
            out.print(f"[green]✓[/green] {shown(str(path))}: {len(ruleset.rules)} {ruleset.kind} rules, "
                      f"sha256 {ruleset.sha256[:12]}")
    if failed:
        raise typer.Exit(2)


@rules_app.command("reference")
def reference(
    as_json: Annotated[bool, typer.Option("--json", help="the reference as JSON")] = False,
) -> None:
    """Every key a rule file, a rule and each action take (type, default, meaning), the keys of a condition and
    its operators: read from what validates rule files, so it says what is accepted."""
    from rich.table import Table

    from rules.reference import rule_reference

    data = rule_reference()
    if as_json:
        print_json(data)
        return

    def table(title: str, rows: list[dict]) -> None:
        if not rows:
            out.print(f"[bold]{shown(title)}[/bold]: no keys of its own")
            return
        grid = Table(title=shown(title), title_justify="left", show_lines=False)
        for column in ("key", "type", "default", "meaning"):
            grid.add_column(column, overflow="fold")
        for row in rows:
            default = "required" if row["required"] else ("-" if row["default"] is None else json.dumps(row["default"]))
            grid.add_row(shown(row["key"]), shown(row["type"]), shown(default), shown(row["description"]))
        out.print(grid)

    table("a rule file", data["file"])
    table("every rule (any kind)", data["every_rule"])
    for action, entry in data["prefilter"].items():
        table(f"prefilter {action}" + (f": {entry['summary']}" if entry["summary"] else ""), entry["keys"])
    table("every override rule: which documents it targets (docs, match or both)", data["override_targets"])
    for action, entry in data["override"].items():
        table(f"override {action}" + (f": {entry['summary']}" if entry["summary"] else ""), entry["keys"])
    table("a condition (when:, match:): one test (field, op, value) or all / any / not / expr", data["condition"])
    operators = Table(title="operators", title_justify="left")
    operators.add_column("op")
    operators.add_column("holds when the field's value", overflow="fold")
    for op, meaning in data["operators"].items():
        operators.add_row(op, shown(meaning))
    out.print(operators)
