"""A test store holding one committed run of every kind, written with ``RunWriter`` in each kind's
real schema (the columns of the kind's views), plus runs that are failed and still running.

Prompts and tokens carry the XSS strings the dashboard must show as text."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from interplab.store import open_store
from interplab.store.layout import KNOWN_SCHEMAS

XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "{{7*7}}"]
PATCH_TOKENS = ["When", " " + XSS[0], XSS[1], " tok{{7*7}}", " gave"]
N_LAYERS, N_POS, N_HEADS = 3, len(PATCH_TOKENS), 4
D = 8


def patching_rows() -> list[dict]:
    rows = []
    for layer in range(N_LAYERS):
        for pos in range(N_POS):
            value = 0.5 * layer - 0.25 * pos + 0.125
            rows.append({"sweep": "resid_pre", "method": "exact", "layer": layer, "position": pos, "head": None,
                         "value": value, "normalized": (value + 1.0) / 2.0})
        for head in range(N_HEADS):
            value = 0.1 * head - 0.3 * layer
            rows.append({"sweep": "head_out", "method": "exact", "layer": layer, "position": None, "head": head,
                         "value": value, "normalized": value / 2.0})
    return rows


CIRCUIT_EDGES = [
    ("input", "a0.h0<q>", 0.9, True), ("input", "a0.h1<k>", -0.2, False), ("input", "m0", 0.5, True),
    ("a0.h0", "m0", 0.7, True), ("a0.h1", "m0", 0.05, False), ("input", "a1.h0<v>", 0.3, False),
    ("a0.h0", "a1.h1<q>", -0.6, True), ("m0", "a1.h0<k>", 0.15, False), ("m0", "m1", 0.8, True),
    ("a1.h0", "m1", 0.4, True), ("a1.h1", "logits", 1.1, True), ("m1", "logits", 0.95, True),
    ("a0.h1", "logits", -0.01, False),
]


def _layer(name: str) -> int:
    if name == "input":
        return -1
    if name == "logits":
        return 2
    return int(name[1])


def circuit_tables() -> dict[str, pa.Table]:
    edges = pa.table({
        "method": ["eap"] * len(CIRCUIT_EDGES),
        "src": [e[0] for e in CIRCUIT_EDGES],
        "dst": [e[1] for e in CIRCUIT_EDGES],
        "src_layer": [_layer(e[0]) for e in CIRCUIT_EDGES],
        "dst_layer": [_layer(e[1]) for e in CIRCUIT_EDGES],
        "score": [float(e[2]) for e in CIRCUIT_EDGES],
        "in_circuit": [e[3] for e in CIRCUIT_EDGES],
    })
    kept = [e for e in CIRCUIT_EDGES if e[3]]
    circuits = pa.table({"method": ["eap"] * len(kept), "rule": ["topn"] * len(kept),
                         "src": [e[0] for e in kept], "dst": [e[1] for e in kept]})
    faith = pa.Table.from_pylist([
        {"method": "eap", "rule": "topn", "absolute": absolute, "n_edges": n, "fraction": n / len(CIRCUIT_EDGES),
         "kept": n, "value": 0.1 * n, "faithfulness": min(1.0, n / 8 + (0.1 if absolute else 0.0))}
        for absolute in (False, True) for n in (0, 2, 4, 8, 13)
    ])
    summary = pa.Table.from_pylist([{
        "method": "eap", "seconds": 0.5, "n_graph_edges": len(CIRCUIT_EDGES), "circuit_edges": len(kept),
        "clean": 2.0, "corrupted": -1.0, "circuit_value": 1.5, "cpr": 0.8, "cmd": 0.2}])
    return {"edges": edges, "circuits": circuits, "faithfulness": faith, "circuit_summary": summary}


def grafting_tables() -> dict[str, pa.Table]:
    from interplab.analyses.grafting import tables

    labels = {"lr": 1e-3, "epochs": 2, "batch_size": 4, "seed": 0}
    evals = []
    for variant, base in (("base", 30.0), ("W_F", 3.0), ("graft", 4.5), ("control", 28.0)):
        for i, eval_set in enumerate(("F", "ImplF", "F_prime", "ImplF_prime")):
            evals.append({"experiment": "grafting", "variant": variant, "layers": "all", "epoch": None, "eval_set": eval_set,
                          "mean_rank": base + i, "mean_logprob": -base / 10, "n": 8, "n_options": 50, **labels})
    deltas = [{"name": "W_F-theta", "experiment": "grafting", "delta": "W_F-theta", "path": "deltas/x.safetensors",
               "bytes": 1024, "sha256": "0" * 64, "n_tensors": 12, "n_params": 4096, "dtype": "float32", "norm": 0.75, **labels}]
    return {"grafting": tables.eval_table(evals), "deltas": tables.deltas_table(deltas)}


PROBE_WEIGHTS = [[0.5, -0.25, 0.0, 1.0, 0.0, 0.0, -1.0, 0.25], [-0.5, 0.25, 1.0, 0.0, 0.5, 0.0, 1.0, -0.25]]

CAPTURE_PROMPTS = [
    ["The", " cat", " sat"],
    ["<script>alert(1)</script>", " is", " text"],
    ['"><img src=x onerror=alert(1)>', " also"],
    ["A", " {{7*7}}", " token", " here"],
    ["Mary", " and", " John", " went"],
    ["One", " more"],
]


def capture_acts(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows for every (prompt, position): prompt_id, position, act [n, D] (float32, exact in the store)."""
    rng = np.random.default_rng(seed)
    pid = np.array([p for p, toks in enumerate(CAPTURE_PROMPTS) for _ in toks], dtype=np.int64)
    pos = np.array([i for toks in CAPTURE_PROMPTS for i in range(len(toks))], dtype=np.int32)
    act = rng.standard_normal((len(pid), D)).astype(np.float32)
    act[9, 3] = 7.5  # prompt 3 (" {{7*7}}"): the strongest activation of neuron 3
    return {"prompt_id": pid, "position": pos, "act": act}


PROBE_ACCURACY = [(0, 0.55, 0.61), (1, 0.72, 0.80), (2, 0.91, 0.97)]  # (layer, test, train)


def probes_table() -> pa.Table:
    from interplab.analyses.probes.tables import PROBES_SCHEMA

    rows = [{"site": "resid_post", "layer": layer, "position": -1, "label": "io", "n_classes": 2, "d": D, "n_train": 40,
             "n_test": 10, "train_accuracy": train, "test_accuracy": test, "train_loss": 0.5, "test_loss": 0.6,
             "majority": 0.5, "l2": 1e-3, "iterations": 20, "grad_norm": 1e-6} for layer, test, train in PROBE_ACCURACY]
    return pa.Table.from_pylist(rows, schema=PROBES_SCHEMA)


PARTITION_EXEMPLAR_ROWS = (9, 0)  # capture rows (layer 0) that anchor regions 0 and 1
PARTITION_TOP_K = 3


def partition_tables(capture_run: str) -> dict[str, pa.Table]:
    """A two-region dictionary over the capture run's resid_post.0 rows: cosine distance to two
    observed rows, each row in the region of its nearest exemplar, the top members per region."""
    rows = capture_acts()
    act = rows["act"].astype(np.float64)
    unit = act / np.linalg.norm(act, axis=1, keepdims=True)
    exemplars = unit[list(PARTITION_EXEMPLAR_ROWS)]
    distance = 1.0 - unit @ exemplars.T
    region = distance.argmin(axis=1)
    nearest = distance[np.arange(len(region)), region]
    tokens = [t for toks in CAPTURE_PROMPTS for t in toks]
    key = {"source_run": [capture_run] * len(region), "prompt_id": rows["prompt_id"], "position": rows["position"],
           "head": pa.array([None] * len(region), pa.int32()), "token": tokens}
    regions = pa.table({**key, "region": pa.array(region, pa.int32()), "distance": nearest})
    ex_rows = list(PARTITION_EXEMPLAR_ROWS)
    exemplar_table = pa.table({
        "source_run": [capture_run] * 2, "prompt_id": rows["prompt_id"][ex_rows], "position": rows["position"][ex_rows],
        "head": pa.array([None, None], pa.int32()), "token": [tokens[i] for i in ex_rows],
        "region": pa.array([0, 1], pa.int32()), "n_members": [int((region == r).sum()) for r in (0, 1)],
        "mean_distance": [float(nearest[region == r].mean()) for r in (0, 1)],
        "max_distance": [float(nearest[region == r].max()) for r in (0, 1)],
        "vector": pa.array([rows["act"][i].tolist() for i in ex_rows], pa.list_(pa.float32()))})
    members = []
    for r in (0, 1):
        mine = np.flatnonzero(region == r)
        for rank, i in enumerate(mine[np.argsort(nearest[mine], kind="stable")][:PARTITION_TOP_K]):
            toks, pos = CAPTURE_PROMPTS[rows["prompt_id"][i]], int(rows["position"][i])
            members.append({"source_run": capture_run, "prompt_id": int(rows["prompt_id"][i]), "position": pos, "head": None,
                            "token": tokens[i], "region": r, "rank": rank, "distance": float(nearest[i]),
                            "context": "".join(toks[max(0, pos - 8):pos]) + f"[{toks[pos]}]" + "".join(toks[pos + 1:pos + 3]),
                            "prompt": "".join(toks)})
    dictionary = pa.table({"site": ["resid_post.0"], "metric": ["cosine"], "threshold": [0.5], "threshold_rule": ["0.5"],
                           "percentile": pa.array([None], pa.float64()), "n_rows": [len(region)], "n_regions": [2], "d": [D],
                           "inputs": [[capture_run]], "build_seconds": [0.01], "assign_seconds": [0.02]})
    return {"dictionaries": dictionary, "exemplars": exemplar_table, "regions": regions,
            "region_members": pa.Table.from_pylist(members)}


ATTRIBUTION_TOKENS = ["The", " " + XSS[0], XSS[1], " {{7*7}}", " is"]
ATTRIBUTION_VALUES = {"itp": [None, 0.25, -0.5, 1.5, 0.0], "hipe": [None, 0.2, -0.4, 1.4, 0.05]}


def attribution_tables() -> dict[str, pa.Table]:
    from interplab.analyses.attribution.job import ATTRIBUTIONS_SCHEMA, SUMMARY_SCHEMA

    rows, summary = [], []
    for method, values in ATTRIBUTION_VALUES.items():
        for pos, (token, value) in enumerate(zip(ATTRIBUTION_TOKENS, values)):
            rows.append({"prompt_id": 0, "method": method, "position": pos, "token_id": pos, "token": token,
                         "unit": None if value is None else pos - 1, "attribution": value, "window": 1, "level": 0})
        summary.append({"prompt_id": 0, "method": method, "prompt": "".join(ATTRIBUTION_TOKENS), "target": " Paris",
                        "perturbation": "mean", "n_tokens": len(ATTRIBUTION_TOKENS), "n_units": len(ATTRIBUTION_TOKENS) - 1,
                        "base_logprob": -1.25, "forwards": 5 if method == "itp" else 4, "passes": 1 if method == "itp" else 2,
                        "rounds": 1 if method == "itp" else 2, "seconds": 0.01})
    return {"attributions": pa.Table.from_pylist(rows, schema=ATTRIBUTIONS_SCHEMA),
            "attribution_summary": pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)}


def build_store(path) -> dict[str, str]:
    """The test store at ``path``; returns run ids by kind (and 'failed', 'running')."""
    store = open_store(str(path))
    ids: dict[str, str] = {}

    with store.begin_run("patching", model="tiny-llama", spec={"kind": "patching", "sweep": ["resid_pre", "head_out"]}) as w:
        w.write_table("patching", pa.Table.from_pylist(patching_rows(), schema=KNOWN_SCHEMAS["patching"]), chunk="sweeps")
        w.write_table("baselines", pa.Table.from_pylist(
            [{"sweep": "", "name": "clean", "value": 1.0}, {"sweep": "", "name": "corrupted", "value": -1.0}],
            schema=KNOWN_SCHEMAS["baselines"]), chunk="baselines")
        w.write_table("prompts", pa.Table.from_pylist(
            [{"prompt_id": 0, "n_tokens": N_POS, "token_ids": list(range(N_POS)), "tokens": PATCH_TOKENS}],
            schema=KNOWN_SCHEMAS["prompts"]), chunk="prompts")
        w.commit()
        ids["patching"] = w.run_id

    with store.begin_run("circuit", model="tiny-llama", spec={"kind": "circuit", "methods": ["eap"]}) as w:
        for name, table in circuit_tables().items():
            w.write_table(name, table, chunk="eap")
        w.commit()
        ids["circuit"] = w.run_id

    with store.begin_run("grafting", model="tiny-llama", spec={"kind": "grafting"}) as w:
        for name, table in grafting_tables().items():
            w.write_table(name, table, chunk="grafting")
        w.commit()
        ids["grafting"] = w.run_id

    with store.begin_run("capture", model="tiny-llama", spec={"kind": "capture", "sites": ["resid_post.0", "resid_post.1"]}) as w:
        rows = capture_acts()
        tokens = [t for toks in CAPTURE_PROMPTS for t in toks]
        for layer in (0, 1):
            act = rows["act"] if layer == 0 else rows["act"][::-1].copy()
            w.write_activations(0, "resid_post", layer, None, rows["prompt_id"], rows["position"],
                                np.arange(len(tokens), dtype=np.int32), tokens, act, dtype="float32")
        w.write_table("prompts", pa.Table.from_pylist(
            [{"prompt_id": i, "n_tokens": len(t), "token_ids": list(range(len(t))), "tokens": t} for i, t in enumerate(CAPTURE_PROMPTS)],
            schema=KNOWN_SCHEMAS["prompts"]), chunk="prompts")
        direction = [0.0] * D
        direction[5] = 1.0
        w.write_table("directions", pa.table({"name": ["probe-neuron5"], "site": ["resid_post"], "layer": [0],
                                               "vector": pa.array([direction], pa.list_(pa.float32()))}), chunk="directions")
        w.commit()
        ids["capture"] = w.run_id

    with store.begin_run("probe", model="tiny-llama", spec={"kind": "probe"}) as w:  # probe_weights: the probes kind's schema
        weights = pa.table({
            "site": ["resid_post", "resid_post"], "layer": pa.array([0, 0], pa.int32()), "class": ["no", "yes"],
            "class_index": pa.array([0, 1], pa.int32()),
            "weight": pa.array([PROBE_WEIGHTS[0], PROBE_WEIGHTS[1]], pa.list_(pa.float32())),
            "bias": [0.1, -0.1], "norm": [1.0, 1.0]})
        w.write_table("probe_weights", weights, chunk="resid_post.0")
        w.write_table("probes", probes_table(), chunk="probes")
        w.commit()
        ids["probe"] = w.run_id

    with store.begin_run("partition", model="tiny-llama", spec={"kind": "partition"}, inputs=[ids["capture"]]) as w:
        for name, table in partition_tables(ids["capture"]).items():
            w.write_table(name, table, chunk=name)
        w.commit()
        ids["partition"] = w.run_id

    with store.begin_run("attribution", model="tiny-llama", spec={"kind": "attribution"}) as w:
        for name, table in attribution_tables().items():
            w.write_table(name, table, chunk=name)
        w.commit()
        ids["attribution"] = w.run_id

    failed = store.begin_run("capture", model="smollm2-135m", spec={"kind": "capture"})
    failed.fail("<b>boom</b> out of memory")
    ids["failed"] = failed.run_id
    ids["running"] = store.begin_run("patching", model="smollm2-135m", spec={"kind": "patching"}).run_id
    store.close()
    return ids
