"""CommonKV's calibration measurements: per-layer key-noise sensitivity and v_proj Fisher importance,
measured once per (model weights, library code, settings) and kept as JSON under ``data/cache/commonkv/``.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Callable

import torch

from crosskv.core import assets
from crosskv.core.capture import attention_modules
from crosskv.core.progress import bar as progress_bar

log = logging.getLogger(__name__)

FORMAT = "crosskv.commonkv/1"


def cache_dir():
    return assets.cache_dir("commonkv")


def cached_measurement(kind: str, model, key: dict, compute: Callable[[], list[float]]) -> list[float]:
    """``compute()`` once per (model weights, library code, ``kind``, ``key``); stored as JSON under
    ``data/cache/commonkv/``. An unreadable file is measured again and replaced."""
    from crosskv.core import fingerprint
    from crosskv.core.models import model_name

    full_key = {"format": FORMAT, "kind": kind, "model": model_name(model), "dtype": str(model.dtype),
                "fingerprint": fingerprint.model_fingerprint(model), "code": fingerprint.code_fingerprint(), **key}
    digest = fingerprint.digest(full_key)
    slug = "".join(ch if ch.isalnum() else "-" for ch in str(full_key["model"]))[-40:]
    path = cache_dir() / f"{slug}-{kind}-{digest}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["values"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("commonkv: unreadable measurement %s (%s); measuring again", path, err)
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": full_key, "values": values}, indent=1))
    tmp.replace(path)
    log.info("commonkv: measured %s for %s → %s", kind, full_key["model"], path)
    return values


@torch.no_grad()
def lm_loss(model, ids: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss of ``model`` on token rows ``ids`` ``(N, T)``."""
    total = 0.0
    for start in range(0, ids.shape[0], batch):
        rows = ids[start:start + batch].to(model.device)
        total += model(input_ids=rows, labels=rows).loss.item() * rows.shape[0]
    return total / ids.shape[0]


def key_noise_sensitivity(model, ids: torch.Tensor, seed: int = 0) -> list[float]:
    """Per layer: perplexity increase when that layer's keys are replaced by Gaussian noise of the same
    per-channel mean and std, on calibration rows ``ids`` ``(N, T)``."""
    base = math.exp(lm_loss(model, ids))
    deltas = []
    gen = torch.Generator().manual_seed(seed)

    def noise(module, args, out):
        mean, std = out.float().mean(dim=(0, 1)), out.float().std(dim=(0, 1))
        rand = torch.randn(out.shape, generator=gen, device="cpu")  # seeded on the CPU: same noise on every device
        return (rand.to(out.device) * std + mean).to(out.dtype)

    for attn in progress_bar(attention_modules(model), desc="key-noise sensitivity", leave=False):
        handle = attn.k_proj.register_forward_hook(noise)
        try:
            deltas.append(math.exp(lm_loss(model, ids)) - base)
        finally:
            handle.remove()
    return deltas


def value_fisher(model, ids: torch.Tensor) -> list[float]:
    """Per layer: Fisher importance of ``v_proj.weight`` as in the CommonKV/Palu release — per weight, the root
    of the mean over the rows of ``ids`` ``(N, T)`` of the squared LM-loss gradient; then the mean over weights."""
    params = [attn.v_proj.weight for attn in attention_modules(model)]
    saved = {p: p.requires_grad for p in model.parameters()}
    squares = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for row in progress_bar(ids, desc="v_proj Fisher", leave=False):
                row = row[None].to(model.device)
                loss = model(input_ids=row, labels=row).loss
                grads = torch.autograd.grad(loss, params)
                for total, g in zip(squares, grads):
                    total += g.double().pow(2)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return [float(total.div(ids.shape[0]).sqrt().mean()) for total in squares]


def group_fisher(model, tokenizer, config, groups: list[list[int]]) -> list[float]:
    """Σ over each group's layers of the per-layer v_proj Fisher importance (measured once, cached on disk);
    :func:`crosskv.core.budget.fisher_ranks` divides by the group size, i.e. ranks ∝ the per-layer mean."""
    per_layer = cached_measurement("fisher", model, config.calibration_key(),
                                   lambda: value_fisher(model, config.calibration_ids(tokenizer)))
    return [sum(per_layer[i] for i in g) for g in groups]
