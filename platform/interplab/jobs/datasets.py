"""Prompt datasets for jobs: inline lists, files (YAML, JSONL, Parquet) and built-in sets.

Built-in sets are generated deterministically (no download): ``ioi`` (indirect-object-identification
sentences with single-token names, with their corrupted twin and answers) and ``facts`` (factual
recall prompts with a one-token answer). Each record is a dict; a capture job reads one ``field``.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from itertools import permutations
from pathlib import Path
from typing import Any

from interplab.jobs.errors import SpecError

# Names and places that are one token for SmolLM2's and GPT-2's tokenizers (with a leading space).
_IOI_NAMES = ("Mary", "John", "Tom", "Alice", "James", "Sarah", "David", "Anna")
_IOI_TEMPLATES = (
    ("When {a} and {b} went to the store, {b} gave a drink to", "store"),
    ("When {a} and {b} went to the park, {b} gave a ball to", "park"),
    ("After {a} and {b} went to the office, {b} gave a book to", "office"),
    ("When {a} and {b} got a snack at the cafe, {b} decided to give it to", "cafe"),
)
_FACTS = (
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("The Colosseum is located in the city of", " Rome"),
    ("The Brandenburg Gate is located in the city of", " Berlin"),
    ("Big Ben is located in the city of", " London"),
    ("The Statue of Liberty is located in the city of", " New"),
    ("The Kremlin is located in the city of", " Moscow"),
    ("The capital of Japan is the city of", " Tokyo"),
    ("The capital of Spain is the city of", " Madrid"),
    ("The Sagrada Familia is located in the city of", " Barcelona"),
    ("The Acropolis is located in the city of", " Athens"),
    ("The Golden Gate Bridge is located in the city of", " San"),
    ("The Prado Museum is located in the city of", " Madrid"),
)


def _ioi() -> list[dict[str, Any]]:
    rows = []
    for template, _ in _IOI_TEMPLATES:
        for a, b in permutations(_IOI_NAMES, 2):
            rows.append(
                {
                    "prompt": template.format(a=a, b=b),
                    "corrupted": template.format(a=a, b=a),
                    "answer": f" {a}",
                    "wrong": f" {b}",
                }
            )
    return rows


def _facts() -> list[dict[str, Any]]:
    return [{"prompt": prompt, "answer": answer} for prompt, answer in _FACTS]


BUILTIN = {"ioi": _ioi, "facts": _facts}


def builtin_names() -> list[str]:
    return sorted(BUILTIN)


def builtin_records(name: str) -> list[dict[str, Any]]:
    if name not in BUILTIN:
        raise SpecError("dataset.builtin", "unknown built-in dataset", name, ", ".join(builtin_names()))
    return BUILTIN[name]()


@lru_cache(maxsize=8)
def _read_file(path: str, mtime_ns: int) -> tuple[Any, ...]:
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        from interplab.jobs.spec import parse_yaml

        data = parse_yaml(file.read_text(encoding="utf-8"), str(file))
        if isinstance(data, dict) and isinstance(data.get("prompts"), list):
            data = data["prompts"]
        if not isinstance(data, list):
            raise SpecError(
                "dataset.path",
                "a YAML dataset must be a list (or a mapping with a 'prompts' list)",
                path,
                "a list of strings or of mappings",
            )
        return tuple(data)
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SpecError(
                        "dataset.path", f"line {n} is not JSON ({exc.msg})", path, "one JSON string or object per line"
                    ) from None
        return tuple(rows)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return tuple(pq.read_table(file).to_pylist())
    raise SpecError("dataset.path", "unknown dataset file type", path, ".yaml, .yml, .jsonl, .ndjson or .parquet")


def file_records(path: str) -> list[Any]:
    file = Path(path)
    if not file.is_file():
        raise SpecError("dataset.path", "dataset file not found", path, "an existing .yaml/.jsonl/.parquet file")
    return list(_read_file(str(file.resolve()), file.stat().st_mtime_ns))


def select_field(records: list[Any], field: str, path: str) -> list[str]:
    """The ``field`` of each record (records may also be plain strings)."""
    out = []
    for i, record in enumerate(records):
        value = record.get(field) if isinstance(record, dict) else record
        if isinstance(record, dict) and field not in record:
            raise SpecError(
                f"{path}[{i}]",
                f"record has no field {field!r}",
                record,
                f"records with a {field!r} field (set dataset.field to choose another)",
            )
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{path}[{i}]", "a prompt must be a non-empty string", value, "non-empty text")
        out.append(value)
    return out


def fingerprint(prompts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in prompts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
