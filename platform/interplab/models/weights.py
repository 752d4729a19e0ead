"""The weights hash of a model: a content hash of its weight files, computed without loading it.

``weight_hash(source)`` is the SHA-256 (first 16 hex digits) over, in name order, every
``*.safetensors`` file and ``config.json`` of a model folder: the name, the size and the **whole**
content of each (one changed value changes the hash). Hashing SmolLM2-135M's 540 MB reads every byte
once (~1-2 s); the digest of each file is then cached under ``$INTERPLAB_CACHE/weight-hash/``
(default ``~/.cache/interplab``), keyed by the file's (resolved path, size, mtime, ctime, inode), so
every later call costs a few ``stat`` calls. A file rewritten in place gets a new mtime/ctime, so a
stale digest is never used.

Other sources: a Hugging Face hub id that is not a local folder hashes as ``hub:<id>``; the built-in
random ``tiny-<family>`` models as ``tiny:<family>:<seed>`` (their weights are a function of the
seed). :func:`spec_weight_hash` gives the hash for a model *name* (what a job spec says), resolving
it to its folder as the loader does (the SmolLM2 GGUF conversion is cached once) without building
the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 8 << 20
HASHED_FILES = ("*.safetensors", "config.json")


def _cache_root() -> Path:
    from interplab.models.loading import cache_dir

    return cache_dir() / "weight-hash"


def file_digest(path: Path) -> str:
    """The SHA-256 of ``path``'s content, cached by (path, size, mtime, ctime, inode)."""
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    entry = _cache_root() / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached.get("ident") == ident and isinstance(cached.get("sha256"), str):
            return str(cached["sha256"])
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    try:  # best effort: a read-only cache only costs a re-hash next time
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"ident": ident, "sha256": value}))
        os.replace(tmp, entry)
    except OSError:
        pass
    return value


def weight_hash(source: Path | str) -> str:
    """A content hash of a model folder's weight files and config (see the module doc)."""
    if not isinstance(source, Path):
        return f"hub:{source}"
    files = sorted({f for pattern in HASHED_FILES for f in source.glob(pattern) if f.is_file()}, key=lambda f: f.name)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}|{file.stat().st_size}|{file_digest(file)}\n".encode())
    return digest.hexdigest()[:16]


def spec_weight_hash(model: str, seed: int = 0) -> str:
    """The weights hash of the model a spec names, without loading it (tokenizer-free, too)."""
    from interplab.models.loading import resolve_source
    from interplab.models.tiny import TINY_PREFIX

    if model.startswith(TINY_PREFIX):
        return f"tiny:{model[len(TINY_PREFIX) :]}:{seed}"
    source = resolve_source(model)
    return weight_hash(Path(source) if isinstance(source, Path) else source)
