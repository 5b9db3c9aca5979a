"""Registries of stage types and index components, filled by plugins via entry points.

The engine never imports a concrete stage. Packages declare an entry point in the
``sieve.stages`` group (Sieve's own ``stages`` package does); loading it registers its types.
YAML can only name a registered type — never a Python import path.
"""

from __future__ import annotations

import re
import threading
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, TypeVar

from engine.errors import SieveError

if TYPE_CHECKING:
    from engine.index import IndexComponent
    from engine.stage import Stage

ENTRY_POINT_GROUP = "sieve.stages"
TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
TYPE_REF = re.compile(r"^(?P<name>[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*)(?:@(?P<version>[0-9]+))?$")

_stages: dict[str, dict[int, type["Stage"]]] = {}
_components: dict[str, type["IndexComponent"]] = {}
_plugins_loaded = False
_lock = threading.RLock()
_loading: str | None = None  # the third-party plugin being loaded ("entry point (distribution version)")
_builtin: frozenset[str] = frozenset()  # Sieve's own stage types, which no plugin may register again
_origins: dict[tuple[str, int], str] = {}  # a plugin's types -> the plugin that registered them
BUILTIN_ENTRY_POINT = "stages"  # Sieve's own: the value of its entry point

S = TypeVar("S", bound="type[Stage]")
C = TypeVar("C", bound="type[IndexComponent]")


def register_stage(cls: S) -> S:
    """Class decorator: register a stage type under ``cls.type_name`` and ``cls.version``."""
    name = getattr(cls, "type_name", None)
    if not isinstance(name, str) or not TYPE_NAME.match(name):
        raise ValueError(f"{cls.__name__}.type_name must look like 'family.name', got {name!r}")
    version = cls.version
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{cls.__name__}.version must be a positive integer")
    if _loading is not None and name in _builtin:
        # a plugin must not replace Sieve's own stages, least of all the access prefilter, by a newer version
        # that unpinned configs would silently resolve to
        raise PluginError(f"plugin {_loading} registers the stage type {name}@{version}, a type of Sieve's own; "
                          f"a plugin's types need a family of their own (e.g. 'acme.{name.split('.')[1]}')")
    versions = _stages.setdefault(name, {})
    existing = versions.get(version)
    if existing is not None and existing is not cls:
        raise PluginError(f"stage type {name}@{version} is registered twice"
                          + (f" (the second time by plugin {_loading})" if _loading is not None else ""))
    versions[version] = cls
    if _loading is not None:
        _origins[(name, version)] = _loading
    return cls


def plugin_of(name: str, version: int) -> str | None:
    """The plugin (entry point and distribution) that registered a stage type, or None for Sieve's own."""
    return _origins.get((name, version))


def register_index_component(cls: C) -> C:
    """Class decorator: register an index component (e.g. ``bm25``) that ``sieve index`` can build."""
    name = cls.name
    existing = _components.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"index component '{name}' is registered twice")
    _components[name] = cls
    return cls


class PluginError(SieveError, ValueError):
    """A stage plugin that cannot be loaded, or registers what it may not."""


def _describe(ep: object) -> str:
    dist = getattr(ep, "dist", None)
    where = f" ({dist.name} {dist.version})" if dist is not None else ""
    return f"'{getattr(ep, 'name', '?')} = {getattr(ep, 'value', '?')}'{where}"


def load_plugins() -> None:
    """Import every package registered under the ``sieve.stages`` entry point group, once: Sieve's own first,
    then the others, each named in any error it causes (a plugin that fails to import, or registers one of
    Sieve's own types again)."""
    global _plugins_loaded, _loading, _builtin
    if _plugins_loaded:
        return
    with _lock:
        if _plugins_loaded:
            return
        found = list(entry_points(group=ENTRY_POINT_GROUP))
        own = [ep for ep in found if ep.value == BUILTIN_ENTRY_POINT]
        for ep in own:
            ep.load()
        _builtin = frozenset(_stages)
        try:
            for ep in found:
                if ep in own:
                    continue
                _loading = _describe(ep)
                try:
                    ep.load()
                except PluginError:
                    raise
                except Exception as exc:  # noqa: BLE001 (whatever a third party's import raises, name the plugin)
                    raise PluginError(f"stage plugin {_loading} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        finally:
            _loading = None
        _plugins_loaded = True


class UnknownStageType(LookupError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def resolve_stage(type_ref: str) -> type["Stage"]:
    """``recall.bm25`` (latest version) or ``recall.bm25@1`` (pinned) to its class."""
    load_plugins()
    match = TYPE_REF.match(type_ref) if isinstance(type_ref, str) else None
    if match is None:
        raise UnknownStageType(
            f"'{type_ref}' is not a stage type name; types look like 'family.name' or "
            f"'family.name@version' and must be registered (Python paths are never loaded). "
            f"Known types: {', '.join(known_stage_types())}"
        )
    name, version = match.group("name"), match.group("version")
    versions = _stages.get(name)
    if not versions:
        from difflib import get_close_matches

        hint = get_close_matches(name, list(_stages), n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UnknownStageType(
            f"unknown stage type '{name}'{did_you_mean}; known types: {', '.join(known_stage_types())}"
        )
    if version is None:
        return versions[max(versions)]
    if int(version) not in versions:
        available = ", ".join(f"{name}@{v}" for v in sorted(versions))
        raise UnknownStageType(f"stage type '{name}' has no version {version}; available: {available}")
    return versions[int(version)]


def known_stage_types() -> list[str]:
    load_plugins()
    return sorted(_stages)


def stage_versions() -> dict[str, list[int]]:
    load_plugins()
    return {name: sorted(versions) for name, versions in sorted(_stages.items())}


def resolve_component(name: str) -> type["IndexComponent"]:
    load_plugins()
    if name not in _components:
        raise UnknownStageType(
            f"unknown index component '{name}'; known components: {', '.join(known_components())}"
        )
    return _components[name]


def known_components() -> list[str]:
    load_plugins()
    return sorted(_components)
