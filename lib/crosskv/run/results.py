"""The results store: one JSON record per completed run, keyed by a hash of what determines the run.

The key is the sha256 of (model name, dtype, method name + parameters, task config, schema
version) and of the content that produced it (:mod:`crosskv.core.fingerprint`): the library code's
fingerprint, the model's fingerprint (config + weights), and the content hash of every file a
parameter names (KVSharer ``strategy``, ``jsonl:PATH``). So a code change, an edited strategy file or
different weights make the next run recompute, while an unchanged re-run is served from the store.
A record that cannot be read (torn, not JSON) is logged with a warning naming the file and treated
as absent: the run is recomputed and the record replaced. The file is ``<results dir>/<key>.json``. The results dir is ``data/results/`` unless
``results_dir=`` or the environment variable ``CROSSKV_RESULTS`` says otherwise. Writes go to a
temporary file in the same folder and are renamed into place (``os.replace``), so an interrupted run
leaves no record and a reader never sees half a file.

A record holds the run's identity, its scores, measured bytes and timings, versions, git commit,
device, and the per-sample ``details`` list. :func:`load_records` gives one tidy row per run
(method parameters flattened as ``param.<name>`` columns, task options as ``option.<name>``,
versions as ``version.<package>``; ``details`` left out); :func:`load_samples` one row per sample.
"""
from __future__ import annotations

import hashlib
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


def identity(model: str, dtype: str, method: str, params: dict[str, Any], task: dict[str, Any],
             model_fingerprint: str | None = None) -> dict[str, Any]:
    """What determines a run's result (the hashed part of a record): names and parameters, plus the library
    code fingerprint, the model fingerprint and the content hash of every file a parameter names."""
    return {"model": model, "dtype": dtype, "method": method, "params": params, "task": task,
            "schema": SCHEMA_VERSION, "code": fingerprint.code_fingerprint(), "model_fingerprint": model_fingerprint,
            "files": fingerprint.file_digests({"params": params, "task": task})}


def run_key(ident: dict[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of :func:`identity`."""
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


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


def environment() -> dict[str, Any]:
    """Versions (read from package metadata; kvpress is not imported), git commit, python and platform."""
    commit, dirty = git_state()
    return {"versions": {p: _version(p) for p in ("torch", "transformers", "kvpress", "crosskv")},
            "git_commit": git_commit(), "git_head": commit, "git_dirty": dirty, "python": platform.python_version(), "platform": platform.platform()}


def _records(path: str | Path | None) -> list[dict[str, Any]]:
    folder = results_dir(path)
    if not folder.is_dir():
        return []
    return [r for r in map(read_record, sorted(folder.glob("*.json"))) if r is not None]


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if k not in ("params", "options", "versions", "details")}
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
