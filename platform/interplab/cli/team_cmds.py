"""``interplab team``: create and list the team areas of a lab store root (``<root>/teams/<team>/``).

Bad input (an invalid team name, a group that does not exist, no right to create the area) prints one
``error: ...`` line on stderr and exits with code 2.
"""

from __future__ import annotations

import click

from interplab.cli.store_cmds import _errors


def register(cli: click.Group) -> None:
    """Attach the ``team`` commands to the ``interplab`` group."""
    cli.add_command(team)


@click.group()
def team() -> None:
    """Team areas of a lab store: each team writes its own area, the lab reads them all."""


@team.command("create")
@click.argument("root")
@click.argument("name")
@click.option("--group", "group", metavar="G", help="The team's OS group, owner of the area (POSIX; required there).")
@click.option(
    "--team-only", is_flag=True, help="Mode 2770 instead of 2775: only the team reads (grant the lab reading with an ACL)."
)
@_errors
def team_create(root: str, name: str, group: str | None, team_only: bool) -> None:
    """Create the area of team NAME under the lab root ROOT (a directory or s3://bucket/prefix).

    \b
    interplab team create /shared/interp ioi --group interp-ioi
    interplab team create s3://lab/interp ioi        # write access: storage/policies/team-write.json
    """
    from interplab.store.teams import create_team

    area = create_team(root, name, group, lab_readable=not team_only)
    if area.group is None:
        click.echo(f"{area.uri}  (grant write access with an IAM policy: storage/policies/)")
    else:
        click.echo(f"{area.uri}  group={area.group}  mode={area.mode}")


@team.command("list")
@click.argument("root")
@_errors
def team_list(root: str) -> None:
    """List the team areas under the lab root ROOT, with their group, mode and whether you can write."""
    from interplab.store.teams import list_teams

    areas = list_teams(root)
    if not areas:
        click.echo(f"no team areas under {root} (create one: interplab team create {root} NAME --group G)", err=True)
    for area in areas:
        if area.group is None:
            click.echo(f"{area.name}\t{area.uri}")
        else:
            access = "write" if area.writable else "read"
            click.echo(f"{area.name}\t{area.uri}\tgroup={area.group}\tmode={area.mode}\tyou={access}")
