"""Facts and implications for the extractive-structures experiments (Feng, Russell & Steinhardt 2024).

    data = first_hop(tokenizer, n=20, seed=0)
    data["F"][0]       # Example('Tarek Ovandi lives in', ' Oslo', options=(' Paris', ' Tokyo', ...))
    data["ImplF"][0]   # Example('The people in the city Tarek Ovandi is from speak', ' Norwegian', ...)

A :class:`TaskData` maps set names to examples:

* ``F`` / ``ImplF``: facts about the train-split names and their implications;
* ``F_prime`` / ``ImplF_prime``: the same names reassigned one-to-one to *other* answers (a seeded
  derangement), and the implications of the new assignment;
* ``F_new`` / ``ImplF_new``: facts about test-split names (data-ordering phase 2) and their implications.

First hop: ``"{name} lives in" -> city`` and ``"The people in the city {name} is from speak" ->
language``. Second hop: ``"The mayor of {city} is" -> name`` and ``"The mayor of the city that
contains {landmark} is" -> name``. Ranks are taken over the first tokens of an example's options,
so every option set is filtered to answers whose first tokens are distinct for the model's
tokenizer. Users give their own sets in YAML or JSONL (:func:`load_task_file`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

SETS = ("F", "ImplF", "F_prime", "ImplF_prime", "F_new", "ImplF_new")
FACT_SETS = ("F", "F_prime", "F_new")


class GraftingDataError(ValueError):
    """Facts/implications that cannot be used (unknown set, missing answer in options, token clashes)."""


@dataclass(frozen=True)
class Example:
    """One prompt, its answer (with its leading space) and the options the answer is ranked among."""

    prompt: str
    answer: str
    options: tuple[str, ...]


TaskData = dict[str, list[Example]]


# ------------------------------------------------------------------ shipped data
def _read(name: str) -> str:
    return resources.files("interplab.data").joinpath("grafting").joinpath(name).read_text(encoding="utf-8")


def _lines(name: str) -> list[str]:
    return [line.strip() for line in _read(name).splitlines() if line.strip() and not line.startswith("#")]


def names(split: str) -> list[str]:
    """The fictional names of a split (``train`` or ``test``)."""
    if split not in ("train", "test"):
        raise GraftingDataError(f"names split must be 'train' or 'test', got {split!r}")
    return _lines(f"names_{split}.txt")


def cities() -> list[tuple[str, str, str]]:
    """``(city, country, language)`` rows."""
    return [tuple(line.split("\t")) for line in _lines("cities.tsv")]  # type: ignore[misc]


def landmarks() -> dict[str, str]:
    """City -> a landmark in it."""
    return {city: landmark for landmark, city in (line.split("\t") for line in _lines("landmarks.tsv"))}


def templates() -> dict[str, dict[str, str]]:
    return yaml.safe_load(_read("templates.yaml"))


# ------------------------------------------------------------------ tokens
def first_token(tokenizer, answer: str) -> int:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GraftingDataError(f"answer {answer!r} tokenizes to no tokens")
    return int(ids[0])


def _distinct_first(tokenizer, items: Sequence, key) -> list:
    """Items (in order) whose ``key`` answer starts with a token no earlier kept item starts with."""
    seen: set[int] = set()
    out = []
    for item in items:
        tokens = [first_token(tokenizer, " " + k) for k in key(item)]
        if any(t in seen for t in tokens) or len(set(tokens)) != len(tokens):
            continue
        seen.update(tokens)
        out.append(item)
    return out


def check_examples(tokenizer, data: TaskData) -> None:
    """Every answer's first token is among its options' first tokens, and those are distinct."""
    for name, examples in data.items():
        if name not in SETS:
            raise GraftingDataError(f"unknown set {name!r}; sets are {', '.join(SETS)}")
        for i, ex in enumerate(examples):
            firsts = [first_token(tokenizer, o) for o in ex.options]
            if len(set(firsts)) != len(firsts):
                raise GraftingDataError(f"{name}[{i}]: options {list(ex.options)} do not start with distinct tokens")
            if first_token(tokenizer, ex.answer) not in firsts:
                raise GraftingDataError(f"{name}[{i}]: answer {ex.answer!r} is not among options {list(ex.options)}")


# ------------------------------------------------------------------ built-in tasks
def _derangement(n: int, rng: random.Random) -> list[int]:
    """A seeded permutation with no fixed point (a shifted random cycle order)."""
    order = list(range(n))
    rng.shuffle(order)
    out = [0] * n
    for i in range(n):
        out[order[i]] = order[(i + 1) % n]
    return out


def first_hop(tokenizer, n: int = 20, *, seed: int = 0) -> TaskData:
    """Names -> cities (``F``), their languages (``ImplF``), a reassignment (``F_prime``), new names."""
    rows = _distinct_first(tokenizer, cities(), key=lambda r: (r[0], r[2]))
    if n < 2 or n > len(rows):
        raise GraftingDataError(f"first_hop: n must be between 2 and {len(rows)} (cities with distinct first tokens), got {n}")
    rng = random.Random(seed)
    chosen = rows[:n]
    city_options = tuple(" " + r[0] for r in chosen)
    lang_options = tuple(" " + r[2] for r in chosen)
    tpl = templates()["first_hop"]
    train, test = names("train"), names("test")
    if n > min(len(train), len(test)):
        raise GraftingDataError(f"first_hop: n={n} exceeds the {min(len(train), len(test))} names of a split")
    group_a, group_b = rng.sample(train, n), rng.sample(test, n)
    assign_a = list(range(n))
    rng.shuffle(assign_a)
    shift = _derangement(n, rng)
    assign_prime = [assign_a[shift[i]] for i in range(n)]
    assign_b = list(range(n))
    rng.shuffle(assign_b)

    def facts(people, assign):
        return [Example(tpl["fact"].format(name=p), city_options[a], city_options) for p, a in zip(people, assign)]

    def impls(people, assign):
        return [Example(tpl["implication"].format(name=p), lang_options[a], lang_options) for p, a in zip(people, assign)]

    return {
        "F": facts(group_a, assign_a),
        "ImplF": impls(group_a, assign_a),
        "F_prime": facts(group_a, assign_prime),
        "ImplF_prime": impls(group_a, assign_prime),
        "F_new": facts(group_b, assign_b),
        "ImplF_new": impls(group_b, assign_b),
    }


def second_hop(tokenizer, n: int = 10, *, seed: int = 0) -> TaskData:
    """Cities -> mayors (``F``), landmark phrasing (``ImplF``); ``F_new`` uses other cities and test names."""
    marks = landmarks()
    rows = [r for r in cities() if r[0] in marks]
    rng = random.Random(seed)
    if n < 2 or 2 * n > len(rows):
        raise GraftingDataError(f"second_hop: n must be between 2 and {len(rows) // 2}, got {n}")
    tpl = templates()["second_hop"]
    people_a = _distinct_first(tokenizer, rng.sample(names("train"), len(names("train"))), key=lambda p: (p,))
    people_b = _distinct_first(tokenizer, rng.sample(names("test"), len(names("test"))), key=lambda p: (p,))
    if len(people_a) < n or len(people_b) < n:
        raise GraftingDataError(f"second_hop: only {min(len(people_a), len(people_b))} names with distinct first tokens; n={n}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    group_a, group_b = [rows[i][0] for i in order[:n]], [rows[i][0] for i in order[n : 2 * n]]
    opts_a, opts_b = tuple(" " + p for p in people_a[:n]), tuple(" " + p for p in people_b[:n])
    shift = _derangement(n, rng)

    def facts(places, answers, options):
        return [Example(tpl["fact"].format(city=c), a, options) for c, a in zip(places, answers)]

    def impls(places, answers, options):
        return [Example(tpl["implication"].format(landmark=marks[c]), a, options) for c, a in zip(places, answers)]

    prime = [opts_a[shift[i]] for i in range(n)]
    return {
        "F": facts(group_a, opts_a, opts_a),
        "ImplF": impls(group_a, opts_a, opts_a),
        "F_prime": facts(group_a, prime, opts_a),
        "ImplF_prime": impls(group_a, prime, opts_a),
        "F_new": facts(group_b, opts_b, opts_b),
        "ImplF_new": impls(group_b, opts_b, opts_b),
    }


# ------------------------------------------------------------------ user data
def _family(name: str) -> str:
    return "F" if name in FACT_SETS else "ImplF"


def examples_from_records(records: Mapping[str, Sequence[Mapping]]) -> TaskData:
    """``{set: [{prompt, answer, options?}, ...]}`` → :class:`TaskData`.

    An example without ``options`` is ranked among every answer of its family (the fact sets ``F``,
    ``F_prime``, ``F_new`` share one option list, the implication sets another)."""
    data: dict[str, list[dict]] = {}
    for name, items in records.items():
        if name not in SETS:
            raise GraftingDataError(f"unknown set {name!r}; sets are {', '.join(SETS)}")
        if not isinstance(items, list) or not items:
            raise GraftingDataError(f"set {name!r} must be a non-empty list of {{prompt, answer, options}}")
        for i, item in enumerate(items):
            if (
                not isinstance(item, Mapping)
                or not isinstance(item.get("prompt"), str)
                or not isinstance(item.get("answer"), str)
            ):
                raise GraftingDataError(f"{name}[{i}] must have string 'prompt' and 'answer', got {item!r}")
            extra = set(item) - {"prompt", "answer", "options"}
            if extra:
                raise GraftingDataError(f"{name}[{i}] has unknown key(s) {sorted(extra)}; keys are prompt, answer, options")
        data[name] = list(items)
    pools: dict[str, list[str]] = {}
    for name, items in data.items():
        pool = pools.setdefault(_family(name), [])
        pool += [it["answer"] for it in items if it["answer"] not in pool]
    out: TaskData = {}
    for name, items in data.items():
        out[name] = [Example(it["prompt"], it["answer"], tuple(it.get("options") or pools[_family(name)])) for it in items]
    return out


def load_task_file(path: str | Path) -> TaskData:
    """Facts and implications from YAML (``{F: [...], ImplF: [...]}``) or JSONL (``{"set": "F", ...}`` lines)."""
    path = Path(path)
    if not path.is_file():
        raise GraftingDataError(f"data file {str(path)!r} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records: dict[str, list] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GraftingDataError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(item, dict) or "set" not in item:
                raise GraftingDataError(f"{path}:{n}: each line needs a 'set' (one of {', '.join(SETS)})")
            records.setdefault(item.pop("set"), []).append(item)
        return examples_from_records(records)
    if path.suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise GraftingDataError(f"{path}: expected a mapping of sets ({', '.join(SETS)})")
        return examples_from_records(raw)
    raise GraftingDataError(f"{path}: unsupported data file type {path.suffix!r}; use .yaml or .jsonl")


def require(data: TaskData, sets: Sequence[str], what: str) -> None:
    missing = [s for s in sets if not data.get(s)]
    if missing:
        raise GraftingDataError(f"{what} needs the set(s) {', '.join(missing)}")
