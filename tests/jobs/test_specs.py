"""Specs: parsing, error messages (path, value, allowed), overrides, and the malformed-spec corpus.

Every file in ``bad_specs/`` starts with ``# expect: FRAGMENT``; ``interplab validate`` and
``interplab run`` must each exit with code 2, print exactly one ``error:`` line containing the
fragment, write nothing to the store and never start Ray. Add a case by dropping a file there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from interplab.jobs import JobSpec, SpecError, SpecErrors, get_kind, kind_names, parse_spec, register_kind
from interplab.jobs.spec import apply_overrides, load_spec_file, parse_yaml

from .conftest import JOBS_DIR

BAD = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: FRAGMENT'"
    return first[len("# expect: "):].strip()


def test_corpus_is_large_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_spec_exits_2_with_one_clear_error(path, cli, tmp_path, no_ray):
    store = tmp_path / "store"
    env = {"INTERPLAB_STORE": str(store)}
    fragment = expected(path)
    for command in (["validate", str(path)], ["run", str(path), "--no-progress"]):
        result = cli(*command, env=env)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        assert len(errors) == 1, result.stderr
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
        assert str(path) in errors[0]  # names the file
        assert "got " in errors[0]  # and the bad value
        assert not store.exists(), "a rejected spec must not create or write the store"


def test_error_names_path_value_and_allowed():
    with pytest.raises(SpecError) as info:
        parse_spec({"kind": "capture", "sites": ["resid_pre.0"], "prompts": ["a"], "dtype": "float8"}, "x.yaml")
    error = info.value
    assert (error.path, error.value) == ("dtype", "float8")
    assert "'float32'" in error.allowed and str(error).startswith("x.yaml: dtype: ")


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(SpecError) as info:
        parse_spec({"kind": "capture", "sites": ["embed"], "prompts": ["a"], "batchsize": 4})
    assert info.value.path == "batchsize" and "batch_size" in info.value.allowed


def test_several_errors_are_all_reported(cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: capture\nmodel: tiny-llama\nprompts: [a]\nsites: [embed]\nbatch_size: 0\nworkers: x\nfoo: 1\n")
    result = cli("validate", str(spec))
    assert result.exit_code == 2
    paths = [line.split(": ")[2] for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert paths == ["batch_size", "workers", "foo"]


def test_valid_spec_validates(cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: capture\nmodel: tiny-llama\ndataset: {builtin: ioi, limit: 5}\nsites: [z.1, resid_post.2]\n"
                    "positions: [0, -1]\nbatch_size: 2\n")
    result = cli("validate", str(spec), env={"INTERPLAB_STORE": str(tmp_path / "s")})
    assert result.exit_code == 0, result.stderr
    assert "valid capture job for tiny-llama: 3 chunk(s)" in result.stdout
    assert not (tmp_path / "s").exists()


def test_dataset_files_resolve_relative_to_the_spec(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    (data / "p.yaml").write_text("- When Mary went\n- John went\n")
    (data / "p.jsonl").write_text('{"text": "When Mary went"}\n"John went"\n')
    pq.write_table(pa.table({"prompt": ["When Mary went", "John went"]}), data / "p.parquet")
    for name, field in (("p.yaml", "prompt"), ("p.jsonl", "text"), ("p.parquet", "prompt")):
        spec = tmp_path / f"{name}.spec.yaml"
        spec.write_text(f"kind: capture\nmodel: tiny-llama\ndataset: {{path: data/{name}, field: {field}}}\nsites: [embed]\n")
        parsed = parse_spec(load_spec_file(spec), str(spec))
        assert parsed.dataset.path == str(data / name)
        assert parsed.prompt_texts() == ["When Mary went", "John went"]


def test_overrides_set_nested_yaml_values():
    raw = {"kind": "capture", "resources": {"num_cpus": 1}}
    out = apply_overrides(raw, ["model=tiny-llama", "resources.num_gpus=0", "sites=[embed, resid_pre.1]"])
    assert out["model"] == "tiny-llama" and out["resources"] == {"num_cpus": 1, "num_gpus": 0}
    assert out["sites"] == ["embed", "resid_pre.1"] and raw == {"kind": "capture", "resources": {"num_cpus": 1}}


def test_spec_round_trips_through_its_record():
    spec = parse_spec({"kind": "capture", "model": "tiny-llama", "prompts": ["a b"], "sites": ["z.1"], "positions": [-1]})
    assert parse_spec(spec.to_record()) == spec


def test_yaml_duplicate_keys_are_errors():
    with pytest.raises(SpecError, match="duplicate key"):
        parse_yaml("kind: capture\nsites: [a]\nsites: [b]\n")


def test_registry_contract():
    assert "capture" in kind_names()
    assert get_kind("capture").spec_cls.__name__ == "CaptureSpec"

    class Incomplete:
        def validate(self, spec, model): ...

    with pytest.raises(TypeError, match="chunks, run_chunk, finalize"):
        register_kind("broken", JobSpec, Incomplete())
    with pytest.raises(TypeError, match="subclass"):
        register_kind("broken", dict, Incomplete())


@pytest.mark.parametrize("path", sorted(JOBS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_parse(path):
    raw = load_spec_file(path)
    try:
        parse_spec(raw, str(path))
    except (SpecError, SpecErrors) as exc:
        pytest.fail(str(exc))
