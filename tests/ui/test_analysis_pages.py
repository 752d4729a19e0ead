"""The run pages of the store-reading analyses (partition, probe, attribution) in a real headless
Chromium: the DOM against the store's own SQL over the kinds' views, the XSS tokens as text, no
console errors, screenshots that are not blank."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from .builders import ATTRIBUTION_TOKENS, CAPTURE_PROMPTS, PROBE_ACCURACY
from .conftest import screenshot
from .test_pages import assert_inert, hover, no_errors, not_blank, open_page, sql

TRANSPARENT = ("rgba(0, 0, 0, 0)", "transparent")


def test_partition_page_shows_the_dictionary_and_each_regions_members(browser, server):
    run_id = server.ids["partition"]
    open_page(browser, server, f"/runs/{run_id}")
    dictionary = sql(server, "SELECT n_regions, n_rows FROM dictionaries WHERE run_id = $r", r=run_id)[0]
    assert int(browser.find_element(By.ID, "n-regions").text) == dictionary["n_regions"] == 2
    assert int(browser.find_element(By.ID, "n-rows").text) == dictionary["n_rows"]
    assigned = sql(server, "SELECT count(*) AS n FROM regions WHERE run_id = $r", r=run_id)[0]["n"]
    assert browser.find_element(By.ID, "n-assigned").text.startswith(f"{assigned} rows in 2 regions")

    sections = browser.find_elements(By.CSS_SELECTOR, "section.region")
    exemplars = sql(server, "SELECT region, n_members FROM exemplars WHERE run_id = $r ORDER BY n_members DESC, region", r=run_id)
    assert [(int(s.get_attribute("data-region")), int(s.get_attribute("data-members"))) for s in sections] == [
        (e["region"], e["n_members"]) for e in exemplars
    ]
    for section in sections:
        region = int(section.get_attribute("data-region"))
        want = sql(server, "SELECT rank, prompt_id, position, token, distance FROM region_members "
                   "WHERE run_id = $r AND region = $g ORDER BY rank", r=run_id, g=region)
        items = section.find_elements(By.CSS_SELECTOR, "li.member")
        assert [(int(i.get_attribute("data-rank")), int(i.get_attribute("data-prompt-id")), int(i.get_attribute("data-position")))
                for i in items] == [(m["rank"], m["prompt_id"], m["position"]) for m in want]
        for item, member in zip(items, want):
            assert float(item.get_attribute("data-distance")) == pytest.approx(member["distance"], rel=1e-9, abs=1e-12)
            marked = item.find_elements(By.CSS_SELECTOR, ".tok.member-tok")
            assert [t.get_attribute("textContent") for t in marked] == [member["token"]]
            assert int(marked[0].get_attribute("data-position")) == member["position"]
            assert marked[0].value_of_css_property("background-color") not in TRANSPARENT
            shown = "".join(t.get_attribute("textContent") for t in item.find_elements(By.CSS_SELECTOR, ".tok"))
            assert shown in "".join(CAPTURE_PROMPTS[member["prompt_id"]])  # the member's prompt, around the member
    shown = {t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, ".tok")}
    assert {"<script>alert(1)</script>", '"><img src=x onerror=alert(1)>'} & shown  # the XSS prompts are members
    assert_inert(browser)
    no_errors(browser)
    not_blank(screenshot(browser, "partition"))


def test_probe_page_chart_and_table_equal_the_probes_view(browser, server):
    run_id = server.ids["probe"]
    open_page(browser, server, f"/runs/{run_id}")
    rows = sql(server, "SELECT layer, test_accuracy, train_accuracy, majority FROM probes WHERE run_id = $r ORDER BY layer", r=run_id)
    assert [(r["layer"], r["test_accuracy"], r["train_accuracy"]) for r in rows] == PROBE_ACCURACY
    table = browser.find_elements(By.CSS_SELECTOR, "#probes tr.probe-row")
    assert [(int(t.get_attribute("data-layer")), float(t.find_element(By.CLASS_NAME, "test-accuracy").text)) for t in table] == [
        (r["layer"], pytest.approx(r["test_accuracy"], abs=5e-5)) for r in rows
    ]
    chart = browser.find_element(By.CSS_SELECTOR, "svg.probe-accuracy")
    assert len(chart.find_elements(By.CSS_SELECTOR, "polyline.series")) == 3  # test, train, majority
    points = chart.find_elements(By.CSS_SELECTOR, "circle.point")
    assert len(points) == 3 * len(rows)
    for point, row in zip(points[: len(rows)], rows):  # the first series: held-out accuracy per layer
        tip = hover(browser, point)
        assert tip["series"] == "resid_post test"
        assert float(tip["layer"]) == row["layer"] and float(tip["accuracy"]) == pytest.approx(row["test_accuracy"], rel=1e-3)
    no_errors(browser)
    not_blank(screenshot(browser, "probe"))


def test_attribution_page_shades_each_token_by_its_attribution(browser, server):
    run_id = server.ids["attribution"]
    open_page(browser, server, f"/runs/{run_id}")
    sections = browser.find_elements(By.CSS_SELECTOR, "section.attribution")
    summary = sql(server, "SELECT prompt_id, method, forwards FROM attribution_summary WHERE run_id = $r ORDER BY prompt_id, method", r=run_id)
    assert [(int(s.get_attribute("data-prompt-id")), s.get_attribute("data-method")) for s in sections] == [
        (r["prompt_id"], r["method"]) for r in summary
    ]
    for section, row in zip(sections, summary):
        want = sql(server, "SELECT position, token, attribution FROM attributions WHERE run_id = $r AND prompt_id = $p "
                   "AND method = $m ORDER BY position", r=run_id, p=row["prompt_id"], m=row["method"])
        tokens = section.find_elements(By.CSS_SELECTOR, ".tok")
        assert [t.get_attribute("textContent") for t in tokens] == [w["token"] for w in want] == ATTRIBUTION_TOKENS
        for token, w in zip(tokens, want):
            value = token.get_attribute("data-value")
            if w["attribution"] is None:
                assert value is None
                assert token.value_of_css_property("background-color") in TRANSPARENT
            else:
                assert float(value) == pytest.approx(w["attribution"], rel=1e-12)
                if w["attribution"] != 0:
                    assert token.value_of_css_property("background-color") not in TRANSPARENT
        assert f"{row['forwards']} forwards" in section.find_element(By.TAG_NAME, "h3").text
        strongest = max((w for w in want if w["attribution"] is not None), key=lambda w: abs(w["attribution"]))
        tip = hover(browser, tokens[strongest["position"]])
        assert float(tip["value"]) == pytest.approx(strongest["attribution"], rel=1e-4)
    assert_inert(browser)
    no_errors(browser)
    not_blank(screenshot(browser, "attribution"))
