"""The ``sieve`` command line: validate, index, search, batch, serve, replay, trace verify, rules, and the analyst
workbench (eval, sweep, compare, explain, report, schema; implemented in :mod:`engine.workbench`).

Bad input ends in a one-paragraph message and a non-zero exit, never a stack trace
(set SIEVE_DEBUG=1 to see one for an internal error).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.tree import Tree

from engine import __version__
from engine.errors import ConfigError, MissingDependencyError, SieveError
from engine.console import EXIT_PIPE_CLOSED, make_console, print_json, shown, utf8_or_escaped

app = typer.Typer(
    name="sieve",
    help="Sieve: a configurable, auditable rules-plus-model retrieval engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print Sieve's version and exit.")] = False,
) -> None:
    """Sieve: a configurable, auditable rules-plus-model retrieval engine."""


trace_app = typer.Typer(help="Work with trace logs.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")

from rules.cli import rules_app  # noqa: E402  (typer and rich only: cheap)
from stages.rerank.train import train_reranker  # noqa: E402  (torch loads when training starts)

app.add_typer(rules_app, name="rules")
app.command("train-reranker")(train_reranker)

out = make_console(highlight=False, soft_wrap=True, emoji=False)  # ":100:" in a message is a line number
err = make_console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    from engine.model import iso_moment, not_a_moment

    moment = iso_moment(value)
    if moment is None:
        raise SieveError(f"{option} {value!r}: {not_a_moment(value)}")
    return moment


@app.command()
def version() -> None:
    """Print Sieve's version."""
    out.print(__version__)


def _writable_file(path: Optional[Path], option: str, *, appended: bool = False) -> None:
    """Refuse, before any work, an output file path that could not be written: a directory, a path under a
    file, a directory that cannot be created or written. ``appended`` (a trace log): an existing regular file this
    process may write is fine in a directory it may not write (appends write the file, not the directory)."""
    if path is None:
        return
    if appended and path.is_file() and os.access(path, os.W_OK):
        return
    from engine.paths import nearest_existing_parent

    try:  # a name too long for the file system fails even to be looked at: say so, with the OS's words
        is_dir = path.is_dir()
        parent = nearest_existing_parent(path.absolute())
    except OSError as exc:
        raise SieveError(f"{option} {path}: {exc.strerror or exc}") from None
    if is_dir:
        raise SieveError(f"{option} {path} is a directory; give a file path")
    if parent is not None and not parent.is_dir():
        raise SieveError(f"{option} {path}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise SieveError(f"{option} {path}: cannot write in {parent} (permission denied)")


@app.command()
def validate(
    configs: Annotated[list[Path], typer.Argument(help="pipeline YAML file(s) to check")],
    settings: SetOption = None,
) -> None:
    """Check pipeline configs without loading any model or index; report every problem at once. With --set, the
    config as that variant (as search, eval and sweep would run it)."""
    from engine.compiler import compile_file
    from engine.pipeline import compile_with_settings

    failed = False
    for path in configs:
        try:
            compiled = compile_with_settings(path, settings) if settings else compile_file(path)
        except SieveError as exc:  # a ConfigError, located; or a --set that cannot apply (given twice, extends)
            failed = True
            err.print(f"[red]✗[/red] {shown(str(path))}: {shown(str(exc))}")
            continue
        for warning in compiled.warnings:
            err.print(f"[yellow]{shown(str(warning))}[/yellow]")
        log = compiled.config.trace.log
        out.print(
            f"[green]✓[/green] {shown(str(path))}: {len(compiled.stages)} stages"
            + (f" ({len(compiled.disabled)} disabled: {shown(', '.join(compiled.disabled))})" if compiled.disabled else "")
            + f", output '{compiled.output}', config sha256 {compiled.config_sha256[:12]}; trace log: "
            + (shown(str(Path(log).absolute())) + ("" if Path(log).is_absolute() else
                                                    " (relative to the working directory)") if log else "none")
        )
    if failed:
        raise typer.Exit(2)


@app.command()
def index(
    corpus: Annotated[Path, typer.Argument(help="BEIR corpus.jsonl, or a directory holding one")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="index directory to create or replace")],
    components: Annotated[
        Optional[list[str]], typer.Option("--with", help="index components to build (repeatable)")
    ] = None,
    language: Annotated[Optional[str], typer.Option(help="tokeniser language for bm25: en or zh")] = None,
    settings_file: Annotated[
        Optional[Path], typer.Option("--settings", help="YAML: {component: {settings}} (e.g. bm25: {k1: 1.2})")
    ] = None,
    keep_previous: Annotated[bool, typer.Option(
        "--keep-previous", help="move the index replaced aside to OUT.<sha12 of its manifest> (for replaying its "
        "traces with --index) instead of deleting it")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache", metavar="DIR", help="build cache directory for the dense embeddings and entities (default: "
        ".OUT.build-cache beside --out, deleted after a successful build). A cache named here is kept (remove it "
        "yourself, or prune it with --prune-cache), reused by later builds (of any --out) for every batch whose "
        "documents, model and settings are unchanged, and may be shared by builds running at once")] = None,
    prune_cache: Annotated[bool, typer.Option(
        "--prune-cache", help="with --cache DIR: after a successful build, remove from DIR the entries this build did "
        "not use (those of other corpus versions, settings or models), and say how much; skipped, and said, while "
        "another build uses DIR")] = False,
    keep_cache: Annotated[bool, typer.Option(
        "--keep-cache", help="keep the default build cache after a successful build (pruned to that build's "
        "entries), so that a rebuild after a corpus change embeds only the batches that changed")] = False,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="build without a cache: an interrupted build then starts over")] = False,
) -> None:
    """Build an index (document store + components such as bm25) from a BEIR corpus. One build of an --out runs
    at a time: a second one started meanwhile fails at once.

    Costly work (dense embeddings, spaCy entities) is kept in a build cache as it is done: after a failure, Ctrl-C,
    SIGTERM or a kill, the same command run again resumes where it stopped. The index is the same, byte for byte,
    with or without a cache."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.index import build_index, kept_copy, load_index_settings, manifest_sha256_of

    if no_cache and (cache_dir is not None or keep_cache or prune_cache):
        raise SieveError("--no-cache cannot be given with "
                         + ("--cache" if cache_dir is not None else "--keep-cache" if keep_cache else "--prune-cache"))
    if prune_cache and cache_dir is None:
        raise SieveError("--prune-cache applies to a cache named with --cache DIR: the default one is deleted after a "
                         "successful build, or kept pruned to that build's entries with --keep-cache")
    settings = load_index_settings(settings_file, components or ["bm25"], language=language)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def report(task: str, advance: int, total: int | None) -> None:
            if task not in tasks:
                tasks[task] = progress.add_task(task, total=total)
            progress.advance(tasks[task], advance)

        def note(message: str) -> None:
            progress.console.print(f"  {shown(message)}")

        previous = manifest_sha256_of(out_dir) if keep_previous else None
        manifest = build_index(corpus, out_dir, settings, report, keep_previous=keep_previous,
                               cache=False if no_cache else cache_dir, keep_cache=keep_cache,
                               prune_cache=prune_cache, notes=note)
    out.print(
        f"[green]✓[/green] indexed {manifest['corpus']['doc_count']} documents into {shown(str(out_dir))} "
        f"(components: {', '.join(manifest['components'])})"
    )
    if previous is not None:
        kept = kept_copy(out_dir, previous)
        if manifest_sha256_of(out_dir) == previous:
            out.print(f"  the previous index (manifest {previous[:12]}) is identical to the new one: nothing to keep")
        elif kept is not None:
            out.print(f"  the previous index (manifest {previous[:12]}) is kept in {shown(str(kept))}")
        else:
            err.print(f"[yellow]warning:[/yellow] the previous index (manifest {previous[:12]}) could not be kept: "
                      f"{shown(str(out_dir.parent / (out_dir.name + '.' + previous[:12])))} is taken")


def _user_context(user: str | None, roles: list[str] | None, groups: list[str] | None, jurisdictions: list[str] | None,
                  attributes: list[str] | None = None):
    from engine.model import UserContext

    named: dict[str, str] = {}
    for item in attributes or ():
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise SieveError(f"--attribute takes NAME=VALUE (e.g. wall_crossed=yes), got {item!r}")
        if name in named:
            raise SieveError(f"--attribute {name} is given twice")
        named[name] = value
    return UserContext(
        user_id=user, roles=tuple(roles or ()), groups=tuple(groups or ()), jurisdictions=tuple(jurisdictions or ()),
        attributes=named,
    )


def _verdict(difference: float, p: float | None, better: str, than: str, alpha: float = 0.05) -> str:
    """A plain sentence for a paired difference and its randomisation p: what an analyst may conclude."""
    if p is None or difference == 0:
        return "no difference to test"
    if p < alpha:
        return f"{better if difference > 0 else than} is better (significant at {alpha}, randomisation test)"
    return (f"not significant at {alpha} (p {p:.2f}): the difference may be chance; keep {than} unless more "
            "queries confirm it")


def _who(user: dict[str, Any]) -> str:
    """A user context as a short phrase: 'anonymous' or 'groups research, jurisdictions US'."""
    return ", ".join(f"{name} {', '.join(v) if isinstance(v, (list, tuple)) else v}" for name, v in user.items()
                     if v) or "anonymous"


# The query context options `search` and `explain` share (one definition each).
QueryArgument = Annotated[str, typer.Argument(
    help="the query text; - reads it from standard input (a command line is seen by every user of the machine, in ps)")]
HistoryOption = Annotated[Optional[list[str]], typer.Option("--history", "-H", help="earlier turns, oldest first")]
HistoryFileOption = Annotated[Optional[Path], typer.Option(
    "--history-file", metavar="FILE", help="the earlier turns as a JSON array of strings, oldest first, instead of "
    "--history (kept off the command line); - reads standard input")]
UserOption = Annotated[Optional[str], typer.Option("--user", help="user id")]
RoleOption = Annotated[Optional[list[str]], typer.Option("--role", help="user role (repeatable)")]
GroupOption = Annotated[Optional[list[str]], typer.Option("--group", help="user group (repeatable)")]
JurisdictionOption = Annotated[Optional[list[str]], typer.Option("--jurisdiction", help="user jurisdiction (repeatable)")]
AttributeOption = Annotated[Optional[list[str]], typer.Option(
    "--attribute", help="user attribute NAME=VALUE, as access rules read user.attributes.NAME (repeatable)")]
AsOfOption = Annotated[Optional[str], typer.Option("--as-of", help="query time, ISO 8601 (default: now)")]
EvalAsOfOption = Annotated[Optional[str], typer.Option(
    "--as-of", help="every query's time, ISO 8601 (default: when the evaluation starts)")]
IndexOption = Annotated[Optional[Path], typer.Option("--index", help="override the config's index")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="PATH=VALUE: override one config setting for this run, by dotted path (stages by id: "
    "stages.rerank.params.device=cpu); the value is YAML; repeatable; the trace records it")]


# What a query or a conversation is read from, standard input or a file: far more than any limit a config may set
_MOST_INPUT_BYTES = 64 << 20


def _input_text(source: Path | None, what: str) -> str:
    """UTF-8 text from ``source`` (None: standard input, one final line break removed, as ``echo`` adds it), at
    most ``_MOST_INPUT_BYTES``: a FIFO or /dev/zero named by mistake is refused, not read for ever."""
    where = "standard input" if source is None else str(source)
    try:
        if source is None:
            if sys.stdin is None or sys.stdin.closed:
                raise SieveError(f"{what} is - (standard input), but there is no standard input")
            if sys.stdin.isatty():
                err.print(f"[dim]reading {what} from standard input (end it with Ctrl-D)[/dim]")
            raw = sys.stdin.buffer.read(_MOST_INPUT_BYTES + 1)
        else:
            with open(source, "rb") as handle:
                raw = handle.read(_MOST_INPUT_BYTES + 1)
    except OSError as exc:
        raise SieveError(f"{what} ({where}): cannot read it ({exc.strerror or exc})") from None
    if len(raw) > _MOST_INPUT_BYTES:
        raise SieveError(f"{what} ({where}) is over {_MOST_INPUT_BYTES >> 20} MiB: nothing was run")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SieveError(f"{what} ({where}) is not UTF-8 text (byte {exc.start})") from None
    if source is not None:
        return text
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _asked(query: Optional[str], history: Optional[list[str]], history_file: Optional[Path],
           option: str = "QUERY") -> tuple[Optional[str], Optional[list[str]]]:
    """The query and the conversation's earlier turns as given: the query read from standard input for ``-``; the
    turns from ``--history`` (repeated) or ``--history-file`` (a JSON array of strings, ``-`` for standard input),
    never both."""
    if history_file is not None and history:
        raise SieveError("--history and --history-file together: give the turns one way")
    from_stdin = history_file is not None and str(history_file) == "-"
    if from_stdin and query == "-":
        raise SieveError(f"{option} and --history-file both read standard input (-): put one of them in a file")
    text = _input_text(None, f"the query ({option})") if query == "-" else query
    if history_file is None:
        return text, history
    where = "standard input" if from_stdin else str(history_file)
    try:
        turns = json.loads(_input_text(None if from_stdin else history_file, "--history-file"))
    except ValueError as exc:
        raise SieveError(f"--history-file ({where}): not JSON: {exc}") from None
    if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
        raise SieveError(f"--history-file ({where}): must be a JSON array of strings (the earlier turns, oldest first)")
    return text, turns


def _make_query(pipeline: Any, text: str, history: Optional[list[str]], user: Optional[str],
                roles: Optional[list[str]], groups: Optional[list[str]], jurisdictions: Optional[list[str]],
                as_of: Optional[str], attributes: Optional[list[str]] = None) -> Any:
    from engine.stage import Port

    if history and not any(stage.produces is Port.QUERY for stage in pipeline.compiled.stages.values()):
        err.print("[yellow]warning:[/yellow] this pipeline has no query-rewriting stage (rewrite.coreference): "
                  "--history is recorded in the trace but does not change the query")
    return pipeline.make_query(
        text, history=tuple(history or ()), user=_user_context(user, roles, groups, jurisdictions, attributes),
        as_of=_parse_time(as_of, "--as-of"),
    )


@dataclass(frozen=True)
class _AskedAs:
    """Who every query of an evaluation is asked as, and when (``sieve eval`` / ``compare``)."""

    user: Any
    as_of: datetime | None

    @classmethod
    def parse(cls, user: Optional[str], roles: Optional[list[str]], groups: Optional[list[str]],
              jurisdictions: Optional[list[str]], attributes: Optional[list[str]], as_of: Optional[str]) -> "_AskedAs":
        return cls(_user_context(user, roles, groups, jurisdictions, attributes), _parse_time(as_of, "--as-of"))


def _unheld_user_values(pipeline: Any, query: Any) -> list[str]:
    """The user's groups, roles or jurisdictions that an access rule compares with the documents and no document
    holds (``RulesPrefilter.unheld_user_values``): a typo in --role, --group or --jurisdiction is said, not silent."""
    from stages.rules import RulesPrefilter

    if pipeline.resources is None:  # not warmed up (the query was refused)
        return []
    stages = [pipeline.compiled.stages[stage_id] for stage_id in pipeline.compiled.order
              if stage_id not in pipeline.unavailable]  # warmed up
    return [said for stage in stages if isinstance(stage, RulesPrefilter) for said in stage.unheld_user_values(query)]


def _config_warnings(pipeline: Any) -> list[str]:
    """What ``sieve validate`` warns of in the pipeline's config, located (a `when: null` removing a base's `when`,
    a deadline that cuts nothing...): said where a query runs too."""
    return [f"{issue.location}  {issue.detail()}" for issue in pipeline.compiled.warnings]


def _print_warnings(warnings: Iterable[str | None]) -> None:
    """Warnings on stderr, one a line (None: nothing to say); e.g. what the stages' warm-up found that changes what
    the pipeline does (``Pipeline.warnings``: a rule reading a field no document has). A stage's warm-up that
    reports what the config's check already said (a rule file's finding, located) is not printed twice."""
    config_warnings: list[str] = []  # printed, not a stage's warm-up warning
    for warning in warnings:
        if not warning:
            continue
        if _STAGE_PREFIX.match(warning):
            core = _STAGE_PREFIX.sub("", warning).replace("  warning: ", "  ", 1)
            if any(earlier.endswith(core) for earlier in config_warnings):
                continue
        else:
            config_warnings.append(warning)
        err.print(f"[yellow]warning:[/yellow] {shown(warning)}")


_STAGE_PREFIX = re.compile(r"^stage '[^']*': ")


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    query: QueryArgument,
    history: HistoryOption = None,
    history_file: HistoryFileOption = None,
    user: UserOption = None,
    role: RoleOption = None,
    group: GroupOption = None,
    jurisdiction: JurisdictionOption = None,
    attribute: AttributeOption = None,
    as_of: AsOfOption = None,
    index_dir: IndexOption = None,
    settings: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results and trace as JSON")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="show each result's explanation tree")] = False,
    trace_out: Annotated[Optional[Path], typer.Option("--trace-out", help="also write the trace to this file")] = None,
    log: Annotated[Optional[Path], typer.Option("--log", help="trace log (default: the config's trace.log)")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="do not append the trace to the log")] = False,
) -> None:
    """Run one query through a pipeline and show the ranked results."""
    from engine.pipeline import Pipeline
    from engine.trace import write_json_atomic

    if log is not None and no_log:
        raise SieveError("--log and --no-log together: give one")
    _output_file(trace_out, "--trace-out")  # a FIFO, a device or this process's stdout: refused before the query runs
    query, history = _asked(query, history, history_file)
    pipeline = Pipeline.from_file(config, index_path=index_dir, settings=settings or ())
    target = None if no_log else pipeline.log_target(log)
    if target is not None:  # before the models load and the query runs, not after (a read-only working directory)
        _writable_file(target.absolute(), "--log" if log is not None else "the config's trace.log", appended=True)
    asked = _make_query(pipeline, query, history, user, role, group, jurisdiction, as_of, attribute)
    result = pipeline.run(asked)
    _print_warnings([*_config_warnings(pipeline), *pipeline.warnings, *_unheld_user_values(pipeline, asked)])
    trace = result.trace
    log_path = None if no_log else pipeline.log_trace(trace, log)
    if trace_out is not None:
        logged = f"the trace is record seq {trace['log']['seq']} of {log_path}" if log_path is not None else (
            "the query ran; its trace was not logged (--no-log)")
        _write_output("--trace-out", trace_out, lambda: write_json_atomic(trace_out, trace), logged)
    if as_json:
        print_json({"results": trace["results"], "trace": trace, "trace_log": str(log_path) if log_path else None})
        return
    _print_results(pipeline, result.results, trace, explain)
    where = []
    if log_path is not None:
        where.append(f"appended to {Path(log_path).absolute()}")
    if trace_out is not None:
        where.append(f"written to {trace_out}")
    out.print(
        f"trace {trace['trace_id']} ({trace['timing_ms']['total']:.1f} ms"
        + (", [yellow]degraded[/yellow]" if result.degraded else "")
        + ")"
        + (f": {'; '.join(shown(w) for w in where)}" if where else "")
    )


def _print_results(pipeline: Any, results: list[Any], trace: dict[str, Any], explain: bool) -> None:
    index = pipeline.resources.index if pipeline.resources else None
    documents = index.documents.get([c.row for c in results]) if index is not None and results else {}
    rewritten = trace["query"].get("rewritten")
    if rewritten:
        out.print(f"rewritten query: [bold]{shown(rewritten)}[/bold]")
    if not results:
        out.print("[yellow]no results[/yellow]")
    table = Table(title=f"{len(results)} results", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("doc_id")
    table.add_column("score", justify="right")
    table.add_column("title")
    for rank, candidate in enumerate(results, start=1):
        doc = documents.get(candidate.row)
        title = (doc.title or doc.text)[:90] if doc is not None else ""
        table.add_row(str(rank), shown(candidate.doc_id, lines=False), f"{candidate.score:.4f}", shown(title, lines=False))
    if results:
        out.print(table)
    for stage in trace["stages"]:
        for decision in stage.get("decisions", []):
            out.print(f"[dim]{shown(stage['id'])}: {shown(decision['detail'])}[/dim]")
        if stage.get("status") == "skipped":
            out.print(f"[yellow]{shown(stage['id'])} skipped: {shown(stage.get('error', ''))}[/yellow]")
        elif stage.get("status") == "bypassed":
            out.print(f"[dim]{shown(stage['id'])}: bypassed, its `when` does not hold "
                      f"({shown(str((stage.get('when') or {}).get('condition', '')))})[/dim]")
        elif (stage.get("when") or {}).get("error"):
            out.print(f"[yellow]{shown(stage['id'])}: its `when` could not be judged: "
                      f"{shown(stage['when']['error'])}[/yellow]")
    if explain:
        for record in trace["results"]:
            if "explanation" not in record:
                continue
            tree = Tree(f"#{record['rank']} {shown(record['doc_id'], lines=False)}")
            _add_explanation(tree, record["explanation"])
            out.print(tree, soft_wrap=False)  # a long description wraps; soft wrap would crop it


def _add_explanation(tree: Tree, node: dict[str, Any]) -> None:
    branch = tree.add(f"[bold]{node['value']:.4f}[/bold]  {shown(node['description'])}")
    for child in node.get("details", []):
        _add_explanation(branch, child)


ExpectHeadOption = Annotated[Optional[str], typer.Option(
    "--expect-head", help="a head of the trace log anchored outside it (sieve trace head): the log must hold it with "
    "the chain intact and the trace's record must be at or before it (the chain has no key: without an anchor, "
    "'verified' means 'matches the log it names')")]


@app.command()
def replay(
    trace_path: Annotated[Path, typer.Argument(help="a trace .json file, or a trace log .jsonl")],
    trace_id: Annotated[Optional[str], typer.Option("--id", help="trace id within a log (default: last)")] = None,
    seq: Annotated[Optional[int], typer.Option("--seq", help="record number within a log")] = None,
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="index to replay against")] = None,
    query: Annotated[Optional[str], typer.Option("--query", help="query text, when the trace stores only its hash; "
                                                  "- reads it from standard input (off the command line)")] = None,
    history: Annotated[Optional[list[str]], typer.Option(
        "--history", "-H", help="an earlier conversation turn, oldest first (repeatable), when the trace stores "
        "only their hashes")] = None,
    history_file: HistoryFileOption = None,
    log: Annotated[Optional[Path], typer.Option(
        "--log", help="the trace log a standalone trace file was appended to (default: the path it records)")] = None,
    config_dir: Annotated[Optional[Path], typer.Option(
        "--config-dir", help="where the config's relative paths (rule files, gazetteers, glossaries) lie now, when not "
        "where the trace was made (a moved checkout, another machine); each file's sha256 is still checked")] = None,
    expect_head: ExpectHeadOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the replay's report as JSON")] = False,
) -> None:
    """Re-run a traced query with its recorded config, index and time; report whatever a re-run does not
    reproduce (ranking, scores, every stage's output, drops, decisions, rules fired, explanations) and why."""
    from engine.replay import replay_trace
    from engine.trace import load_trace_checked

    if trace_path.suffix != ".jsonl" and (trace_id is not None or seq is not None):
        raise SieveError("--id and --seq select a record in a trace log (.jsonl); a .json file holds one trace")
    query, history = _asked(query, history, history_file, "--query")
    trace, source = load_trace_checked(trace_path, trace_id, seq, log, expect_head=expect_head)
    report = replay_trace(trace, index_path=index_dir, query_text=query, history=history, config_dir=config_dir)
    report["source"] = source.to_json()
    if as_json:
        print_json(report)
    else:
        if source.verified:
            out.print(f"[dim]source: {shown(source.message)}[/dim]")
        else:
            out.print(f"[yellow]{shown(source.message)}[/yellow]")
        for note in report["notes"]:
            out.print(f"[dim]note: {shown(note)}[/dim]")
        # What the trace file says of itself (its id, hashes) is shown as written; the verdict line says itself
        # whether the trace is a logged one, so that no line before it carries that alone.
        unverified = "" if source.verified else " [yellow](an unverified trace file)[/yellow]"
        trace_name = shown(report["trace_id"], lines=False)
        if report["identical"]:
            out.print(
                f"[green]✓ identical[/green]{unverified}: {report['compared']} results of trace {trace_name} and "
                f"every stage's output reproduced exactly (config {shown(report['config_sha256'][:12])}, index "
                f"{shown(str(report['index_manifest_sha256'])[:12])})"
            )
        else:
            out.print(f"[red]✗ different[/red]{unverified}: trace {trace_name}")
            for line in report["differences"]:
                out.print(f"  {shown(line)}")
    if not report["identical"]:
        raise typer.Exit(1)


@trace_app.command("verify")
def trace_verify(
    log: Annotated[Path, typer.Argument(help="trace log (.jsonl)")],
    expect_head: Annotated[Optional[str], typer.Option(
        "--expect-head", help="hash of the record that ended the log when it was anchored (sieve trace head): "
        "it must still be there")] = None,
    expect_count: Annotated[Optional[int], typer.Option(
        "--expect-count", help="how many records the log held when it was anchored: at least that many must "
        "still be there")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict as JSON (for a monitor; the exit "
                                                          "status is the same: 1 when the chain is broken)")] = False,
) -> None:
    """Check a trace log's hash chain: detects edited, reordered and rewritten records, and records removed
    before the last one. Records cut from the end (or an emptied log) leave a chain that still links up: only
    an anchored head (sieve trace head, kept outside the log) shows them, with --expect-head/--expect-count."""
    from engine.trace import check_log

    check = check_log(log, expect_head=expect_head, expect_count=expect_count)
    if as_json:
        print_json({"log": str(check.path), "intact": not check.problems, "records": check.records,
                    "segments": [str(segment) for segment in check.segments], "problems": check.problems,
                    "warnings": check.warnings, "anchored": expect_head is not None or expect_count is not None})
        if check.problems:
            raise typer.Exit(1)
        return
    _print_warnings(check.warnings)  # e.g. bytes of a torn record set aside next to the log
    if check.problems:
        for problem in check.problems:
            err.print(f"[red]✗[/red] {shown(problem)}")
        raise typer.Exit(1)
    anchored = expect_head is not None or expect_count is not None
    rotated = len(check.segments) > 1
    out.print(f"[green]✓[/green] {check.records} records"
              + (f" in {len(check.segments)} segments ({shown(', '.join(p.name for p in check.segments))})"
                 if rotated else "")
              + ", chain intact" + (", the anchored head is present" if expect_head is not None else
                                     f", at least the anchored {expect_count} (a count alone cannot tell a record "
                                     "replaced: anchor the head too)" if expect_count is not None else ""))
    if not anchored:
        out.print("[dim]records cut from the log's end cannot be seen in the chain: anchor its head outside the log "
                  f"(sieve trace head {shown(str(log))}) and check it with --expect-head[/dim]")


@trace_app.command("head")
def trace_head(
    log: Annotated[Path, typer.Argument(help="trace log (.jsonl)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the head as JSON")] = False,
) -> None:
    """Print an intact log's record count and last record's hash, to anchor outside the log (a ticket, a WORM
    store); `sieve trace verify LOG --expect-head HASH --expect-count N` later shows whether records were cut
    from its end."""
    from engine.trace import log_head

    head = log_head(log)
    if as_json:
        print_json({"log": str(head.path), "records": head.records, "seq": head.seq, "hash": head.hash})
        return
    if head.hash is None:
        out.print(f"{shown(str(log))}: 0 records (an empty log); anchor: --expect-count 0")
        return
    out.print(f"{shown(str(log))}: {head.records} records; head seq {head.seq} hash {head.hash}")
    out.print(f"check later: sieve trace verify {shown(str(log))} --expect-head {head.hash} "
              f"--expect-count {head.records}")


@trace_app.command("rotate")
def trace_rotate(
    log: Annotated[Path, typer.Argument(help="trace log (.jsonl)")],
    as_json: Annotated[bool, typer.Option("--json", help="print what was done as JSON")] = False,
) -> None:
    """Move a log's records to an archived segment beside it (LOG-STEM.FIRST-LAST.jsonl) and start the log
    again with a record that links to the archive's last one: the chain stays unbroken, and `sieve trace
    verify`, `replay` and `report` follow it back through the segments beside the log. Safe while a server or
    other processes append (they wait for the rotation, then append to the new log)."""
    from engine.trace import rotate_log

    rotation = rotate_log(log)
    marker = rotation.marker
    if as_json:
        print_json({"log": str(rotation.path), "archive": str(rotation.archive),
                    "first_seq": rotation.first_seq, "last_seq": rotation.last_seq,
                    "records": marker["seq"] + 1, "seq": marker["seq"], "hash": marker["hash"]})
        return
    moved = rotation.last_seq - rotation.first_seq + 1
    out.print(f"{shown(str(rotation.path))}: seq {rotation.first_seq}..{rotation.last_seq} ({moved} record"
              f"{'s' if moved != 1 else ''}) moved to {shown(str(rotation.archive))}")
    out.print(f"the log goes on at seq {marker['seq']}, with a record linking to the archive's last "
              f"(hash {rotation.marker['prev'][:16]}…); keep the archive beside the log for verify and replay to "
              "follow the chain")
    out.print(f"anchor: sieve trace verify {shown(str(rotation.path))} --expect-head {marker['hash']} "
              f"--expect-count {marker['seq'] + 1}")


# ---------------------------------------------------------------------------- analyst workbench


def _progress_bar(description: str):  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=err, transient=False,
    )


def _run_eval(config: Path, dataset: Path, split: str, index_dir: Path | None, limit: int | None, recall_k: int, label: str,  # type: ignore[no-untyped-def]
              trace_log: Path | None = None, data: Any = None, asked: "_AskedAs | None" = None,
              settings: tuple[str, ...] | list[str] = ()):
    """Evaluate one config with a progress bar on stderr; what the stages' warm-up found is printed first."""
    from engine.workbench.evaluate import evaluate_pipeline

    with _progress_bar(label) as progress:
        tasks: list[Any] = []  # the bar appears once the data set is read and the pipeline warmed up

        def start(total: int) -> None:
            tasks.append(progress.add_task(label, total=total))

        def advance(step: int) -> None:
            progress.advance(tasks[0], step)

        try:
            report = evaluate_pipeline(
                config, dataset, split=split, index_path=index_dir, limit=limit, recall_k=recall_k,
                on_start=start, progress=advance, trace_log=trace_log, data=data,
                user=asked.user if asked else None, as_of=asked.as_of if asked else None, settings=tuple(settings),
            )
        except KeyboardInterrupt:
            done = int(progress.tasks[0].completed) if tasks else 0
            total = int(progress.tasks[0].total or 0) if tasks else 0
            logged = f"; their traces are in {shown(trace_log)}" if trace_log is not None and done else ""
            err.print(f"interrupted after {done} of {total} queries{logged}: no figures and no output file written")
            raise
    _print_warnings(report.warm_up_warnings)
    return report


def _output_file(path: Optional[Path], option: str) -> None:
    """:func:`_writable_file`, and a target that is not a regular file (a FIFO, device or socket; a symlink is
    judged by its target), refused before an evaluation starts rather than found when its output is written."""
    if path is None:
        return
    _writable_file(path, option)
    from engine.trace import atomic_write_target

    try:
        atomic_write_target(path)
    except SieveError as exc:
        raise SieveError(f"{option} {exc}") from None


def _write_output(option: str, path: Path, write: Any,
                  after: str = "the figures above are complete; this file was not written") -> None:
    """Run ``write()``; a failure (a full disk, a target that changed since the start) is a SieveError naming the
    file and the OS's reason, and ``after`` what stands. Called after the figures are printed, so they are never lost
    to it."""
    try:
        write()
    except OSError as exc:
        raise SieveError(f"could not write {option} {path}: {exc.strerror or exc} ({after})") from None
    except SieveError as exc:
        raise SieveError(f"could not write {option} {path}: {exc} ({after})") from None


@contextlib.contextmanager
def _printing_then_writing(outputs: list[tuple[str, Optional[Path], Any, Optional[str]]], *,
                           quiet: bool) -> Iterator[None]:
    """Print the figures inside; then write ``outputs`` (:func:`_write_outputs`), also when printing failed with an
    OSError (stdout a closed pipe, ``| head -1``, or a full disk): the files are what the run made, the printed
    figures only its report, and an hour's evaluation was lost with them."""
    try:
        yield
    except (OSError, SystemExit):  # SystemExit: rich's answer to a closed pipe (make_console)
        _write_outputs(outputs, quiet=True)
        raise
    _write_outputs(outputs, quiet=quiet)


def _write_outputs(outputs: list[tuple[str, Optional[Path], Any, Optional[str]]], *, quiet: bool) -> None:
    """Write each requested (option, path, write, message) output after the figures are printed; the ones that
    fail are reported together as one error, the others are written (and said, unless ``quiet``)."""
    failures = []
    for option, path, write, message in outputs:
        if path is None:
            continue
        try:
            _write_output(option, path, write)
        except SieveError as exc:
            failures.append(str(exc))
        else:
            if message is not None and not quiet:
                out.print(shown(message))
    if failures:
        raise SieveError("; ".join(failures))


def _refuse_spaced_doc_ids(config: Path, index_dir: Optional[Path], settings: Sequence[str]) -> None:
    """Before an evaluation with --run-out: a document id with whitespace in the index would make the run file
    unwritable once every query has run (a TREC run line cannot hold it), so it is refused now, naming it."""
    from engine.index import Index
    from engine.pipeline import Pipeline

    index_path = Pipeline.from_file(config, index_path=index_dir, settings=settings).index_path
    if index_path is None:
        return
    index = Index.open(Path(index_path), verify=False)
    try:
        spaced = next((doc_id for doc_id in index.doc_ids() if any(ch.isspace() for ch in doc_id)), None)
    finally:
        index.close()
    if spaced is not None:
        raise SieveError(f"--run-out: the index at {index_path} holds the document id {spaced!r}, with whitespace, "
                         "which a TREC run line cannot hold: the run file could not be written; evaluate without "
                         "--run-out (the figures and --json-out are not affected), or rebuild with ids without spaces")


_LIMIT_HELP = "only the first N judged queries, in natural order of id (2 before 10, q2 before q10)"
_SPLIT_HELP = "qrels split: qrels/<split>.tsv (BEIR or TREC qrels); a plain name (letters, digits, '.', '_', '-')"


@app.command("eval")
def eval_command(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="BEIR data set directory (corpus.jsonl, queries, qrels/)")],
    split: Annotated[str, typer.Option(help=_SPLIT_HELP)] = "test",
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="override the config's index")] = None,
    limit: Annotated[Optional[int], typer.Option(help=_LIMIT_HELP)] = None,
    recall_k: Annotated[int, typer.Option("--recall-k", help="Recall@k reported besides Recall@100")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON (pytrec_eval metric names)")] = False,
    per_query: Annotated[bool, typer.Option("--per-query", help="with --json or --json-out: include per-query "
                                            "figures")] = False,
    run_out: Annotated[Optional[Path], typer.Option("--run-out", help="save the run (TREC format) for compare/reuse")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json-out", help="also write the JSON report to this file")] = None,
    trace_log: Annotated[Optional[Path], typer.Option(
        "--trace-log", help="append every query's trace to this hash-chained log (for audit: sieve replay / sieve report --seq)")] = None,
    user: UserOption = None,
    role: RoleOption = None,
    group: GroupOption = None,
    jurisdiction: JurisdictionOption = None,
    attribute: AttributeOption = None,
    as_of: EvalAsOfOption = None,
    settings: SetOption = None,
) -> None:
    """Evaluate a pipeline on a BEIR split: nDCG@10, MRR@10, Recall@k, MAP (pytrec_eval) and latency.

    Every query is asked as the user the options name (default: anonymous) at one time (--as-of, default: when
    the evaluation starts); the report records both. The figures are printed first, then --run-out and
    --json-out are written (atomically): a file that cannot be written is an error that leaves the printed
    figures complete, and output that cannot be printed (a closed pipe) still leaves the files written."""
    from engine.evaluation import coverage_warnings, index_membership, judgement_coverage, load_beir, write_trec_run
    from engine.trace import write_json_atomic
    from engine.workbench.evaluate import ordered_metric_names

    if per_query and not as_json and json_out is None:
        raise SieveError("--per-query adds per-query figures to the JSON: give it with --json or --json-out")
    _output_file(run_out, "--run-out")
    _output_file(json_out, "--json-out")
    data = load_beir(dataset, split)
    if run_out is not None:
        chosen = list(data.queries)[:limit] if limit is not None and limit >= 1 else list(data.queries)
        spaced = next((qid for qid in chosen if not qid or any(ch.isspace() for ch in qid)), None)
        if spaced is not None:
            raise SieveError(f"--run-out: query id {spaced!r} contains whitespace, which a TREC run line cannot hold")
        _refuse_spaced_doc_ids(config, index_dir, settings or ())
    asked = _AskedAs.parse(user, role, group, jurisdiction, attribute, as_of)
    report = _run_eval(config, dataset, split, index_dir, limit, recall_k, f"eval {config.name}", trace_log, data, asked,
                       settings or ())
    index = report.index or {}
    qrels = {qid: data.qrels[qid] for qid in report.per_query}
    with index_membership(index.get("path")) as in_index:
        coverage = judgement_coverage(report.run, qrels, data.qrels, in_index)
    if run_out is not None:
        report.run_file = str(run_out)
    document = report.to_json(per_query=per_query)
    document["qrels_format"] = data.qrels_format
    document["judgements"] = {**coverage, "index": index.get("path")}
    tag = "".join("_" if ch.isspace() else ch for ch in (report.pipeline_name or config.stem)) or "sieve"
    with _printing_then_writing([
        ("--run-out", run_out, lambda: write_trec_run(report.run, run_out, tag=tag), f"run written to {run_out}"),
        ("--json-out", json_out, lambda: write_json_atomic(json_out, document), None),
    ], quiet=as_json):
        _print_warnings([*coverage_warnings(coverage, index=index.get("path")), report.degraded_warning(),
                         report.empty_warning()])
        if as_json:
            print_json(document)
        else:
            out.print(
                f"[bold]{shown(report.pipeline_name or str(config))}[/bold] on {shown(str(dataset))} ({shown(split)}, "
                f"{report.queries} queries; qrels: {shown(data.qrels_format)}); config {report.config_sha256[:12]}, "
                f"index {str(index.get('manifest_sha256', '-'))[:12]}; asked as {shown(_who(report.asked_as['user']))} "
                f"at {shown(report.asked_as['as_of'])}"
                + (f"; with --set {shown(', '.join(report.settings))}" if report.settings else "")
            )
            metrics = Table(title="retrieval quality (pytrec_eval)")
            metrics.add_column("metric")
            metrics.add_column("value", justify="right")
            for name in ordered_metric_names(list(report.metrics)):
                metrics.add_row(name, f"{report.metrics[name]:.4f}")
            out.print(metrics)
            routed = any("bypassed" in figures for figures in report.stage_latency_ms.values())
            latency = Table(title="latency per query (ms)" + (", of the queries each stage ran for" if routed else ""))
            for column in ("stage", "type", "p50", "p95", "mean") + (("ran",) if routed else ()):
                latency.add_column(column, justify="left" if column in ("stage", "type") else "right")
            for stage_id, figures in report.stage_latency_ms.items():
                ran = (f"{figures.get('count', 0)} of {report.queries}",) if routed else ()
                latency.add_row(stage_id, figures["type"], f"{figures['p50']:.2f}", f"{figures['p95']:.2f}",
                                f"{figures['mean']:.2f}", *ran)
            overall = report.latency_ms
            latency.add_row("[bold]total[/bold]", "", f"{overall['p50']:.2f}", f"{overall['p95']:.2f}", f"{overall['mean']:.2f}",
                            *(("",) if routed else ()))
            out.print(latency)


@app.command("batch")
def batch_command(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    queries_file: Annotated[Path, typer.Argument(help="JSONL, a query a line: {\"id\", \"text\"} and optionally "
                                                 "\"history\", \"user\", \"as_of\", \"language\"; or a BEIR queries.jsonl")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="results JSONL, a line per query in input order "
                                           "(written as OUT.partial, renamed when every query is done)")],
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted batch's OUT.partial (its config, "
                                         "index, queries, --top, default user and trace log must be the same, and "
                                         "the log must still hold its traces)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT (once the new one is "
                                            "complete); without --resume, discard an interrupted batch's "
                                            "OUT.partial")] = False,
    top: Annotated[Optional[int], typer.Option("--top", min=1, help="write each query's first N results (default: "
                                               "all the pipeline returns)")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="queries run at once, on threads sharing "
                                         "one pipeline; lines are still written in input order")] = 1,
    user: UserOption = None,
    role: RoleOption = None,
    group: GroupOption = None,
    jurisdiction: JurisdictionOption = None,
    attribute: AttributeOption = None,
    as_of: Annotated[Optional[str], typer.Option(
        "--as-of", help="query time, ISO 8601, for the lines that give none (default: when the batch starts, one "
        "time for all; a resumed batch keeps its own)")] = None,
    index_dir: IndexOption = None,
    settings: SetOption = None,
    log: Annotated[Optional[Path], typer.Option("--log", help="trace log (default: the config's trace.log)")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="do not append the traces to a log")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run a file of queries through one pipeline, offline: a results line per query, each trace logged.

    The whole file is checked first (every problem at once, FILE:LINE; nothing runs). A query whose run fails
    (a stage under on_error: fail) gets an error line and the batch goes on (exit 1 at the end). Ctrl-C or
    SIGTERM stop after the line in hand, leaving OUT.partial for --resume. The user options and --as-of are the
    defaults for lines that give no user or as_of."""
    from engine.index import manifest_sha256_of
    from engine.pipeline import Pipeline
    from engine.stage import Port
    from engine.trace import TraceLog, atomic_write_target, write_json_atomic
    from engine.workbench import batch

    if log is not None and no_log:
        raise SieveError("--log and --no-log together: give one")
    _output_file(out_file, "--out")
    target = atomic_write_target(out_file)  # through a symlink: its target (the partial file goes beside it)
    partial, sidecar = batch.partial_path(target), batch.sidecar_path(target)
    written_to = {os.path.realpath(p) for p in (target, partial, sidecar)}

    def check_log_path(path: Path, option: str) -> None:
        """The checks --log and the config's trace.log both get, before any work."""
        if os.path.realpath(path) in written_to:
            raise SieveError(f"--out {out_file} would write over {option} {path}")
        if os.path.realpath(path) == os.path.realpath(queries_file):
            raise SieveError(f"{option} {path} is the queries file: the traces would be appended to it")
        _writable_file(path, option, appended=True)

    if os.path.realpath(queries_file) in written_to:
        raise SieveError(f"--out {out_file} would write over the queries file {queries_file}")
    if log is not None:
        check_log_path(log, "--log")
    if partial.exists() and batch.partial_in_use(partial):  # running, not interrupted: whatever was asked
        raise SieveError(batch.in_use_message(partial))
    if target.exists() and not overwrite:
        raise SieveError(f"--out {out_file} exists (a finished batch's results): give --overwrite to replace it (it "
                         "is replaced only once the new batch is complete), or another --out")
    # An empty partial file (with its sidecar, or not) is a batch stopped before its first line, SIGTERM or SIGKILL
    # in its warm-up: nothing to resume or lose, so it is started again.
    interrupted = partial.exists() and partial.stat().st_size > 0
    if interrupted and not resume and not overwrite:
        raise SieveError(f"a previous batch writing {out_file} was interrupted: {partial} holds the results it wrote. "
                         "Continue it with the same command and --resume, or discard it with --overwrite")
    recorded = batch.read_sidecar(target) if interrupted and resume else None
    if resume and recorded is None:
        none = "it holds no line" if partial.exists() else "no such file"
        err.print(f"[dim]no interrupted batch to resume ({shown(str(partial))}: {none}): starting the batch[/dim]")
    asked = _AskedAs.parse(user, role, group, jurisdiction, attribute, as_of)
    default_as_of = asked.as_of
    if default_as_of is None and recorded is not None:
        default_as_of = _parse_time(recorded.get("as_of"), f"the as_of recorded in {sidecar}")
    if default_as_of is None:
        default_as_of = datetime.now(timezone.utc)  # one time for the whole batch: reproducible results
    if default_as_of.tzinfo is None:
        default_as_of = default_as_of.replace(tzinfo=timezone.utc)  # as a query reads it

    pipeline = Pipeline.from_file(config, index_path=index_dir, settings=settings or ())
    trace_log = batch.trace_log_target(pipeline, log, no_log)
    if trace_log is not None:
        option = "--log" if log is not None else "the config's trace.log"
        if log is None:
            check_log_path(trace_log, option)  # as --log's, before the warm-up rather than at the first query
        try:
            TraceLog(trace_log).check_appendable()  # and where it ends: a log removed mid-run is then noticed
        except SieveError as exc:
            raise SieveError(f"{option}: {exc}") from None
    queries = batch.read_queries(queries_file, pipeline, asked.user, default_as_of)
    if queries.with_history and not any(stage.produces is Port.QUERY for stage in pipeline.compiled.stages.values()):
        err.print(f"[yellow]warning:[/yellow] {queries.with_history} queries give a history, but this pipeline has no "
                  "query-rewriting stage (rewrite.coreference): it is recorded in the traces but does not change the "
                  "queries")
    manifest = manifest_sha256_of(Path(pipeline.index_path)) if pipeline.index_path is not None else None
    identity = batch.batch_identity(queries, pipeline, manifest, asked.user, default_as_of, top, trace_log)
    if recorded is not None:
        differences = batch.sidecar_differences(recorded, identity)
        if differences:
            raise SieveError(f"cannot resume {partial}: " + "; ".join(differences) + ". Resume it with what it "
                             "started with, or discard it with --overwrite")

    partial.parent.mkdir(parents=True, exist_ok=True)
    fd = batch.lock_partial(partial, fresh=recorded is None)
    written = batch.Written()
    running = False  # once queries run, a failure keeps what was written, for --resume
    try:
        if target.exists() and not overwrite:  # again, holding the lock: another batch may have finished meanwhile
            raise SieveError(f"--out {out_file} exists: another batch finished it while this one started; give "
                             "--overwrite to replace it, or another --out")
        if recorded is None:
            _write_output("the batch's sidecar", sidecar, lambda: write_json_atomic(sidecar, identity),
                          "no query was run")
        else:
            written = batch.read_partial(fd, partial, queries)
            if trace_log is not None:
                batch.check_logged(written, trace_log, partial)  # the traces of the lines written are in that log
        pipeline.warm_up()
        _print_warnings([*_config_warnings(pipeline), *pipeline.warnings])
        index = pipeline.resources.index if pipeline.resources is not None else None
        if index is not None and manifest is not None and index.manifest_sha256 != manifest:
            raise SieveError(f"the index at {index.path} was rebuilt while the batch started (manifest {manifest[:12]} "
                             f"then {index.manifest_sha256[:12]}); run the batch again")
        label = f"batch {queries_file.name}"
        running = True
        with batch.stop_on_signals() as stop, _progress_bar(label) as progress:
            task = progress.add_task(label, total=len(queries.ids), completed=written.lines)
            summary = batch.run_batch(
                pipeline, queries, target, fd, written, default_user=asked.user, default_as_of=default_as_of, top=top,
                workers=workers, log=log, no_log=no_log, stop=stop, progress=lambda step: progress.advance(task, step))
    except BaseException as exc:
        if recorded is None and os.fstat(fd).st_size == 0:  # nothing written: leave nothing behind
            for path in (partial, sidecar):
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        if not running or isinstance(exc, batch.PartialLost):  # PartialLost says what was lost
            raise
        gone = batch.partial_problem(fd, partial)
        if gone is not None:
            keep = (f"{partial} is gone ({gone}): the results written to it are lost; run the batch again (without "
                    "--resume)")
        else:
            keep = f"the results written so far are kept in {partial}: continue with the same command and --resume"
        if isinstance(exc, SieveError):
            kept = SieveError(f"{exc}\n{keep}")
            kept.exit_code = exc.exit_code
            raise kept from None
        err.print(f"[yellow]{shown(keep)}[/yellow]")
        raise
    finally:
        os.close(fd)

    document = summary.to_json()
    if as_json:
        print_json(document)
    else:
        latency = summary.latency_ms
        out.print(
            f"{summary.queries} queries: {summary.run} run, {summary.resumed} resumed (already written), "
            f"{'[red]' if summary.failed else ''}{summary.failed} failed{'[/red]' if summary.failed else ''}, "
            f"{summary.empty} empty, {summary.degraded} degraded; latency per query run p50 {latency['p50']:.2f} ms, "
            f"p95 {latency['p95']:.2f}, mean {latency['mean']:.2f} ({summary.wall_s:.1f} s, {summary.workers} "
            f"worker{'s' if summary.workers != 1 else ''})")
        out.print(f"asked as {shown(_who(summary.user))} at {shown(summary.as_of)} (for the lines giving none); "
                  f"traces: {shown(summary.trace_log) if summary.trace_log else 'not logged'}")
        for failure in summary.failures:
            out.print(f"[red]✗[/red] {shown(failure['id'], lines=False)} ({shown(str(queries_file))}:{failure['line']}): "
                      f"{shown(failure['error'])}")
        if summary.failed > len(summary.failures):
            out.print(f"  ... and {summary.failed - len(summary.failures)} more failed (their lines hold \"error\")")
        if summary.complete:
            out.print(f"[green]✓[/green] results written to {shown(str(out_file))}")
    if not summary.complete:
        err.print(f"[yellow]stopped by {summary.stopped_by}[/yellow] after {summary.resumed + summary.run} of "
                  f"{summary.queries} queries: the results so far are in {shown(str(partial))}; continue with the "
                  "same command and --resume")
        raise typer.Exit(143 if summary.stopped_by == "SIGTERM" else 130)
    if summary.failed:
        err.print(f"[red]error:[/red] {summary.failed} of {summary.queries} queries failed (their lines in "
                  f"{shown(str(out_file))} hold \"error\" and no results)")
        raise typer.Exit(1)


@app.command("sweep")
def sweep_command(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="BEIR data set directory (corpus.jsonl, queries, qrels/)")],
    settings: Annotated[list[str], typer.Option(
        "--set", help="PATH=VALUES: a config setting by dotted path (stages by id: stages.blend.params.weights.rerank) "
        "and the values to try, one YAML value or a YAML list ([0.5, 0.65, 0.8]); repeat for a grid")],
    split: Annotated[str, typer.Option(help="the tuning split (qrels/<split>.tsv); test is refused without --allow-test")] = "train",
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="override the config's index")] = None,
    limit: Annotated[Optional[int], typer.Option(help=_LIMIT_HELP)] = None,
    metric: Annotated[str, typer.Option(help="the measure variants are ranked by (pytrec_eval spelling)")] = "ndcg_cut_10",
    recall_k: Annotated[int, typer.Option("--recall-k", help="Recall@k computed besides Recall@100")] = 10,
    allow_test: Annotated[bool, typer.Option("--allow-test", help="tune on the test split anyway (its figures then "
                                             "measure nothing)")] = False,
    best_out: Annotated[Optional[Path], typer.Option("--best-out", help="write the best variant's config here, beside "
                                                     "CONFIG")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json-out", help="also write the JSON report to this file")] = None,
    user: UserOption = None,
    role: RoleOption = None,
    group: GroupOption = None,
    jurisdiction: JurisdictionOption = None,
    attribute: AttributeOption = None,
    as_of: EvalAsOfOption = None,
) -> None:
    """Tune by configuration: evaluate every combination of --set values next to the config as written, on a
    tuning split, best first, with a paired test of the best against the config as written. Models and index
    components are loaded once for all variants. Confirm the chosen config once on held-out queries."""
    from engine.trace import write_json_atomic
    from engine.workbench.evaluate import PRIMARY
    from engine.workbench.sweep import check_best_out, parse_setting, sweep, write_best

    parsed = [parse_setting(text) for text in settings]
    asked = _AskedAs.parse(user, role, group, jurisdiction, attribute, as_of)
    _output_file(json_out, "--json-out")
    if best_out is not None:  # before hours of evaluation, not after
        check_best_out(config, best_out)
        _output_file(best_out, "--best-out")
    with _progress_bar(f"sweep {config.name}") as progress:
        task = progress.add_task(f"sweep {config.name}", total=None)

        def on_variant(number: int, total: int, chosen: dict[str, Any]) -> None:
            what = ", ".join(f"{_setting_label(p)}={json.dumps(v, default=str)}" for p, v in chosen.items())
            progress.update(task, total=total, completed=number - 1,
                            description=f"variant {number}/{total}: {what or 'as written'}")

        report = sweep(config, dataset, parsed, split=split, index_path=index_dir, limit=limit, metric=metric,
                       recall_k=recall_k, allow_test=allow_test, on_variant=on_variant, user=asked.user,
                       as_of=asked.as_of)
        progress.update(task, completed=len(report.variants) + 1)
    document = report.to_json()
    with _printing_then_writing([
        ("--best-out", best_out, lambda: write_best(report, config, best_out), f"best config written to {best_out}"),
        ("--json-out", json_out, lambda: write_json_atomic(json_out, document), None),
    ], quiet=as_json):
        if as_json:
            print_json(document)
        else:
            out.print(f"[bold]{shown(config.name)}[/bold] on {shown(str(dataset))} ({shown(split)}, {report.queries} "
                      f"queries): {len(report.variants)} variants and the config as written, by {shown(metric)}")
            table = Table()
            paths = [s.path for s in parsed]
            short = {p: _setting_label(p) for p in paths}
            columns = [metric] + [m for m in PRIMARY if m != metric]
            for path in paths:
                table.add_column(shown(short[path]))
            for name in columns:
                table.add_column(shown(name), justify="right")
            rows = [(v, False) for v in report.variants] + [(report.baseline, True)]
            for variant, written in rows:
                cells = ["(as written)" if written else shown(json.dumps(variant.settings[p], default=str)) for p in paths]
                figures = (["failed"] + [""] * (len(columns) - 1) if variant.error is not None else
                           [f"{variant.metrics.get(m, 0.0):.4f}" for m in columns])
                style = "bold" if variant is report.best and report.improves else None
                table.add_row(*cells, *figures, style=style)
            out.print(table)
            paired = report.best_vs_baseline
            out.print(f"best vs as written: {paired['difference']:+.4f} {shown(metric)} ({paired['wins']} queries "
                      f"better, {paired['losses']} worse; randomisation p "
                      f"{'-' if paired['randomisation_p'] is None else format(paired['randomisation_p'], '.4f')}): "
                      f"{_verdict(paired['difference'], paired['randomisation_p'], 'the best variant', 'the config as written')}")
            out.print(f"[dim]{shown(report.note())}[/dim]")
        _print_warnings(report.warnings())


def _setting_label(path: str) -> str:
    """A sweep column's heading: the setting without ``stages.`` and ``params.`` but with its stage's id
    (``rerank.enabled``, ``dedup.threshold``): two stages' ``enabled`` stay apart."""
    parts = path.split(".")
    if parts[0] == "stages" and len(parts) > 2:
        parts = [parts[1]] + (parts[3:] if parts[2] == "params" and len(parts) > 3 else parts[2:])
    return ".".join(parts)


@app.command("schema")
def schema_command(
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the schema here instead of stdout")] = None,
    human: Annotated[bool, typer.Option("--human", help="a parameter reference to read (name, type, default, allowed "
                                        "values, description of every pipeline setting, stage parameter and index "
                                        "setting) instead of the JSON Schema")] = False,
    stage: Annotated[Optional[str], typer.Option("--stage", help="the reference of one stage type "
                                                 "(rerank.cross_encoder, recall.bm25@1); implies --human")] = None,
    component: Annotated[Optional[str], typer.Option("--component", help="the reference of one index component's "
                                                     "settings (bm25, dense, entities), set by sieve index --settings; "
                                                     "implies --human")] = None,
) -> None:
    """Print the JSON Schema of pipeline configs (every registered stage type's params), for editors."""
    from engine.trace import write_json_atomic
    from engine.workbench.schema import pipeline_json_schema

    _writable_file(out_file, "--out")
    if human or stage is not None or component is not None:
        from engine.trace import write_text_atomic
        from engine.workbench.reference import render_reference

        text = render_reference(stage=stage, component=component)
        if out_file is None:
            sys.stdout.write(text)
        else:
            write_text_atomic(out_file, text)
            err.print(f"[green]✓[/green] parameter reference written to {shown(str(out_file))}")
        return
    schema = pipeline_json_schema()
    if out_file is None:
        sys.stdout.write(json.dumps(schema, indent=2) + "\n")
        return
    write_json_atomic(out_file, schema)
    branches = len(schema["else"]["properties"]["stages"]["items"]["oneOf"])  # a complete config's stage union
    err.print(f"[green]✓[/green] schema with {branches} stage types written to {shown(str(out_file))}")


@app.command("explain")
def explain_command(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    query: QueryArgument,
    docs: Annotated[Optional[list[str]], typer.Option("--doc", help="why not this document? (repeatable)")] = None,
    history: HistoryOption = None,
    history_file: HistoryFileOption = None,
    user: UserOption = None,
    role: RoleOption = None,
    group: GroupOption = None,
    jurisdiction: JurisdictionOption = None,
    attribute: AttributeOption = None,
    as_of: AsOfOption = None,
    index_dir: IndexOption = None,
    settings: SetOption = None,
    top: Annotated[Optional[int], typer.Option(help="explain only the first N results (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print explanations and verdicts as JSON")] = False,
    trace_out: Annotated[Optional[Path], typer.Option("--trace-out", help="also write the trace to this file")] = None,
) -> None:
    """Explain a query's ranking: each result's score tree, rules fired, dedup merges; and why a --doc was not returned."""
    from engine.trace import write_json_atomic
    from engine.workbench.inspect import (
        InspectingPipeline, dedup_merges, explain_report, rules_fired, signal_contributions, why_not,
    )

    _output_file(trace_out, "--trace-out")  # a FIFO, a device or this process's stdout: refused before the query runs
    if top is not None and top < 0:
        raise SieveError(f"--top must be 0 or more, got {top}")
    query, history = _asked(query, history, history_file)
    pipeline = InspectingPipeline.from_file(config, index_path=index_dir, settings=settings or ())
    if not pipeline.compiled.config.trace.explain:
        err.print("[yellow]trace.explain is off in this config: results carry no explanation trees[/yellow]")
    asked = _make_query(pipeline, query, history, user, role, group, jurisdiction, as_of, attribute)
    result = pipeline.run(asked)
    _print_warnings([*_config_warnings(pipeline), *pipeline.warnings, *_unheld_user_values(pipeline, asked)])
    trace = result.trace
    if trace_out is not None:
        _write_output("--trace-out", trace_out, lambda: write_json_atomic(trace_out, trace),
                      "the explanation was not printed")
    records = trace["results"] if top is None else trace["results"][:top]
    verdicts = [why_not(pipeline, result, doc_id) for doc_id in (docs or [])]
    if as_json:
        print_json(explain_report(trace, verdicts, top))
        return
    _print_results(pipeline, result.results, trace, explain=False)
    for record in records:
        tree = Tree(f"[bold]#{record['rank']} {shown(record['doc_id'], lines=False)}[/bold]  score {record['score']:.6g}")
        if "explanation" in record:
            _add_explanation(tree, record["explanation"])
        contributions = signal_contributions(record.get("explanation") or {})
        if contributions:
            parts = tree.add("signals (raw -> normalised -> weighted)")
            for part in contributions:
                raw = "-" if part["raw"] is None else f"{part['raw']:.4g}"
                parts.add(f"{shown(part['signal'])}: raw {raw} -> {part['normalised']:.4f} ({shown(part['method'])}) "
                          f"-> {part['weight']:g} x = [bold]{part['weighted']:.4f}[/bold]")
        for firing in rules_fired(trace, record["doc_id"]):
            tree.add(f"rule [bold]{shown(firing['rule'])}[/bold] fired ({shown(firing.get('action', ''))}, stage "
                     f"'{shown(firing['stage'])}'): {shown(str(firing.get('effect', '')))}, rank "
                     f"{firing.get('rank_before')} -> {firing.get('rank_after')}")
        for merge in dedup_merges(trace, record["doc_id"]):
            tree.add(f"absorbed near-duplicate {shown(merge['absorbed'], lines=False)} (similarity {merge['similarity']:.4f}, "
                     f"stage '{shown(merge['stage'])}')")
        out.print(tree, soft_wrap=False)
    for verdict in verdicts:
        colour = "green" if verdict.status == "returned" else "yellow"
        out.print(f"\n[bold]why not {shown(verdict.doc_id, lines=False)}?[/bold] [{colour}]{verdict.status}[/{colour}]: "
                  f"{shown(verdict.message)}")
        if verdict.journey:
            table = Table(title=f"{shown(verdict.doc_id, lines=False)} stage by stage")
            for column in ("stage", "type", "rank", "score", "of"):
                table.add_column(column, justify="right" if column in ("rank", "score", "of") else "left")
            for step in verdict.journey:
                table.add_row(shown(step.stage), shown(step.type), "-" if step.rank is None else str(step.rank),
                              "-" if step.score is None else f"{step.score:.6g}", str(step.of))
            out.print(table)


@contextlib.contextmanager
def _which_side(label: str, path: Path) -> Iterator[None]:
    """A side's failure names the side: a --set naming what only one config has, say. A config error is located
    already (its file, or --set PATH, says which config)."""
    try:
        yield
    except ConfigError:
        raise
    except SieveError as exc:
        raise SieveError(f"{label} ({path}): {exc}") from exc


@app.command("compare")
def compare_command(
    a: Annotated[Path, typer.Argument(help="A: pipeline YAML, or a saved TREC run file")],
    b: Annotated[Path, typer.Argument(help="B: pipeline YAML, or a saved TREC run file")],
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="BEIR data set directory (queries, qrels/)")],
    split: Annotated[str, typer.Option(help=_SPLIT_HELP)] = "test",
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="override both configs' index")] = None,
    config_a: Annotated[Optional[Path], typer.Option("--config-a", help="when A is a run file: its config, to explain moves")] = None,
    config_b: Annotated[Optional[Path], typer.Option("--config-b", help="when B is a run file: its config, to explain moves")] = None,
    limit: Annotated[Optional[int], typer.Option(help=_LIMIT_HELP)] = None,
    recall_k: Annotated[int, typer.Option("--recall-k", help="Recall@k reported besides Recall@100")] = 10,
    most_changed: Annotated[int, typer.Option("--most-changed", help="document-level diffs for this many queries")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the comparison as markdown")] = False,
    user: UserOption = None,
    role: RoleOption = None,
    group: GroupOption = None,
    jurisdiction: JurisdictionOption = None,
    attribute: AttributeOption = None,
    as_of: EvalAsOfOption = None,
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", help="PATH=VALUE: override a setting in both configs for this run (as for eval); repeatable")] = None,
) -> None:
    """Compare two pipelines or runs: metric deltas with paired significance tests, wins/losses, document moves.
    Both configs' queries are asked as the same user at the same time (the options, as for eval)."""
    from engine.workbench.compare import Side, compare, is_config, load_run_side, to_markdown

    if as_json and markdown:
        raise SieveError("--json and --markdown together: give one")
    if most_changed < 0:
        raise SieveError(f"--most-changed must be 0 or more, got {most_changed}")
    if limit is not None and limit < 1:
        raise SieveError(f"--limit must be at least 1, got {limit}")
    asked = _AskedAs.parse(user, role, group, jurisdiction, attribute, as_of)
    if asked.as_of is None:  # one time for both sides, not each side's start
        asked = _AskedAs(asked.user, datetime.now(timezone.utc))
    # Everything either side needs is read and checked before A runs: a B that does not compile (or a data set that
    # is not there) is said at once, not after A's whole evaluation
    from engine.evaluation import load_beir
    from engine.pipeline import Pipeline

    data = load_beir(dataset, split)
    named = (("A", a, config_a), ("B", b, config_b))
    run_sides: dict[str, Side] = {}
    for label, path, extra_config in named:
        if not is_config(path):
            run_sides[label] = load_run_side(path, extra_config, index_dir)
            continue
        if extra_config is not None:
            raise SieveError(f"--config-{label.lower()} is for a run file, but {label} is already a config ({path})")
        with _which_side(label, path):
            Pipeline.from_file(path, index_path=index_dir, settings=settings or ())
    sides = []
    judged_index = index_dir  # the index the judgement coverage is checked against: --index, else a config's
    for label, path, _ in named:
        if label in run_sides:
            sides.append(run_sides[label])
        else:
            with _which_side(label, path):
                report = _run_eval(path, dataset, split, index_dir, limit, recall_k, f"{label}: {path.name}",
                                   data=data, asked=asked, settings=settings or ())
            empty = report.empty_warning()
            if empty:
                err.print(f"[yellow]warning:[/yellow] {label}: {shown(empty)}")
            if judged_index is None and report.index is not None:
                judged_index = Path(report.index["path"])
            sides.append(Side(path.name, report.run, "config", path, index_dir))
    if sides[0].label == sides[1].label:
        sides[0].label, sides[1].label = f"A:{sides[0].label}", f"B:{sides[1].label}"
    comparison = compare(sides[0], sides[1], dataset, split=split, recall_k=recall_k, most_changed=most_changed,
                         limit=limit, index_path=judged_index)
    _print_warnings(comparison.warnings)
    if as_json:
        print_json({**comparison.to_json(), "settings": list(settings or ())})
        return
    if markdown:
        command = [f"sieve compare {a} {b} --dataset {dataset} --split {split}"]
        for flag, value in (("--index", index_dir), ("--config-a", config_a), ("--config-b", config_b),
                            ("--limit", limit), ("--recall-k", recall_k), ("--most-changed", most_changed)):
            if value is not None:
                command.append(f"{flag} {value}")
        command += [f"--set '{setting}'" for setting in settings or ()]
        sys.stdout.write(to_markdown(comparison, " ".join(command) + " --markdown"))
        return
    out.print(f"A = [bold]{shown(sides[0].label)}[/bold], B = [bold]{shown(sides[1].label)}[/bold] on "
              f"{shown(str(dataset))} ({shown(split)}, {comparison.queries} queries; qrels: "
              f"{shown(comparison.qrels_format or '-')})"
              + (f"; both configs with --set {shown(', '.join(settings))}" if settings else ""))
    table = Table(title="B - A; p: paired t-test (t) and paired randomisation test (rand), two-sided; "
                  "wins/losses: queries where B is better/worse")
    for column in ("metric", "A", "B", "delta", "p(t)", "p(rand)", "wins", "losses", "ties"):
        table.add_column(column, justify="left" if column == "metric" else "right", no_wrap=True)
    for m in comparison.metrics:
        colour = "green" if m.delta > 0 else "red" if m.delta < 0 else "white"
        table.add_row(m.metric, f"{m.mean_a:.4f}", f"{m.mean_b:.4f}", f"[{colour}]{m.delta:+.4f}[/{colour}]",
                      "n/a" if m.t_test_p is None else f"{m.t_test_p:.4f}",
                      "n/a" if m.randomisation_p is None else f"{m.randomisation_p:.4f}", str(m.wins), str(m.losses), str(m.ties))
    # Nine columns: never crop a p-value on a narrow terminal or piped output (rich assumes 80 there).
    make_console(highlight=False, soft_wrap=True, emoji=False, width=max(out.width, 110)).print(table)
    primary = next((m for m in comparison.metrics if m.metric == "ndcg_cut_10"), None)
    if primary is not None:
        out.print(f"ndcg_cut_10: {_verdict(primary.delta, primary.randomisation_p, 'B', 'A')}")
    for diff in comparison.diffs:
        out.print(f"\n[bold]query {shown(diff.qid, lines=False)}[/bold] ndcg@10 {diff.score_a:.3f} -> {diff.score_b:.3f}: {shown(diff.text, lines=False)}")
        if diff.note:
            out.print(f"[yellow]{shown(diff.note)}[/yellow]")
        for move in diff.moves:
            where = f"{move.rank_a if move.rank_a is not None else '-'} -> {move.rank_b if move.rank_b is not None else '-'}"
            mark = "[green]relevant[/green]" if move.relevance else "[dim]not relevant[/dim]"
            reasons = "; ".join(move.reasons) if move.reasons else "no explanation (no config for this side)"
            out.print(f"  doc {shown(move.doc_id, lines=False)} ({mark}) moved {where}: {shown(reasons)}")


@app.command("report")
def report_command(
    trace_path: Annotated[Path, typer.Argument(help="a trace .json file (--trace-out), or a trace log .jsonl")],
    html: Annotated[Path, typer.Option("--html", help="write the HTML report here")],
    trace_id: Annotated[Optional[str], typer.Option("--id", help="trace id within a log (default: last)")] = None,
    seq: Annotated[Optional[int], typer.Option("--seq", help="record number within a log")] = None,
    log: Annotated[Optional[Path], typer.Option(
        "--log", help="the trace log a standalone trace file was appended to (default: the path it records)")] = None,
    expect_head: ExpectHeadOption = None,
) -> None:
    """Render a trace as a static HTML report: stages and timings, score bars, rules, drops, hashes."""
    from engine.trace import load_trace_checked
    from engine.workbench.report import write_report

    if trace_path.suffix != ".jsonl" and (trace_id is not None or seq is not None):
        raise SieveError("--id and --seq select a record in a trace log (.jsonl); a .json file holds one trace")
    _output_file(html, "--html")
    trace, source = load_trace_checked(trace_path, trace_id, seq, log, expect_head=expect_head)
    _write_output("--html", html, lambda: write_report(trace, html, source=source),
                  "a report there before is unchanged")
    if not source.verified:
        err.print(f"[yellow]{shown(source.message)}[/yellow] (the report says so at its top)")
    out.print(f"[green]✓[/green] report for trace {shown(trace.get('trace_id'), lines=False)} written to {shown(str(html))}")


@app.command()
def serve(
    configs: Annotated[list[Path], typer.Argument(help="pipeline YAML files, each served under its name")],
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    body_timeout: Annotated[float, typer.Option(
        help="seconds a request body may take to arrive whole (then 408)", min=0.1)] = 30.0,
    shutdown_grace: Annotated[float, typer.Option(
        help="seconds in-flight requests get after SIGTERM/SIGINT before the server exits anyway", min=0.0)] = 30.0,
    limit_concurrency: Annotated[int, typer.Option(
        help="connections and requests at once before new ones get 503 (0: no limit)", min=0)] = 512,
) -> None:
    """Serve pipelines over HTTP (JSON API: POST /v1/pipelines/{name}/search and .../explain, GET /v1/pipelines,
    /healthz, /readyz, and GET /metrics for Prometheus)."""
    import importlib.util

    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(module, "sieve-retrieval[server]", "sieve serve")
    from engine.server import serve as run_server

    run_server(configs, host, port, log_level, body_timeout=body_timeout, shutdown_grace=shutdown_grace,
               limit_concurrency=limit_concurrency or None)


# Typer >= 0.2x raises the usage errors of its own copy of click, which are not click's classes, and needs no click
# installed; an older one raises click's
try:
    import click

    _USAGE_ERRORS: tuple[type[Exception], ...] = (click.exceptions.ClickException,)
    _ABORTS: tuple[type[BaseException], ...] = (click.exceptions.Abort, typer.Abort)
except ImportError:
    _USAGE_ERRORS, _ABORTS = (), (typer.Abort,)
_USAGE_ERRORS += tuple(c for c in (getattr(typer, "TyperException", None),) if c is not None)


# Exit statuses beyond a command's own (0 done; 1 a negative verdict: replay different, verify found problems,
# failed queries or rule tests; 2 bad input or usage; 130 interrupted; 141 stdout's reader went away,
# engine.console.EXIT_PIPE_CLOSED), listed in README's "The command line as a process"
EXIT_IO_ERROR = 74  # sysexits' EX_IOERR: output could not be written (a full disk under stdout)
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: a bug in Sieve


def main() -> None:
    """Entry point: runs the CLI, turning every Sieve error into a message and an exit code."""
    # Model libraries' own download/loading bars would interleave with Sieve's output; a user
    # who wants them sets the variable to 0.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    utf8_or_escaped()
    try:
        code = app(standalone_mode=False)
    except SieveError as exc:
        err.print(f"[red]error:[/red] {shown(str(exc))}")
        sys.exit(exc.exit_code)
    except _USAGE_ERRORS as exc:  # usage: unknown command, missing argument
        if hasattr(exc, "show"):
            exc.show()
        else:
            err.print(f"[red]error:[/red] {shown(exc.format_message())}")
        sys.exit(exc.exit_code)
    except _ABORTS:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit as exc:
        if type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):  # typer's answer to a reader closing the pipe
            sys.exit(EXIT_PIPE_CLOSED)
        raise exc
    except OSError as exc:  # the environment, not a bug: stdout on a full disk (>/dev/full), an I/O error
        if os.environ.get("SIEVE_DEBUG"):
            raise
        with contextlib.suppress(OSError):
            err.print(f"[red]error:[/red] {shown(exc.strerror or str(exc))}"
                      + (f": {shown(str(exc.filename))}" if exc.filename else " (writing the output)"))
        sys.exit(EXIT_IO_ERROR)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for those who ask
        if os.environ.get("SIEVE_DEBUG"):
            raise
        err.print(
            f"[red]internal error:[/red] {shown(type(exc).__name__)}: {shown(str(exc))} "
            "(this is a bug in Sieve; rerun with SIEVE_DEBUG=1 for the traceback)"
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
