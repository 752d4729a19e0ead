"""The dashboard's Kubernetes manifests (``k8s/ui``): checked offline against the shared schema plus
the Deployment and Service fields they use; the command is what the real CLI accepts; the Service
stays ClusterIP; the login tokens and the Ray token are the Secrets the model service and the
RayCluster use."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
UI = K8S / "ui"
SHARED = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "k8s_schema.yaml").read_text())
EXTRA = yaml.safe_load((Path(__file__).parent / "k8s_ui_schema.yaml").read_text())
DEFS = {**SHARED["$defs"], **EXTRA["$defs"]}


def validate(doc: dict) -> None:
    kind = doc.get("kind")
    assert kind in DEFS, f"no schema for kind {kind!r}"
    schema = {"$schema": SHARED["$schema"], "$defs": DEFS, "$ref": f"#/$defs/{kind}"}
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((UI / name).read_text()) if d is not None]
    assert len(docs) == 1
    return docs[0]


@pytest.mark.parametrize("name", sorted(p.name for p in UI.glob("*.yaml")))
def test_manifests_match_the_schema(name):
    validate(load(name))


def test_misspelled_or_exposed_fields_are_caught():
    service, deployment = load("service.yaml"), load("deployment.yaml")
    for doc, mutate in (
        (service, lambda d: d["spec"].__setitem__("type", "LoadBalancer")),
        (service, lambda d: d["spec"]["ports"][0].__setitem__("targetport", 8300)),
        (deployment, lambda d: d["spec"].__setitem__("replica", 1)),
        (deployment, lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("volumeMount", [])),
    ):
        broken = copy.deepcopy(doc)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_the_command_is_what_interplab_ui_accepts_and_the_ports_agree():
    from interplab.cli.ui_cmds import ui

    deployment, service = load("deployment.yaml"), load("service.yaml")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:2] == ["interplab", "ui"]
    ctx = ui.make_context("ui", list(container["command"][2:]))  # click parses it as the CLI would
    params = ctx.params
    assert params["host"] == "0.0.0.0" and params["tokens"] == "/etc/interplab/serve-tokens"
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert params["port"] == port and service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]

    # logins: the model service's tokens Secret, mounted where --tokens points
    serve = yaml.safe_load((K8S / "serve" / "rayservice.yaml").read_text())
    serve_volumes = serve["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == params["tokens"])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == next(v["secret"]["secretName"] for v in serve_volumes if v["name"] == "serve-tokens")

    # the Ray token: the RayCluster's own (token auth on the cluster), for the Jobs API and Serve
    cluster = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": cluster["metadata"]["name"], "key": "auth_token"}
    assert params["jobs_address"] == "http://interplab-head-svc:8265" and params["ray_address"] == "interplab-head-svc:6379"
    # KubeRay creates that Secret (named after the cluster, key auth_token) and the head Service
    # (<cluster>-head-svc) in the RayCluster's namespace: the dashboard must live in the same one
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert yaml.safe_load((UI / "kustomization.yaml").read_text())["namespace"] == base["namespace"]
    assert params["ray_address"].split(":")[0] == f"{cluster['metadata']['name']}-head-svc"
    assert {"configMapRef": {"name": "interplab-store"}} in container["envFrom"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_kustomize_build_validates():
    out = subprocess.run(["kubectl", "kustomize", str(UI)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["namespace"] == "interplab"
