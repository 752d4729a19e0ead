"""Which SQL file defines each store view: the core views, and the views of every installed job kind.

* **Core views** (``runs``, ``prompts``, ``activations``): ``interplab/store/sql/<view>.sql``, which in
  the repository is ``storage/`` itself (``store/sql`` is a symlink to it; a wheel holds the files).
* **A kind's views**: the ``views/<view>.sql`` files in the folder of the module that the kind's
  ``interplab.kinds`` entry point names (:mod:`interplab.jobs.kinds`), e.g.
  ``interplab/analyses/patching/views/patching.sql``, or a lab's plugin package's own ``views/``.
  The folders are located without importing any kind, so reading the store stays torch-free.

In a view file, ``{{<view>}}`` stands for the relation over the committed files of table ``<view>``.
A view defined twice (by two kinds, or by a kind and the core) is an error naming both files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from interplab.store.errors import StoreError
from interplab.store.sqlfiles import core_sql_dir

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
CORE = "interplab (core)"


@dataclass(frozen=True)
class ViewFile:
    """One view definition: ``name`` (= its table), the file, and who defines it."""

    name: str
    path: Traversable
    owner: str  # CORE, or a kind's description (entry point, module, distribution)

    def sql(self) -> str:
        return self.path.read_text()


def view_files() -> dict[str, ViewFile]:
    """Every view definition, core first, keyed by view name."""
    from interplab.jobs.kinds import kind_sources

    found: dict[str, ViewFile] = {}
    _add(found, core_sql_dir(), CORE)
    seen = set()
    for source in kind_sources():
        folder = source.folder()
        if folder is None:
            raise StoreError(
                f"{source.describe()}: module {source.module!r} is not installed, so its views "
                "cannot be read (fix or uninstall the package that declares it)"
            )
        if folder not in seen:
            seen.add(folder)
            _add(found, folder / "views", source.describe())
    return found


def _add(found: dict[str, ViewFile], folder: Traversable, owner: str) -> None:
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".sql") or not path.is_file():
            continue
        name = path.name[: -len(".sql")]
        if not _NAME.match(name):
            raise StoreError(f"view file {path} ({owner}): a view name is lower-case letters, digits and '_'")
        if name in found:
            raise StoreError(f"view {name!r} is defined twice: {found[name].path} ({found[name].owner}) and {path} ({owner})")
        found[name] = ViewFile(name, path, owner)
