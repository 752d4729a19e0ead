"""A writer run in its own process by the crash and concurrency tests (not a test module).

    python writer_process.py STORE RUN_ID begin|resume CHUNKS ROWS D [--no-commit]

Writes chunks ``CHUNKS`` (comma-separated ints) of two sites, each chunk's rows keyed by
(prompt_id = chunk * ROWS + i), then commits unless ``--no-commit``. Prints ``ready`` once imports
are done so the parent can time a kill inside the write phase.
"""

from __future__ import annotations

import sys

import numpy as np

from interplab.store import open_store


def chunk_rows(chunk: int, rows: int, d: int) -> dict:
    rng = np.random.default_rng(chunk)
    return {
        "prompt_id": np.arange(rows, dtype=np.int64) + chunk * rows,
        "position": np.zeros(rows, dtype=np.int32),
        "token_id": np.arange(rows),
        "token": ["t"] * rows,
        "act": rng.standard_normal((rows, d), dtype=np.float32),
    }


def main(argv: list[str]) -> None:
    uri, run_id, mode, chunks, rows, d = argv[:6]
    commit = "--no-commit" not in argv
    store = open_store(uri)
    print("ready", flush=True)
    writer = store.begin_run("capture", model="tiny", spec={}, run_id=run_id) if mode == "begin" else store.resume_run(run_id)
    for chunk in (int(c) for c in chunks.split(",") if c):
        data = chunk_rows(chunk, int(rows), int(d))
        files = [
            writer.write_activations(chunk, site, 0, None, data["prompt_id"], data["position"], data["token_id"],
                                     data["token"], data["act"])
            for site in ("resid_pre", "resid_post")
        ]
        writer.finish_chunk("activations", chunk, files)
    if commit:
        writer.commit()
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
