"""Errors across the service boundary.

The server answers a failed request with an HTTP status and a JSON body
``{"error": {"type": "SiteError", "message": "...", "field": "capture[1]", "limit": null}}``. The client
raises the class named by ``type`` when it is on a fixed allow-list (:data:`USER_ERRORS`: the classes the
local backend raises for a user's mistake), with the server's message; anything else is a
:class:`ServiceError`. Nothing is unpickled: a class is looked up by name in the allow-list, never
imported from what the server says.
"""

from __future__ import annotations

from interplab.engine.interventions import InterventionError
from interplab.engine.sites import SiteError
from interplab.engine.tokens import TokenizationError


class ServeError(Exception):
    """Base of the errors this package raises itself (not a user error of the engine)."""


class FieldError(ValueError):
    """A request field that is missing, of the wrong type, shape or dtype, or out of range (HTTP 400)."""

    def __init__(self, field: str, problem: str, *, message: str | None = None) -> None:
        self.field = field
        super().__init__(message if message is not None else f"{field}: {problem}")


class LimitError(ValueError):
    """A request over one of the service's limits (HTTP 413); ``limit`` names it (``max_rows``, ...)."""

    def __init__(self, limit: str, value: int | float, got: int | float, what: str, *, message: str | None = None) -> None:
        self.limit = limit
        self.value = value
        self.got = got
        super().__init__(
            message
            if message is not None
            else f"limit {limit}={value} exceeded: {what} is {got} (see the service's limits: info()['limits'])"
        )


class AuthError(ServeError, PermissionError):
    """No bearer token, or one the service does not know (HTTP 401)."""


class UnknownModelError(ServeError, LookupError):
    """No model of that name is served at this address (HTTP 404), or the request names another model."""


class ServiceError(ServeError, RuntimeError):
    """The service failed (HTTP 5xx), or answered an error whose class is not on the allow-list.

    ``status``: the HTTP status; ``remote_type``: the class name the server gave; ``field``: the request
    field it named, if any."""

    def __init__(self, message: str, *, status: int = 500, remote_type: str = "", field: str | None = None) -> None:
        self.status = status
        self.remote_type = remote_type
        self.field = field
        super().__init__(message)


class ServiceUnavailable(ServiceError):
    """The service could not be reached or is restarting (HTTP 503, or no connection)."""


USER_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        RuntimeError,
        NotImplementedError,
        ZeroDivisionError,
        SiteError,
        InterventionError,
        TokenizationError,
        FieldError,
        LimitError,
    )
}


def status_for(exc: BaseException) -> int:
    """The HTTP status the server answers for ``exc``."""
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, UnknownModelError):
        return 400
    if isinstance(exc, LimitError):
        return 429 if exc.limit == "max_user_in_flight" else 413
    if type(exc).__name__ in USER_ERRORS or isinstance(exc, (ValueError, TypeError, KeyError, IndexError)):
        return 400
    return 500


def error_body(exc: BaseException) -> dict[str, object]:
    """The JSON error body for ``exc``: its class name (the nearest allow-listed base class for a
    subclass the client would not know), its message, and the field or limit it names."""
    name = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in USER_ERRORS), type(exc).__name__)
    if isinstance(exc, (AuthError, UnknownModelError, ServiceError)):
        name = type(exc).__name__
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return {
        "error": {
            "type": name,
            "message": str(message),
            "field": getattr(exc, "field", None),
            "limit": getattr(exc, "limit", None),
        }
    }


def from_body(status: int, body: object) -> Exception:
    """The exception a client raises for an error answer (never anything but a fixed class)."""
    info = body.get("error") if isinstance(body, dict) else None
    if not isinstance(info, dict):
        text = str(body)[:500]
        if status == 503:
            return ServiceUnavailable(f"the service is unavailable (HTTP 503): {text}", status=503)
        return ServiceError(f"HTTP {status}: {text}", status=status)
    name = str(info.get("type", ""))
    message = str(info.get("message", ""))
    field = info.get("field") if isinstance(info.get("field"), str) else None
    if status == 401 or name == "AuthError":
        return AuthError(message)
    if name == "UnknownModelError":
        return UnknownModelError(message)
    if status == 503:
        return ServiceUnavailable(message, status=status, remote_type=name, field=field)
    limit = info.get("limit")
    if name == "LimitError" and isinstance(limit, str):
        return LimitError(limit, 0, 0, "", message=message)
    if name == "FieldError" and field is not None:
        return FieldError(field, "", message=message)
    cls = USER_ERRORS.get(name)
    if cls is None or status >= 500:
        return ServiceError(f"{name}: {message}" if name else message, status=status, remote_type=name, field=field)
    return cls(message)
