"""``interplab plot RUN_ID -o FILE``: the standard picture of a run's results."""

from __future__ import annotations

import sys

import click

from interplab.store.cli_options import store_option


@click.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, help="Image file: .png, .svg or .pdf.")
@store_option
def plot(run_id: str, output: str, store_uri: str | None) -> None:
    """Plot a patching run's heatmaps (layers x tokens or heads) to OUTPUT."""
    from interplab.analyses.patching.plot import plot_patching
    from interplab.store import StoreError, open_store

    try:
        store = open_store(store_uri, create=False)
        info = store.run(run_id)
        rows = store.sql("SELECT sweep, method, layer, position, head, value, normalized FROM patching WHERE run_id = $run_id", {"run_id": run_id}).to_pylist()
        tokens = store.sql("SELECT tokens FROM prompts WHERE run_id = $run_id AND prompt_id = 0", {"run_id": run_id}).to_pylist()
        path = plot_patching(rows, tokens[0]["tokens"] if tokens else [], output, title=f"{run_id} ({info.model})" if hasattr(info, "model") else run_id)
    except (StoreError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {path}")


def register(cli: click.Group) -> None:
    cli.add_command(plot)
