"""Content fingerprints — the one place crosskv hashes: JSON-able values, the library code, files named by
parameters, and a model's weights.

A cached number is only current if everything that produced it is unchanged, so result keys and
the on-disk measurement caches (KVSharer search, CommonKV Fisher/sensitivity) include:

- :func:`digest` — sha256 of a JSON-able value's canonical JSON (result keys, cache file names, notebook inputs);
- :func:`code_fingerprint` — sha256 over the sources of the ``crosskv`` package (computed once per
  process; tests change it with ``monkeypatch``);
- :func:`file_digests` — the content hash of every existing file a parameter names (a KVSharer
  ``strategy`` file, a ``jsonl:PATH`` task), so editing the file changes the key, renaming it does not;
- :func:`model_fingerprint` — the model config plus, per parameter tensor, its name, shape, dtype,
  float64 sum and a strided sample of its values; computed once per model object (cached on it).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

PACKAGE_DIR = Path(__file__).resolve().parents[1]
_SAMPLE = 4096  # values hashed per parameter tensor
_ATTR = "_crosskv_fingerprint"


def digest(value: Any, length: int | None = 16) -> str:
    """sha256 (hex, first ``length`` chars; all 64 with ``None``) of ``value``'s canonical JSON (sorted keys,
    no spaces; non-JSON values by ``str``)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """sha256 (hex, 16 chars) of every ``*.py`` file of the ``crosskv`` package, by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | Path, length: int | None = 16) -> str:
    """sha256 (hex, first ``length`` chars; all 64 with ``None``) of a file's content (re-read only when its
    size or mtime changes)."""
    stat = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)[:length]


def _strings(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{prefix}.{i}")


def file_digests(params: dict[str, Any]) -> dict[str, str]:
    """``{parameter path: content hash}`` for every string in ``params`` (nested) that names an existing file;
    a ``family:PATH`` value (e.g. ``jsonl:tasks.jsonl``) counts when PATH is a file."""
    found = {}
    for name, text in _strings(params, ""):
        for candidate in (text, text.partition(":")[2]):
            if candidate and len(candidate) < 4096 and Path(candidate).is_file():
                found[name] = file_digest(candidate)
                break
    return found


def _tensor_digest(tensor) -> str:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].float().cpu()
    total = float(flat.double().sum()) if flat.numel() else 0.0
    return hashlib.sha256(sample.numpy().tobytes() + repr(total).encode()).hexdigest()[:16]


def model_fingerprint(model) -> str:
    """sha256 (hex, 16 chars) of ``model``'s config and weights (per tensor: name, shape, dtype, sum, sample).

    Cheap (one pass over the weights, no file reads) and computed once per model object.
    """
    import torch

    cached = getattr(model, _ATTR, None)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    config.pop("_name_or_path", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{_tensor_digest(tensor)}".encode())
    value = digest.hexdigest()[:16]
    try:
        object.__setattr__(model, _ATTR, value)
    except (AttributeError, TypeError):
        pass
    return value
