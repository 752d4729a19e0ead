"""Who made a run, from what, and when: owner and team resolution, git state, hashes, annotations.

Owner, first that is set: the ``owner=`` argument (``--user`` on the CLI), ``$INTERPLAB_USER``, the
user of the serving token a job used (``provenance["service"]["user"]``), the OS user.
Team, first that is set: ``team=`` (``--team``), ``$INTERPLAB_TEAM``, the team area the store is
(``<lab-root>/teams/<team>/``, or ``"team"`` in the store's marker).

Annotations (tags, description, pin) are written after a run is committed, which is immutable, so
they are separate append-only event files ``runs/<id>/annotations/<time>-<random>.json`` (one
``{"op", "value", "at", "by"}`` each). Readers fold the events in (time, name) order: tags are a
set (``tag`` adds, ``untag`` removes), ``describe`` and ``pin``/``unpin`` are last-writer-wins.
Two writers never touch the same object, so annotating is safe from any number of hosts.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Literal

from interplab.store.errors import StoreError

USER_ENV = "INTERPLAB_USER"
TEAM_ENV = "INTERPLAB_TEAM"
ANNOTATIONS_DIR = "annotations"
TEAMS_DIR = "teams"
AnnotationOp = Literal["tag", "untag", "describe", "pin", "unpin"]
ANNOTATION_OPS: tuple[str, ...] = ("tag", "untag", "describe", "pin", "unpin")
_GIT_TIMEOUT_S = 5.0


def resolve_owner(owner: str | None = None, provenance: dict[str, Any] | None = None) -> str | None:
    """The run's owner: ``owner``, ``$INTERPLAB_USER``, the serving token's user, the OS user."""
    if owner:
        return owner
    if os.environ.get(USER_ENV):
        return os.environ[USER_ENV]
    service = (provenance or {}).get("service")
    if isinstance(service, dict) and service.get("user"):
        return str(service["user"])
    return os_user()


def resolve_team(team: str | None = None, area_team: str | None = None) -> str | None:
    """The run's team: ``team``, ``$INTERPLAB_TEAM``, the team area the store is (``area_team``)."""
    if team:
        return team
    if os.environ.get(TEAM_ENV):
        return os.environ[TEAM_ENV]
    return area_team


def os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def area_team(root: str, marker: dict[str, Any], parent_is_store: bool) -> str | None:
    """The team a store serves: its marker's ``team``, else ``<team>`` when it sits at
    ``<lab-root>/teams/<team>/`` below another store (``parent_is_store``)."""
    team = marker.get("team")
    if isinstance(team, str) and team:
        return team
    parts = root.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == TEAMS_DIR and parent_is_store:
        return parts[-1]
    return None


@dataclass(frozen=True)
class GitState:
    """The git commit of the repository a spec file lives in, and whether its work tree was dirty."""

    commit: str
    dirty: bool
    repo: str

    def to_dict(self) -> dict[str, Any]:
        return {"commit": self.commit, "dirty": self.dirty, "repo": self.repo}


def git_state(path: str | None) -> GitState | None:
    """:class:`GitState` of the repository holding ``path`` (a file or folder); None when there is
    no such file, no repository, or no ``git`` (never raises: provenance is best effort)."""
    if not path:
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", folder, *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    repo = git("rev-parse", "--show-toplevel") or folder
    return GitState(commit=commit, dirty=bool(status) if status is not None else True, repo=repo)


def spec_hash(spec: dict[str, Any] | None) -> str | None:
    """sha256 of the spec's canonical JSON (sorted keys, no whitespace); None without a spec."""
    if spec is None:
        return None
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def dataset_hash_from(provenance: dict[str, Any] | None) -> str | None:
    """A dataset hash a job kind already recorded (``prompts_sha256``, ``data_sha256``), if any."""
    for key in ("dataset_hash", "prompts_sha256", "data_sha256"):
        value = (provenance or {}).get(key)
        if isinstance(value, str) and value:
            return value
    return None


def texts_hash(texts: list[str]) -> str:
    """sha256 of the prompt texts in order (each followed by a NUL byte)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def check_inputs(inputs: list[str] | tuple[str, ...] | None) -> list[str]:
    """The ``inputs`` of ``begin_run`` as a list of run ids (order kept, duplicates dropped)."""
    if inputs is None:
        return []
    if isinstance(inputs, str) or not all(isinstance(i, str) and i for i in inputs):
        raise StoreError(f"inputs must be a list of run ids, got {inputs!r}")
    return list(dict.fromkeys(inputs))


# -- annotations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Annotations:
    """The folded annotation events of one run."""

    tags: tuple[str, ...] = ()
    description: str | None = None
    pinned: bool = False
    events: tuple[dict[str, Any], ...] = field(default=(), repr=False)


def annotation_event(op: str, value: str | None, by: str | None, at: str) -> dict[str, Any]:
    if op not in ANNOTATION_OPS:
        raise StoreError(f"unknown annotation {op!r}; one of {', '.join(ANNOTATION_OPS)}")
    if op in ("tag", "untag"):
        check_tag(value)
    if op == "describe" and not isinstance(value, str):
        raise StoreError(f"a description must be text, got {value!r}")
    return {"op": op, "value": value, "at": at, "by": by}


def check_tag(tag: object) -> str:
    if not isinstance(tag, str) or not tag.strip() or len(tag) > 128 or any(c in tag for c in ",\n\r\t"):
        raise StoreError(f"invalid tag {tag!r}: 1-128 characters, no commas, tabs or newlines")
    return tag


def fold(events: list[tuple[str, dict[str, Any]]]) -> Annotations:
    """Fold ``(file name, event)`` pairs in (time, file name) order."""
    tags: dict[str, None] = {}
    description: str | None = None
    pinned = False
    ordered = sorted(events, key=lambda item: (str(item[1].get("at", "")), item[0]))
    for _, event in ordered:
        op, value = event.get("op"), event.get("value")
        if op == "tag" and isinstance(value, str):
            tags[value] = None
        elif op == "untag" and isinstance(value, str):
            tags.pop(value, None)
        elif op == "describe":
            description = value if isinstance(value, str) else None
        elif op in ("pin", "unpin"):
            pinned = op == "pin"
    return Annotations(tuple(tags), description, pinned, tuple(e for _, e in ordered))
