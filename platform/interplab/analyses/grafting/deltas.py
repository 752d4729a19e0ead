"""Weight deltas and grafting arithmetic, and deltas kept in the store as safetensors files.

    delta = subtract(w_f_implf, w_f)                           # W_{F,ImplF} - W_F
    graft = add(w_f_prime, delta)                              # W_{F'} + (W_{F,ImplF} - W_F)
    early = add(w_f_prime, delta, keep=in_layers(model, (0, 22)))   # only layers 0..21 get the delta
    row = save_delta(writer, "graft_delta-s0", delta, {...})   # -> a row of the ``deltas`` table
    delta = load_delta(store, run_id, "graft_delta-s0")

A delta file is ``data/deltas/run_id=<run>/blobs/<key>.safetensors`` in the store, written atomically
(temporary name + rename locally, one PUT on S3) *before* the ``deltas`` row that names it; the row
becomes visible with the run's commit, so a reader never finds a row without its file. The file is
not a Parquet chunk, so the manifest does not list it (views never read it); deleting or garbage-
collecting the run removes it with the run's other data. Never pickle: safetensors only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

from interplab.analyses.grafting.weights import Weights, layer_of

DELTAS_TABLE = "deltas"
KeepFn = Callable[[str], bool]


def subtract(a: Weights, b: Weights) -> Weights:
    """``a - b`` parameter by parameter (same names and shapes)."""
    if set(a) != set(b):
        raise KeyError(f"weights differ in names: {sorted(set(a) ^ set(b))[:4]}")
    return {n: a[n] - b[n] for n in a}


def add(base: Weights, delta: Weights, *, keep: KeepFn | None = None) -> Weights:
    """``base + delta`` where ``keep(name)`` (every parameter when None); ``base`` elsewhere."""
    if set(base) != set(delta):
        raise KeyError(f"weights differ in names: {sorted(set(base) ^ set(delta))[:4]}")
    return {n: base[n] + delta[n] if keep is None or keep(n) else base[n].clone() for n in base}


def in_layers(model, layers: tuple[int, int] | None) -> KeepFn | None:
    """Keep-function for decoder layers ``[start, stop)`` (embeddings, final norm and head excluded)."""
    if layers is None:
        return None
    start, stop = layers

    def keep(name: str) -> bool:
        layer = layer_of(model, name)
        return layer is not None and start <= layer < stop

    return keep


def graft(w_f_prime: Weights, w_f_implf: Weights, w_f: Weights, *, keep: KeepFn | None = None) -> Weights:
    """``W_{F'} + (W_{F,ImplF} - W_F)``: the implication-training delta moved onto new facts."""
    return add(w_f_prime, subtract(w_f_implf, w_f), keep=keep)


def control(w_f_prime: Weights, w_implf: Weights, theta: Weights, *, keep: KeepFn | None = None) -> Weights:
    """``W_{F'} + (W_{ImplF} - θ)``: implications trained without the facts, moved onto new facts."""
    return add(w_f_prime, subtract(w_implf, theta), keep=keep)


def norm(delta: Weights) -> float:
    total = sum(((v.double() ** 2).sum() for v in delta.values()), torch.zeros((), dtype=torch.float64))
    return float(torch.sqrt(total))


# ------------------------------------------------------------------ store
def blob_path(run_id: str, key: str) -> str:
    from interplab.store import layout

    layout.chunk_key(key)  # the same character rules as chunk names
    return f"{layout.table_dir(DELTAS_TABLE, run_id)}/blobs/{key}.safetensors"


def save_delta(writer, key: str, delta: Weights, info: Mapping[str, object], *, dtype: str = "float32") -> dict:
    """Write ``delta`` as a safetensors file of ``writer``'s run; return its ``deltas`` row.

    The caller writes the rows with ``writer.write_table("deltas", ...)`` after this returns.
    """
    from safetensors.torch import save

    from interplab.store import fs

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tensors = {n: v.detach().to("cpu", torch_dtype).contiguous() for n, v in delta.items()}
    data = save(tensors, metadata={k: str(v) for k, v in info.items()})
    loc = writer.store.location
    rel = blob_path(writer.run_id, key)
    fs.write_bytes(loc, loc.path(rel), data)
    return {
        "name": key,
        **info,
        "path": rel,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "n_tensors": len(tensors),
        "n_params": int(sum(v.numel() for v in tensors.values())),
        "dtype": dtype,
        "norm": norm(delta),
    }


def load_delta(store, run_id: str, name: str) -> Weights:
    """Read a delta named in the ``deltas`` table of a committed run (checks its sha256)."""
    from safetensors.torch import load

    from interplab.store import fs

    rows = store.sql(
        "SELECT path, sha256 FROM deltas WHERE run_id = $run AND name = $name", {"run": run_id, "name": name}
    ).to_pylist()
    if not rows:
        raise KeyError(f"run {run_id!r} has no delta named {name!r}")
    loc = store.location
    data = fs.read_bytes(loc, loc.path(rows[0]["path"]))
    if data is None:
        raise FileNotFoundError(f"delta file {rows[0]['path']} of run {run_id!r} is missing")
    if hashlib.sha256(data).hexdigest() != rows[0]["sha256"]:
        raise ValueError(f"delta {name!r} of run {run_id!r}: file content does not match its sha256")
    return load(data)
