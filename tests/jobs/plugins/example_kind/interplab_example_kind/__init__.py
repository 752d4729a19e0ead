"""The ``example`` job kind: count the tokens of some words, one chunk per ``chunk_size`` words.

.. code-block:: yaml

    kind: example
    model: tiny-llama
    words: [alpha, beta, gamma]
    chunk_size: 2

Rows land in ``example_words`` (view: ``views/example_words.sql``); ``interplab plot RUN_ID`` draws
them (:func:`interplab_example_kind.plot.plot_run`). Only interplab's public API is used.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import PositiveInt

from interplab.jobs import JobSpec, JobSummary, SpecError, register_kind
from interplab_example_kind.plot import plot_run

TABLE = "example_words"


class ExampleSpec(JobSpec):
    kind: Literal["example"]
    model: str = "tiny-llama"
    words: list[str] = ["alpha", "beta", "gamma"]
    chunk_size: PositiveInt = 2


class ExampleRunner:
    def validate(self, spec: ExampleSpec, model) -> None:
        for i, word in enumerate(spec.words):
            if not word.strip():
                raise SpecError(f"words[{i}]", "must not be empty", word, "a word")

    def chunks(self, spec: ExampleSpec, model) -> list[str]:
        return [f"w{start}" for start in range(0, len(spec.words), spec.chunk_size)]

    def run_chunk(self, spec: ExampleSpec, model, chunk_id: str, writer) -> None:
        start = int(chunk_id[1:])
        indices = list(range(start, min(start + spec.chunk_size, len(spec.words))))
        words = [spec.words[i] for i in indices]
        counts = [len(model.tokenizer(word)["input_ids"]) for word in words]
        writer.write_table(TABLE, pa.table({"word_index": indices, "word": words, "n_tokens": counts}), chunk=chunk_id)

    def finalize(self, spec: ExampleSpec, model, writer) -> JobSummary:
        return JobSummary(lines=[f"{len(spec.words)} words counted"],
                          sql=[f"SELECT word, n_tokens FROM {TABLE} WHERE run_id = '{{run_id}}' ORDER BY word_index"])


register_kind("example", ExampleSpec, ExampleRunner(), plot=plot_run)
