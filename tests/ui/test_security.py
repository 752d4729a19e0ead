"""Logins, CSRF and read-only behaviour over HTTP (the app in-process through Starlette's TestClient,
nothing bound), and the CLI's refusals."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from .conftest import LOGIN_TOKEN


@pytest.fixture
def open_store_(ui_store):
    from interplab.store import open_store

    path, ids = ui_store
    store = open_store(str(path), create=False)
    yield store, ids
    store.close()


def client_for(store, tokens_file, host: str, **extra) -> TestClient:
    from interplab.ui.app import create_app
    from interplab.ui.config import UIConfig

    app = create_app(UIConfig(host=host, tokens=tokens_file, **extra), store)
    return TestClient(app, base_url="http://dashboard.test", follow_redirects=False)


def test_off_loopback_every_page_needs_a_login(open_store_, tokens_file):
    store, ids = open_store_
    client = client_for(store, tokens_file, host="0.0.0.0")
    for path in ("/runs", f"/runs/{ids['capture']}", "/activations", "/sql?q=SELECT+1", "/sql/download?q=SELECT+1", "/jobs", "/served"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    assert client.post("/api/jobs/x/stop").status_code == 401
    assert client.get("/static/app.js").status_code == 200 and client.get("/healthz").status_code == 200

    bad = client.post("/login", content="token=not-a-valid-token-at-all&next=/runs", headers={"content-type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 401 and "unknown token" in bad.text and "interplab_ui_session" not in bad.headers.get("set-cookie", "")
    good = client.post("/login", content=f"token={LOGIN_TOKEN}&next=//evil.example/x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert good.status_code == 303 and good.headers["location"] == "/runs"  # no open redirect
    cookie = good.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = client.get("/runs")
    assert page.status_code == 200 and ">alice<" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # a bearer token works for API clients, without a session
    assert TestClient(client.app, base_url="http://dashboard.test").get(
        "/runs", headers={"Authorization": f"Bearer {LOGIN_TOKEN}"}, follow_redirects=False
    ).status_code == 200


def test_stop_needs_a_login_and_the_csrf_token(open_store_, tokens_file):
    store, _ = open_store_
    client = client_for(store, tokens_file, host="127.0.0.1")  # loopback: pages open, stopping is not
    assert client.get("/runs").status_code == 200
    assert client.post("/api/jobs/raysubmit_x/stop").status_code == 401
    client.post("/login", content=f"token={LOGIN_TOKEN}", headers={"content-type": "application/x-www-form-urlencoded"})
    page = client.get("/jobs").text
    csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    assert len(csrf) >= 32
    assert client.post("/api/jobs/raysubmit_x/stop").status_code == 403  # no token
    assert client.post("/api/jobs/raysubmit_x/stop", headers={"X-CSRF-Token": "wrong"}).status_code == 403
    cross = client.post("/api/jobs/raysubmit_x/stop", headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert cross.status_code == 403 and "cross-origin" in cross.json()["error"]
    # authorised and same-origin: it reaches the Jobs API, which is not configured here
    ok = client.post("/api/jobs/raysubmit_x/stop", headers={"X-CSRF-Token": csrf, "Origin": "http://dashboard.test"})
    assert ok.status_code == 503 and "no Ray cluster configured" in ok.json()["error"]


def test_sql_goes_through_the_sandbox(open_store_, tokens_file):
    store, _ = open_store_
    client = client_for(store, tokens_file, host="127.0.0.1")
    for bad in ("DROP VIEW runs", "SELECT * FROM read_csv('/etc/passwd')", "COPY runs TO '/tmp/x.csv'", "SELECT 1; SELECT 2"):
        response = client.get("/sql/download", params={"q": bad, "format": "csv"})
        assert response.status_code == 400 and "refused" in response.json()["error"], bad
    assert client.get("/sql/download", params={"q": "SELECT 1 AS x", "format": "xlsx"}).status_code == 400
    assert client.get("/runs", params={"sort": "1; DROP"}).status_code == 400


def test_config_refuses_an_open_bind_without_tokens(tmp_path, ui_store):
    from pydantic import ValidationError

    from interplab.cli.ui_cmds import ui
    from interplab.ui.config import UIConfig

    with pytest.raises(ValidationError, match="--tokens"):
        UIConfig(host="0.0.0.0")
    assert UIConfig(host="::1").login_required is False and UIConfig(host="10.0.0.5", tokens=tmp_path).login_required
    runner = CliRunner()
    out = runner.invoke(ui, ["--store", str(ui_store[0]), "--host", "0.0.0.0"], env={"INTERPLAB_SERVE_TOKENS": ""})
    assert out.exit_code == 2 and "needs a login" in out.output
    out = runner.invoke(ui, ["--store", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "no interplab store" in out.output
    short = tmp_path / "short.txt"
    short.write_text("abc alice\n")
    out = runner.invoke(ui, ["--store", str(ui_store[0]), "--tokens", str(short)])
    assert out.exit_code == 2 and "shorter than 16" in out.output
