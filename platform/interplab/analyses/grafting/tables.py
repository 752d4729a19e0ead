"""Arrow schemas of the grafting result tables (the columns ``views/grafting.sql`` and ``views/deltas.sql`` beside this module name)."""

from __future__ import annotations

import pyarrow as pa

_LABELS = [("lr", pa.float64()), ("epochs", pa.int32()), ("batch_size", pa.int32()), ("seed", pa.int32())]

EVAL_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("variant", pa.string()),
        ("layers", pa.string()),
        ("epoch", pa.int32()),
        ("eval_set", pa.string()),
        ("mean_rank", pa.float64()),
        ("mean_logprob", pa.float64()),
        ("n", pa.int32()),
        ("n_options", pa.int32()),
        *_LABELS,
    ]
)
TRAIN_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("run", pa.string()),
        ("step", pa.int32()),
        ("epoch", pa.int32()),
        ("loss", pa.float64()),
        *_LABELS,
    ]
)
SCORES_SCHEMA = pa.schema(
    [
        ("score", pa.string()),
        ("layer", pa.int32()),
        ("component", pa.string()),
        ("head", pa.int32()),
        ("position", pa.int32()),
        ("token", pa.string()),
        ("value", pa.float64()),
        ("delta", pa.string()),
        ("eval_set", pa.string()),
        ("n", pa.int32()),
        *_LABELS,
    ]
)
DELTAS_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("experiment", pa.string()),
        ("delta", pa.string()),
        ("path", pa.string()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("n_tensors", pa.int32()),
        ("n_params", pa.int64()),
        ("dtype", pa.string()),
        ("norm", pa.float64()),
        *_LABELS,
    ]
)


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def eval_table(rows: list[dict]) -> pa.Table:
    return _table(rows, EVAL_SCHEMA)


def train_table(rows: list[dict]) -> pa.Table:
    return _table(rows, TRAIN_SCHEMA)


def scores_table(rows: list[dict]) -> pa.Table:
    return _table(rows, SCORES_SCHEMA)


def deltas_table(rows: list[dict]) -> pa.Table:
    return _table(rows, DELTAS_SCHEMA)
