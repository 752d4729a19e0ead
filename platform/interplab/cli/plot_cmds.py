"""``interplab plot RUN_ID -o FILE``: the standard picture of a run's results, by the run's kind."""

from __future__ import annotations

import sys

import click

from interplab.store.cli_options import store_option


def _plot_patching(store, run_id: str, output: str, info) -> list:
    from interplab.analyses.patching.plot import plot_patching

    rows = store.sql("SELECT sweep, method, layer, position, head, value, normalized FROM patching WHERE run_id = $run_id", {"run_id": run_id}).to_pylist()
    tokens = store.sql("SELECT tokens FROM prompts WHERE run_id = $run_id AND prompt_id = 0", {"run_id": run_id}).to_pylist()
    title = f"{run_id} ({info.model})" if hasattr(info, "model") else run_id
    return [plot_patching(rows, tokens[0]["tokens"] if tokens else [], output, title=title)]


def _plot_circuit(store, run_id: str, output: str, info, method: str | None) -> list:
    from interplab.analyses.circuits.plot import plot_circuit_run

    return plot_circuit_run(store, run_id, output, method=method)


def _plot_grafting(store, run_id: str, output: str, info) -> list:
    from interplab.analyses.grafting.plot import plot_grafting

    return [plot_grafting(store, run_id, output)]


@click.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, help="Image file: .png, .svg or .pdf (.dot for a circuit's Graphviz source).")
@click.option("--method", default=None, help="circuit runs: which method's circuit to draw (default: the first).")
@store_option
def plot(run_id: str, output: str, method: str | None, store_uri: str | None) -> None:
    """Plot a run: patching heatmaps, a circuit diagram and faithfulness curves, or grafting ranks and scores."""
    from interplab.store import StoreError, open_store

    try:
        store = open_store(store_uri, create=False)
        info = store.run(run_id)
        kind = getattr(info, "kind", "patching")
        if kind == "circuit":
            paths = _plot_circuit(store, run_id, output, info, method)
        elif kind == "grafting":
            paths = _plot_grafting(store, run_id, output, info)
        elif kind == "patching":
            paths = _plot_patching(store, run_id, output, info)
        else:
            raise ValueError(f"run {run_id} is a {kind!r} run; plots exist for patching, circuit and grafting runs")
    except (StoreError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for path in paths:
        click.echo(f"wrote {path}")


def register(cli: click.Group) -> None:
    cli.add_command(plot)
