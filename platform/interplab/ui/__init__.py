"""The lab's web dashboard: runs, per-kind result pages, an activation browser, a read-only SQL
console, Ray jobs and served models (``interplab ui``; ``docs/dashboard.md``).

Modules: ``config`` (settings), ``security`` (logins, sessions, CSRF), ``runs`` (the runs table),
``results`` (what each kind's page shows), ``activations`` (the browser's SQL), ``sqlconsole``,
``jobs`` (Ray's Jobs API), ``served`` (Ray Serve), ``app`` (the FastAPI application); ``templates/``
and ``static/`` ship with the package (no CDN).
"""

from interplab.ui.config import UIConfig

__all__ = ["UIConfig", "create_app"]


def create_app(config: UIConfig, store: object) -> object:
    """The dashboard's ASGI application (imports FastAPI on call)."""
    from interplab.ui.app import create_app as build

    return build(config, store)
