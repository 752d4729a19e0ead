"""An exemplar dictionary as data: its vectors, metric and threshold; read from and kept in the store.

    d = load_dictionary(store, run_id)           # a committed partition run
    region, distance = d.nearest(acts)           # acts: float32 [n, d]
    d.save_safetensors("dict.safetensors")       # exemplars [K, d] + metadata, for other tools

In the store a dictionary is the run's ``exemplars`` rows (one per region, ``vector`` the observed
activation that anchors it, ``list<float>``) and its ``dictionaries`` row (metric, threshold, site).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from interplab.analyses.partition.leader import Metric, as_tensor, nearest, prepare

if TYPE_CHECKING:
    from interplab.store import Store

EXEMPLARS_TABLE = "exemplars"
REGIONS_TABLE = "regions"
MEMBERS_TABLE = "region_members"
DICTIONARIES_TABLE = "dictionaries"
MATCH_TABLE = "partition_match"


class DictionaryError(ValueError):
    """A run that holds no dictionary, or a region it does not have."""


@dataclass(frozen=True)
class Dictionary:
    """``vectors [K, d]``: the exemplars (observed activations), region ``i`` anchored by row ``i``."""

    vectors: np.ndarray
    metric: Metric
    threshold: float
    site: str | None = None
    run_id: str | None = None

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def d(self) -> int:
        return int(self.vectors.shape[1])

    def prepared(self) -> torch.Tensor:
        return prepare(torch.from_numpy(np.ascontiguousarray(self.vectors, dtype=np.float32)), self.metric)

    def direction(self, region: int) -> np.ndarray:
        """The unit vector of region ``region``'s exemplar (``float32 [d]``)."""
        if not 0 <= region < self.size:
            raise DictionaryError(f"region {region} is out of range: the dictionary has regions 0..{self.size - 1}")
        v = self.vectors[region].astype(np.float32)
        n = float(np.linalg.norm(v))
        if n == 0:
            raise DictionaryError(f"region {region}'s exemplar is the zero vector; it has no direction")
        return v / n

    def nearest(self, acts: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Each row's region and nearest-exemplar distance (the out-of-distribution score)."""
        x = as_tensor(acts).reshape(-1, self.d)
        region, distance = nearest(prepare(x, self.metric), self.prepared(), self.metric)
        return region.numpy(), distance.numpy()

    def save_safetensors(self, path: str | Path) -> Path:
        """Write ``exemplars [K, d]`` (float32) with the metric, threshold and site as metadata."""
        from safetensors.numpy import save_file

        path = Path(path)
        meta = {"metric": self.metric, "threshold": repr(self.threshold), "site": self.site or "", "run_id": self.run_id or ""}
        save_file({"exemplars": np.ascontiguousarray(self.vectors, dtype=np.float32)}, str(path), metadata=meta)
        return path

    @classmethod
    def load_safetensors(cls, path: str | Path) -> Dictionary:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            vectors = f.get_tensor("exemplars")
        metric = meta.get("metric", "cosine")
        if metric not in ("cosine", "euclidean"):
            raise DictionaryError(f"{path}: unknown metric {metric!r} in the file's metadata")
        return cls(vectors, metric, float(meta.get("threshold", "nan")), meta.get("site") or None, meta.get("run_id") or None)


def load_dictionary(store: Store, run_id: str) -> Dictionary:
    """The dictionary of the committed partition run ``run_id``."""
    info = store.run(run_id)
    if info.kind != "partition":
        raise DictionaryError(f"run {run_id!r} is a {info.kind!r} run, not a partition run; it holds no dictionary")
    if info.status != "committed":
        raise DictionaryError(f"partition run {run_id!r} is {info.status}; only a committed run's dictionary can be read")
    meta = store.sql(
        f"SELECT metric, threshold, site FROM {DICTIONARIES_TABLE} WHERE run_id = $run_id", {"run_id": run_id}
    ).to_pylist()
    rows = store.sql(f"SELECT region, vector FROM {EXEMPLARS_TABLE} WHERE run_id = $run_id ORDER BY region", {"run_id": run_id})
    if not meta or rows.num_rows == 0:
        raise DictionaryError(f"partition run {run_id!r} has no exemplars")
    regions = rows.column("region").to_numpy(zero_copy_only=False)
    if not np.array_equal(regions, np.arange(len(regions))):
        raise DictionaryError(f"partition run {run_id!r}: exemplar regions are not 0..{len(regions) - 1}")
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v in rows.column("vector").to_pylist()])
    m = meta[0]
    return Dictionary(vectors, m["metric"], float(m["threshold"]), m["site"], run_id)


def vector_column(vectors: np.ndarray) -> pa.Array:
    """``[K, d]`` float32 as an Arrow ``list<float>`` column."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)
