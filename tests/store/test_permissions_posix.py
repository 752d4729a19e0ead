"""Team areas on a shared POSIX filesystem, with real OS users and groups created by the test.

Three users: alice and carol in team A's group, bob in team B's. Each write or read runs in a child
process that drops to that user (``setgroups``/``setgid``/``setuid``) with umask 077, so the kernel
decides what each may do. The child imports everything while still root, because this machine's
Python lives under ``/root`` (mode 700), which the test users cannot traverse.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from interplab.store import open_store

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="creates OS users and groups: needs root (CI runs as root)"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd/groupadd (shadow-utils)"),
]

REPO = Path(__file__).resolve().parents[2]
ROWS, D = 64, 8

CHILD = r"""
import json, os, sys
import numpy as np
from interplab.store import StoreError, open_store
from interplab.store import query
from interplab.cli.main import _register, cli

uid, gid, groups, action, uri, arg = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), *sys.argv[4:7]
# this machine's Python lives under /root: load what the user's process needs before dropping to it
views = query.view_files()
query.view_files = lambda: views
_register()
n, d = int(os.environ["ROWS"]), int(os.environ["D"])
act = np.random.default_rng(int(arg) if action == "write" else 0).standard_normal((n, d)).astype(np.float32)


def write(store):
    writer = store.begin_run("capture", model="tiny", spec={"seed": int(arg) if action == "write" else 0})
    entry = writer.write_activations(0, "resid_pre", 1, None, np.arange(n), np.zeros(n, np.int32), np.arange(n),
                                     ["t"] * n, act)
    writer.finish_chunk("activations", 0, [entry])
    writer.commit()
    return writer.run_id


def read(store):
    got = store.sql("SELECT run_id, count(*) AS n, sum(list_sum(act::DOUBLE[])) AS s FROM activations GROUP BY run_id")
    return {r["run_id"]: [r["n"], r["s"]] for r in got.to_pylist()}


import shutil, tempfile
warm = tempfile.mkdtemp()
with open_store(warm + "/s") as scratch:
    read(scratch) if write(scratch) else None
shutil.rmtree(warm)
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
os.umask(0o077)
if action == "cli":
    cli.main(json.loads(arg), prog_name="interplab")
try:
    store = open_store(uri, create=False)
    if action == "write":
        run_id = write(store)
        print(json.dumps({"run_id": run_id, "sum": float(act.astype(np.float16).astype(np.float64).sum())}))
    elif action == "read":
        print(json.dumps(read(store)))
except StoreError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(3)
"""


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Groups lab/team A/team B and users alice, carol (A) and bob (B), removed afterwards; a lab root
    under /tmp that every user can traverse."""
    tag = secrets.token_hex(3)
    groups = {name: f"ipl{name}{tag}" for name in ("lab", "a", "b")}
    users = {"alice": "a", "carol": "a", "bob": "b"}
    names = {user: f"ipl{user[:3]}{tag}" for user in users}
    created_groups: list[str] = []
    created_users: list[str] = []
    root = tempfile.mkdtemp(prefix="interplab-lab-", dir="/tmp")
    os.chmod(root, 0o755)
    try:
        for group in groups.values():
            _run(["groupadd", group])
            created_groups.append(group)
        for user, team in users.items():
            _run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-g", groups["lab"], "-G", groups[team], names[user]])
            created_users.append(names[user])
        home = os.path.join(root, "home")
        os.mkdir(home)
        os.chmod(home, 0o1777)
        yield {"root": os.path.join(root, "lab"), "groups": groups, "users": names, "home": home}
    finally:
        for user in created_users:
            subprocess.run(["userdel", user], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for group in created_groups:
            subprocess.run(["groupdel", group], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def as_user(lab: dict, user: str, action: str, uri: str, arg: str = "0") -> subprocess.CompletedProcess:
    """Run ``CHILD`` as ``user`` (uid, primary group and supplementary groups from the user database)."""
    entry = pwd.getpwnam(lab["users"][user])
    groups = sorted({g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem} | {entry.pw_gid})
    env = {**os.environ, "HOME": lab["home"], "ROWS": str(ROWS), "D": str(D), "PYTHONPATH": f"{REPO}:{REPO / 'platform'}"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(entry.pw_uid), str(entry.pw_gid), json.dumps(groups), action, uri, arg],
        capture_output=True, text=True, env=env, timeout=120,
    )


def tree(path: str) -> dict[str, tuple[int, int, int]]:
    """Every path under ``path`` → (mode, uid, gid)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_uid, st.st_gid)
    return out


@pytest.fixture(scope="module")
def areas(lab):
    from interplab.cli import team_cmds

    @click.group()
    def group() -> None:
        pass

    team_cmds.register(group)
    runner = CliRunner()
    out = {}
    for team in ("a", "b"):
        result = runner.invoke(group, ["team", "create", lab["root"], f"team-{team}", "--group", lab["groups"][team]])
        assert result.exit_code == 0, result.output
        out[team] = os.path.join(lab["root"], "teams", f"team-{team}")
    listed = runner.invoke(group, ["team", "list", lab["root"]])
    assert listed.exit_code == 0
    lines = listed.output.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["team-a", "team-b"]
    assert f"group={lab['groups']['a']}\tmode=drwxrwsr-x" in lines[0]
    return out


def test_team_area_is_group_owned_setgid(lab, areas):
    with open_store(lab["root"], create=False) as root:  # the lab root is a store listing its areas
        assert root.team_areas() == {"team-a": areas["a"], "team-b": areas["b"]}
    with open_store(areas["a"], create=False) as area:
        assert area.team == "team-a"
    st = os.stat(areas["a"])
    assert st.st_gid == grp.getgrnam(lab["groups"]["a"]).gr_gid
    assert stat.S_IMODE(st.st_mode) == 0o2775
    marker = os.stat(os.path.join(areas["a"], "interplab-store.json"))
    assert marker.st_gid == st.st_gid and stat.S_IMODE(marker.st_mode) & 0o664 == 0o664


def test_members_write_lab_reads(lab, areas):
    gid_a = grp.getgrnam(lab["groups"]["a"]).gr_gid
    first = as_user(lab, "alice", "write", areas["a"], "1")
    assert first.returncode == 0, first.stderr + first.stdout
    # carol writes into the folders alice created (umask 077 on both sides)
    second = as_user(lab, "carol", "write", areas["a"], "2")
    assert second.returncode == 0, second.stderr + second.stdout
    written = {json.loads(p.stdout)["run_id"]: json.loads(p.stdout)["sum"] for p in (first, second)}
    for rel, (mode, _uid, gid) in tree(areas["a"]).items():
        assert gid == gid_a, rel
        want = 0o2775 if stat.S_ISDIR(mode) else 0o664
        assert stat.S_IMODE(mode) == want, f"{rel}: {oct(stat.S_IMODE(mode))}"
    # bob (team B) reads everything team A committed
    read = as_user(lab, "bob", "read", areas["a"])
    assert read.returncode == 0, read.stderr + read.stdout
    got = json.loads(read.stdout)
    assert set(written) <= set(got)
    with open_store(areas["a"], create=False) as store:
        assert {r.run_id: r.team for r in store.runs() if r.run_id in written} == {run_id: "team-a" for run_id in written}
    for run_id, total in written.items():
        assert got[run_id][0] == ROWS
        assert got[run_id][1] == pytest.approx(total, rel=1e-9)


def test_non_member_gets_one_clear_error_and_nothing_partial(lab, areas):
    ok = as_user(lab, "alice", "write", areas["a"], "3")
    assert ok.returncode == 0, ok.stderr + ok.stdout
    run_id = json.loads(ok.stdout)["run_id"]
    before = tree(areas["a"])

    refused = as_user(lab, "bob", "write", areas["a"], "4")
    assert refused.returncode == 3, refused.stderr + refused.stdout
    message = json.loads(refused.stdout)["error"]
    group = lab["groups"]["a"]
    assert areas["a"] in message and repr(group) in message and lab["users"]["bob"] in message
    assert f"usermod -aG {group} {lab['users']['bob']}" in message
    assert tree(areas["a"]) == before  # no run folder, no temp file, nothing changed

    # the CLI: one error line, non-zero exit, and the run is still there
    cli = as_user(lab, "bob", "cli", areas["a"], json.dumps(["runs", "delete", run_id, "--yes", "--store", areas["a"]]))
    assert cli.returncode != 0
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: permission denied") and repr(group) in lines[0], cli.stderr
    assert tree(areas["a"]) == before
    assert open_store(areas["a"], create=False).run(run_id).status == "committed"

    # bob can still write his own team's area
    own = as_user(lab, "bob", "write", areas["b"], "5")
    assert own.returncode == 0, own.stderr + own.stdout


def test_team_create_errors(lab, tmp_path):
    from interplab.store import StoreError
    from interplab.store.teams import create_team

    with pytest.raises(StoreError, match="groupadd no-such-group-"):
        create_team(lab["root"], "team-c", f"no-such-group-{secrets.token_hex(3)}")
    with pytest.raises(StoreError, match="invalid team name"):
        create_team(lab["root"], "Team C", lab["groups"]["a"])
    with pytest.raises(StoreError, match="--group"):
        create_team(lab["root"], "team-c")
    with pytest.raises(StoreError, match="owned by group"):
        create_team(lab["root"], "team-a", lab["groups"]["b"])
