"""The results store: one JSON record per completed run, keyed by a hash of what determines the run.

The key is the sha256 of (model name, dtype, device type, method name + parameters, task config, schema
version, the versions of torch, transformers and kvpress) and of the content that produced it (:mod:`crosskv.core.fingerprint`): the library code's
fingerprint, the model's fingerprint (config + weights), and the content hash of every file a
parameter names (KVSharer ``strategy``, ``jsonl:PATH``). So a code change, an edited strategy file or
different weights make the next run recompute, while an unchanged re-run is served from the store.
A record that cannot be read (torn, not JSON) is logged with a warning naming the file and treated
as absent: the run is recomputed and the record replaced. The file is ``<results dir>/<key>.json``. The results dir is ``data/results/`` unless
``results_dir=`` or the environment variable ``CROSSKV_RESULTS`` says otherwise. Writes go to a
temporary file in the same folder and are renamed into place (``os.replace``), so an interrupted run
leaves no record and a reader never sees half a file.

A record holds the run's identity, its scores, measured bytes and timings, versions, git commit,
device, the machine it ran on (:func:`machine_name`), and the per-sample ``details`` list. Timings and peak
memory describe one machine: a stored record served on another machine (same key: same device type, dtype
and versions) keeps its scores and bytes but has its timing fields (:data:`TIMING_FIELDS`,
:data:`DETAIL_TIMING_FIELDS`) set to ``None`` and ``timings_dropped`` naming the machine they came from
(:func:`served`); ``force=True`` recomputes them. :func:`load_records` gives one tidy row per run
(method parameters flattened as ``param.<name>`` columns, task options as ``option.<name>``,
versions as ``version.<package>``; ``details`` left out); :func:`load_samples` one row per sample.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from crosskv.core import fingerprint
from crosskv.core.assets import PROJECT_ROOT

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
ENV_VAR = "CROSSKV_RESULTS"


def results_dir(path: str | Path | None = None) -> Path:
    """``path``, else ``$CROSSKV_RESULTS``, else ``data/results`` in the project."""
    return Path(path or os.environ.get(ENV_VAR) or PROJECT_ROOT / "data" / "results")


KEY_PACKAGES = ("torch", "transformers", "kvpress")
TIMING_FIELDS = ("prefill_s", "compress_s", "decode_tok_s", "seconds", "peak_mem_bytes", "peak_mem_kind")
DETAIL_TIMING_FIELDS = ("prefill_s", "compress_s", "decode_s", "continuation_s")


def identity(model: str, dtype: str, method: str, params: dict[str, Any], task: dict[str, Any],
             model_fingerprint: str | None = None, *, device_type: str) -> dict[str, Any]:
    """What determines a run's result (the hashed part of a record): names and parameters, the device type
    (``cpu``, ``cuda``) and the versions of :data:`KEY_PACKAGES`, plus the library code fingerprint, the model
    fingerprint and the content hash of every file a parameter names."""
    return {"model": model, "dtype": dtype, "device_type": device_type, "method": method, "params": params,
            "task": task, "schema": SCHEMA_VERSION, "code": fingerprint.code_fingerprint(),
            "model_fingerprint": model_fingerprint, "key_versions": {p: _version(p) for p in KEY_PACKAGES},
            "files": fingerprint.file_digests({"params": params, "task": task})}


def machine_name(device_type: str) -> str:
    """The machine a run's timings describe (from :func:`machine`): host and processor with its core count,
    or host and GPU name."""
    m = machine()
    where = f"cuda: {m['gpu']}" if device_type == "cuda" else f"cpu: {m['cpu']}, {m['cores']} cores"
    return f"{m['host']} · {where}"


def served(record: dict[str, Any], machine: str) -> dict[str, Any]:
    """``record`` as served on ``machine``: unchanged when it was measured there; otherwise a copy whose timing
    fields (run and per-sample) are ``None`` and whose ``timings_dropped`` names the machine they came from."""
    if record.get("machine") == machine:
        return record
    log.info("record %s was timed on %r, not this machine (%r): serving its scores, dropping its timings",
             str(record.get("key"))[:12], record.get("machine"), machine)
    out = {**record, **{k: None for k in TIMING_FIELDS if k in record},
           "timings_dropped": record.get("machine") or "unknown machine"}
    out["details"] = [{**d, **{k: None for k in DETAIL_TIMING_FIELDS if k in d}} for d in record.get("details", [])]
    return out


def run_key(ident: dict[str, Any]) -> str:
    """sha256 hex digest (64 chars) of the canonical JSON of :func:`identity` (:func:`crosskv.core.fingerprint.digest`)."""
    return fingerprint.digest(ident, length=None)


def record_path(key: str, path: str | Path | None = None) -> Path:
    return results_dir(path) / f"{key}.json"


def read_record(file: Path) -> dict[str, Any] | None:
    """The record in ``file``, or ``None`` (with a warning naming the file) when it is torn or unreadable."""
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable result record %s (%s); it will be recomputed", file, err)
        return None
    if not isinstance(record, dict) or "key" not in record:
        log.warning("ignoring malformed result record %s (not a record object); it will be recomputed", file)
        return None
    return record


def load_record(key: str, path: str | Path | None = None) -> dict[str, Any] | None:
    """The stored record of run ``key``, or ``None`` (also when the file is unreadable: it is then recomputed)."""
    file = record_path(key, path)
    if not file.is_file():
        return None
    return read_record(file)


def save_record(record: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write ``record`` atomically as ``<key>.json`` (tmp file in the same folder, then ``os.replace``)."""
    folder = results_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    final = record_path(record["key"], folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{record['key'][:12]}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved %s", final)
    return final


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


DIRTY_PATHS = ("lib", "pyproject.toml")  # what produces a result: the library and its pinned dependencies


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty flag: tracked files under :data:`DIRTY_PATHS` changed), or ``(None, None)`` outside a
    git checkout. Edited notebooks, figures or docs do not make a result dirty: they do not produce it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *DIRTY_PATHS],
                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(dirty)


def git_commit() -> str | None:
    """The project's HEAD commit (suffixed ``+dirty`` when tracked files changed), or ``None``."""
    commit, dirty = git_state()
    return None if commit is None else commit + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """The one description of the machine a measurement ran on (records, ``bench``, ``timing``): ``host``,
    ``cpu`` (model name), ``cores``, ``gpu`` (CUDA device name, ``None`` without one), ``threads`` (torch's)
    and ``load_1min`` (the 1-minute load average now)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "load_1min": round(os.getloadavg()[0], 2)}


def environment() -> dict[str, Any]:
    """Versions (read from package metadata; kvpress is not imported), git commit, python, platform and
    :func:`machine`."""
    commit, dirty = git_state()
    return {"versions": {p: _version(p) for p in ("torch", "transformers", "kvpress", "crosskv")},
            "git_commit": git_commit(), "git_head": commit, "git_dirty": dirty, "python": platform.python_version(),
            "platform": platform.platform(), **machine()}


def _records(path: str | Path | None) -> list[dict[str, Any]]:
    folder = results_dir(path)
    if not folder.is_dir():
        return []
    return [r for r in map(read_record, sorted(folder.glob("*.json"))) if r is not None]


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if k not in ("params", "options", "versions", "key_versions", "details")}
    row.update({f"param.{k}": v for k, v in record.get("params", {}).items()})
    row.update({f"option.{k}": v for k, v in record.get("options", {}).items()})
    row.update({f"version.{k}": v for k, v in record.get("versions", {}).items()})
    return row


def _filter(df, filters: dict[str, Any]):
    for column, wanted in filters.items():
        if column not in df.columns:
            return df.iloc[0:0]
        values = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
        df = df[df[column].isin(values)]
    return df.reset_index(drop=True)


def load_records(results_dir: str | Path | None = None, **filters: Any):
    """One row per stored run as a ``pandas.DataFrame``; ``filters`` keep rows whose column equals the value
    (or is in a list), e.g. ``load_records(method="full", task="niah_single_2")`` or
    ``load_records(**{"param.compression_ratio": 0.5})``. Method parameters are ``param.<name>`` columns."""
    import pandas as pd

    return _filter(pd.DataFrame([_flat(r) for r in _records(results_dir)]), filters)


def load_samples(results_dir: str | Path | None = None, **filters: Any):
    """One row per sample of every stored run (run identity columns + the sample's details)."""
    import pandas as pd

    rows = []
    for record in _records(results_dir):
        run = {k: record.get(k) for k in ("key", "model", "dtype", "method", "task", "context", "seed")}
        run.update({f"param.{k}": v for k, v in record.get("params", {}).items()})
        for detail in record.get("details", []):
            rows.append({**run, **{k: v for k, v in detail.items() if k != "info"}, **{
                f"info.{k}": v for k, v in detail.get("info", {}).items()}})
    return _filter(pd.DataFrame(rows), filters)
