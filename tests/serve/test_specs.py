"""``kind: serve`` specs, the CLI's options on top of them, and the KubeRay RayService manifest."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from interplab.cli.serve_cmds import build_spec
from interplab.serve.spec import ServeSpecError, load_serve_spec

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "serve" / "smollm2.yaml"
RAYSERVICE = REPO / "k8s" / "serve" / "rayservice.yaml"

# The RayService entry for tests/jobs/k8s_schema.yaml ($defs), validated here until it is added there.


def test_the_shipped_spec_parses_and_options_override_it(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_SERVE_TOKENS", str(tmp_path / "tokens"))
    spec = load_serve_spec(SPEC)
    assert spec.model == "smollm2-135m" and spec.name == "smollm2-135m" and spec.limits.max_new_tokens == 256
    merged = build_spec(str(SPEC), ("model=tiny-llama",), stages="2", replicas=2, limits=("max_rows=8",), batch_window_ms=1.5,
                        no_batching=True, num_cpus=0.5, port=9000)
    assert merged.model == "tiny-llama" and merged.parallel.stages == 2 and merged.replicas == 2
    assert merged.limits.max_rows == 8 and merged.limits.max_new_tokens == 256  # the spec's other limits stay
    assert merged.batching.window_ms == 1.5 and not merged.batching.enabled and merged.batching.max_rows == 1024
    assert merged.resources.num_cpus == 0.5 and merged.http.port == 9000 and merged.http.host == "127.0.0.1"
    assert merged.app_args()["tokens"] == str(tmp_path / "tokens")


@pytest.mark.parametrize("bad, field", [
    ({"limits": {"max_rowz": 3}}, "limits.max_rowz"),
    ({"batching": {"window_ms": -1}}, "batching.window_ms"),
    ({"replicas": 0}, "replicas"),
    ({"parallel": {"stages": 0}}, "parallel.stages"),
    ({"modle": "x"}, "modle"),
])
def test_bad_specs_name_the_field(bad, field, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"kind": "serve", "model": "tiny-llama", "tokens": "t", **bad}))
    with pytest.raises(ServeSpecError, match=field.replace(".", r"\.")):
        load_serve_spec(path)


def test_a_model_name_needs_a_tokens_path(monkeypatch):
    monkeypatch.delenv("INTERPLAB_SERVE_TOKENS", raising=False)
    with pytest.raises(ValueError, match="no tokens path"):
        build_spec("tiny-llama")
    assert build_spec("tiny-llama", tokens="t.txt", limits=("max_rows=4",)).limits.max_rows == 4
    with pytest.raises(ValueError, match="--limit expects KEY=VALUE"):
        build_spec("tiny-llama", tokens="t.txt", limits=("max_rows",))


def _validate(doc):
    schema = yaml.safe_load((REPO / "tests" / "jobs" / "k8s_schema.yaml").read_text())
    jsonschema.validate(doc, {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/RayService"},
                        cls=jsonschema.Draft202012Validator)


def test_rayservice_has_token_auth_the_tokens_secret_and_a_valid_application():
    from interplab.serve.deployment import build_app

    doc = yaml.safe_load(RAYSERVICE.read_text())
    _validate(doc)
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    for app in config["applications"]:
        assert app["import_path"] == "interplab.serve.deployment:build_app"
        assert app["route_prefix"] == f"/{app['name']}" and app["deployments"][0]["name"] == app["args"]["name"]
        build_app(app["args"])  # the builder accepts the arguments as written
        for pod in pods:  # the tokens path exists wherever a replica may run
            mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
            volume = mounts[app["args"]["tokens"]]
            assert {"name": volume, "secret": {"secretName": "interplab-serve-tokens"}} in pod["spec"]["volumes"]
    open_auth = copy.deepcopy(doc)
    open_auth["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "disabled"}
    with pytest.raises(jsonschema.ValidationError):
        _validate(open_auth)
    with pytest.raises(ValueError, match="unknown argument 'modle'"):
        build_app({"modle": "x", "tokens": "t"})
