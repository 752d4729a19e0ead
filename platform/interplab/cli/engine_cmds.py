"""Engine commands: ``interplab demo`` and ``interplab sites``.

Until the job runner lands, ``demo`` is the README's one-command tour: load SmolLM2-135M offline,
complete a factual prompt, capture residual-stream activations into the store and print where they
are and how to query them.
"""

from __future__ import annotations

import sys

import click

from interplab.store.cli_options import store_option

DEMO_PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "The Colosseum is located in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Alice went to the park, Alice gave a ball to",
)


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name (alias, tiny-<family>, path, .gguf).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@store_option
def demo(model: str, dtype: str, store_uri: str | None) -> None:
    """Complete a prompt, capture every layer's resid_post at the last token, store and query it."""
    from interplab import load_model
    from interplab.models.loading import ModelLoadError
    from interplab.store import StoreError, open_store
    from interplab.store.capture import write_capture_chunk

    try:
        hooked = load_model(model, dtype=dtype)
        store = open_store(store_uri)
    except (ModelLoadError, StoreError) as exc:
        _fail(str(exc))
    completion = hooked.generate(DEMO_PROMPTS[0], max_new_tokens=4)
    click.echo(f"{hooked.name}: {DEMO_PROMPTS[0]!r} -> {completion!r}")
    sites = [f"resid_post.{layer}" for layer in range(hooked.n_layers)]
    spec = {"kind": "capture", "model": model, "dtype": dtype, "prompts": list(DEMO_PROMPTS), "sites": sites, "positions": [-1]}
    with store.begin_run("capture", model=hooked.name, spec=spec, weight_hash=hooked.weight_hash) as writer:
        for chunk in hooked.capture_stream(DEMO_PROMPTS, sites, batch_size=2, positions=[-1]):
            write_capture_chunk(writer, chunk, dtype="float32")
        writer.commit()
    run_id = writer.run_id
    query = (
        "SELECT layer, round(avg(list_aggregate(act::FLOAT[], 'max')), 3) AS mean_max_act "
        f"FROM activations WHERE run_id = '{run_id}' GROUP BY layer ORDER BY layer LIMIT 5"
    )
    table = store.sql(query)
    click.echo(f"captured {len(sites)} sites x {len(DEMO_PROMPTS)} prompts into run {run_id}")
    click.echo(f"store: {store.uri}")
    click.echo("\t".join(table.column_names))
    for row in table.to_pylist():
        click.echo("\t".join(str(value) for value in row.values()))
    click.echo("query it:")
    click.echo(
        f"  interplab sql --store {store.uri} \"SELECT prompt_id, token, layer FROM activations WHERE run_id = '{run_id}' LIMIT 10\""
    )


@click.command()
@click.argument("model")
@click.option("--kind", "kinds", multiple=True, help="Only these site kinds (repeatable).")
def sites(model: str, kinds: tuple[str, ...]) -> None:
    """List the sites of MODEL in their canonical string form."""
    from interplab import load_model
    from interplab.engine import SiteError
    from interplab.models.loading import ModelLoadError

    try:
        hooked = load_model(model)
        listed = hooked.sites(kinds or None)
    except (ModelLoadError, SiteError, ValueError) as exc:
        _fail(str(exc))
    click.echo(f"{hooked.name} ({hooked.spec.name}): {hooked.n_layers} layers, {hooked.n_heads} heads, d_model {hooked.d_model}")
    for site in listed:
        click.echo(str(site))


def register(cli: click.Group) -> None:
    cli.add_command(demo)
    cli.add_command(sites)
