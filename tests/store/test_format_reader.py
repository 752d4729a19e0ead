"""The pyarrow-only reader printed in docs/store.md ("Format v1") reads exactly the committed data.

The example is taken from the document verbatim and run in a child process in which ``interplab``
cannot be imported, so it can rely on nothing but the format.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from tests.store.conftest import make_rows, write_site

DOC = Path(__file__).resolve().parents[2] / "docs" / "store.md"

RUNNER = r"""
import json, sys
sys.modules["interplab"] = None  # importing interplab now fails: the reader has only the format
source, root = sys.argv[1], sys.argv[2]
namespace = {}
exec(source, namespace)
table = namespace["read_activations"](root)
rows = {}
for r in table.to_pylist():
    rows[f"{r['run_id']}|{r['site']}|{r['layer']}|{r['head']}|{r['prompt_id']}|{r['position']}"] = [r["token"], r["act"]]
print(json.dumps({"n": table.num_rows, "columns": sorted(table.column_names), "rows": rows}))
"""


def doc_reader() -> str:
    text = DOC.read_text()
    section = text[text.index("## Format v1"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "docs/store.md: the Format v1 section has no python reader"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 18
    assert "interplab" not in code
    return code


def test_doc_reader_reads_exactly_committed_rows(store):
    sites = [("resid_pre", 0, None, "float16"), ("resid_post", None, None, "float32"), ("z", 1, 2, "float16")]
    expected = {}
    with store.begin_run("capture", model="tiny") as w:
        for chunk in range(2):
            files = []
            for i, (site, layer, head, dtype) in enumerate(sites):
                rows = make_rows(30, 6, seed=10 * chunk + i, prompt_offset=100 * chunk)
                files.append(write_site(w, chunk, site, layer, rows, head=head, dtype=dtype))
                acts = rows["act"].astype(dtype).astype(np.float32)
                for j in range(30):
                    key = f"{w.run_id}|{site}|{layer}|{head}|{rows['prompt_id'][j]}|{rows['position'][j]}"
                    expected[key] = (rows["token"][j], acts[j])
            w.finish_chunk("activations", chunk, files)
        w.write_table("baselines", pa.table({"sweep": ["s"], "name": ["clean"], "value": [1.0]}))
    # invisible: a running run, a failed run, and a stray temporary file
    running = store.begin_run("capture", model="tiny")
    write_site(running, 0, "resid_pre", 0, make_rows(7, 6, seed=5))
    failed = store.begin_run("capture", model="tiny")
    write_site(failed, 0, "resid_pre", 0, make_rows(9, 6, seed=6))
    failed.fail("test")
    data = Path(store.location.root) / "data" / "activations" / f"run_id={w.run_id}" / "site=resid_pre" / "layer=0"
    (data / "chunk-000000.parquet.tmp-abc").write_bytes(b"partial")

    out = subprocess.run([sys.executable, "-c", RUNNER, doc_reader(), store.location.root],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["n"] == len(expected) == 2 * 3 * 30
    assert {"run_id", "site", "layer", "prompt_id", "position", "token_id", "token", "head", "act"} <= set(got["columns"])
    assert set(got["rows"]) == set(expected)
    for key, (token, act) in expected.items():
        assert got["rows"][key][0] == token
        np.testing.assert_array_equal(np.array(got["rows"][key][1], np.float32), act)
    # the same rows through interplab's own SQL view
    n = store.sql("SELECT count(*) AS n FROM activations").column("n")[0].as_py()
    assert n == got["n"]
