"""KubeRay manifests: every file in ``k8s/`` and every ``interplab k8s render`` output is checked
offline against ``k8s_schema.yaml`` (the fields we use, nothing else), overlays render with
kustomize, and the checked-in example RayJob is what the renderer produces."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from .conftest import JOBS_DIR, K8S_DIR

SCHEMA = yaml.safe_load((Path(__file__).parent / "k8s_schema.yaml").read_text())
MANIFESTS = sorted(p for p in K8S_DIR.rglob("*.yaml"))
KUSTOMIZE_DIRS = sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def validate(doc) -> None:
    """Validate one document against the schema of its kind (patches and kustomizations too)."""
    if isinstance(doc, list):
        name = "JsonPatch"
    else:
        name = doc.get("kind")
        assert name in SCHEMA["$defs"], f"no schema for kind {name!r}"
    schema = {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{name}"}
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_manifest_matches_schema(path):
    for doc in load_docs(path):
        validate(doc)


def test_misspelled_fields_are_caught():
    rayjob = load_docs(K8S_DIR / "jobs" / "capture-smollm2.rayjob.yaml")[1]
    for mutate in (
        lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", d["spec"].pop("shutdownAfterJobFinishes")),
        lambda d: d["spec"].__setitem__("ttlSecondAfterFinished", d["spec"].pop("ttlSecondsAfterFinished")),
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("minReplica", 0),
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        ["resources"]["limits"].__setitem__("nvidia.com/gpus", "1"),
        lambda d: d["spec"]["rayClusterSpec"].__setitem__("authOptions", {"mode": "disabled"}),
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].__setitem__("serviceType", "LoadBalancer"),
        lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"),
    ):
        doc = copy.deepcopy(rayjob)
        mutate(doc)
        with pytest.raises(jsonschema.ValidationError):
            validate(doc)


def test_raycluster_has_gpu_workers_autoscaling_and_auth():
    cluster = load_docs(K8S_DIR / "base" / "raycluster.yaml")[0]["spec"]
    worker = cluster["workerGroupSpecs"][0]
    assert cluster["enableInTreeAutoscaling"] and worker["minReplicas"] < worker["maxReplicas"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["authOptions"] == {"mode": "token"}


def test_example_rayjob_is_what_the_renderer_writes(cli, tmp_path):
    out = tmp_path / "job.yaml"
    result = cli("k8s", "render", str(JOBS_DIR / "capture-smollm2.yaml"), "--run-id", "capture-smollm2-example",
                 "--image", "interplab", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    checked_in = (K8S_DIR / "jobs" / "capture-smollm2.rayjob.yaml").read_text().split("\n", 1)[1]
    assert out.read_text().split("\n", 1)[1] == checked_in.replace(
        str(JOBS_DIR / "capture-smollm2.yaml"), "jobs/capture-smollm2.yaml"), "regenerate k8s/jobs/ (see its kustomization)"


@pytest.mark.parametrize("path", sorted(JOBS_DIR.glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("backend", ["pvc", "s3"])
def test_render_every_job_spec(path, backend, cli):
    result = cli("k8s", "render", str(path), "--store-backend", backend, "--gpus", "1", "--run-id", "r1")
    assert result.exit_code == 0, result.stderr
    configmap, rayjob = load_docs_text(result.stdout)
    validate(configmap)
    validate(rayjob)
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert "--run-id r1" in spec["entrypoint"]
    assert yaml.safe_load(configmap["data"]["spec.yaml"])["kind"] == yaml.safe_load(path.read_text())["kind"]
    volumes = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"].get("volumes", [])
    assert bool(volumes) == (backend == "pvc")


def load_docs_text(text: str) -> list:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_render_refuses_local_dataset_files(cli, tmp_path):
    (tmp_path / "p.jsonl").write_text('"a b"\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: capture\nmodel: tiny-llama\ndataset: {path: p.jsonl}\nsites: [embed]\n")
    result = cli("k8s", "render", str(spec))
    assert result.exit_code == 2 and "dataset.path" in result.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS, ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_kustomize_builds_validate(directory):
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = load_docs_text(out.stdout)
    assert docs
    for doc in docs:
        validate(doc)
    kinds = {d["kind"] for d in docs}
    if directory.name == "pvc":
        cluster = next(d for d in docs if d["kind"] == "RayCluster")
        assert "PersistentVolumeClaim" in kinds
        for pod in [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]:
            assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "interplab-store"
            assert pod["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/mnt/store"
    if directory.name == "s3":
        store = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "interplab-store")
        assert store["data"]["INTERPLAB_STORE"].startswith("s3://")
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob"):  # the images transformer replaced the placeholder
            assert "image: ghcr.io/interplab/interplab:0.1.0" in yaml.safe_dump(doc)
