"""A parameter reference for people: every setting an analyst can tune, read from the models that validate it.

:func:`pipeline_json_schema` (``sieve schema``) serves editors; this module serves a terminal. It walks the same
sources, so a new stage type, parameter or index component appears here as soon as it is registered: the
pipeline's own settings (:class:`engine.config.PipelineConfig`), each registered stage type's ``Params``, and each
registered index component's ``Settings`` (set when the index is built, ``sieve index --settings FILE``). Each
parameter is one :class:`ParamRow`: its dotted name, type, default, allowed values or range, and description.
"""

from __future__ import annotations

import textwrap
import types
import typing
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from engine.errors import SieveError

# the pipeline's own sections that are settings (stages and output are the pipeline's shape, not tuned values)
PIPELINE_SECTIONS = ("trace", "limits", "executor", "server")
WIDTH = 100


@dataclass(frozen=True)
class ChosenComponent:
    """An index component a stage reads only under one value of one of its params, and only when the component was
    built with the stage's own settings of the same names (else the stage computes the same per query): what the
    stage's params cannot say (its ``component`` parameter names the component it reads otherwise)."""

    parameter: str  # method
    value: str  # minhash
    component: str  # minhash
    holds: str  # what the component holds for the stage: signatures


# dedup.near_duplicate reads the minhash component's signatures under method: minhash when they were signed with its own
# fields, shingle_size, num_perm and seed (stages/dedup.py: index_signatures_mismatch, and it warns at warm-up when they
# were not); under method: embedding, the vectors of the dense component its ``component`` names
CHOSEN_COMPONENTS: dict[str, ChosenComponent] = {
    "dedup.near_duplicate": ChosenComponent("method", "minhash", "minhash", "signatures"),
}


@dataclass(frozen=True)
class ParamRow:
    """One parameter as the reference lists it."""

    name: str  # dotted for nested settings: cascade.full_top, tokenizer.language
    type: str  # in YAML's words: integer, number, true/false, text, list of text, mapping, ...
    default: str  # as it would be written in YAML; "required" when there is none
    allowed: str  # the range or the choices; "" when any value of the type will do
    description: str


@dataclass(frozen=True)
class Section:
    """The parameters of one stage type, one index component, or the pipeline's own settings."""

    title: str  # recall.bm25@1, index component bm25, pipeline settings
    summary: str
    where: str  # where these are written: params of a stage, a section of sieve index --settings
    rows: tuple[ParamRow, ...]
    notes: tuple[str, ...] = ()  # e.g. which settings of the index the stage reads were fixed when it was built


def _arms(annotation: Any) -> tuple[tuple[Any, ...], bool]:
    """The alternatives of a union annotation other than None, and whether None is one of them."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (annotation,), False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_words(annotation: Any) -> str:
    """An annotation in YAML's words."""
    arms, nullable = _arms(annotation)
    words = " or ".join(dict.fromkeys(_one_type(arm) for arm in arms))
    return f"{words} or null" if nullable else words


def _one_type(annotation: Any) -> str:
    if annotation is bool:
        return "true/false"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation is str:
        return "text"
    if annotation is Any:
        return "any"
    if _is_model(annotation):
        return "mapping"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        kinds = {type(a) for a in args}
        return "text" if kinds == {str} else " or ".join(sorted(_one_type(k) for k in kinds))
    if origin is typing.Annotated:
        return _one_type(args[0])
    if origin in (list, tuple, set, frozenset):
        item = args[0] if args else Any
        return f"list of {_type_words(item)}"
    if origin is dict:
        value = args[1] if len(args) == 2 else Any
        return f"mapping of text to {_type_words(value)}"
    if origin is typing.Union or origin is types.UnionType:
        return _type_words(annotation)
    return getattr(annotation, "__name__", str(annotation))


def _yaml_value(value: Any) -> str:
    """A default as an analyst would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, str):
        plain = value and value.strip() == value and not any(c in value for c in ":#{}[],&*!|>'\"%@`")
        return value if plain else repr(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(info: FieldInfo) -> str:
    if info.default is not PydanticUndefined:
        return _yaml_value(info.default)
    if info.default_factory is not None:
        return _yaml_value(info.default_factory())  # type: ignore[call-arg]
    return "required"


def _units(annotation: Any) -> str:
    """What a length constraint counts in a value of this type."""
    words = _type_words(annotation)
    return "items" if words.startswith("list") else "entries" if words.startswith("mapping") else "characters"


def _allowed(info: FieldInfo) -> str:
    """The range or choices a field accepts, from its constraints and Literal type."""
    arms, _ = _arms(info.annotation)
    choices = [a for arm in arms if typing.get_origin(arm) is Literal for a in typing.get_args(arm)]
    if choices:
        return " | ".join(_yaml_value(c) for c in choices)
    low = high = ""
    parts = []
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"at least {item.ge}"
        elif isinstance(item, annotated_types.Gt):
            low = f"above {item.gt}"
        elif isinstance(item, annotated_types.Le):
            high = f"at most {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f"below {item.lt}"
        elif isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            units = _units(info.annotation)
            parts.append("not empty" if item.min_length == 1 else f"at least {item.min_length} {units}")
        elif isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} {_units(info.annotation)}")
        elif getattr(item, "pattern", None):
            parts.append(f"matches {item.pattern}")
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "pattern" in extra:
        parts.append(f"matches {extra['pattern']}")
    if low.startswith("at least") and high.startswith("at most"):
        bounds = f"{low.removeprefix('at least ')} to {high.removeprefix('at most ')}"
    else:
        bounds = ", ".join(b for b in (low, high) if b)
    return "; ".join(p for p in (bounds, *parts) if p)


def parameter_rows(model: type[BaseModel], prefix: str = "") -> list[ParamRow]:
    """Every field of ``model``, depth first; a field that is itself a settings model (``cascade``,
    ``tokenizer``) is listed, then its own fields as ``name.field``."""
    rows: list[ParamRow] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        rows.append(ParamRow(dotted, _type_words(info.annotation), _default(info), _allowed(info),
                             " ".join((info.description or "").split())))
        arms, _ = _arms(info.annotation)
        for arm in arms:
            if _is_model(arm):
                rows.extend(parameter_rows(arm, dotted + "."))
    return rows


def _summary(cls: type) -> str:
    """A class's one-line summary: its ``summary``, else the first paragraph of its docstring (whole: a sentence
    wrapped over two lines is not cut), as plain text (RST's ``literal`` marks dropped)."""
    text = getattr(cls, "summary", None)
    if not isinstance(text, str) or not text.strip():
        text = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(text.replace("``", "").split())


def stage_section(type_ref: str) -> Section:
    """The parameters of one stage type (``rerank.cross_encoder``, latest version, or ``name@version``)."""
    from engine.registry import UnknownStageType, resolve_stage

    try:
        cls = resolve_stage(type_ref)
    except UnknownStageType as exc:
        raise SieveError(exc.message) from None
    return Section(cls.qualified_name(), _summary(cls), f"params of a stage with type: {cls.type_name}",
                   tuple(parameter_rows(cls.Params)), tuple(_index_notes(cls.type_name, cls.Params)))


def _names(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _other_values(params: type[BaseModel], chosen: ChosenComponent) -> str:
    """The values of ``chosen.parameter`` under which the stage reads its ``component`` parameter's component."""
    field = params.model_fields.get(chosen.parameter)
    arms, _ = _arms(field.annotation) if field is not None else ((), False)
    values = [str(v) for arm in arms if typing.get_origin(arm) is Literal for v in typing.get_args(arm)
              if v != chosen.value]
    return " or ".join(values) if values else f"other than {chosen.value}"


def _index_notes(type_name: str, params: type[BaseModel]) -> list[str]:
    """For a stage that reads an index component (its ``component`` parameter's, or one chosen by another parameter):
    the settings that component was built with, which the stage cannot change. A setting that is also one of the
    stage's own params (recall.dense's model, dedup's fields) is the stage's, whose description says how it relates
    to the index's: it is not listed as fixed. A component read only when it was built with the stage's own settings
    (dedup's minhash) says so."""
    from engine.index import component_read_by
    from engine.registry import UnknownStageType, resolve_component

    own = set(params.model_fields)
    chosen = CHOSEN_COMPONENTS.get(type_name)
    notes = []
    component = component_read_by(params)
    if component is not None:
        settings = list(component.Settings.model_fields)
        fixed = [name for name in settings if name not in own]
        shared = [name for name in settings if name in own]
        where = (f"sieve index --settings FILE, see 'index component {component.name}'); to compare values, build "
                 "an index per value and sweep them: sieve sweep CONFIG --set 'index=[dirA, dirB]'")
        also = ""
        if shared:
            also = (f"; {_names(shared)}, {'settings' if len(shared) > 1 else 'a setting'} of that component too, "
                    f"{'are' if len(shared) > 1 else 'is'} this stage's own (below)")
        if chosen is None:
            notes.append(f"{', '.join(fixed)}: settings of the index's {component.name} component, fixed when the "
                         f"index is built ({where}{also}")
        else:
            notes.append(f"with {chosen.parameter}: {_other_values(params, chosen)} the stage reads the index's "
                         f"{component.name} component, whose {_names(fixed)} are fixed when the index is built "
                         f"({where}{also}")
    if chosen is not None:
        try:
            settings = list(resolve_component(chosen.component).Settings.model_fields)
        except UnknownStageType:
            return notes
        notes.append(f"with {chosen.parameter}: {chosen.value} the stage reads the {chosen.holds} of the index's "
                     f"{chosen.component} component (sieve index --with {chosen.component}, see 'index component "
                     f"{chosen.component}') only when that was built with the same {_names(settings)} as this "
                     f"stage's own (below); otherwise it computes the {chosen.holds} per query (and warns at warm-up "
                     f"when the index's were built with other settings)")
    return notes


def component_section(name: str) -> Section:
    """The settings of one index component (``bm25``), fixed when the index is built."""
    from engine.registry import UnknownStageType, known_components, resolve_component

    try:
        cls = resolve_component(name)
    except UnknownStageType:
        hint = get_close_matches(name, known_components(), n=1)
        raise SieveError(f"unknown index component '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                         + f"; known components: {', '.join(known_components())}") from None
    return Section(f"index component {cls.name}", _summary(cls) or _summary(cls.Settings),
                   f"set when the index is built: sieve index --with {cls.name} --settings FILE, "
                   f"under '{cls.name}:' in FILE", tuple(parameter_rows(cls.Settings)), tuple(_readers(cls.name)))


def _readers(component: str) -> list[str]:
    """Which stage types read the component (by their ``component`` parameter's default, or under one value of
    another parameter), and what a stage that reads it only when built with its own settings requires."""
    from engine.index import component_read_by
    from engine.registry import resolve_component, resolve_stage, stage_versions

    readers, notes = [], []
    for type_name, versions in stage_versions().items():
        params = resolve_stage(f"{type_name}@{max(versions)}").Params
        chosen = CHOSEN_COMPONENTS.get(type_name)
        read = component_read_by(params)
        if chosen is not None and chosen.component == component:
            readers.append(f"{type_name} ({chosen.parameter}: {chosen.value})")
            settings = list(resolve_component(component).Settings.model_fields)
            notes.append(f"{type_name} uses these {chosen.holds} only when its own {_names(settings)} are the ones "
                         f"the index was built with; otherwise it computes them per query (and warns at warm-up)")
        elif read is not None and read.name == component:
            readers.append(type_name + (f" ({chosen.parameter}: {_other_values(params, chosen)}, "
                                        if chosen is not None else " (") + "its component parameter)")
    return ([f"read by {_names(readers)}"] if readers else []) + notes


def pipeline_section() -> Section:
    """The pipeline's own settings (trace, limits, executor, server), outside any stage."""
    from engine.config import PipelineConfig

    rows: list[ParamRow] = []
    for name in PIPELINE_SECTIONS:
        annotation = PipelineConfig.model_fields[name].annotation
        rows.extend(parameter_rows(annotation, f"{name}."))  # type: ignore[arg-type]
    return Section("pipeline settings", "settings of the whole pipeline, outside any stage",
                   "top-level sections of the pipeline config:", tuple(rows))


def stage_envelope_section() -> Section:
    """What every stage entry takes besides its type's params (id, inputs, on_error, enabled, when...)."""
    from engine.config import StageSpec

    rows = [ParamRow(name, "condition or null" if name == "when" else _type_words(info.annotation), _default(info),
                     _allowed(info), " ".join((info.description or "").split()))
            for name, info in StageSpec.model_fields.items() if name != "params"]
    return Section("every stage", "the keys of a stage entry besides its type's params",
                   "in each entry of stages:", tuple(rows),
                   ("when: the condition language of the rule files (field/op/value, all/any/not, expr), on the "
                    "query side only: query.text, query.rewritten, query.effective, query.language, query.history, "
                    "query.entities[.LABEL], query.entity_labels, user.*, as_of",))


def reference_sections(stage: str | None = None, component: str | None = None) -> list[Section]:
    """The sections asked for: one stage type, one index component, or (neither named) everything: the pipeline's
    settings, every registered stage type (each version), every index component."""
    from engine.registry import known_components, stage_versions

    if stage is not None or component is not None:
        return ([stage_section(stage)] if stage is not None else []) + (
            [component_section(component)] if component is not None else [])
    sections = [pipeline_section(), stage_envelope_section()]
    sections += [stage_section(f"{name}@{version}")
                 for name, versions in stage_versions().items() for version in versions]
    sections += [component_section(name) for name in known_components()]
    return sections


def render_section(section: Section, width: int = WIDTH) -> str:
    """One section as plain text: a heading, then per parameter a line of name, type, default and allowed values,
    and the description wrapped below it."""
    lines = [section.title + (f": {section.summary}" if section.summary else ""), f"  {section.where}"]
    for note in section.notes:
        lines.extend(textwrap.wrap(f"note: {note}", width=width, initial_indent="  ", subsequent_indent=" " * 4,
                                   break_on_hyphens=False))
    name_width = max((len(row.name) for row in section.rows), default=0)
    for row in section.rows:
        facts = [row.type, f"default {row.default}"] + ([f"allowed {row.allowed}"] if row.allowed else [])
        lines.append(f"  {row.name.ljust(name_width)}  " + "; ".join(facts))
        if row.description:
            lines.extend(textwrap.wrap(row.description, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                       break_on_hyphens=False))
    return "\n".join(lines)


def render_reference(stage: str | None = None, component: str | None = None, width: int = WIDTH) -> str:
    """The parameter reference as terminal text (see :func:`reference_sections` for what is included)."""
    return "\n\n".join(render_section(s, width) for s in reference_sections(stage, component)) + "\n"
