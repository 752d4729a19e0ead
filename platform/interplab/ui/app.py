"""The dashboard's web application (FastAPI + Jinja2, autoescaping on; JS and CSS in ``static/``).

Pages render on the server; results are embedded as JSON data blocks (Jinja's ``tojson`` escapes
``<``, ``>``, ``&`` and quotes) that ``static/*.js`` draws with DOM calls (``textContent``, SVG
elements), never ``innerHTML``. Every response carries a Content-Security-Policy that allows
scripts and styles from this server only, so text from the store can never run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from interplab.ui import activations, analyses, jobs, results, runs, sqlconsole
from interplab.ui.config import UIConfig
from interplab.ui.security import SESSION_COOKIE, AuthRequired, CsrfRejected, Session, Sessions, check_csrf
from interplab.ui.served import ServedModels
from interplab.ui.snapshot import SessionCache, snapshot

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
OPEN_PATHS = ("/login", "/static/", "/healthz")
KIND_PAGES = {
    "patching": "run_patching.html",
    "circuit": "run_circuit.html",
    "grafting": "run_grafting.html",
    "capture": "run_capture.html",
    "partition": "run_partition.html",
    "probe": "run_probe.html",
    "attribution": "run_attribution.html",
}


class Dashboard:
    """The state behind the pages: the store (one lock: DuckDB connections are not shared across
    threads), sessions, the Jobs API and the served-models probe."""

    def __init__(self, config: UIConfig, store: Any) -> None:
        self.config = config
        self.store = store
        self.lock = threading.RLock()
        self.sessions = Sessions(config.tokens)
        self.jobs = jobs.JobsAPI(config.jobs_address, config.ray_token_file)
        self.served = ServedModels(config.ray_address)
        self._figures: dict[str, bytes] = {}
        self._sessions = SessionCache()

    def sql(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(snapshot)`` under the store's lock: one listing of the runs, every query in one session."""
        with self.lock:
            return fn(snapshot(self.store, self._sessions))

    def figure(self, run_id: str) -> bytes | None:
        """The PNG of the run's kind's plot (``interplab plot``), cached: committed runs never change."""
        if run_id in self._figures:
            return self._figures[run_id]
        import tempfile
        from pathlib import Path

        from interplab.jobs import get_kind

        with self.lock:
            info = self.store.run(run_id)
            kind = get_kind(info.kind)
            if kind.plot is None or info.status != "committed":
                return None
            with tempfile.TemporaryDirectory() as tmp:
                paths = kind.plot(self.store, run_id, Path(tmp) / "figure.png", None)
                data = Path(paths[0]).read_bytes()
        self._figures[run_id] = data
        return data


def create_app(config: UIConfig, store: Any) -> FastAPI:
    """The dashboard over ``store`` (an opened :class:`interplab.store.Store`)."""
    dash = Dashboard(config, store)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("interplab.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["urlencode_merge"] = _urlencode_merge
    templates = Jinja2Templates(env=env)
    app = FastAPI(title="interplab dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dashboard = dash
    static = resources.files("interplab.ui") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    def session_of(request: Request) -> Session | None:
        return dash.sessions.current(request.cookies.get(SESSION_COOKIE), request.headers.get("authorization"))

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        session = session_of(request)
        base = {
            "request": request,
            "session": session,
            "logins": dash.sessions.enabled,
            "csrf": session.csrf if session else "",
            "store_uri": getattr(store, "uri", None) or ", ".join(getattr(e, "name", "") for e in getattr(store, "stores", [])),
            "nav": request.url.path.split("/")[1] or "runs",
        }
        response: HTMLResponse = templates.TemplateResponse(request, name, {**base, **context})
        return response

    def error(request: Request, status: int, message: str) -> HTMLResponse:
        response = page(request, "error.html", status=status, message=message)
        response.status_code = status
        return response

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        path = request.url.path
        if config.login_required and not path.startswith(OPEN_PATHS) and session_of(request) is None:
            if path.startswith("/api/"):
                response: Response = JSONResponse({"error": "log in first (a login token)"}, status_code=401)
            else:
                response = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        else:
            response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        return response

    # -- login ---------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/runs") -> HTMLResponse:
        return page(request, "login.html", next=_local(next), failed=None)

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        target = _local((form.get("next") or ["/runs"])[0])
        try:
            sid, _ = dash.sessions.login(token)
        except AuthRequired as exc:
            response = page(request, "login.html", next=target, failed=str(exc))
            response.status_code = 401
            return response
        redirect = RedirectResponse(target, status_code=303)
        redirect.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return redirect

    @app.post("/logout")
    def logout(request: Request) -> Response:
        try:
            check_csrf(
                session_of(request),
                request.headers.get("x-csrf-token"),
                request.headers.get("origin"),
                request.headers.get("host"),
            )
        except (AuthRequired, CsrfRejected) as exc:
            return JSONResponse({"error": str(exc)}, status_code=403)
        dash.sessions.logout(request.cookies.get(SESSION_COOKIE))
        response = JSONResponse({"ok": True})
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- runs ----------------------------------------------------------------------------------

    @app.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request) -> HTMLResponse:
        params = dict(request.query_params)
        try:
            query = runs.RunQuery.from_params(params, config.page_size)
        except runs.QueryError as exc:
            return error(request, 400, str(exc))
        result = runs.query_runs(dash.sql(runs.all_runs), query)
        return page(request, "runs.html", result=result, query=query, params=params, filters=runs.FILTERS, sortable=runs.SORTABLE)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        from interplab.store import StoreError

        try:
            loaded = dash.sql(lambda s: _run_page_data(s, run_id, config))
        except StoreError as exc:
            return error(request, 400, str(exc))
        if loaded is None:
            return error(request, 404, f"no run {run_id!r} in this store")
        run, template, data, tables = loaded
        return page(
            request,
            template,
            run=run,
            data=data,
            tables=tables,
            spec=results.pretty_json(run.get("spec")),
            provenance=results.pretty_json(run.get("provenance")),
            metadata=results.pretty_json(run.get("metadata")),
        )

    @app.get("/runs/{run_id}/figure.png")
    def run_figure(run_id: str) -> Response:
        from interplab.jobs import JobError, SpecError
        from interplab.store import StoreError

        try:
            data = dash.figure(run_id)
        except (StoreError, SpecError, JobError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        if data is None:
            return JSONResponse({"error": "this run's kind draws no figure"}, status_code=404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    # -- activations -----------------------------------------------------------------------------

    @app.get("/activations", response_class=HTMLResponse)
    def activations_page(request: Request) -> HTMLResponse:
        from interplab.store import StoreError

        params = dict(request.query_params)

        def load(s: Any) -> tuple[Any, ...]:
            outcome: dict[str, Any] | None = None
            problem = None
            if params.get("run_id"):
                try:
                    outcome = activations.browse(s, _probe(params, s))
                except (activations.BrowserError, StoreError) as exc:
                    problem = str(exc)
            return activations.browsable(s), activations.stored_directions(s), outcome, problem

        options, stored, outcome, problem = dash.sql(load)
        return page(request, "activations.html", options=options, stored=stored, params=params, outcome=outcome, problem=problem)

    # -- SQL -------------------------------------------------------------------------------------

    @app.get("/sql", response_class=HTMLResponse)
    def sql_page(request: Request) -> HTMLResponse:
        from interplab.store import StoreError

        params = dict(request.query_params)
        query, name = params.get("q"), params.get("saved")

        def load(s: Any) -> tuple[Any, ...]:
            outcome, problem = None, None
            if query or name:
                try:
                    outcome = sqlconsole.grid(sqlconsole.run(s, query, name, _saved_params(params)), config.max_grid_rows)
                except StoreError as exc:
                    problem = str(exc)
            return outcome, problem, s.views()

        outcome, problem, views = dash.sql(load)
        return page(
            request,
            "sql.html",
            q=query or "",
            saved=sqlconsole.saved(),
            chosen=name or "",
            params=params,
            outcome=outcome,
            problem=problem,
            views=views,
            download=str(request.url.query),
        )

    @app.get("/sql/download")
    def sql_download(request: Request) -> Response:
        from interplab.store import StoreError

        params = dict(request.query_params)
        fmt = params.get("format", "csv")
        if fmt not in sqlconsole.FORMATS:
            return JSONResponse({"error": f"format={fmt!r}: use csv or parquet"}, status_code=400)
        try:
            table = dash.sql(lambda s: sqlconsole.run(s, params.get("q"), params.get("saved"), _saved_params(params)))
        except StoreError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        body = sqlconsole.serialise(table, fmt)
        return Response(
            body,
            media_type=sqlconsole.FORMATS[fmt],
            headers={"Content-Disposition": f'attachment; filename="interplab-query.{fmt}"'},
        )

    # -- jobs ------------------------------------------------------------------------------------

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request) -> HTMLResponse:
        rows: list[dict[str, Any]] = []
        problem = None
        try:
            rows = dash.jobs.list()
        except (jobs.JobsUnavailable, LookupError) as exc:
            problem = str(exc)
        if rows:
            progress = dash.sql(lambda s: [jobs.progress(s, r["run_id"]) for r in rows])
            for row, done in zip(rows, progress):
                row["progress"] = done
        return page(request, "jobs.html", jobs=rows, problem=problem, address=config.jobs_address)

    @app.get("/jobs/{submission_id}", response_class=HTMLResponse)
    def job_page(request: Request, submission_id: str) -> HTMLResponse:
        try:
            job = dash.jobs.get(submission_id)
            logs = dash.jobs.logs(submission_id)
        except jobs.JobsUnavailable as exc:
            return error(request, 503, str(exc))
        except LookupError as exc:
            return error(request, 404, f"no job {submission_id!r}: {exc}")
        job["progress"] = dash.sql(lambda s: jobs.progress(s, job["run_id"]))
        return page(request, "job.html", job=job, logs=logs)

    @app.post("/api/jobs/{submission_id}/stop")
    def stop_job(request: Request, submission_id: str) -> JSONResponse:
        try:
            who = check_csrf(
                session_of(request),
                request.headers.get("x-csrf-token"),
                request.headers.get("origin"),
                request.headers.get("host"),
            )
        except AuthRequired as exc:
            return JSONResponse({"error": str(exc)}, status_code=401)
        except CsrfRejected as exc:
            return JSONResponse({"error": str(exc)}, status_code=403)
        try:
            stopped = dash.jobs.stop(submission_id)
        except jobs.JobsUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse({"submission_id": submission_id, "stopped": stopped, "by": who.user})

    # -- served models -----------------------------------------------------------------------------

    @app.get("/served", response_class=HTMLResponse)
    def served_page(request: Request) -> HTMLResponse:
        return page(request, "served.html", report=dash.served.report())

    return app


def _urlencode_merge(params: dict[str, str], **changes: Any) -> str:
    """The query string of ``params`` with ``changes`` applied (empty values dropped)."""
    merged = {**params, **{k: str(v) for k, v in changes.items()}}
    return urlencode({k: v for k, v in merged.items() if v != ""})


def _local(target: str) -> str:
    """A redirect target on this site only (no ``//host`` or ``scheme:`` targets)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/runs"
    return target


def _saved_params(params: dict[str, str]) -> dict[str, str]:
    return {k[len("p_") :]: v for k, v in params.items() if k.startswith("p_")}


def _int(params: dict[str, str], name: str, default: int | None = None) -> int | None:
    raw = params.get(name, "")
    if raw == "" or raw.upper() == "NULL":
        return default
    try:
        return int(raw)
    except ValueError:
        raise activations.BrowserError(f"{name}={raw!r}: a whole number") from None


def _run_page_data(
    s: Any, run_id: str, config: UIConfig
) -> tuple[dict[str, Any], str, dict[str, Any], list[dict[str, Any]]] | None:
    """(run, template, kind data, tables) of one run's page, from one snapshot; None: no such run."""
    found = s.sql("SELECT * FROM runs WHERE run_id = $r", {"r": run_id}).to_pylist()
    if not found:
        return None
    run = runs.normalise(found[0])
    committed = run["status"] == "committed"
    template = KIND_PAGES.get(run["kind"], "run_other.html") if committed else "run_other.html"
    data: dict[str, Any] = {}
    if template == "run_patching.html":
        data = results.patching(s, run_id)
    elif template == "run_circuit.html":
        data = results.circuit(s, run_id, config.max_graph_edges)
    elif template == "run_grafting.html":
        data = results.grafting(s, run_id)
    elif template == "run_capture.html":
        data = results.capture(s, run_id)
    elif template == "run_partition.html":
        data = analyses.partition(s, run_id)
    elif template == "run_probe.html":
        data = analyses.probe(s, run_id)
    elif template == "run_attribution.html":
        data = analyses.attribution(s, run_id)
    return run, template, data, results.run_tables(s, run_id) if committed else []


def _probe(params: dict[str, str], s: Any) -> activations.Probe:
    mode = params.get("mode", "neuron")
    direction = None
    neuron = None
    if mode == "neuron":
        neuron = _int(params, "neuron")
        if neuron is None:
            raise activations.BrowserError("neuron: give a neuron index")
    elif mode == "vector":
        direction = activations.parse_vector(params.get("vector", ""))
    elif mode == "stored":
        direction = activations.stored_direction(s, params.get("stored", ""))
    else:
        raise activations.BrowserError(f"mode={mode!r}: neuron, vector or stored")
    return activations.Probe(
        run_id=params["run_id"],
        site=params.get("site", ""),
        layer=_int(params, "layer"),
        head=_int(params, "head"),
        neuron=neuron,
        direction=direction,
        k=_int(params, "k", 20) or 20,
    )
