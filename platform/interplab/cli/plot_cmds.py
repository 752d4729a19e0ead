"""``interplab plot RUN_ID -o FILE``: the picture of a run's results that the run's kind registers.

The kind is found by name (``interplab.kinds`` entry points); its ``register_kind(..., plot=fn)``
draws (:class:`interplab.jobs.PlotFunction`). Bad input (unknown run, a kind without a plot, a bad
output name) exits with code 2; a kind that fails to load exits with code 1, naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from interplab.store.cli_options import store_option


@click.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, help="Image file: .png, .svg or .pdf (.dot for a circuit's Graphviz source).")
@click.option(
    "--method", default=None, help="Which of the run's methods to draw, for kinds that have several (circuit: default the first)."
)
@store_option
def plot(run_id: str, output: str, method: str | None, store_uri: str | None) -> None:
    """Plot a run with its kind's plot: patching heatmaps, a circuit diagram and faithfulness curves, grafting ranks and scores, ..."""
    from interplab.jobs import JobError, SpecError, get_kind
    from interplab.store import StoreError, open_store

    try:
        store = open_store(store_uri, create=False)
        info = store.run(run_id)
        try:
            kind = get_kind(info.kind)
        except SpecError as exc:
            raise ValueError(
                f"run {run_id} is a {info.kind!r} run, a kind not installed here (installed: {exc.allowed})"
            ) from None
        if kind.plot is None:
            raise ValueError(f"run {run_id} is a {info.kind!r} run, and that kind registers no plot")
        paths = kind.plot(store, run_id, Path(output), method)
    except (StoreError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except JobError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for path in paths:
        click.echo(f"wrote {path}")


def register(cli: click.Group) -> None:
    cli.add_command(plot)
