"""storage/ (reviewed source) and the packaged interplab/store/sql/ copy must not drift."""

from __future__ import annotations

from pathlib import Path

from interplab.store.sqlfiles import saved_queries

REPO = Path(__file__).resolve().parents[2]
PACKAGED = REPO / "platform" / "interplab" / "store" / "sql"


def _sql_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.sql"))}


def test_packaged_sql_equals_storage():
    assert _sql_files(REPO / "storage") == _sql_files(PACKAGED)


def test_saved_queries_declare_params():
    queries = saved_queries()
    assert {"nearest", "top_tokens_neuron", "top_tokens_direction", "patching_heatmap"} <= set(queries)
    for q in queries.values():
        assert q.description
        for p in q.params:
            assert f"${p.name}" in q.sql, (q.name, p.name)
