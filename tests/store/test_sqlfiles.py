"""Each view's SQL has one source: core views in storage/ (the package's store/sql is a symlink to it),
each kind's views in its own folder's views/, found through the kind's entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from interplab.store import StoreError
from interplab.store.sqlfiles import core_sql_dir, saved_queries
from interplab.store.views import CORE, view_files

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "platform" / "interplab"
OWNERS = {  # view -> the folder of its SQL file, relative to the repository
    "runs": "storage", "prompts": "storage", "activations": "storage",
    "patching": "platform/interplab/analyses/patching/views",
    "baselines": "platform/interplab/analyses/patching/views",
    "edges": "platform/interplab/analyses/circuits/views",
    "circuits": "platform/interplab/analyses/circuits/views",
    "faithfulness": "platform/interplab/analyses/circuits/views",
    "circuit_summary": "platform/interplab/analyses/circuits/views",
    "grafting": "platform/interplab/analyses/grafting/views",
    "deltas": "platform/interplab/analyses/grafting/views",
    "dictionaries": "platform/interplab/analyses/partition/views",
    "exemplars": "platform/interplab/analyses/partition/views",
    "partition_match": "platform/interplab/analyses/partition/views",
    "region_members": "platform/interplab/analyses/partition/views",
    "regions": "platform/interplab/analyses/partition/views",
    "probes": "platform/interplab/analyses/probes/views",
    "probe_weights": "platform/interplab/analyses/probes/views",
    "attributions": "platform/interplab/analyses/attribution/views",
    "attribution_summary": "platform/interplab/analyses/attribution/views",
}


def test_core_sql_is_storage_itself():
    assert (PACKAGE / "store" / "sql").is_symlink()
    assert Path(str(core_sql_dir())).resolve() == REPO / "storage"
    assert sorted(p.name for p in (REPO / "storage").glob("*.sql")) == ["activations.sql", "prompts.sql", "runs.sql"]


def test_every_view_has_one_file_where_its_kind_lives():
    views = view_files()
    assert set(OWNERS) <= set(views)
    for name, folder in OWNERS.items():
        view = views[name]
        assert Path(str(view.path)).resolve() == REPO / folder / f"{name}.sql", name
        assert (view.owner == CORE) == (folder == "storage"), (name, view.owner)
        sql = view.sql()
        assert f"CREATE VIEW {name} AS" in sql and "{{" + name + "}}" in sql, name
    # no copies: outside storage/ (reached through the symlink) and tests, each view file name occurs once
    names = [f for root, _, files in os.walk(REPO / "platform") for f in files if f.endswith(".sql") and "queries" not in root]
    names += [p.name for p in (REPO / "storage").glob("*.sql")]
    assert sorted(names) == sorted(f"{n}.sql" for n in OWNERS)


def test_storage_readme_says_where_every_view_lives():
    readme = (REPO / "storage" / "README.md").read_text()
    for name, folder in OWNERS.items():
        assert f"`{folder}/{name}.sql`" in readme, name
    for query in saved_queries():
        assert f"`{query}`" in readme, query


def test_a_view_defined_twice_is_an_error_naming_both(tmp_path, monkeypatch):
    """A plugin (a dist-info with an entry point) whose views/ redefines ``patching``."""
    (tmp_path / "copycat_kind" / "views").mkdir(parents=True)
    (tmp_path / "copycat_kind" / "__init__.py").write_text("")
    (tmp_path / "copycat_kind" / "views" / "patching.sql").write_text("CREATE VIEW patching AS SELECT * FROM {{patching}};\n")
    dist = tmp_path / "copycat_kind-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: copycat-kind\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[interplab.kinds]\ncopycat = copycat_kind\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StoreError) as info:
        view_files()
    message = str(info.value)
    assert "'patching' is defined twice" in message
    assert "analyses/patching/views/patching.sql" in message and "copycat_kind/views/patching.sql" in message
    assert "copycat" in message


def test_saved_queries_declare_params():
    queries = saved_queries()
    assert {"nearest", "top_tokens_neuron", "top_tokens_direction", "patching_heatmap"} <= set(queries)
    for q in queries.values():
        assert q.description
        for p in q.params:
            assert f"${p.name}" in q.sql, (q.name, p.name)


@pytest.mark.slow
def test_wheel_holds_the_sql_files_and_the_kinds(tmp_path):
    """A wheel built offline from a copy of the checkout (symlink kept) holds the files, not a link."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "platform", source / "platform", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "storage", source / "storage", ignore=ignore)
    assert (source / "platform" / "interplab" / "store" / "sql").is_symlink()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "-w", str(tmp_path / "wheel"), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheel").glob("interplab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        declared = archive.read(entry_points).decode()
    for name, folder in OWNERS.items():
        inside = "interplab/store/sql" if folder == "storage" else folder.removeprefix("platform/")
        assert f"{inside}/{name}.sql" in names, name
    assert {f"interplab/store/sql/queries/{q}.sql" for q in saved_queries()} <= names
    assert "[interplab.kinds]" in declared and "patching = interplab.analyses.patching.kind" in declared
