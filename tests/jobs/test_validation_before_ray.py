"""A spec is refused before Ray starts (exit 2, store untouched) for all that the spec, the model's
config and its tokenizer can tell — the cases live in ``bad_specs/`` and ``test_specs.py`` runs each
through ``validate`` and ``run`` with Ray forbidden. Here: a CLI flag that overrides a field does not
hide that field being malformed, and the Ray guard those tests rely on does catch a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from interplab.jobs.prepare import prepare
from interplab.jobs.spec import load_spec_file

BAD = Path(__file__).parent / "bad_specs"
MALFORMED_STORES = ["store-unknown-scheme.yaml", "store-bad-s3.yaml"]


def expected(path: Path) -> str:
    return path.read_text().splitlines()[0].removeprefix("# expect: ").strip()


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("name", MALFORMED_STORES)
def test_store_flag_does_not_hide_a_malformed_store_field(name, cli, tmp_path, no_ray):
    spec = BAD / name
    store = tmp_path / "store"
    result = cli("run", str(spec), "--store", str(store), "--no-progress")
    assert result.exit_code == 2, result.stdout + result.stderr
    assert len(error_lines(result)) == 1 and expected(spec) in error_lines(result)[0]
    assert "Ray" not in result.stdout and not store.exists()
    # submit refuses it too, with or without the local model check, before looking for a cluster
    for check in ("--local-check", "--no-local-check"):
        result = cli("submit", str(spec), "--store", str(store), check, "--address", "http://127.0.0.1:9")
        assert result.exit_code == 2, result.stdout + result.stderr
        assert expected(spec) in error_lines(result)[0]
    assert not store.exists()


def test_store_flag_overrides_a_valid_store_field_and_the_spec_is_kept_as_written(tmp_path):
    raw = load_spec_file(BAD / "store-unknown-scheme.yaml")
    raw["store"] = str(tmp_path / "spec-store")
    job, uri = prepare(raw, "spec.yaml", store=str(tmp_path / "flag-store"))
    assert uri == str(tmp_path / "flag-store")
    assert job.record["store"] == str(tmp_path / "spec-store")  # what the run saves: the valid spec as written
    assert not (tmp_path / "spec-store").exists() and not (tmp_path / "flag-store").exists()


def test_the_ray_guard_catches_a_job_that_reaches_ray(cli, tmp_path, no_ray):
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: capture\nmodel: tiny-llama\nprompts: [When Mary went]\nsites: [resid_pre.0]\n")
    with pytest.raises(AssertionError, match="ray.init was called"):
        cli("run", str(spec), "--store", str(tmp_path / "store"), "--no-progress")
    assert not (tmp_path / "store").exists()
