"""The Served models page against a real Ray Serve serving tiny-llama (the shared ``served_tiny``
fixture): the model shows as running with the queue depth its replica reports."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from selenium.webdriver.common.by import By

from .conftest import console_errors, free_port, screenshot, serve
from .test_pages import not_blank


@pytest.mark.slow
def test_served_models_page_shows_the_running_model(served_tiny, ui_store, browser):
    from interplab.serve.deployment import served, stats
    from interplab.store import open_store
    from interplab.ui.app import create_app
    from interplab.ui.config import UIConfig

    store = open_store(str(ui_store[0]), create=False)
    try:
        app = create_app(UIConfig(ray_address="auto"), store)  # this process is already on the cluster
        client = TestClient(app)
        page = client.get("/served")
        assert page.status_code == 200
        assert 'id="no-service"' not in page.text
        row = re.search(r"<tr><td>" + re.escape(served_tiny.name) + r"</td>(.*?)</tr>", page.text, re.S)
        assert row is not None, page.text
        assert served()[served_tiny.name]["status"] == "RUNNING" and "RUNNING" in row.group(1)
        depth = re.search(r'<td class="queue-depth">(\d+)</td>', row.group(1))
        assert depth is not None and int(depth.group(1)) == stats(served_tiny.name)["queue_depth"]
        assert "tiny-llama" in row.group(1)
        port = free_port()
        for url in serve(app, port):  # the same page in the browser, for the screenshot
            browser.get(f"{url}/served")
            assert browser.find_element(By.CSS_SELECTOR, "#served-table .queue-depth").text == depth.group(1)
            assert console_errors(browser) == []
            not_blank(screenshot(browser, "served"))
    finally:
        store.close()
