"""Discovery of job kinds: Python entry points in the group ``interplab.kinds``.

Each entry point is one kind: its name is the kind's name, its value the module that registers it
(:func:`~interplab.jobs.registry.register_kind`, called when the module is imported)::

    [project.entry-points."interplab.kinds"]
    patching = "interplab.analyses.patching.kind"      # interplab's own, in its pyproject.toml
    mykind = "mylab_kinds.mykind"                      # a lab's package, installed next to interplab

The folder of that module is the kind's folder: the store reads the kind's views from its
``views/*.sql`` (:mod:`interplab.store.views`). A kind's module is imported the first time the kind
is asked for (:func:`load_kind`); a kind that fails to load raises :class:`KindLoadError`, naming the
entry point, its module and the cause. Nothing is skipped.

``$INTERPLAB_JOB_KINDS`` (comma-separated modules) is a second way, for modules that are on the path
but not installed as a package (the test kinds); they are imported whenever kinds are listed or
looked up, and the variable is passed on to Ray workers and submitted jobs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass
from importlib.machinery import PathFinder
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from interplab.jobs.errors import JobError

KINDS_GROUP = "interplab.kinds"
EXTRA_KINDS_ENV = "INTERPLAB_JOB_KINDS"


@dataclass(frozen=True)
class KindSource:
    """Where a kind comes from: an entry point (``name`` is the kind) or a module of ``$INTERPLAB_JOB_KINDS``."""

    name: str | None  # None for $INTERPLAB_JOB_KINDS modules: their kinds are known once imported
    module: str
    entry_point: EntryPoint | None = None

    def describe(self) -> str:
        if self.entry_point is None:
            return f"module {self.module!r} of ${EXTRA_KINDS_ENV}"
        ep = self.entry_point
        dist = f", from {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
        return f"job kind {self.name!r} (entry point '{ep.name} = {ep.value}' in group {KINDS_GROUP!r}{dist})"

    def folder(self) -> Path | None:
        """The folder holding the kind's module, found without importing anything; None if absent."""
        return module_folder(self.module)


class KindLoadError(JobError):
    """An installed job kind cannot be loaded (its module is missing, raises, or registers no such kind).

    The message names the entry point, its module and the cause; ``remote_traceback`` holds the
    import's traceback (``INTERPLAB_DEBUG=1`` prints it)."""

    def __init__(self, source: KindSource, problem: str, import_traceback: str = ""):
        self.source = source
        super().__init__(
            f"{source.describe()} failed to load: {problem} (fix or uninstall the package that declares it)",
            remote_traceback=import_traceback,
        )


def kind_sources() -> list[KindSource]:
    """Every installed kind (entry points, by name) then every ``$INTERPLAB_JOB_KINDS`` module; imports nothing."""
    declared = [KindSource(ep.name, ep.module, ep) for ep in entry_points(group=KINDS_GROUP)]
    return sorted(declared, key=lambda s: s.name or "") + [KindSource(None, m) for m in extra_kind_modules()]


def extra_kind_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(EXTRA_KINDS_ENV, "").split(",") if m.strip()]


def entry_point_kinds() -> list[str]:
    """Names of the kinds declared by entry points (not imported)."""
    return sorted({s.name for s in kind_sources() if s.name is not None})


_loaded: set[str] = set()  # modules imported and checked


def load_kind(name: str) -> None:
    """Import the module of the entry point ``name`` (once), and the ``$INTERPLAB_JOB_KINDS`` modules."""
    sources = kind_sources()
    declared = [s for s in sources if s.name == name]
    if len({s.module for s in declared}) > 1:
        raise KindLoadError(declared[1], f"kind {name!r} is declared twice; also by {declared[0].describe()}")
    for source in declared + [s for s in sources if s.name is None]:
        _load(source)


def load_extra_kinds() -> None:
    for source in kind_sources():
        if source.name is None:
            _load(source)


def _load(source: KindSource) -> None:
    from interplab.jobs.registry import registered_kinds

    if source.module in _loaded:
        return
    try:
        if source.entry_point is not None:
            source.entry_point.load()
        else:
            importlib.import_module(source.module)
    except Exception as exc:  # noqa: BLE001 - any failure to import is reported, with its cause
        raise KindLoadError(source, f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc
    if source.name is not None and source.name not in registered_kinds():
        raise KindLoadError(
            source,
            f"module {source.module!r} imported but registered no kind {source.name!r} "
            f"(registered: {', '.join(sorted(registered_kinds())) or 'none'})",
        )
    _loaded.add(source.module)


def module_folder(module: str) -> Path | None:
    """The folder of ``module`` (a package: its own folder), located without importing it or its parents."""
    loaded = sys.modules.get(module)
    path = getattr(loaded, "__file__", None) if loaded is not None else None
    if path:
        return Path(path).resolve().parent
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    for depth in range(2, len(parts) + 1):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = PathFinder.find_spec(".".join(parts[:depth]), list(spec.submodule_search_locations))
    if spec is None:
        return None
    if spec.origin and spec.has_location:
        return Path(spec.origin).resolve().parent
    locations = list(spec.submodule_search_locations or [])  # a namespace package
    return Path(locations[0]).resolve() if locations else None
