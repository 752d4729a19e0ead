"""Dashboard speed on 2 cores: the runs page over 1,000 runs (goal < 1 s server time), an
activation-browser query, top 20 over 1 M rows (goal < 2 s), and a patching run page in a real
headless Chromium (goal < 1 s to interactive, Navigation Timing).

    python bench/ui_pages.py [--runs 1000] [--rows 1000000] [--d 64] [--dir /tmp] [--no-browser]

Baselines measured in the same run: the runs page against ``SELECT * FROM runs`` alone (the store's
own cost); the browser (read from the run's files with numpy, ``interplab.store.neurons``) against
the same page data by SQL alone (``activations.browse_sql``) and against the store's saved query
``top_tokens_neuron`` (the top tokens without the histogram and prompt shading); and the patching
page against an error page of the same dashboard (the browser's fixed cost for a page).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from interplab.store import open_store
from interplab.store.layout import KNOWN_SCHEMAS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_of  # noqa: E402


def fill_runs(store, n: int) -> None:
    kinds = ("capture", "patching", "circuit", "grafting")
    for i in range(n):
        w = store.begin_run(kinds[i % 4], model=("smollm2-135m", "tiny-llama")[i % 2], spec={"i": i}, run_id=f"run-{i:05d}")
        if i % 10 == 9:
            w.fail("bench: a failed run")
            continue
        w.commit()


def fill_activations(store, rows: int, d: int) -> None:
    rng = np.random.default_rng(0)
    w = store.begin_run("capture", model="bench", spec={}, run_id="acts")
    per_prompt = 32
    for chunk, start in enumerate(range(0, rows, 200_000)):
        n = min(200_000, rows - start)
        idx = np.arange(start, start + n)
        act = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
        w.write_activations(
            chunk,
            "resid_post",
            5,
            None,
            (idx // per_prompt).astype(np.int64),
            (idx % per_prompt).astype(np.int32),
            rng.integers(0, 49152, n),
            [f"tok{i % 5000}" for i in range(n)],
            act,
        )
    prompts = [
        {
            "prompt_id": p,
            "n_tokens": per_prompt,
            "token_ids": list(range(per_prompt)),
            "tokens": [f" t{p}.{j}" for j in range(per_prompt)],
        }
        for p in range(rows // per_prompt)
    ]
    w.write_table("prompts", pa.Table.from_pylist(prompts, schema=KNOWN_SCHEMAS["prompts"]), chunk="prompts")
    w.commit()


def fill_patching(store, layers: int = 30, positions: int = 15, heads: int = 9) -> str:
    rows = [
        {
            "sweep": "resid_pre",
            "method": "exact",
            "layer": layer,
            "position": p,
            "head": None,
            "value": float(np.sin(layer + p)),
            "normalized": float(np.cos(layer * p)),
        }
        for layer in range(layers)
        for p in range(positions)
    ]
    rows += [
        {
            "sweep": "head_out",
            "method": "exact",
            "layer": layer,
            "position": None,
            "head": h,
            "value": float(np.sin(layer - h)),
            "normalized": float(np.cos(layer + h)),
        }
        for layer in range(layers)
        for h in range(heads)
    ]
    w = store.begin_run("patching", model="smollm2-135m", spec={}, run_id="patch")
    w.write_table("patching", pa.Table.from_pylist(rows, schema=KNOWN_SCHEMAS["patching"]), chunk="all")
    w.write_table(
        "prompts",
        pa.Table.from_pylist(
            [
                {
                    "prompt_id": 0,
                    "n_tokens": positions,
                    "token_ids": list(range(positions)),
                    "tokens": [f" w{j}" for j in range(positions)],
                }
            ],
            schema=KNOWN_SCHEMAS["prompts"],
        ),
        chunk="prompts",
    )
    w.commit()
    return "patch"


def server_ms(client, path: str) -> float:
    response = client.get(path)
    response.raise_for_status()
    return float(response.headers["server-timing"].split("dur=")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()

    root = tempfile.mkdtemp(dir=args.dir, prefix="ui-bench-")
    try:
        store = open_store(f"{root}/store")
        t0 = time.perf_counter()
        fill_runs(store, args.runs)
        fill_activations(store, args.rows, args.d)
        fill_patching(store)
        print(
            f"filled {args.runs} runs + {args.rows:,} x {args.d} activation rows in {time.perf_counter() - t0:.1f} s "
            f"({os.cpu_count()} cores)"
        )

        from fastapi.testclient import TestClient
        from interplab.ui import activations
        from interplab.ui.app import create_app
        from interplab.ui.config import UIConfig

        app = create_app(UIConfig(store=f"{root}/store"), store)
        client = TestClient(app)
        server_ms(client, "/runs")  # warm: views built, run records cached
        page = min(server_ms(client, "/runs?sort=created_at&order=desc&page=3") for _ in range(5))
        filtered = min(server_ms(client, "/runs?kind=patching&status=committed&sort=run_id") for _ in range(5))
        base, _ = best_of(lambda: store.sql("SELECT * FROM runs"), rounds=5)
        print(
            f"runs page ({args.runs + 2} runs): {page:.0f} ms server time; filtered+sorted {filtered:.0f} ms "
            f"(goal < 1000); SELECT * FROM runs alone {base * 1000:.0f} ms; ratio {page / (base * 1000):.2f}x"
        )

        probe = activations.Probe(run_id="acts", site="resid_post", layer=5, neuron=7, k=20)
        t_browse, out = best_of(lambda: activations.browse(store, probe), rounds=3)
        t_sql, by_sql = best_of(lambda: activations.browse_sql(store, probe), rounds=3)
        t_saved, top = best_of(
            lambda: store.saved("top_tokens_neuron", run_id="acts", site="resid_post", layer=5, neuron=7, k=20), rounds=3
        )
        assert out == by_sql and out["examples"][0]["prompt_id"] == top.to_pylist()[0]["prompt_id"]
        direction = np.random.default_rng(1).standard_normal(args.d).tolist()
        dprobe = activations.Probe(run_id="acts", site="resid_post", layer=5, direction=tuple(direction), k=20)
        t_dir, out = best_of(lambda: activations.browse(store, dprobe), rounds=3)
        t_dir_sql, by_sql = best_of(lambda: activations.browse_sql(store, dprobe), rounds=3)
        assert [e["prompt_id"] for e in out["examples"]] == [e["prompt_id"] for e in by_sql["examples"]]
        page_ms = min(
            server_ms(client, "/activations?run_id=acts&site=resid_post&layer=5&mode=neuron&neuron=7&k=20") for _ in range(3)
        )
        print(
            f"activation browser, top 20 over {args.rows:,} x {args.d}: neuron {t_browse:.2f} s, direction {t_dir:.2f} s, "
            f"whole page {page_ms / 1000:.2f} s (goal < 2 s); by SQL alone: neuron {t_sql:.2f} s, direction "
            f"{t_dir_sql:.2f} s (ratios {t_sql / t_browse:.2f}x, {t_dir_sql / t_dir:.2f}x); "
            f"saved query top_tokens_neuron {t_saved:.2f} s"
        )

        if not args.no_browser:
            browser_timing(app)
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def browser_timing(app) -> None:
    import socket

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    script = "const t = performance.getEntriesByType('navigation')[0]; return [t.domInteractive, t.loadEventEnd];"
    try:

        def load(path: str) -> tuple[float, float]:
            best = (float("inf"), float("inf"))
            for _ in range(5):
                driver.get(f"http://127.0.0.1:{port}{path}")
                interactive, loaded = driver.execute_script(script)
                best = min(best, (interactive, loaded))
            return best

        load("/runs/patch")  # warm the static files' cache, as a returning user has it
        interactive, loaded = load("/runs/patch")
        cells = driver.execute_script("return document.querySelectorAll('svg.heatmap rect.cell').length")
        base_i, base_l = load("/runs/no-such-run")
        print(
            f"patching run page (30 layers x 15 tokens + 30 x 9 heads = {cells} cells): domInteractive {interactive:.0f} ms, "
            f"loadEventEnd {loaded:.0f} ms (goal < 1000); error page {base_i:.0f} / {base_l:.0f} ms; ratio {loaded / base_l:.2f}x"
        )
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=30)


if __name__ == "__main__":
    main()
