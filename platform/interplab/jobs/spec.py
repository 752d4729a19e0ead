"""Job specs: the YAML a researcher writes, as pydantic models.

Every kind's spec subclasses :class:`JobSpec` (``extra="forbid"``, ``strict=True``: unknown keys and
wrong types are errors, ``"8"`` is not an integer). :func:`load_spec_file` reads YAML (duplicate
keys are errors too), applies ``--set key=value`` overrides and returns the raw mapping;
:func:`interplab.jobs.registry.parse_spec` turns it into the kind's model, and
:func:`format_validation_error` turns pydantic's errors into :class:`SpecError` s that name the field
path, the bad value and what is allowed.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, model_validator

from interplab.jobs.errors import MISSING, SpecError, SpecErrors

DEFAULT_MODEL = "smollm2-135m"


class StrictModel(BaseModel):
    """Base of every spec model: unknown keys and wrong types are errors; values are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Resources(StrictModel):
    """Ray resources of one worker actor. ``num_gpus: auto`` = 1 when the cluster has GPUs, else 0."""

    num_cpus: PositiveFloat = 1.0
    num_gpus: float | Literal["auto"] = Field(default="auto", union_mode="left_to_right")

    def gpus(self, cluster_gpus: float) -> float:
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return float(self.num_gpus)


class ServiceRef(StrictModel):
    """Where a served model (``model: serve://NAME``) is: Serve's HTTP address and the environment
    variable holding the user's bearer token (the token itself never goes into a spec or the store)."""

    url: str = Field(pattern=r"^https?://\S+$")
    token_env: str = Field(default="INTERPLAB_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


SERVE_SCHEME = "serve://"


class JobSpec(StrictModel):
    """Fields every job kind has. Kinds add their own (and narrow ``kind`` to a ``Literal``)."""

    kind: str
    description: str = ""
    model: str = DEFAULT_MODEL
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: NonNegativeInt = 0
    store: str | None = None
    batch_size: PositiveInt = 8
    workers: PositiveInt = 1
    resources: Resources = Resources()
    retries: NonNegativeInt = 1
    # The Ray shard runtime's ParallelConfig (interplab.runtime), validated by jobs.model.check_parallel.
    parallel: dict[str, Any] | None = None
    # A served model: ``model: serve://NAME`` with ``service: {url, token_env}`` (docs/serving.md).
    service: ServiceRef | None = None

    @model_validator(mode="after")
    def _served_model(self) -> JobSpec:
        served = self.model.startswith(SERVE_SCHEME)
        if served and self.service is None:
            raise ValueError(
                f"model {self.model!r} is a served model: add service: {{url: http://HOST:8000, token_env: INTERPLAB_TOKEN}}"
            )
        if not served and self.service is not None:
            raise ValueError(f"service is set but model {self.model!r} is not a served model: use model: serve://NAME")
        if served and self.parallel is not None:
            raise ValueError("a served model runs where it is served: remove parallel (the service has its own stages)")
        return self

    @classmethod
    def resolve_paths(cls, raw: dict[str, Any], base_dir: str) -> dict[str, Any]:
        """Make file paths in ``raw`` (``dataset.path``) absolute, relative to the spec's folder."""
        dataset = raw.get("dataset")
        if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
            path = Path(dataset["path"]).expanduser()
            if not path.is_absolute():
                raw = {**raw, "dataset": {**dataset, "path": str(Path(base_dir) / path)}}
        return raw

    def to_record(self) -> dict[str, Any]:
        """The spec as JSON-able data (what the store keeps; :func:`parse_spec` reads it back)."""
        # unset optional sections are left out, so records (and content keys) of specs without them stay as they were
        exclude = {name for name in ("service", "interventions") if getattr(self, name, None) in (None, [])}
        return self.model_dump(mode="json", exclude=exclude or None)


class DatasetSpec(StrictModel):
    """Prompts from a file (``path``: .yaml/.jsonl/.parquet, relative to the spec) or a built-in set."""

    builtin: str | None = None
    path: str | None = None
    field: str = "prompt"
    limit: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of 'builtin' (e.g. ioi, facts) or 'path' (a .yaml/.jsonl/.parquet file)")
        return self

    def records(self) -> list[Any]:
        from interplab.jobs import datasets

        if self.builtin is not None:
            rows = datasets.builtin_records(self.builtin)
        elif self.path is not None:
            rows = datasets.file_records(self.path)
        else:  # the model validator requires one of them
            raise ValueError("dataset: give builtin or path")
        return rows[: self.limit] if self.limit is not None else rows

    def texts(self) -> list[str]:
        from interplab.jobs import datasets

        return datasets.select_field(self.records(), self.field, "dataset")


# -- YAML --------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise SpecError(
                str(key),
                f"duplicate key (first at line {seen[key]}, again at line {key_node.start_mark.line + 1})",
                key,
                "each key once",
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, source: str = "<spec>") -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecError as exc:
        raise exc.with_source(source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        lines = text.splitlines()
        bad_line = lines[mark.line] if mark is not None and mark.line < len(lines) else MISSING
        raise SpecError(
            "(yaml)", f"not valid YAML at {where}: {problem}", bad_line, "YAML (a mapping of fields)", source=source
        ) from None


def load_spec_file(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Read a spec file into a mapping, apply ``key=value`` overrides, resolve relative data paths."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SpecError(
            "(file)",
            "spec file not found" if not path.exists() else "not a file",
            source,
            "a path to a .yaml spec, e.g. jobs/capture-smollm2.yaml",
        )
    raw = parse_yaml(path.read_text(encoding="utf-8"), source)
    if not isinstance(raw, dict):
        raise SpecError("(spec)", "a spec must be a YAML mapping of fields", raw, "kind: ..., model: ..., ...", source=source)
    raw = apply_overrides(raw, overrides, source)
    raw["__base_dir__"] = str(path.resolve().parent)
    return raw


def apply_overrides(raw: dict[str, Any], overrides, source: str = "--set") -> dict[str, Any]:
    """``["model=tiny-llama", "dataset.limit=4"]`` → a copy of ``raw`` with those (YAML) values set."""
    out = _copy(raw)
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", "expected KEY=VALUE", item, "e.g. --set model=tiny-llama", source=source)
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise SpecError("--set", "empty key", item, "e.g. --set model=tiny-llama", source=source)
        value = parse_yaml(text, f"--set {key}") if text.strip() else ""
        target = out
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# -- pydantic errors → SpecError ---------------------------------------------------------------


def format_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _value_at(raw: Any, loc: tuple) -> Any:
    value = raw
    for part in loc:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            return MISSING
    return value


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/list/dict/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    if origin in (list, tuple, set, frozenset, dict):
        args = typing.get_args(annotation)
        return [t for arg in args[-1:] for t in _unwrap(arg)]
    return [annotation]


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        nested = [t for t in _unwrap(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def describe_type(annotation: Any) -> str:
    """A short human description of an annotation: ``a positive integer``, ``'float16' or 'float32'``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        bounds = []
        for m in meta:
            for attr, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                v = getattr(m, attr, None)
                if v is not None:
                    bounds.append(f"{word} {v}")
            if getattr(m, "min_length", None) is not None:
                bounds.append(f"with at least {m.min_length} item(s)")
        text = describe_type(base)
        return f"{text} {' and '.join(bounds)}" if bounds else text
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in typing.get_args(annotation) if a is not type(None)]
        optional = type(None) in typing.get_args(annotation)
        return " or ".join(parts) + (" or null" if optional else "")
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        inner = describe_type(args[0]) if args else "values"
        for article in ("a ", "an "):
            if inner.startswith(article) and " " not in inner[len(article) :]:
                inner = inner[len(article) :] + "s"
        return f"a list of {inner}"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with keys " + ", ".join(annotation.model_fields)
    return getattr(annotation, "__name__", str(annotation))


def _allowed(model: type[BaseModel], loc: tuple, error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        return "keys " + ", ".join(parent.model_fields) if parent is not None else ""
    if kind == "literal_error":
        return str(error.get("ctx", {}).get("expected", ""))
    parent = _model_at(model, tuple(p for p in loc[:-1]))
    names = [p for p in loc if isinstance(p, str)]
    if parent is not None and names and names[-1] in parent.model_fields:
        annotation: Any = parent.model_fields[names[-1]].annotation
        metadata = parent.model_fields[names[-1]].metadata
        if metadata:
            annotation = typing.Annotated[(annotation, *metadata)]
        if isinstance(loc[-1], int):  # an item of a list
            inner = [a for a in typing.get_args(annotation) if typing.get_origin(a) in (list, tuple)] or [annotation]
            args = typing.get_args(inner[0])
            return describe_type(args[0]) if args else describe_type(annotation)
        return describe_type(annotation)
    return ""


def _problem(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    msg = error["msg"]
    return msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg[0].lower() + msg[1:]


def format_validation_error(exc: ValidationError, model: type[BaseModel], raw: Any, source: str = "") -> SpecErrors:
    """Every pydantic error as a :class:`SpecError` (path, problem, bad value, what is allowed)."""
    out: list[SpecError] = []
    seen: set[str] = set()
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            field_loc = _field_loc(model, loc[:-1]) + loc[-1:]
        else:
            field_loc = _field_loc(model, loc)
        path = format_path(field_loc)
        if path in seen:
            continue
        seen.add(path)
        value = _value_at(raw, field_loc)
        out.append(SpecError(path, _problem(error), value, _allowed(model, field_loc, error), source=source))
    return SpecErrors(out)


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "is-instance", "function-after", "function-before"}


def _field_loc(model: type[BaseModel], loc: tuple) -> tuple:
    """``loc`` without the union-member tags pydantic inserts (``'float'``, ``"literal['auto']"``)."""
    out: list[Any] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        if current is not None:
            if part in current.model_fields:
                out.append(part)
                current = _model_at(current, (part,))
            continue  # a tag inside a model-typed union
        if part in _TYPE_TAGS or any(c in part for c in "[]'()") or part[:1].isupper():
            continue
        out.append(part)  # a key of a plain mapping
    return tuple(out)
