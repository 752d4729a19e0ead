"""The activation store: Parquet files with provenance, committed atomically, queried with DuckDB.

Torch-free (``capture.write_capture_chunk`` and ``Store.export_torch`` import torch lazily).
See ``docs/store.md`` for the design and ``storage/README.md`` for the layout and the views.
"""

from interplab.store.catalog import Catalog, open_catalog
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry, RunInfo
from interplab.store.ray_data import act_matrix, to_ray_dataset
from interplab.store.store import Store, open_store
from interplab.store.writer import RunWriter

__all__ = ["Catalog", "FileEntry", "RunInfo", "RunWriter", "Store", "StoreError", "open_catalog", "open_store"]
__all__ += ["act_matrix", "to_ray_dataset"]
