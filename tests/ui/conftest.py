"""Fixtures for the dashboard tests: the test store, the dashboard served over real HTTP (uvicorn in
a thread), and a real headless Chromium driven by Selenium (Debian's ``chromium`` + ``chromium-driver``,
installed by ``scripts/setup.sh``)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.jobs.conftest import free_port, ray_head  # noqa: F401 - the shared Ray head fixture
from tests.serve.fixtures import serve_cluster, served_tiny  # noqa: F401 - a real Ray Serve with tiny-llama

from .builders import build_store

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
LOGIN_TOKEN = "ui-test-token-0123456789abcdef"


@dataclass
class Server:
    url: str
    store: object
    ids: dict[str, str]


def serve(app, port: int) -> Iterator[str]:
    """Serve ``app`` with uvicorn on loopback in a thread; stops it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(600):  # bounded: uvicorn sets .started once it listens
        if server.started or not thread.is_alive():
            started.set()
            break
        started.wait(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui-tokens") / "tokens.txt"
    path.write_text(f"{LOGIN_TOKEN} alice\n")
    return path


@pytest.fixture(scope="session")
def ui_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ui-store") / "store"
    ids = build_store(path)
    return path, ids


@pytest.fixture(scope="session")
def server(ui_store, tokens_file) -> Iterator[Server]:
    from interplab.store import open_store
    from interplab.ui.app import create_app
    from interplab.ui.config import UIConfig

    path, ids = ui_store
    port = free_port()
    store = open_store(str(path), create=False)
    app = create_app(UIConfig(store=str(path), port=port, tokens=tokens_file, page_size=4), store)
    for url in serve(app, port):
        yield Server(url=url, store=store, ids=ids)
    store.close()


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError("the dashboard tests need Debian's chromium and chromium-driver: bash scripts/setup.sh installs them")
    return browser, driver


@pytest.fixture(scope="session")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:
    """Console messages of level SEVERE since the last call (JS errors, CSP violations, failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, name: str) -> Path:
    """Save a screenshot under tests/ui/artifacts/ (and docs/img/ with INTERPLAB_UPDATE_DOCS_IMG=1)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("INTERPLAB_UPDATE_DOCS_IMG") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMG / f"dashboard-{name}.png")
    return path
