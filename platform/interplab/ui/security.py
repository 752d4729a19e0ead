"""Logins, sessions and CSRF tokens of the dashboard.

* **Who**: a login token from the model service's tokens path (:class:`interplab.serve.auth.TokenAuth`,
  the same files and Kubernetes Secret). ``POST /login`` with the token opens a session: a random
  id in an ``HttpOnly``, ``SameSite=Strict`` cookie, kept in memory on the server (a restart logs
  everybody out). API clients may send ``Authorization: Bearer TOKEN`` instead.
* **When**: off loopback every page needs a session (``UIConfig.login_required``); on loopback pages
  are open and read-only, and only state-changing requests (stopping a job) need one.
* **CSRF**: each session has its own random token, rendered into pages as a ``<meta>`` tag; a
  state-changing request must carry it in the ``X-CSRF-Token`` header (a cross-site form cannot
  set headers) and come from this origin. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SESSION_COOKIE = "interplab_ui_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str
    bearer: bool = False  # authenticated by an Authorization header: no cookie, so no CSRF to fear


class AuthRequired(Exception):
    """No valid session or bearer token (answered 401, or a redirect to the login page)."""


class CsrfRejected(Exception):
    """A state-changing request without the session's CSRF token, or from another origin (403)."""


class Sessions:
    """Open sessions (in memory), and the token check behind logging in."""

    def __init__(self, tokens: Path | None) -> None:
        self._auth: Any = None
        if tokens is not None:
            from interplab.serve.auth import TokenAuth

            self._auth = TokenAuth(tokens)  # TokenFileError (a ValueError) names what is wrong
        self._open: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether anybody can log in (a tokens path was given)."""
        return self._auth is not None

    def login(self, token: str) -> tuple[str, Session]:
        """A new session for a valid login token: (cookie value, session); AuthRequired otherwise."""
        user = self._user(f"Bearer {token.strip()}")
        sid = secrets.token_urlsafe(32)
        session = Session(user=user, csrf=secrets.token_urlsafe(32))
        with self._lock:
            self._open[sid] = session
        return sid, session

    def logout(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._open.pop(sid, None)

    def current(self, cookie: str | None, authorization: str | None) -> Session | None:
        """The session of a request: its cookie, else its bearer token (a session without CSRF use)."""
        if cookie:
            with self._lock:
                found = self._open.get(cookie)
            if found is not None:
                return found
        if authorization and self.enabled:
            try:
                return Session(user=self._user(authorization), csrf="", bearer=True)
            except AuthRequired:
                return None
        return None

    def _user(self, header: str) -> str:
        if self._auth is None:
            raise AuthRequired("logins are off: start the dashboard with --tokens PATH to enable them")
        from interplab.serve.errors import AuthError

        try:
            user: str = self._auth.user(header)
        except AuthError as exc:
            raise AuthRequired(str(exc)) from None
        return user


def check_csrf(session: Session | None, header: str | None, origin: str | None, host: str | None) -> Session:
    """The session of a state-changing request, if it is logged in, same-origin and carries its token."""
    if session is None:
        raise AuthRequired("log in first: stopping a job needs a login token")
    if session.bearer:
        return session
    if origin is not None and host is not None and origin.split("://", 1)[-1] != host:
        raise CsrfRejected(f"cross-origin request refused (origin {origin!r}, this dashboard is {host!r})")
    if not session.csrf or not header or not hmac.compare_digest(session.csrf.encode(), header.encode()):
        raise CsrfRejected("missing or wrong CSRF token (the X-CSRF-Token header of a page of this dashboard)")
    return session
