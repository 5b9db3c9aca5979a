"""``sieve schema``: the pipeline config as JSON Schema, for editor completion and validation.

The schema is generated from the same pydantic models the compiler validates with: the top-level
:class:`engine.config.PipelineConfig` and, for ``stages``, a union discriminated on ``type`` with
one branch per registered stage type whose ``params`` is that type's own ``Params`` model. So an
editor (e.g. the YAML language server) completes stage types and each type's parameters, and a
new stage type appears in the schema as soon as it is registered.
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
    # a config may extend a base in its directory (merged before it is validated: engine.compiler.resolve_extends);
    # the schema describes a complete config, so a child's partial stage entries are not what it validates
    fields["extends"] = (Optional[str], Field(None, description=(
        "a base config in this config's directory that this one is written over (mappings merge key by key, "
        "stages by id)")))
    model = create_model(
        "SievePipeline",
        __config__=ConfigDict(frozen=True, extra="forbid", title="Sieve pipeline"),
        __doc__=(PipelineConfig.__doc__ or "").strip(),
        **fields,
    )
    schema = TypeAdapter(model).json_schema(mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}
