"""``rewrite.coreference``: resolve pronouns and ellipsis against the conversation, then apply the glossary.

"Is it treatable?" after "What is throat cancer?" becomes "Is throat cancer treatable?". The stage
produces a query (port ``query``) whose ``text`` stays as asked and whose ``rewritten`` holds the
rewrite; downstream recall stages use the rewrite by default (``query: effective``), the question
as asked (``query: original``) or, for ``recall.bm25``, both (``query: both``).

English runs on a spaCy pipeline (``en_core_web_sm`` by default, resolved to the packaged copy by
:func:`engine.models.resolve_spacy`; noun chunks, entities, dependency parse) with the salience
heuristics of :mod:`stages.rewrite.english`; Chinese on jieba (:mod:`stages.rewrite.chinese`).
Then the analyst glossary (:mod:`stages.rewrite.glossary`) adds synonyms or substitutes canonical
terms. The trace records the text before and after, and for every change its span, the
antecedent, the turn it came from, its salience and the rule that fired. Models load in
``warm_up``; nothing heavy is imported with this module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from engine.errors import ConfigError, MissingDependencyError, ModelLoadError
from engine.model import Decision, Query
from engine.registry import register_stage
from engine.stage import (
    Explanation,
    GraphIssue,
    GraphView,
    Port,
    Resources,
    Stage,
    StageContext,
    StageNode,
    StageParams,
    StageResult,
)
from stages.rewrite.discourse import Redactor, Replacement, SalienceWeights
from stages.rewrite.english import EnglishHeuristics, Resolution, describe_candidates
from stages.rewrite.glossary import Glossary, GlossaryHit

DEFAULT_SPACY_MODEL = "en_core_web_sm"
GLOSSARY_FILE_PATTERN = r"^[^\x00]+\.(ya?ml)$"
REQUIRED_SPACY_COMPONENTS = ("tagger", "parser", "ner")
REDACTED = "<redacted>"


class CoreferenceParams(StageParams):
    model: str = Field(DEFAULT_SPACY_MODEL, min_length=1, description="spaCy pipeline for English (name or path)")
    language: Literal["auto", "en", "zh"] = Field(
        "auto", description="auto: the query's `language` if set, else Chinese when Han characters, counted twice, "
        "are at least as many as the other letters; each history turn is read only by its own language's resolver",
    )
    glossary: str | None = Field(
        None, json_schema_extra={"pattern": GLOSSARY_FILE_PATTERN},
        description="glossary/synonym file (YAML), relative to the pipeline config's directory; None: none",
    )
    user_dict: str | None = Field(
        None, description="words the Chinese resolver's segmenter must know (names, drugs, companies), one a line "
        "as jieba writes them: `word [frequency] [tag]`, relative to the pipeline config's directory; the "
        "glossary's Chinese terms are added anyway; None: none",
    )
    max_history_turns: int | None = Field(
        None, ge=0, le=1000, description="only the last N turns are read; None: the whole history"
    )
    heuristics: EnglishHeuristics = Field(
        default_factory=EnglishHeuristics, description="which kinds of English rewrite are on (each true unless "
        "set false here, e.g. {acronyms: false}); the Chinese resolver does not read them",
    )
    salience: SalienceWeights = Field(
        default_factory=SalienceWeights, description="weights of the salience model that ranks the antecedent "
        "candidates of a pronoun or an ellipsis (English and Chinese); a weight not given keeps its default, "
        "tuned on TREC CAsT 2019 (bench/cast_rewrite.py)",
    )
    trace_candidates: int = Field(5, ge=0, le=100, description="antecedent candidates listed in the trace")

    @field_validator("glossary", "user_dict")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        from engine.yamlsource import path_problem

        problem = path_problem(value) if value is not None else None  # before the name's ending: 'g\0.yaml' has it
        if problem is not None:
            raise PydanticCustomError("path", "{problem}", {"problem": problem})
        return value

    @field_validator("glossary")
    @classmethod
    def _yaml_file(cls, value: str | None) -> str | None:
        if value is not None and not re.match(GLOSSARY_FILE_PATTERN, value):
            raise PydanticCustomError("glossary_file", "a glossary is a YAML file: its name must end in .yaml or .yml")
        return value


def _load_glossary(path: Path) -> Glossary:
    from stages.rewrite.glossary import load_glossary

    return load_glossary(path)


def _load_spacy(name: str, base_dir: Path | None = None) -> tuple[Any, str]:
    """The spaCy pipeline ``name`` (packaged stand-in resolved), checked for what the resolver needs."""
    from engine.models import resolve_spacy

    try:
        import spacy
    except ImportError:
        raise MissingDependencyError("spacy", "spacy", "rewrite.coreference (English)") from None
    package = resolve_spacy(name, base_dir)
    try:
        nlp = spacy.load(package)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load spaCy pipeline '{name}' ({package}): {exc}") from None
    missing = [c for c in REQUIRED_SPACY_COMPONENTS if c not in nlp.pipe_names]
    if missing:
        raise ModelLoadError(
            f"spaCy pipeline '{name}' ({package}) lacks {', '.join(missing)}; rewrite.coreference needs a tagger, "
            f"a dependency parser and NER (it has: {', '.join(nlp.pipe_names) or 'nothing'})"
        )
    return nlp, package


@register_stage
class CoreferenceRewrite(Stage):
    """Multi-turn query rewriting: pronouns, possessives, ellipsis, glossary synonyms."""

    type_name = "rewrite.coreference"
    version = 1
    Params = CoreferenceParams
    produces = Port.QUERY
    accepts = frozenset({Port.QUERY})
    min_candidate_inputs = 0
    max_candidate_inputs = 0
    summary = "resolve pronouns/ellipsis against the conversation history; glossary rewrites"
    params: CoreferenceParams

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._english: Any = None
        self._chinese: Any = None
        self._glossary: Glossary | None = None
        self._identity: dict[str, Any] = {}
        self._warmed = False

    # ------------------------------------------------------------------ compile time / warm-up

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        """Load the glossary at compile time when the compiler says where the config lives."""
        params = node.params
        assert isinstance(params, CoreferenceParams)
        base_dir = getattr(graph, "base_dir", None)
        if params.glossary is None or base_dir is None:
            return []
        path = Path(params.glossary).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        try:
            glossary = _load_glossary(path)
        except ConfigError as exc:
            return [GraphIssue(f"{issue.location}  {issue.detail()}", ("params", "glossary"), issue.severity)
                    for issue in exc.issues]
        # what loads but is probably not meant (a chain of replacements, a pronoun), located in the glossary
        return [GraphIssue(f"{issue.location}  {issue.detail()}", ("params", "glossary"), "warning")
                for issue in glossary.warnings]

    def warm_up(self, resources: Resources) -> None:
        params = self.params
        if params.glossary is not None:
            self._glossary = _load_glossary(resources.resolve_path(params.glossary))  # parsed once: cached by content
            try:
                self._glossary.prepare()  # the term index (and jieba for Chinese terms): now, not on the first query
            except ImportError:
                raise MissingDependencyError(
                    "jieba", "jieba", "rewrite.coreference (a glossary with Chinese terms)"
                ) from None
            self._identity["glossary"] = self._glossary.describe()
        if params.language in ("auto", "en"):
            from stages.rewrite.english import EnglishResolver

            nlp, package = _load_spacy(params.model, resources.base_dir)
            self._english = EnglishResolver(nlp, params.salience, params.heuristics)
            self._identity.update(model=params.model, package=package, model_version=str(nlp.meta.get("version")),
                                  spacy_version=_spacy_version())
        if params.language in ("auto", "zh"):
            self._chinese = self._load_chinese(resources)
        self._warmed = True

    def _load_chinese(self, resources: Resources) -> Any:
        """The Chinese resolver, its segmenter taught the glossary's terms and the user dictionary's words."""
        words: list[tuple[str, str | None]] = []
        if self._glossary is not None:
            for entry in self._glossary.entries:
                words += [(term, None) for term in (*entry.terms, *filter(None, [entry.canonical]))]
        if self.params.user_dict is not None:
            path = resources.resolve_path(self.params.user_dict)
            user_words, sha256 = _load_user_dict(path)
            words += user_words
            self._identity["user_dict"] = {"file": str(path), "sha256": sha256, "words": len(user_words)}
        try:
            from stages.rewrite.chinese import ChineseResolver

            resolver = ChineseResolver(self.params.salience, words)
        except (ImportError, MissingDependencyError):
            raise MissingDependencyError("jieba", "jieba", "rewrite.coreference (Chinese)") from None
        import jieba

        self._identity["jieba_version"] = getattr(jieba, "__version__", None)
        self._identity["segmenter_words_added"] = resolver.added_words
        return resolver

    def identity(self) -> dict[str, Any] | None:
        return dict(self._identity) if self._identity else None

    # ------------------------------------------------------------------ per query

    def _language(self, query: Query, text: str) -> str:
        """The question's language: the stage's ``language``, else the query's, else by its letters
        (:func:`stages.rewrite.chinese.language_of`; English when it has none)."""
        if self.params.language != "auto":
            return self.params.language
        if query.language is not None:
            return "zh" if query.language.lower().startswith("zh") else "en"
        from stages.rewrite.chinese import language_of

        return language_of(text) or "en"

    @staticmethod
    def _own_language(history: tuple[str, ...], language: str) -> tuple[tuple[str, ...], list[int]]:
        """``history`` with the turns in another language blanked (so turn numbers stay those of the
        conversation), and the 1-based numbers of those turns. A turn with no letters is kept."""
        from stages.rewrite.chinese import language_of

        kept: list[str] = []
        skipped: list[int] = []
        for number, turn in enumerate(history, start=1):
            found = language_of(turn)
            if found is not None and found != language:
                skipped.append(number)
                kept.append("")
            else:
                kept.append(turn)
        return tuple(kept), skipped

    def rewrite(self, query: Query) -> tuple[str, Resolution | None, list[GlossaryHit], dict[str, Any], list[Decision]]:
        """The rewritten text, the resolution, the glossary hits, timings and decisions (no trace shaping)."""
        if not self._warmed:
            raise ModelLoadError(f"stage '{self.id}' was not warmed up (call Pipeline.warm_up or stage.warm_up first)")
        source = query.effective_text
        history = tuple(query.history)
        decisions: list[Decision] = []
        limit = self.params.max_history_turns
        if limit is not None and len(history) > limit:
            decisions.append(Decision("history_truncated", f"{len(history)} earlier turns; the last {limit} are read",
                                      {"turns": len(history), "read": limit}))
            history = history[len(history) - limit :] if limit else ()
        language = self._language(query, source)
        timings: dict[str, float] = {}
        resolution: Resolution | None = None
        first = len(query.history) - len(history)  # turns before the window
        history, skipped = self._own_language(history, language)
        if skipped:
            name = {"en": "English", "zh": "Chinese"}[language]
            numbers = [first + n for n in skipped]
            listed = f"turn{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
            decisions.append(Decision(
                "history_other_language",
                f"{len(skipped)} earlier turn(s) not in {name} skipped: the question is {name}, and the {name} "
                f"resolver takes antecedents only from {name} turns ({listed} of the conversation)",
                {"skipped": len(skipped), "turns": numbers, "language": language},
            ))
        if not history:
            decisions.append(Decision("no_history", "no earlier turns: nothing to resolve against; pronouns kept"))
        elif len(skipped) < len(history):
            resolver = self._resolver(language)
            began = time.perf_counter()
            resolution = resolver.resolve(source, history)
            timings["resolve"] = (time.perf_counter() - began) * 1000.0
        text = resolution.rewritten if resolution is not None else source
        hits: list[GlossaryHit] = []
        if self._glossary is not None:
            began = time.perf_counter()
            text, hits = self._glossary.apply(text)
            timings["glossary"] = (time.perf_counter() - began) * 1000.0
        return text, resolution, hits, timings, decisions

    def _resolver(self, language: str) -> Any:
        """The resolver for ``language``; warm-up loaded every one that ``params.language`` can pick."""
        return self._chinese if language == "zh" else self._english

    def run(self, ctx: StageContext) -> StageResult:
        query = ctx.query
        text, resolution, hits, timings, decisions = self.rewrite(query)
        source = query.effective_text
        trace_text = ctx.trace_text
        replacements = resolution.replacements if resolution is not None else ()
        redactor = None if trace_text else self._redactor(query, source, text, resolution)
        skipped = next((d.data["skipped"] for d in decisions if d.code == "history_other_language"), 0)
        details: dict[str, Any] = {
            "language": self._language(query, source),
            "changed": text != source,
            "history_turns": len(query.history),
            **({"history_other_language": skipped} if skipped else {}),
            "replacements": [r.to_dict(trace_text, redactor) for r in replacements],
            "glossary": [self._hit(h, trace_text) for h in hits],
            # what the character offsets count in: replacements in the question as the stage got it, glossary
            # hits in the question once resolved (before the glossary), which `resolved` holds when it differs
            "offsets": {"replacements": "input" if source != query.text else "original", "glossary": "resolved"},
        }
        if trace_text:
            resolved = resolution.rewritten if resolution is not None else source
            details = {"original": query.text, **({"input": source} if source != query.text else {}),
                       **({"resolved": resolved} if resolved != text else {}), "rewritten": text, **details}
        if resolution is not None and self.params.trace_candidates:
            details["candidates"] = describe_candidates(resolution.candidates, self.params.trace_candidates, trace_text)
        if self._glossary is not None:
            details["glossary_file"] = self._glossary.describe()
        details["explanation"] = self._explanation(source, text, replacements, hits, trace_text, redactor).to_dict()
        rewritten = query.model_copy(update={"rewritten": text})
        return StageResult(query=rewritten, decisions=decisions, details=details, timings_ms=timings)

    # ------------------------------------------------------------------ trace

    @staticmethod
    def _redactor(query: Query, source: str, text: str, resolution: Resolution | None) -> Redactor:
        """What takes the conversation's text out of rule descriptions when the trace holds no query text:
        every text a quoted fragment may come from, and the words of the question and history."""
        said = [query.text, source, *query.history]
        texts = [*said, text]
        if resolution is not None:
            texts.append(resolution.rewritten)
            for replacement in resolution.replacements:
                texts.extend(replacement.texts())
        return Redactor(texts, said)

    @staticmethod
    def _hit(hit: GlossaryHit, trace_text: bool) -> dict[str, Any]:
        record: dict[str, Any] = {"entry": hit.entry, "action": hit.action}
        if trace_text:  # without the text, no offsets either: an entry's term of that length names the word typed
            record.update(start=hit.start, end=hit.end, matched=hit.matched, added=hit.added)
        return record

    def _change(self, replacement: Replacement, trace_text: bool, redactor: Redactor | None = None) -> Explanation:
        """One change and its basis: the antecedent's salience and its factors; for a change made of parts (a
        question rebuilt around "What about X?", "they" -> "X and Y"), each part in turn. Without query text,
        the text the rule quotes is redacted."""
        what = f"'{replacement.original}' -> '{replacement.replacement.strip()}'" if trace_text else replacement.kind
        heuristic = replacement.heuristic
        if not trace_text:
            heuristic = (redactor or Redactor(replacement.texts())).redact(heuristic)
        antecedent = replacement.antecedent
        if replacement.parts or antecedent is None:
            return Explanation(0.0, f"{what} ({replacement.kind}): {heuristic}",
                               tuple(self._change(part, trace_text, redactor) for part in replacement.parts))
        return Explanation(
            antecedent.salience,
            f"{what} ({replacement.kind}): antecedent named in turn {antecedent.named_turn} (last mentioned in turn "
            f"{antecedent.turn}), salience "
            f"{antecedent.salience:.3f} = sum(mention weight x decay^age) + first-turn bonus; {heuristic}",
            tuple(Explanation(v, k) for k, v in antecedent.factors.items()),
        )

    def _explanation(self, source: str, text: str, replacements: Sequence[Replacement], hits: Sequence[GlossaryHit],
                     trace_text: bool, redactor: Redactor | None = None) -> Explanation:
        """value = number of changes; one child per change, stating its basis. A glossary change names its entry
        by id even without query text: an id names the analyst's rule, as a rule id does."""
        parts = [self._change(replacement, trace_text, redactor) for replacement in replacements]
        for hit in hits:
            what = f"'{hit.matched}' -> {'+' if hit.action == 'expand' else ''}'{hit.added}'" if trace_text else hit.action
            parts.append(Explanation(1.0, f"{what}: glossary entry '{hit.entry}' ({hit.action})"))
        if trace_text:
            description = f"rewrite '{source}' -> '{text}'" if text != source else f"'{source}' unchanged"
        else:
            description = "query rewritten (text redacted)" if text != source else "query unchanged"
        return Explanation(float(len(parts)), f"{description} by stage '{self.id}': {len(parts)} change(s)", tuple(parts))


def _load_user_dict(path: Path) -> tuple[list[tuple[str, str | None]], str]:
    """(word, tag or None) pairs of a jieba user dictionary (`word [frequency] [tag]` a line; blank lines
    and lines opening with # skipped), and the file's sha256. A malformed line is a ConfigError at
    file:line."""
    import hashlib

    from engine.errors import ConfigIssue, Location

    try:
        data = path.read_bytes()
    except OSError as exc:
        issue = ConfigIssue(Location(str(path)), "params.user_dict", f"cannot read: {exc.strerror}")
        raise ConfigError([issue]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(Location(str(path)), "params.user_dict", "not UTF-8 text")]) from None
    words: list[tuple[str, str | None]] = []
    issues: list[ConfigIssue] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        word, rest = fields[0], fields[1:]
        if rest and rest[0].isdigit():
            rest = rest[1:]  # a frequency: the resolver uses the one that keeps the word whole
        if len(rest) > 1 or (rest and not rest[0].isalpha()):
            issues.append(ConfigIssue(Location(str(path), number), "params.user_dict",
                                      f"'{line.strip()}': expected `word [frequency] [tag]`"))
            continue
        words.append((word, rest[0] if rest else None))
    if issues:
        raise ConfigError(issues)
    return words, hashlib.sha256(data).hexdigest()


def _spacy_version() -> str | None:
    try:
        import spacy
    except ImportError:
        return None
    return spacy.__version__
