"""Team areas on S3 with IAM enforced by the emulator (moto server, ``/moto-api/reset-auth``).

The policies are the files in ``storage/policies/`` with their placeholders filled in: alice has
team A's write policy, bob team B's, both the lab read policy. The admin (moto's default
credentials) creates the bucket, users and areas while moto still lets every request through; then
every request is signed, checked against the caller's policies, and refused if none allows it.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from interplab.store import StoreError, open_store
from interplab.store.teams import create_team, list_teams

from tests.store.conftest import make_rows, s3_env, start_moto_server, stop_moto_server, write_site

boto3 = pytest.importorskip("boto3")

POLICIES = Path(__file__).resolve().parents[2] / "storage" / "policies"
BUCKET, LAB = "lab-bucket", "interp"
ROOT = f"s3://{BUCKET}/{LAB}"


# moto recomputes SigV4 signatures from the URL as it received it, and gets a different answer than
# the AWS C++ SDK (pyarrow) for ListObjectsV2 requests: it refuses them as SIGNATURE_DOES_NOT_MATCH.
# Its server then checks only who the access key belongs to and what that user's policies allow.
NO_SIGNATURE_CHECK = "from moto.iam.access_control import S3IAMRequest\nS3IAMRequest.check_signature = lambda self: None"


def policy(name: str, team: str = "") -> str:
    text = (POLICIES / name).read_text()
    return text.replace("<bucket>", BUCKET).replace("<lab-prefix>", LAB).replace("<team>", team)


@pytest.fixture(scope="module")
def iam_lab():
    """A moto server of our own (auth is server-wide), two users with the example policies; yields
    {"endpoint", user: env}. Auth is switched on after the set-up."""
    proc, endpoint = start_moto_server(preamble=NO_SIGNATURE_CHECK)
    try:
        admin = s3_env(endpoint)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="test", aws_secret_access_key="test")
        users = {}
        for user, team in (("alice", "team-a"), ("bob", "team-b")):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="team-write", PolicyDocument=policy("team-write.json", team))
            iam.put_user_policy(UserName=user, PolicyName="lab-read", PolicyDocument=policy("lab-read.json"))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = s3_env(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        with pytest.MonkeyPatch.context() as mp:
            for k, v in admin.items():
                mp.setenv(k, v)
            for team in ("team-a", "team-b"):
                create_team(ROOT, team)
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()  # from now on every request is authorised
        yield {"endpoint": endpoint, **users}
    finally:
        stop_moto_server(proc)


@pytest.fixture
def as_user(monkeypatch, iam_lab):
    def switch(user: str) -> None:
        for k, v in iam_lab[user].items():
            monkeypatch.setenv(k, v)

    return switch


def all_keys(iam_lab) -> list[tuple[str, int]]:
    client = boto3.client("s3", endpoint_url=iam_lab["endpoint"], region_name="us-east-1",
                          aws_access_key_id=iam_lab["alice"]["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=iam_lab["alice"]["AWS_SECRET_ACCESS_KEY"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return sorted((o["Key"], o["Size"]) for page in pages for o in page.get("Contents", []))


def write_run(uri: str, seed: int) -> tuple[str, np.ndarray]:
    rows = make_rows(50, 8, seed=seed)
    with open_store(uri, create=False) as store:
        with store.begin_run("capture", model="tiny") as w:
            w.finish_chunk("activations", 0, [write_site(w, 0, "resid_pre", 2, rows)])
    return w.run_id, rows["act"].astype(np.float16).astype(np.float32)


def test_enforcement_is_on(iam_lab):
    client = boto3.client("s3", endpoint_url=iam_lab["endpoint"], region_name="us-east-1",
                          aws_access_key_id=iam_lab["bob"]["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=iam_lab["bob"]["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(Exception, match="AccessDenied|Access Denied|403"):
        client.put_object(Bucket=BUCKET, Key=f"{LAB}/teams/team-a/x", Body=b"x")
    client.put_object(Bucket=BUCKET, Key=f"{LAB}/teams/team-b/probe", Body=b"x")
    client.delete_object(Bucket=BUCKET, Key=f"{LAB}/teams/team-b/probe")


def test_team_writes_its_prefix_lab_reads(iam_lab, as_user):
    as_user("alice")
    run_id, acts = write_run(f"{ROOT}/teams/team-a", seed=1)
    as_user("bob")
    assert [t.name for t in list_teams(ROOT)] == ["team-a", "team-b"]
    with open_store(f"{ROOT}/teams/team-a", create=False) as store:  # bob reads team A's run
        np.testing.assert_array_equal(store.export(run_id, "resid_pre.2"), acts)
    own, _ = write_run(f"{ROOT}/teams/team-b", seed=2)
    assert open_store(f"{ROOT}/teams/team-b", create=False).run(own).status == "committed"


def test_other_team_gets_one_clear_error_and_nothing_partial(iam_lab, as_user):
    as_user("alice")
    run_id, _ = write_run(f"{ROOT}/teams/team-a", seed=3)
    before = all_keys(iam_lab)
    as_user("bob")
    with pytest.raises(StoreError) as err:
        write_run(f"{ROOT}/teams/team-a", seed=4)
    message = str(err.value)
    assert message.startswith("permission denied") and f"{BUCKET}/{LAB}/teams/team-a" in message
    assert iam_lab["bob"]["AWS_ACCESS_KEY_ID"] in message and "team-write.json" in message
    assert all_keys(iam_lab) == before  # no run.json, no data object

    from interplab.cli.main import _register, cli

    _register()
    result = CliRunner().invoke(cli, ["runs", "delete", run_id, "--yes", "--store", f"{ROOT}/teams/team-a"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines() if result.stderr else result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: permission denied"), result.output
    assert all_keys(iam_lab) == before
    as_user("alice")
    assert open_store(f"{ROOT}/teams/team-a", create=False).run(run_id).status == "committed"
    assert json.loads(policy("team-write.json", "team-a"))["Statement"][0]["Resource"].endswith("/interp/teams/team-a/*")
