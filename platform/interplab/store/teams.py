"""A lab store root and its team areas: ``<lab-root>/teams/<team>/``, each a full store (the lab
root is a store too: ``Store.team_areas()`` and a catalog entry for it find the areas).

Permissions are the storage's own, not a convention:

* **POSIX** (a shared filesystem): a team area is owned by the team's OS group, mode ``rwxrwsr-x``
  (2775): the team writes, everyone else (the lab) reads. The setgid bit makes everything created
  inside belong to the team's group, and the store's writers (:mod:`interplab.store.fs`) make every
  file and folder they create there group-writable whatever the writer's umask. Someone outside the
  group gets one :class:`StoreError` naming the area and its group, and nothing is written.
  ``lab_readable=False`` gives 2770 (team only), for a lab that grants reading through a lab group or
  an ACL instead (``docs/store.md``, "Team areas").
* **S3**: an area is the prefix ``<lab-root>/teams/<team>/``; who may write it is an IAM (or bucket)
  policy, examples in ``storage/policies/``. Creating an area writes its store marker only.

Creating a POSIX area with a group needs the right to ``chown`` to it (root, or the folder's owner
being a member of the group).
"""

from __future__ import annotations

import grp
import os
import re
import stat
from dataclasses import dataclass

from interplab.store import fs
from interplab.store.errors import StoreError
from interplab.store.provenance import TEAMS_DIR
from interplab.store.store import open_store

TEAMS = TEAMS_DIR  # the folder of the team areas, shared with Store.team_areas()
_TEAM = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
TEAM_MODE = 0o2775  # team writes, lab reads
TEAM_ONLY_MODE = 0o2770  # team only (reading granted by a lab group's ACL)
LAB_MODE = 0o755


@dataclass(frozen=True)
class TeamArea:
    """One team's area. ``group``/``mode``/``writable`` are None on S3 (IAM policies decide there)."""

    name: str
    uri: str
    group: str | None
    mode: str | None
    writable: bool | None


def check_team(team: str) -> str:
    if not isinstance(team, str) or not _TEAM.match(team):
        raise StoreError(f"invalid team name {team!r}: use lower-case letters, digits, '_' and '-', starting with a letter")
    return team


def team_uri(root: str, team: str) -> str:
    """The store URI of ``team``'s area under the lab root ``root``."""
    loc = fs.resolve(root)
    return f"{loc.uri.rstrip('/')}/{TEAMS}/{check_team(team)}"


def create_lab(root: str) -> str:
    """Create the lab root (itself a store, which the lab's admins write) and its ``teams/`` folder
    (POSIX: mode 755); return the lab root's URI. An existing store becomes a lab root as it is."""
    loc = fs.resolve(root)
    if loc.local:
        if os.path.exists(loc.root) and not os.path.isdir(loc.root):
            raise StoreError(f"lab root {loc.root} is a file, not a folder")
        if not os.path.isdir(loc.root):
            _mkdir(loc.root)
    open_store(loc.uri).close()  # the marker: a catalog entry for the lab root finds its team areas
    if loc.local and not os.path.isdir(loc.path(TEAMS)):
        _mkdir(loc.path(TEAMS))
    return loc.uri


def _mkdir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        os.chmod(path, LAB_MODE)
    except PermissionError as exc:
        raise StoreError(f"cannot create lab root folder {path}: {exc.strerror}; run as its owner or an admin") from None


def create_team(root: str, team: str, group: str | None = None, *, lab_readable: bool = True) -> TeamArea:
    """Create ``team``'s area under the lab root (idempotent for an existing area with the same group).

    POSIX: ``group`` (the team's OS group, required) owns the area, mode 2775 (2770 without
    ``lab_readable``); the area is then initialised as a store. S3: ``group`` must be None; the area's
    store marker is written, and write access is granted by the team's IAM policy.
    """
    check_team(team)
    area = team_uri(root, team)
    if not fs.resolve(root).local:
        if group is not None:
            raise StoreError(
                "--group applies to POSIX stores only; on S3 grant the team write access with an IAM policy "
                "(storage/policies/team-write.json)"
            )
        open_store(area).close()
        return TeamArea(team, area, None, None, None)
    if group is None:
        raise StoreError(f"team {team!r}: give the team's OS group (--group G); it will own {area}")
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise StoreError(
            f"group {group!r} does not exist; create it first (groupadd {group}) and add the team's members"
        ) from None
    create_lab(root)
    mode = TEAM_MODE if lab_readable else TEAM_ONLY_MODE
    try:
        if os.path.isdir(area):
            current = os.stat(area)
            if current.st_gid != gid:
                raise StoreError(f"team area {area} already exists, owned by group {_group(current.st_gid)!r}, not {group!r}")
        else:
            os.mkdir(area)
        os.chown(area, -1, gid)
        os.chmod(area, mode)  # after chown: chown clears the setgid bit
    except PermissionError as exc:
        raise StoreError(
            f"cannot create team area {area} for group {group!r}: {exc.strerror}. Run as root, or as the lab root's "
            f"owner while a member of {group!r}"
        ) from None
    open_store(area).close()  # the marker: written group-writable, owned by the group (setgid)
    return _describe(team, area)


def list_teams(root: str) -> list[TeamArea]:
    """The team areas under a lab root, by name."""
    loc = fs.resolve(root)
    names = fs.list_dirs(loc, loc.path(TEAMS))
    out = []
    for name in names:
        if not _TEAM.match(name):
            continue
        area = f"{loc.uri.rstrip('/')}/{TEAMS}/{name}"
        out.append(_describe(name, area) if loc.local else TeamArea(name, area, None, None, None))
    return out


def _describe(name: str, area: str) -> TeamArea:
    info = os.stat(area)
    writable = os.access(area, os.W_OK | os.X_OK)
    return TeamArea(name, area, _group(info.st_gid), stat.filemode(info.st_mode), writable)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
