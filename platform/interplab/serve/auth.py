"""Who may use a served model: bearer tokens mapped to user names.

Every request carries ``Authorization: Bearer TOKEN``. The tokens come from one path, read by each
replica (so a Kubernetes Secret mounted into the pods works as it is):

* a **directory** (a mounted Secret): every file not starting with ``.`` is one user; the file's
  name is the user name and its content (stripped) the token. ``kubectl create secret generic
  interplab-serve-tokens --from-literal=alice=$(openssl rand -hex 32)`` gives ``/…/alice``.
* a **``.toml`` file** (Python >= 3.11): a ``[tokens]`` table ``"TOKEN" = "user"``.
* any other **file**: one ``TOKEN USER`` pair per line; blank lines and ``#`` comments are ignored.

Tokens must be at least 16 characters. The path is re-read when its modification time changes
(a rotated Secret takes effect without a restart). Tokens are kept only as SHA-256 digests and
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from interplab.serve.errors import AuthError

MIN_TOKEN_CHARS = 16
TOKENS_ENV = "INTERPLAB_SERVE_TOKENS"


class TokenFileError(ValueError):
    """A tokens file or directory that cannot be used (missing, malformed, a token too short)."""


def read_tokens(path: str | Path) -> dict[str, str]:
    """Token -> user name from a tokens directory or file (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise TokenFileError(f"tokens path {str(path)!r} does not exist (a directory, a .toml file or 'TOKEN USER' lines)")
    pairs: list[tuple[str, str, str]] = []  # (token, user, where)
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            pairs.append((entry.read_text().strip(), entry.name, str(entry)))
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise TokenFileError(f"{path}: TOML tokens files need Python >= 3.11; use 'TOKEN USER' lines") from None
        try:
            table = tomllib.loads(path.read_text()).get("tokens")
        except tomllib.TOMLDecodeError as exc:
            raise TokenFileError(f"{path}: {exc}") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise TokenFileError(f'{path}: expected a [tokens] table of "TOKEN" = "user" entries')
        pairs = [(token, user, f"{path} [tokens]") for token, user in table.items()]
    else:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenFileError(f"{path}:{number}: expected 'TOKEN USER', got {len(parts)} fields")
            pairs.append((parts[0], parts[1], f"{path}:{number}"))
    tokens: dict[str, str] = {}
    for token, user, where in pairs:
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"{where}: the token of user {user!r} is shorter than {MIN_TOKEN_CHARS} characters")
        if token in tokens and tokens[token] != user:
            raise TokenFileError(f"{where}: user {user!r} has the same token as user {tokens[token]!r}")
        tokens[token] = user
    if not tokens:
        raise TokenFileError(f"tokens path {str(path)!r} holds no tokens")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Checks ``Authorization`` headers against a tokens path (re-read when it changes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: float | None = None
        self._users: list[tuple[bytes, str]] = []
        self._load()

    def _load(self) -> None:
        stamp = self._mtime()
        self._users = [(_digest(token), user) for token, user in read_tokens(self.path).items()]
        self._stamp = stamp

    def _mtime(self) -> float:
        stamps = [self.path.stat().st_mtime]
        if self.path.is_dir():  # a Secret update swaps the ..data link inside the directory
            stamps += [os.stat(p).st_mtime for p in self.path.iterdir()]
        return max(stamps)

    def user(self, header: str | None) -> str:
        """The user name for an ``Authorization`` header value, or :class:`AuthError`."""
        if not header:
            raise AuthError("missing 'Authorization: Bearer TOKEN' header")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer TOKEN'")
        try:
            if self._mtime() != self._stamp:
                self._load()
        except (OSError, TokenFileError):
            pass  # keep the tokens read last; the path is being replaced
        presented = _digest(token.strip())
        found = ""
        for digest, name in self._users:  # every entry compared: the time does not tell which matched
            if hmac.compare_digest(digest, presented):
                found = name
        if not found:
            raise AuthError("unknown token")
        return found
