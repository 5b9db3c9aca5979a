"""``sieve schema``: the pipeline config as JSON Schema, for editor completion and validation.

The schema is generated from the same pydantic models the compiler validates with: the top-level
:class:`engine.config.PipelineConfig` and, for ``stages``, a union discriminated on ``type`` with
one branch per registered stage type whose ``params`` is that type's own ``Params`` model. So an
editor (e.g. the YAML language server) completes stage types and each type's parameters, and a
new stage type appears in the schema as soon as it is registered.

A config that ``extends`` a base is only what it changes (merged onto the base before it is validated:
:func:`engine.compiler.resolve_extends`), so the schema takes it apart, on the presence of ``extends``
(``if``/``else``): ``version`` and ``stages`` are then optional and a stage entry needs only its ``id``
(``{id: final, params: {k: 3}}``, ``{id: floor, enabled: false}``), its params checked by name against
its ``type`` when it names one; a complete config keeps the full validation (the ``else``: each stage
entry one branch of the union on ``type``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from engine.config import STAGE_ID_PATTERN, PipelineConfig, StageSpec
from engine.registry import resolve_stage, stage_versions

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _model_name(type_name: str, version: int) -> str:
    return "Stage_" + type_name.replace(".", "_") + f"_v{version}"


def _stage_branches() -> list[type[BaseModel]]:
    """One envelope model per registered stage type and version, ``type`` a literal of its spellings."""
    branches: list[type[BaseModel]] = []
    envelope = StageSpec.model_fields
    for type_name, versions in stage_versions().items():
        latest = max(versions)
        for version in versions:
            cls = resolve_stage(f"{type_name}@{version}")
            spellings: tuple[str, ...] = (f"{type_name}@{version}",)
            if version == latest:
                spellings = (type_name,) + spellings  # the bare name means the latest version
            doc_lines = (cls.__doc__ or "").strip().splitlines()
            description = cls.summary or (doc_lines[0] if doc_lines else "")
            branches.append(
                create_model(  # type: ignore[call-overload]
                    _model_name(type_name, version),
                    # not Strict: its field validator may not sit on the union's discriminator ('type'); the
                    # schema needs only the shape (the compiler validates with the real models)
                    __config__=ConfigDict(frozen=True, extra="forbid"),
                    __doc__=f"{type_name}@{version}: {description}" if description else f"{type_name}@{version}",
                    id=(str, Field(pattern=STAGE_ID_PATTERN, max_length=64, description="unique stage id")),
                    type=(Literal[spellings], Field(description=f"{type_name} (latest) or {type_name}@{version}")),  # type: ignore[valid-type]
                    inputs=(list[str], Field(default_factory=list, description=envelope["inputs"].description
                                             or "ids of the stages this one reads from")),
                    params=(cls.Params, Field(default_factory=dict, description=f"parameters of {type_name}@{version}")),
                    on_error=(envelope["on_error"].annotation, Field("fail", description=envelope["on_error"].description)),
                    enabled=(envelope["enabled"].annotation, Field(True, description=envelope["enabled"].description)),
                    when=(envelope["when"].annotation, Field(None, description=envelope["when"].description)),
                    description=(Optional[str], None),
                )
            )
    return branches


def pipeline_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a pipeline YAML file, stage params included."""
    branches = _stage_branches()
    stage_union = Annotated[Union[tuple(branches)], Field(discriminator="type")]  # type: ignore[valid-type]
    # every top-level setting as PipelineConfig declares it (a section added there is in the schema too), but the
    # stages: one branch per registered stage type, with its params
    fields: dict[str, Any] = {name: (info.annotation, info) for name, info in PipelineConfig.model_fields.items()}
    fields["stages"] = (list[stage_union], Field(min_length=1, description="the DAG's stages; each names a registered type"))  # type: ignore[valid-type]
    # a config may extend a base in its directory (merged before it is validated: engine.compiler.resolve_extends):
    # then it gives only what it changes (see _allow_extending)
    fields["extends"] = (Optional[str], Field(None, min_length=1, description=(
        "a base config in this config's directory that this one is written over (mappings merge key by key, "
        "stages by id): with it, version and stages may be left out and a stage entry needs only its id")))
    model = create_model(
        "SievePipeline",
        __config__=ConfigDict(frozen=True, extra="forbid", title="Sieve pipeline"),
        __doc__=(PipelineConfig.__doc__ or "").strip(),
        **fields,
    )
    schema = TypeAdapter(model).json_schema(mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, **_allow_extending(schema)}


STAGE_ENTRY = "StageEntry"


def _when_is_a_condition(defs: dict[str, Any]) -> None:
    """Each stage branch's ``when`` a condition, not null: ``when:`` with nothing under it is refused in a complete
    config (its lines commented out would run the stage for every query; engine.config.StageSpec). In a config that
    extends a base, null removes the base stage's ``when`` (:data:`STAGE_ENTRY`; the compiler warns of it)."""
    for definition in defs.values():
        when = definition.get("properties", {}).get("when") if definition.get("title", "").startswith("Stage_") else None
        if isinstance(when, dict) and "anyOf" in when:
            arms = [arm for arm in when.pop("anyOf") if arm != {"type": "null"}]
            when.pop("default", None)
            when.update(arms[0] if len(arms) == 1 else {"anyOf": arms})


def _allow_extending(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (a complete config's) made to accept a config that extends a base as well, on the presence of
    ``extends`` (``if``, ``else``). Every stage entry is a :data:`STAGE_ENTRY`: only ``id`` required (in a config
    that extends a base, an entry merges into the base's stage of that id, or is appended: then the compiler requires
    its ``type``), ``type`` one of the registered spellings, the envelope's keys as in a complete entry, and
    ``params`` any mapping (it merges key by key into the base stage's, so a required param may be in the base) whose
    keys, where the entry names its type, are that type's params. Without ``extends`` the ``else`` adds what a
    complete config needs: ``version`` and ``stages`` required, each entry its type's branch, with every param
    checked. The other top-level sections have no required keys, so a partial one validates as it is."""
    defs = schema["$defs"]
    _when_is_a_condition(defs)
    stages = schema["properties"]["stages"]
    union = stages.pop("items")
    min_items = stages.pop("minItems", None)
    branches = [defs[ref["$ref"].rsplit("/", 1)[-1]] for ref in union["oneOf"]]
    spellings: list[str] = []
    params_named = []
    for branch in branches:
        names = list(branch["properties"]["type"]["enum"])
        spellings += names
        params = branch["properties"]["params"]
        if "$ref" in params:
            params = defs[params["$ref"].rsplit("/", 1)[-1]]
        params_named.append({
            "if": {"properties": {"type": {"enum": names}}, "required": ["type"]},
            "then": {"properties": {"params": {"propertyNames": {"enum": sorted(params.get("properties", {}))}}}},
        })
    envelope = branches[0]["properties"]
    defs[STAGE_ENTRY] = {
        "title": STAGE_ENTRY, "type": "object", "additionalProperties": False,
        "description": ("a stage entry; in a config that extends a base, merged into the base's stage of the same id "
                        "(whose type cannot change) or appended as a new stage (which needs a type)"),
        "properties": {
            **{key: value for key, value in envelope.items() if key not in ("type", "params", "when")},
            "when": {"anyOf": [{k: v for k, v in envelope["when"].items() if k != "description"}, {"type": "null"}],
                     "description": envelope["when"].get("description", "") + "; in a config that extends a base, "
                     "null removes the base stage's"},
            "type": {"title": "Type", "type": "string", "enum": spellings,
                     "description": "a registered stage type, e.g. recall.bm25 or recall.bm25@1"},
            "params": {"title": "Params", "type": "object",
                       "description": "the stage type's parameters (merged key by key into a base stage's)"},
        },
        "required": ["id"],
        "allOf": params_named,
    }
    stages["items"] = {"$ref": f"#/$defs/{STAGE_ENTRY}"}
    complete: dict[str, Any] = {"properties": {"stages": {**({"minItems": min_items} if min_items is not None else {}),
                                                          "items": union}}}
    if "required" in schema:
        complete["required"] = schema.pop("required")
    extends = schema["properties"]["extends"]
    extends.pop("default", None)
    extends.pop("anyOf", None)
    extends.update({"type": "string", "minLength": 1})
    schema["if"] = {"required": ["extends"]}
    schema["else"] = complete
    return schema
