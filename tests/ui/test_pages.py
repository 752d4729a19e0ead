"""The dashboard in a real headless Chromium: every page, clicked through; the DOM checked against
the store's own SQL; no console errors; screenshots that are not blank."""

from __future__ import annotations

import io

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from .builders import CIRCUIT_EDGES, PATCH_TOKENS
from .conftest import console_errors, screenshot


def loaded(driver) -> bool:
    """The current document has finished loading (a changed URL alone does not mean its DOM is there)."""
    return bool(driver.execute_script("return document.readyState") == "complete")


def open_page(browser, server, path: str) -> None:
    browser.get(server.url + path)
    WebDriverWait(browser, 60).until(loaded)


def no_errors(browser) -> None:
    errors = console_errors(browser)
    assert errors == [], errors


def tooltip(browser) -> dict[str, str]:
    tip = browser.find_element(By.ID, "tooltip")
    WebDriverWait(browser, 60).until(lambda d: tip.is_displayed())
    return {e.get_attribute("data-label"): e.text for e in tip.find_elements(By.CLASS_NAME, "tip-value")}


def hover(browser, element) -> dict[str, str]:
    ActionChains(browser).move_to_element(element).perform()
    return tooltip(browser)


def hover_path(browser, path) -> dict[str, str]:
    """Point at the middle of an SVG path's stroke (its bounding box's centre may be off the curve)."""
    chart = path.find_element(By.XPATH, "./ancestor::*[local-name()='svg']")
    x, y, w, h = browser.execute_script(
        "const p = arguments[0].getPointAtLength(arguments[0].getTotalLength() / 2);"
        "const r = arguments[1].getBoundingClientRect(); return [p.x, p.y, r.width, r.height];",
        path,
        chart,
    )
    ActionChains(browser).move_to_element_with_offset(chart, int(x - w / 2), int(y - h / 2)).perform()
    return tooltip(browser)


def sql(server, query: str, **params) -> list[dict]:
    return server.store.sql(query, params or None).to_pylist()


def not_blank(path) -> None:
    from PIL import Image, ImageStat

    image = Image.open(path).convert("L")
    assert image.size[0] >= 800, image.size
    assert ImageStat.Stat(image).stddev[0] > 10, f"{path} looks blank"


def test_runs_filter_sort_paginate(browser, server):
    open_page(browser, server, "/runs")
    every = sql(server, "SELECT run_id FROM runs")
    assert int(browser.find_element(By.ID, "runs-total").text) == len(every) == 9
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.run-row")) == 4  # page_size 4
    browser.find_element(By.ID, "page-next").click()
    WebDriverWait(browser, 60).until(lambda d: "page=2" in d.current_url and loaded(d))
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.run-row")) == 4
    browser.find_element(By.ID, "page-next").click()
    WebDriverWait(browser, 60).until(lambda d: "page=3" in d.current_url and loaded(d))
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.run-row")) == 1

    open_page(browser, server, "/runs")
    Select(browser.find_element(By.ID, "filter-kind")).select_by_value("capture")
    browser.find_element(By.ID, "apply-filters").click()
    WebDriverWait(browser, 60).until(lambda d: "kind=capture" in d.current_url and loaded(d))
    shown = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a.run-link")]
    assert sorted(shown) == sorted(r["run_id"] for r in sql(server, "SELECT run_id FROM runs WHERE kind = 'capture'"))

    Select(browser.find_element(By.ID, "filter-status")).select_by_value("failed")
    browser.find_element(By.ID, "apply-filters").click()
    WebDriverWait(browser, 60).until(lambda d: "status=failed" in d.current_url and loaded(d))
    shown = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a.run-link")]
    assert shown == [server.ids["failed"]]

    owner = sql(server, "SELECT coalesce(owner, \"user\") AS o FROM runs LIMIT 1")[0]["o"]
    open_page(browser, server, "/runs?sort=run_id&order=desc")
    Select(browser.find_element(By.ID, "filter-owner")).select_by_value(owner)
    browser.find_element(By.ID, "apply-filters").click()
    WebDriverWait(browser, 60).until(lambda d: "owner=" in d.current_url and loaded(d))
    browser.find_element(By.ID, "sort-run_id").click()  # toggles to ascending
    WebDriverWait(browser, 60).until(lambda d: "order=asc" in d.current_url and loaded(d))
    shown = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a.run-link")]
    assert shown == sorted(r["run_id"] for r in every)[:4]
    browser.find_element(By.CSS_SELECTOR, "a.run-link").click()
    WebDriverWait(browser, 60).until(lambda d: "/runs/" in d.current_url and loaded(d))
    assert browser.find_element(By.ID, "run-id").text == shown[0]
    no_errors(browser)


def test_patching_heatmap_matches_the_store(browser, server):
    run_id = server.ids["patching"]
    open_page(browser, server, f"/runs/{run_id}")
    rows = sql(server, "SELECT layer, position, value, normalized FROM patching WHERE run_id = $r AND sweep = 'resid_pre'", r=run_id)
    cells = browser.find_elements(By.CSS_SELECTOR, "svg.heatmap[data-sweep='resid_pre'] rect.cell")
    assert len(cells) == len(rows) == 15
    by_key = {(r["layer"], r["position"]): r for r in rows}
    for cell in cells:
        row = by_key[(int(cell.get_attribute("data-layer")), int(cell.get_attribute("data-x")))]
        assert float(cell.get_attribute("data-value")) == pytest.approx(row["value"], abs=1e-12)
        assert float(cell.get_attribute("data-normalized")) == pytest.approx(row["normalized"], abs=1e-12)
        assert cell.get_attribute("data-token") == PATCH_TOKENS[row["position"]]
    for cell in cells[:: 4]:  # hover: the tooltip shows the cell's layer, token and both values
        tip = hover(browser, cell)
        row = by_key[(int(cell.get_attribute("data-layer")), int(cell.get_attribute("data-x")))]
        assert tip["layer"] == str(row["layer"])
        assert tip["token"].startswith(f"{row['position']}: ") and PATCH_TOKENS[row["position"]] in tip["token"]
        assert float(tip["value"]) == pytest.approx(row["value"], rel=1e-5, abs=1e-9)
        assert float(tip["normalized"]) == pytest.approx(row["normalized"], rel=1e-5, abs=1e-9)
    heads = sql(server, "SELECT layer, head, value FROM patching WHERE run_id = $r AND sweep = 'head_out'", r=run_id)
    head_cells = browser.find_elements(By.CSS_SELECTOR, "svg.heatmap[data-sweep='head_out'] rect.cell")
    assert len(head_cells) == len(heads) == 12
    assert sorted((int(c.get_attribute("data-layer")), int(c.get_attribute("data-x"))) for c in head_cells) == sorted(
        (h["layer"], h["head"]) for h in heads
    )
    no_errors(browser)
    not_blank(screenshot(browser, "patching"))


def test_circuit_graph_has_the_runs_edges(browser, server):
    run_id = server.ids["circuit"]
    open_page(browser, server, f"/runs/{run_id}")
    edges = sql(server, "SELECT src, dst, score FROM edges WHERE run_id = $r", r=run_id)
    paths = browser.find_elements(By.CSS_SELECTOR, "svg.circuit path.edge")
    assert len(paths) == len(edges) == len(CIRCUIT_EDGES)
    assert sorted((p.get_attribute("data-src"), p.get_attribute("data-dst")) for p in paths) == sorted(
        (e["src"], e["dst"]) for e in edges
    )
    strongest = max(edges, key=lambda e: abs(e["score"]))
    path = next(p for p in paths if p.get_attribute("data-src") == strongest["src"] and p.get_attribute("data-dst") == strongest["dst"])
    tip = hover_path(browser, path)
    assert tip["edge"] == f"{strongest['src']} → {strongest['dst']}"
    assert float(tip["score"]) == pytest.approx(strongest["score"], rel=1e-5)
    in_circuit = {(p.get_attribute("data-src"), p.get_attribute("data-dst")) for p in browser.find_elements(By.CSS_SELECTOR, "path.edge.in-circuit")}
    assert in_circuit == {(e["src"], e["dst"]) for e in sql(server, "SELECT src, dst FROM edges WHERE run_id = $r AND in_circuit", r=run_id)}

    slider = browser.find_element(By.ID, "threshold")
    slider.send_keys(Keys.END)  # threshold = the largest |score|: only the strongest edge stays
    visible = [p for p in paths if p.value_of_css_property("display") != "none"]
    assert [(p.get_attribute("data-src"), p.get_attribute("data-dst")) for p in visible] == [(strongest["src"], strongest["dst"])]
    slider.send_keys(Keys.HOME)
    assert all(p.value_of_css_property("display") != "none" for p in paths)
    assert browser.find_element(By.ID, "edge-count").text.startswith(f"{len(edges)} of {len(edges)} edges")
    curves = sql(server, "SELECT DISTINCT method, rule, absolute FROM faithfulness WHERE run_id = $r", r=run_id)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#faithfulness polyline.series")) == len(curves) == 2
    no_errors(browser)
    not_blank(screenshot(browser, "circuit"))


def test_grafting_rank_tables_and_plot(browser, server):
    run_id = server.ids["grafting"]
    open_page(browser, server, f"/runs/{run_id}")
    table = browser.find_element(By.ID, "ranks-grafting")
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for eval_set, text in zip(header[3:], cells[3:]):
            want = sql(server, "SELECT mean_rank FROM grafting WHERE run_id = $r AND variant = $v AND eval_set = $e",
                       r=run_id, v=cells[0], e=eval_set)[0]["mean_rank"]
            assert float(text) == pytest.approx(want, abs=5e-4)
    assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == 4
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.getElementById('run-figure').naturalWidth") > 0)
    no_errors(browser)
    not_blank(screenshot(browser, "grafting"))


def test_capture_coverage(browser, server):
    run_id = server.ids["capture"]
    open_page(browser, server, f"/runs/{run_id}")
    cover = sql(server, "SELECT site, layer, count(*) AS n FROM activations WHERE run_id = $r GROUP BY ALL", r=run_id)
    cells = browser.find_elements(By.CSS_SELECTOR, "svg.coverage rect.cell")
    assert sorted((c.get_attribute("data-site"), int(c.get_attribute("data-layer")), int(c.get_attribute("data-rows"))) for c in cells) == sorted(
        (r["site"], r["layer"], r["n"]) for r in cover
    )
    tip = hover(browser, cells[0])
    assert tip["rows"] == cells[0].get_attribute("data-rows")
    no_errors(browser)
    not_blank(screenshot(browser, "capture"))


def test_activation_browser_top_prompt_is_the_sqls(browser, server):
    run_id = server.ids["capture"]
    open_page(browser, server, "/activations")
    Select(browser.find_element(By.ID, "where")).select_by_value(f"{run_id}|resid_post|0")
    neuron = browser.find_element(By.ID, "neuron")
    neuron.clear()
    neuron.send_keys("3")
    browser.find_element(By.ID, "browse").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.example"))
    top = server.store.saved("top_tokens_neuron", run_id=run_id, site="resid_post", layer=0, neuron=3, k=1).to_pylist()[0]
    first = browser.find_element(By.CSS_SELECTOR, "li.example")
    assert int(first.get_attribute("data-prompt-id")) == top["prompt_id"]
    assert float(first.get_attribute("data-activation")) == pytest.approx(top["activation"], rel=1e-6)
    tokens = first.find_elements(By.CSS_SELECTOR, ".tok")
    prompt = sql(server, "SELECT tokens FROM prompts WHERE run_id = $r AND prompt_id = $p", r=run_id, p=top["prompt_id"])[0]["tokens"]
    assert [t.text for t in tokens] == prompt  # white-space: pre-wrap keeps each token's spaces
    assert [t.get_attribute("textContent") for t in tokens] == prompt
    shaded = [t for t in tokens if t.get_attribute("data-activation")]
    assert all(t.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent") for t in shaded)
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.histogram rect.bar")
    n_rows = sql(server, "SELECT count(*) AS n FROM activations WHERE run_id = $r AND site = 'resid_post' AND layer = 0", r=run_id)[0]["n"]
    assert sum(int(b.get_attribute("data-count")) for b in bars) == n_rows
    no_errors(browser)
    not_blank(screenshot(browser, "activations"))

    # a stored direction (the 'directions' table): the top prompt is the saved direction query's
    browser.find_element(By.ID, "mode-stored").click()
    Select(browser.find_element(By.ID, "stored")).select_by_value(f"directions|{run_id}|probe-neuron5")
    browser.find_element(By.ID, "browse").click()
    WebDriverWait(browser, 30).until(lambda d: "mode=stored" in d.current_url and loaded(d))
    vector = sql(server, "SELECT vector FROM directions WHERE name = 'probe-neuron5'")[0]["vector"]
    want = server.store.saved("top_tokens_direction", run_id=run_id, site="resid_post", layer=0, direction=vector, k=1).to_pylist()[0]
    first = browser.find_element(By.CSS_SELECTOR, "li.example")
    assert int(first.get_attribute("data-prompt-id")) == want["prompt_id"]
    assert float(first.get_attribute("data-activation")) == pytest.approx(want["projection"], rel=1e-6)

    # a pasted vector of the wrong width is refused with a message naming it
    browser.find_element(By.ID, "mode-vector").click()
    browser.find_element(By.ID, "vector").send_keys("[1, 2, 3]")
    browser.find_element(By.ID, "browse").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "browser-error"))
    assert "3 numbers" in browser.find_element(By.ID, "browser-error").text
    no_errors(browser)


def test_sql_console_grid_downloads_and_sandbox(browser, server):
    import httpx
    import pyarrow.parquet as pq

    open_page(browser, server, "/sql")
    query = "SELECT run_id, kind, status FROM runs ORDER BY run_id"
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query)
    browser.find_element(By.ID, "run-sql").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "result"))
    grid = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in browser.find_elements(By.CSS_SELECTOR, "#result tbody tr")]
    assert grid == [[r["run_id"], r["kind"], r["status"]] for r in sql(server, query)]
    not_blank(screenshot(browser, "sql"))
    csv_url = browser.find_element(By.ID, "download-csv").get_attribute("href")
    parquet_url = browser.find_element(By.ID, "download-parquet").get_attribute("href")
    csv = httpx.get(csv_url).text.splitlines()
    assert csv[0] == '"run_id","kind","status"' and len(csv) == 1 + len(grid)
    table = pq.read_table(io.BytesIO(httpx.get(parquet_url).content))
    assert table.to_pylist() == sql(server, query)

    # a saved query with its parameters
    run_id = server.ids["capture"]
    form = browser.find_element(By.ID, "saved-top_tokens_neuron")
    for name, value in (("run_id", run_id), ("site", "resid_post"), ("layer", "0"), ("neuron", "3"), ("k", "5")):
        form.find_element(By.NAME, f"p_{name}").send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 30).until(lambda d: "saved=top_tokens_neuron" in d.current_url and loaded(d))
    first = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#result tbody tr")[0].find_elements(By.TAG_NAME, "td")]
    top = server.store.saved("top_tokens_neuron", run_id=run_id, site="resid_post", layer=0, neuron=3, k=5).to_pylist()[0]
    assert int(first[0]) == top["prompt_id"] and int(first[1]) == top["position"]

    # the sandbox: writes and file reads are refused, with the store's message
    for bad in ("DELETE FROM runs", "SELECT * FROM read_parquet('/etc/passwd')"):
        open_page(browser, server, "/sql?" + httpx.QueryParams({"q": bad}).__str__())
        assert "refused" in browser.find_element(By.ID, "sql-error").text
    no_errors(browser)


XSS_STRINGS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "{{7*7}}"]


def assert_inert(browser) -> None:
    """No alert opened, no element injected: only the page's own scripts and no <img src=x>."""
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 - raises when no alert is open
    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x']") == []
    sources = browser.execute_script("return [...document.scripts].map(s => s.src || s.type)")
    assert all(s.startswith(f"{browser.current_url.split('/')[0]}//") or s == "application/json" for s in sources), sources


def test_xss_strings_render_as_text(browser, server):
    open_page(browser, server, f"/runs/{server.ids['capture']}")
    texts = [td.get_attribute("textContent") for td in browser.find_elements(By.CSS_SELECTOR, "td.prompt-text")]
    assert "<script>alert(1)</script> is text" in texts
    assert '"><img src=x onerror=alert(1)> also' in texts
    assert "A {{7*7}} token here" in texts
    assert_inert(browser)

    open_page(browser, server, f"/runs/{server.ids['patching']}")
    labels = [t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "svg.heatmap text.xtick")]
    assert f"1 {PATCH_TOKENS[1]}" in labels and f"2 {PATCH_TOKENS[2]}" in labels and f"3 {PATCH_TOKENS[3]}" in labels
    assert_inert(browser)

    open_page(browser, server, f"/activations?run_id={server.ids['capture']}&site=resid_post&layer=0&mode=neuron&neuron=3&k=6")
    shown = {t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, ".tok")}
    assert set(XSS_STRINGS[:2]) <= shown and " {{7*7}}" in shown
    for token in browser.find_elements(By.CSS_SELECTOR, ".tok"):
        if token.get_attribute("textContent") in (*XSS_STRINGS, " {{7*7}}"):
            assert browser.execute_script("return arguments[0].innerText", token) == token.get_attribute("textContent")
    assert_inert(browser)

    open_page(browser, server, f"/runs/{server.ids['failed']}")  # the failure reason holds markup too
    assert browser.find_element(By.CSS_SELECTOR, "dd.error").text == "<b>boom</b> out of memory"
    assert browser.find_elements(By.CSS_SELECTOR, "dd.error b") == []
    no_errors(browser)


def test_every_page_opens_without_console_errors(browser, server):
    pages = {"runs": "/runs", "sql": "/sql", "jobs": "/jobs", "served": "/served"}
    pages.update({f"run-{k}": f"/runs/{v}" for k, v in server.ids.items()})
    for name, path in pages.items():
        open_page(browser, server, path)
        assert browser.find_element(By.TAG_NAME, "h1").text, name
        no_errors(browser)
        if name in ("runs", "served"):
            not_blank(screenshot(browser, name if name == "runs" else "served-none"))
    open_page(browser, server, "/served")
    assert "no service" in browser.find_element(By.ID, "no-service").text
    open_page(browser, server, "/jobs")
    assert "no Ray cluster configured" in browser.find_element(By.ID, "jobs-problem").text
    open_page(browser, server, "/runs/no-such-run")
    assert "no run 'no-such-run'" in browser.find_element(By.ID, "error").text
    logged = console_errors(browser)  # the browser logs the 404 of the page itself, and nothing else
    assert len(logged) == 1 and "404" in logged[0]["message"], logged
    for nav in ("activations", "sql", "jobs", "served", "runs"):  # click through the navigation
        browser.find_element(By.ID, f"nav-{nav}").click()
        WebDriverWait(browser, 60).until(lambda d, n=nav: d.current_url.endswith(f"/{n}") and loaded(d))
        assert "active" in browser.find_element(By.ID, f"nav-{nav}").get_attribute("class")
    no_errors(browser)
