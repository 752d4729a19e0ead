"""The store's own SQL files: the core views and the saved queries (``sql/queries/*.sql``).

``interplab/store/sql/`` is, in the repository, a symlink to ``storage/`` at the top: one copy of
each file, read by the installed package (a wheel holds the files themselves) and by people reading
the repository. Views of analysis kinds live with their kind (:mod:`interplab.store.views`).

A saved query starts with a header of comments::

    -- description: top activating tokens for one neuron of a site
    -- param: run_id VARCHAR
    -- param: k INTEGER = 20
    -- param: head INTEGER = NULL

and uses the parameters as DuckDB named parameters (``$run_id``). A parameter with a default is optional.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from interplab.store.errors import StoreError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_PARAM = re.compile(r"^--\s*param:\s*([A-Za-z_][A-Za-z0-9_]*)\s+([A-Za-z0-9_\[\]]+)\s*(?:=\s*(.+?))?\s*$")


def core_sql_dir() -> Traversable:
    """The folder of the core view files and ``queries/`` (a Traversable; a Path when installed from files)."""
    folder = resources.files("interplab.store") / "sql"
    if not (folder / "runs.sql").is_file():
        raise StoreError(
            f"the store's SQL files are missing from the installed package ({folder}); "
            "in a checkout, interplab/store/sql must be the symlink to storage/"
        )
    return folder


@dataclass(frozen=True)
class SavedParam:
    name: str
    type: str
    default: str | None  # the literal after '=', None when the parameter is required

    @property
    def required(self) -> bool:
        return self.default is None

    def convert(self, value: Any) -> Any:
        """A CLI string (or a Python value) → the value DuckDB gets for this parameter."""
        if not isinstance(value, str):
            return value.tolist() if hasattr(value, "tolist") else value
        if value.upper() == "NULL":
            return None
        base = self.type.upper()
        try:
            if base.endswith("[]"):
                items = json.loads(value)
                if not isinstance(items, list):
                    raise ValueError("not a JSON list")
                return [float(x) for x in items]
            if base in ("INTEGER", "BIGINT", "INT"):
                return int(value)
            if base in ("DOUBLE", "FLOAT", "REAL"):
                return float(value)
        except ValueError as exc:
            raise StoreError(f"parameter {self.name!r} must be {self.type}, got {value!r} ({exc})") from None
        return value


@dataclass(frozen=True)
class SavedQuery:
    name: str
    description: str
    params: tuple[SavedParam, ...]
    sql: str

    def bind(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check and convert parameters; raise StoreError naming what is missing or unknown."""
        names = {p.name for p in self.params}
        unknown = sorted(set(given) - names)
        if unknown:
            raise StoreError(f"saved query {self.name!r} has no parameter {unknown[0]!r}; parameters: {self.usage()}")
        missing = [p.name for p in self.params if p.required and p.name not in given]
        if missing:
            raise StoreError(f"saved query {self.name!r} needs parameter {missing[0]!r}; parameters: {self.usage()}")
        return {p.name: p.convert(given[p.name] if p.name in given else p.default) for p in self.params}

    def usage(self) -> str:
        return ", ".join(f"{p.name} {p.type}" + ("" if p.required else f" = {p.default}") for p in self.params)


def parse_saved(name: str, text: str) -> SavedQuery:
    description, params = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("--"):
            if stripped:
                break
            continue
        match = _PARAM.match(stripped)
        if match:
            params.append(SavedParam(match.group(1), match.group(2), match.group(3)))
        elif stripped.lower().startswith("-- description:"):
            description = stripped.split(":", 1)[1].strip()
    return SavedQuery(name, description, tuple(params), text)


@cache
def saved_queries() -> dict[str, SavedQuery]:
    folder = core_sql_dir() / "queries"
    out = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.endswith(".sql"):
            name = path.name[: -len(".sql")]
            out[name] = parse_saved(name, path.read_text())
    return out


def saved_query(name: str) -> SavedQuery:
    queries = saved_queries()
    if not isinstance(name, str) or name not in queries:
        raise StoreError(f"unknown saved query {name!r}; available: {', '.join(queries) or '(none)'}")
    return queries[name]
