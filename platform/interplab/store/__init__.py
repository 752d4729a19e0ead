"""The activation store: Parquet files with provenance, committed atomically, queried with DuckDB.

Torch-free (``capture.write_capture_chunk`` and ``Store.export_torch`` import torch lazily); opening a
store and listing its runs import neither numpy nor pyarrow.
See ``docs/store.md`` for the design and ``storage/README.md`` for the layout and the views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from interplab.store.catalog import PART_OF, Catalog, open_catalog
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry, RunInfo
from interplab.store.store import Store, open_store

if TYPE_CHECKING:
    from interplab.store.ray_data import act_matrix, to_ray_dataset
    from interplab.store.writer import RunWriter

__all__ = ["PART_OF", "Catalog", "FileEntry", "RunInfo", "RunWriter", "Store", "StoreError", "open_catalog", "open_store"]
__all__ += ["act_matrix", "to_ray_dataset"]

# Imported on first use: they need numpy and pyarrow, which opening a store and listing runs do not.
_LAZY = {
    "RunWriter": "interplab.store.writer",
    "act_matrix": "interplab.store.ray_data",
    "to_ray_dataset": "interplab.store.ray_data",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
