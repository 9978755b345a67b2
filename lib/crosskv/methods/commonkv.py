"""``commonkv``: cross-layer parameter sharing with a latent cache and an adaptive merge budget (CommonKV).

Offline, for each group of ``group_size`` consecutive layers the stacked projection weights
[W_k¹;…;W_kᴳ;W_v¹;…;W_vᴳ] ``(2·G·H_kv·d, D)`` get a thin SVD U·Σ·Vᵀ; the group shares the
down-projection P_g = Σ^½·Vᵀ ``(r_g, D)`` and each layer keeps its up-projections R_k, R_v (its rows
of U·Σ^½). Each layer's ``k_proj``/``v_proj`` are replaced by modules computing the latent
c = P_g·x once and K = R_k·c (+ bias), V = R_v·c (+ bias); exact when r_g is the full rank.

The cache stores **one** latent per layer and token (pre-RoPE) with its absolute position. After the
prefill, per (group, token) the cosine between the group's first and last layer latents is scored;
over all groups the ``unmerged_ratio`` least similar entries stay per-layer (the first
``sink_tokens`` and last ``recent_tokens`` prompt tokens never merge) and every other entry is
replaced by one group latent, the sensitivity-weighted average of the group's latents, stored once.

Attention (``attend``): ``"rebuild"`` (default) holds only latents and rebuilds K/V (RoPE at the
stored positions) on every call, as the CommonKV release does — the memory-saving mode.
``"buffer"`` additionally keeps the rebuilt post-RoPE K and V as a float buffer (built once after
compression, then the exact new K/V are appended), so decoding runs at plain-cache speed; the
buffer is held across steps, so it is counted in ``stored_tensors()`` (``kept`` > 1 then): a speed
reference, not a compression mode. Exact latent attention is not cheaper here: V can be absorbed (out = R_v·Σ a_t c_t)
but costs H·r per token instead of H_kv·d, and RoPE makes the absorbed key a per-frequency
combination that costs as much as rebuilding K.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from crosskv.core import budget
from crosskv.core.assets import data_dir
from crosskv.core.capture import Rotary, attention_modules, decoder_layers, kv_shape
from crosskv.methods.base import MethodConfig, Runner, register
from crosskv.cache.quant import QTensor, QuantSpec, quantize, split_residual
from crosskv.core.progress import bar as progress_bar

log = logging.getLogger(__name__)

FORMAT = "crosskv.commonkv/1"
RANKINGS = ("uniform", "fisher")
WEIGHTINGS = ("sensitivity", "uniform")
MERGE_BUDGETS = ("global", "group")
ATTEND = ("buffer", "rebuild")


def cache_dir():
    return data_dir() / "cache" / "commonkv"


# ----------------------------------------------------------------------------- weight sharing

@dataclass
class GroupFactors:
    """One group's shared down-projection ``down`` (r, D) and per-layer ``up_k``/``up_v`` (H_kv·d, r)."""

    layers: list[int]
    down: torch.Tensor
    up_k: list[torch.Tensor]
    up_v: list[torch.Tensor]

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def stacked_weights(attns: list, layers: list[int]) -> torch.Tensor:
    """[W_k of each layer; W_v of each layer] → ``(2·G·H_kv·d, D)`` float64."""
    keys = [attns[i].k_proj.weight.detach().double() for i in layers]
    values = [attns[i].v_proj.weight.detach().double() for i in layers]
    return torch.cat(keys + values)


def factorize_group(attns: list, layers: list[int], rank: int) -> GroupFactors:
    """Thin SVD of the group's stacked K/V weights, truncated to ``rank`` (≤ its full rank)."""
    weights = stacked_weights(attns, layers)
    u, s, vh = torch.linalg.svd(weights, full_matrices=False)
    if rank > s.numel():
        raise ValueError(f"rank={rank} exceeds the group's full rank {s.numel()}")
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]                  # (r, D)
    up = u[:, :rank] * root[None, :]                  # (2·G·w, r)
    width = attns[layers[0]].k_proj.weight.shape[0]
    g = len(layers)
    up_k = [up[i * width:(i + 1) * width] for i in range(g)]
    up_v = [up[(g + i) * width:(g + i + 1) * width] for i in range(g)]
    return GroupFactors(layers, down.float(), [t.float() for t in up_k], [t.float() for t in up_v])


def full_rank(layers: int, width: int, hidden: int) -> int:
    """Rank of a group's stacked weights at most: min(D, 2·G·H_kv·d)."""
    return min(hidden, 2 * layers * width)


class LatentSlot:
    """Hands the latent computed by a layer's key projection to its value projection and cache layer."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.latent: torch.Tensor | None = None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


class LatentKeyProj(nn.Module):
    """Replaces ``k_proj``: x ``(B, T, D)`` → latent c = P_g·x ``(B, T, r)`` (kept in the slot) → R_k·c + b_k."""

    def __init__(self, down: nn.Linear, up: nn.Linear, slot: LatentSlot):
        super().__init__()
        self.down, self.up, self.slot = down, up, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.down(x)
        self.slot.x, self.slot.latent = x, latent
        return self.up(latent)


class LatentValueProj(nn.Module):
    """Replaces ``v_proj``: reuses the latent of the same input (computes it if the input differs) → R_v·c + b_v."""

    def __init__(self, down: nn.Linear, up: nn.Linear, slot: LatentSlot):
        super().__init__()
        self.down, self.up, self.slot = down, up, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.slot.latent if self.slot.x is x else self.down(x)
        return self.up(latent)


# ----------------------------------------------------------------------------- the latent cache

class GroupStore:
    """A group's merged entries: latents ``(B, M, r)`` (float or quantized) and their positions ``(M,)`` int32."""

    def __init__(self, device: torch.device | None = None):
        self.pos = torch.zeros(0, dtype=torch.int32, device=device)
        self.lat: torch.Tensor | None = None
        self.qlat: QTensor | None = None

    def __len__(self) -> int:
        return self.pos.numel()

    def latents(self) -> torch.Tensor | None:
        return self.qlat.dequantize() if self.qlat is not None else self.lat

    def tensors(self) -> Iterator[torch.Tensor]:
        if not len(self):
            return
        yield self.pos
        yield from (self.qlat.tensors() if self.qlat is not None else (self.lat,))


class CommonKVLayer(CacheLayerMixin):
    """One layer's latents ``(B, n, r)`` with absolute positions ``(n,)``; K/V rebuilt with the layer's R_k, R_v.

    Own latents are ``qlat`` (quantized, oldest) followed by ``lat`` (float), in position order.
    ``seen`` counts every token that arrived (absolute positions; evicted/merged ones included).
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, slot: LatentSlot, up_k: nn.Linear, up_v: nn.Linear, store: GroupStore, rotary: Rotary,
                 kv_heads: int, head_dim: int, attend: str, k_norm: nn.Module | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.slot, self.up_k, self.up_v, self.store, self.rotary = slot, up_k, up_v, store, rotary
        self.kv_heads, self.head_dim, self.attend, self.k_norm = kv_heads, head_dim, attend, k_norm
        self.lat: torch.Tensor | None = None
        self.qlat: QTensor | None = None
        self.pos = torch.zeros(0, dtype=torch.int32, device=device)
        self.seen = 0
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- transformers protocol
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.pos = self.pos.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs=None):
        """Store the new tokens' latents; return K, V ``(B, H_kv, S, d)`` for every held token."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        latent = self.slot.latent
        self.slot.x = self.slot.latent = None  # the slot must not keep this step's activations alive
        q = key_states.shape[-2]
        if latent is None or latent.shape[-2] != q:
            raise RuntimeError("CommonKV cache used without its latent projections (run inside Runner.applied())")
        self.lat = latent if self.lat is None else torch.cat([self.lat, latent], dim=-2)
        new_pos = torch.arange(self.seen, self.seen + q, dtype=torch.int32, device=self.pos.device)
        self.pos = torch.cat([self.pos, new_pos])
        self.seen += q
        if self.attend == "rebuild":
            return self.rebuild()
        if self.buffer is None:
            self.buffer = (key_states, value_states)
        else:
            self.buffer = (torch.cat([self.buffer[0], key_states], dim=-2),
                           torch.cat([self.buffer[1], value_states], dim=-2))
        return self.buffer

    def held(self) -> int:
        """Tokens attended to: own latents + the group's merged entries."""
        return self.pos.numel() + len(self.store)

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        held = self.held()
        return held + cache_position.shape[0], self.seen - held

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Drop the newest own latents down to ``max_length`` seen (float latents appended after compression)."""
        max_length = self.seen + max_length if max_length < 0 else max_length
        if max_length >= self.seen:
            return
        drop = int((self.pos >= max_length).sum())
        lat = 0 if self.lat is None else self.lat.shape[-2]
        merged_late = len(self.store) and bool((self.store.pos >= max_length).any())
        if drop > lat or bool((self.pos[self.pos.numel() - drop:] < max_length).any()) or merged_late:
            raise ValueError(f"cannot crop to {max_length} tokens: some later tokens were merged or quantized")
        if drop:
            self.lat, self.pos = self.lat[:, :lat - drop].clone(), self.pos[:self.pos.numel() - drop].clone()  # no pinning views
            if self.buffer is not None:
                rows = self.buffer[0].shape[-2] - drop
                self.buffer = (self.buffer[0][..., :rows, :].clone(), self.buffer[1][..., :rows, :].clone())
        self.seen = max_length

    def reset(self) -> None:
        self.lat, self.qlat, self.buffer, self.seen = None, None, None, 0
        self.pos = torch.zeros(0, dtype=torch.int32, device=self.pos.device)

    # --- latents
    def own_latents(self) -> torch.Tensor:
        """Own latents ``(B, n, r)`` in position order."""
        parts = ([self.qlat.dequantize()] if self.qlat is not None else []) + ([self.lat] if self.lat is not None else [])
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def latents_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Own latents ``(B, m, r)`` at ``positions`` ``(m,)`` (which must be held by this layer)."""
        index = torch.searchsorted(self.pos, positions.to(self.pos.dtype))
        return self.own_latents().index_select(-2, index.long())

    def all_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Own and merged latents ``(B, S, r)`` in position order, with positions ``(S,)`` int64."""
        own = self.own_latents()
        merged = self.store.latents()
        if merged is None or not len(self.store):
            return own, self.pos.long()
        pos = torch.cat([self.pos, self.store.pos]).long()
        order = torch.argsort(pos)
        return torch.cat([own, merged.to(own.dtype)], dim=-2).index_select(-2, order), pos[order]

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only own latents at ``positions`` (eviction or removal of merged tokens); float storage only."""
        if self.qlat is not None:
            raise RuntimeError("cannot drop tokens from a quantized CommonKV layer (quantize last)")
        mask = torch.isin(self.pos, positions.to(self.pos.dtype))
        self.lat, self.pos = self.lat[:, mask], self.pos[mask]

    def rebuild(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K (post-RoPE) and V ``(B, H_kv, S, d)`` from the latents, RoPE at the stored positions."""
        latents, positions = self.all_latents()
        b, s, _ = latents.shape
        keys = self.up_k(latents).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        values = self.up_v(latents).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        return self.rotary.rotate(keys, positions), values

    def current_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V attention currently sees (for eviction scorers)."""
        return self.buffer if self.attend == "buffer" and self.buffer is not None else self.rebuild()

    def refresh(self) -> None:
        """Rebuild the working buffer after the stored latents changed (merge, eviction, quantization)."""
        if self.attend == "buffer":
            self.buffer = self.rebuild()

    def quantize_(self, spec: QuantSpec) -> None:
        """Quantize own latents per token, all but the ``spec.residual`` most recent."""
        if self.qlat is not None or self.lat is None:
            return
        n_q = split_residual(self.lat, spec.residual, axis=-2)
        if n_q:
            self.qlat = quantize(self.lat[:, :n_q], spec.bits, spec.group_size, axis=-1)
            self.lat = self.lat[:, n_q:].clone()

    def stored(self) -> Iterator[torch.Tensor]:
        if self.qlat is not None:
            yield from self.qlat.tensors()
        if self.lat is not None and self.lat.numel():
            yield self.lat
        if self.pos.numel():
            yield self.pos


class CommonKVCache(Cache):
    """Container of :class:`CommonKVLayer` s and one :class:`GroupStore` per layer group."""

    def __init__(self, layers: list[CommonKVLayer], groups: list[list[int]], stores: list[GroupStore]):
        super().__init__(layers=layers)
        self.groups, self.stores = groups, stores

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            yield from layer.stored()
        for store in self.stores:
            yield from store.tensors()
        for layer in self.layers:  # attend="buffer": the rebuilt K/V kept across steps
            if layer.buffer is not None:
                yield from layer.buffer

    def evict_tokens(self, kept: dict[int, torch.Tensor]) -> None:
        """Keep, per layer index, only the latents at the given absolute positions."""
        for idx, positions in kept.items():
            self.layers[idx].keep(positions)
        self.refresh()

    def quantize_(self, spec: QuantSpec) -> None:
        for layer in self.layers:
            layer.quantize_(spec)
        for store in self.stores:
            if len(store) and store.qlat is None:
                store.qlat, store.lat = quantize(store.lat, spec.bits, spec.group_size, axis=-1), None
        self.refresh()

    def refresh(self) -> None:
        for layer in self.layers:
            layer.refresh()


# ----------------------------------------------------------------------------- the adaptive merge

def candidate_positions(layers: list[CommonKVLayer], prompt_len: int, sinks: int, recent: int) -> torch.Tensor:
    """Positions held by every layer of a group, outside the first ``sinks`` and last ``recent`` prompt tokens."""
    pos = layers[0].pos
    for layer in layers[1:]:
        pos = pos[torch.isin(pos, layer.pos)]
    return pos[(pos >= sinks) & (pos < prompt_len - recent)]


def group_similarity(layers: list[CommonKVLayer], positions: torch.Tensor) -> torch.Tensor:
    """Cosine of the first and last layer's latents per position ``(m,)`` (averaged over the batch)."""
    first = layers[0].latents_at(positions).float()
    last = layers[-1].latents_at(positions).float()
    return torch.nn.functional.cosine_similarity(first, last, dim=-1).mean(0)


def merge_groups(cache: CommonKVCache, weights: list[float], unmerged_ratio: float, sinks: int, recent: int,
                 mode: str = "global") -> list[int]:
    """Merge the most similar (group, token) entries into one weighted group latent; returns merged counts per group."""
    prompt_len = cache.layers[0].seen
    groups = [[cache.layers[i] for i in g] for g in cache.groups]
    cands = [candidate_positions(ls, prompt_len, sinks, recent) if len(ls) > 1 else ls[0].pos[:0] for ls in groups]
    scores = [group_similarity(ls, c) if c.numel() else c.new_zeros(0, dtype=torch.float32) for ls, c in zip(groups, cands)]
    select = budget.global_bottom_k if mode == "global" else budget.per_group_bottom_k
    unmerged = select(scores, unmerged_ratio)
    counts = []
    for g, (layers, pos, keep) in enumerate(zip(groups, cands, unmerged)):
        chosen = pos[~keep.to(pos.device)]
        counts.append(int(chosen.numel()))
        if not chosen.numel():
            continue
        w = [weights[i] for i in cache.groups[g]]
        merged = sum(wi * layer.latents_at(chosen).float() for wi, layer in zip(w, layers))
        store = cache.stores[g]
        store.pos, store.lat = chosen.clone(), merged.to(layers[0].lat.dtype)
        for layer in layers:
            layer.keep(layer.pos[~torch.isin(layer.pos, chosen)])
    cache.refresh()
    return counts


# ----------------------------------------------------------------------------- calibration measurements

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


# ----------------------------------------------------------------------------- the method

@register
@dataclass(frozen=True)
class CommonKV(MethodConfig):
    """CommonKV. Ranks: ``rank`` per group, else ``rank_ratio``·D uniformly, or ``ranks="fisher"`` under the
    ``rank_ratio`` budget. Merge: ``unmerged_ratio`` (1 = no merging) with ``merge_budget`` global
    (adaptive cosine bottom-k) or per group, ``weights`` sensitivity or uniform.

    Default budget ``kept=0.5`` (used when neither ``rank`` nor ``rank_ratio`` is given; it is then cleared):
    the rank r is chosen so that the nominal latent bytes — r per layer per token, times the stored
    fraction ``u + (1 − u)/G`` of merging — are ``kept`` × a plain cache's 2·H_kv·d, rounded down to a
    multiple of 32 (see :func:`kept_rank`). The measured ``kept`` of a run differs: sink and recent tokens
    are never merged, and decoded tokens are stored unmerged. On GQA models a latent is easily wider
    than the K+V it replaces (rank_ratio=1: 576 > 384 on SmolLM2, 4096 > 2048 on Llama-3.1-8B); such runs
    record ``latent_wider_than_kv: true``."""

    name = "commonkv"
    description = "cross-layer shared K/V down-projection (weight SVD), latent cache, adaptive cosine merge"
    note = ("kept=0.5 (default) picks the latent rank r to save memory; with rank/rank_ratio the latent can be "
            "wider than a layer's K+V (r > 2·H_kv·d: rank_ratio=1 gives 576 > 384 on SmolLM2-135M, 4096 > 2048 on "
            "Llama-3.1-8B) and holds more than a plain cache before merging; such runs record "
            "latent_wider_than_kv: true")

    group_size: int = 4
    rank: int | None = None
    rank_ratio: float | None = None
    kept: float | None = 0.5
    ranks: str = "uniform"
    unmerged_ratio: float = 0.4
    merge_budget: str = "global"
    weights: str = "sensitivity"
    sink_tokens: int = 4
    recent_tokens: int = 128
    attend: str = "rebuild"
    calibration: int = 30
    calibration_length: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.rank is not None or self.rank_ratio is not None:
            object.__setattr__(self, "kept", None)  # an explicit rank budget replaces the kept target
        if self.rank_ratio is not None:
            budget.check_ratio("rank_ratio", self.rank_ratio, allow_zero=False)
        if self.kept is not None:
            budget.check_ratio("kept", self.kept, allow_zero=False)
        budget.check_ratio("unmerged_ratio", self.unmerged_ratio)
        for field, value, allowed in (("ranks", self.ranks, RANKINGS), ("weights", self.weights, WEIGHTINGS),
                                      ("merge_budget", self.merge_budget, MERGE_BUDGETS),
                                      ("attend", self.attend, ATTEND)):
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {allowed}")
        if self.ranks == "fisher" and self.rank is not None:
            raise ValueError(f"rank={self.rank} conflicts with ranks='fisher' (give rank_ratio or kept as the budget)")
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise ValueError(f"sink_tokens={self.sink_tokens} and recent_tokens={self.recent_tokens} must be >= 0")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.calibration < 1 or self.calibration_length < 2:
            raise ValueError(f"calibration={self.calibration} rows of calibration_length={self.calibration_length} "
                             "tokens: need >= 1 row of >= 2 tokens")

    @property
    def merges(self) -> bool:
        return self.unmerged_ratio < 1

    def calibration_ids(self, tokenizer) -> torch.Tensor:
        from crosskv.core.data import calibration_set

        return calibration_set(tokenizer, n=self.calibration, length=self.calibration_length, seed=self.seed)

    def calibration_key(self) -> dict:
        return {"calibration": self.calibration, "length": self.calibration_length, "seed": self.seed}

    def stored_fraction(self) -> float:
        """Nominal latent rows stored per layer and token after merging: u + (1 − u)/G (1 without merging)."""
        return self.unmerged_ratio + (1 - self.unmerged_ratio) / self.group_size if self.merges else 1.0

    def rank_budget(self, model) -> float:
        """The uniform rank ratio r/D: ``rank_ratio``, or the one :func:`kept_rank` picks for ``kept``."""
        if self.rank_ratio is not None:
            return self.rank_ratio
        shape = kv_shape(model)
        return kept_rank(self.kept, 2 * shape.width, self.stored_fraction(), shape.hidden) / shape.hidden

    def group_ranks(self, model, tokenizer, groups: list[list[int]]) -> list[int]:
        shape = kv_shape(model)
        caps = [full_rank(len(g), shape.width, shape.hidden) for g in groups]
        if self.rank is not None and self.rank > shape.hidden:
            raise ValueError(f"rank={self.rank} exceeds the model width D={shape.hidden}")
        if self.ranks == "uniform":
            rank = self.rank if self.rank is not None else max(1, round(self.rank_budget(model) * shape.hidden))
            return budget.uniform_ranks(rank, caps)
        fisher = group_fisher(model, tokenizer, self, groups)
        return budget.fisher_ranks(fisher, [len(g) for g in groups], caps, self.rank_budget(model), shape.hidden)

    def layer_weights(self, model, tokenizer, groups: list[list[int]]) -> list[float]:
        layers = kv_shape(model).layers
        if not self.merges or self.weights == "uniform":
            return budget.normalise_within_groups([1.0] * layers, groups)
        deltas = cached_measurement("sensitivity", model, self.calibration_key(),
                                    lambda: key_noise_sensitivity(model, self.calibration_ids(tokenizer), self.seed))
        return budget.normalise_within_groups(deltas, groups)

    def bind(self, model, tokenizer=None) -> "CommonKVRunner":
        groups = budget.layer_groups(kv_shape(model).layers, self.group_size)
        ranks = self.group_ranks(model, tokenizer, groups)
        weights = self.layer_weights(model, tokenizer, groups)
        return CommonKVRunner(self, model, tokenizer, groups, ranks, weights)


def kept_rank(kept: float, kv_width: int, stored_fraction: float, hidden: int, multiple: int = 32) -> int:
    """The latent rank r whose nominal bytes r·``stored_fraction`` are ``kept``·``kv_width`` (a plain cache's
    2·H_kv·d per layer and token), rounded down to a multiple of ``multiple`` (at least one), at most D."""
    ideal = kept * kv_width / stored_fraction
    return min(hidden, max(multiple, multiple * math.floor(ideal / multiple)))


def group_fisher(model, tokenizer, config: CommonKV, groups: list[list[int]]) -> list[float]:
    """Σ over each group's layers of the per-layer v_proj Fisher importance (measured once, cached on disk);
    :func:`crosskv.core.budget.fisher_ranks` divides by the group size, i.e. ranks ∝ the per-layer mean."""
    per_layer = cached_measurement("fisher", model, config.calibration_key(),
                                   lambda: value_fisher(model, config.calibration_ids(tokenizer)))
    return [sum(per_layer[i] for i in g) for g in groups]


class CommonKVRunner(Runner):
    """Holds the factorized weights; installs the latent projections and builds latent caches."""

    def __init__(self, config: CommonKV, model, tokenizer, groups: list[list[int]], ranks: list[int],
                 weights: list[float]):
        super().__init__(config, model, tokenizer)
        self.groups, self.ranks, self.weights = groups, ranks, weights
        attns = attention_modules(model)
        self.factors = [factorize_group(attns, g, r) for g, r in zip(groups, ranks)]
        self.rotary = Rotary(model)
        self.slots: list[LatentSlot] | None = None
        self.ups: list[tuple[nn.Linear, nn.Linear]] = []
        self.merged_counts: list[int] = []
        self.kv_width = 2 * kv_shape(model).width
        log.info("commonkv: groups %s, ranks %s", [len(g) for g in groups], ranks)
        if self.latent_wider_than_kv:
            log.warning("commonkv: latent ranks %s are wider than a layer's K+V (%d): unmerged entries hold more "
                        "than a plain cache", ranks, self.kv_width)

    @property
    def latent_wider_than_kv(self) -> bool:
        """True when some group's latent (r per layer and token) is wider than the K+V it replaces (2·H_kv·d)."""
        return max(self.ranks) > self.kv_width

    def record_fields(self) -> dict:
        return {"latent_ranks": list(self.ranks), "kv_width": self.kv_width,
                "latent_wider_than_kv": self.latent_wider_than_kv}

    def _modules(self) -> tuple[list[LatentSlot], list[tuple[nn.Module, nn.Module]], list[tuple[nn.Linear, nn.Linear]]]:
        attns = attention_modules(self.model)
        slots, replacements, ups = [None] * len(attns), [None] * len(attns), [None] * len(attns)
        for factors in self.factors:
            first = attns[factors.layers[0]].k_proj
            down = _linear(factors.down, None, first)
            for i, layer in enumerate(factors.layers):
                attn = attns[layer]
                up_k = _linear(factors.up_k[i], attn.k_proj.bias, attn.k_proj)
                up_v = _linear(factors.up_v[i], attn.v_proj.bias, attn.v_proj)
                slots[layer] = LatentSlot()
                replacements[layer] = (LatentKeyProj(down, up_k, slots[layer]), LatentValueProj(down, up_v, slots[layer]))
                ups[layer] = (up_k, up_v)
        return slots, replacements, ups

    @contextlib.contextmanager
    def applied(self) -> Iterator["CommonKVRunner"]:
        attns = attention_modules(self.model)
        originals = [(a.k_proj, a.v_proj) for a in attns]
        self.slots, replacements, self.ups = self._modules()
        try:
            for attn, (k, v) in zip(attns, replacements):
                attn.k_proj, attn.v_proj = k, v
            yield self
        finally:
            for attn, (k, v) in zip(attns, originals):
                attn.k_proj, attn.v_proj = k, v
            self.slots, self.ups = None, []

    def new_cache(self) -> CommonKVCache:
        if self.slots is None:
            raise RuntimeError("CommonKVRunner.new_cache() must be called inside runner.applied()")
        shape = kv_shape(self.model)
        attns = attention_modules(self.model)
        device = next(self.model.parameters()).device
        stores = [GroupStore(device) for _ in self.groups]
        group_of = {layer: g for g, layers in enumerate(self.groups) for layer in layers}
        layers = [CommonKVLayer(self.slots[i], *self.ups[i], stores[group_of[i]], self.rotary, shape.kv_heads,
                                shape.head_dim, self.config.attend, getattr(attns[i], "k_norm", None), device)
                  for i in range(shape.layers)]
        return CommonKVCache(layers, self.groups, stores)

    def compress(self, cache: CommonKVCache) -> None:
        if not self.config.merges:
            return
        self.merged_counts = merge_groups(cache, self.weights, self.config.unmerged_ratio, self.config.sink_tokens,
                                          self.config.recent_tokens, self.config.merge_budget)
        log.info("commonkv: merged tokens per group %s", self.merged_counts)


# ----------------------------------------------------------------------------- analysis helpers

@torch.no_grad()
def prompt_latents(runner: CommonKVRunner, ids: torch.Tensor) -> CommonKVCache:
    """Prefill ``ids`` ``(1, T)`` through the latent projections; the returned cache holds every layer's latents."""
    with runner.applied():
        cache = runner.new_cache()
        runner.model(input_ids=ids.to(runner.model.device), past_key_values=cache, use_cache=True)
    return cache


def token_cosines(cache: CommonKVCache) -> list[torch.Tensor | None]:
    """Per group: cosine between its first and last layer's latents at every held position ``(T,)``
    (averaged over the batch; ``None`` for 1-layer groups)."""
    out = []
    for group in cache.groups:
        layers = [cache.layers[i] for i in group]
        out.append(group_similarity(layers, layers[0].pos) if len(layers) > 1 else None)
    return out


def group_cosines(cache: CommonKVCache) -> list[float]:
    """Per group: mean over tokens of the cosine between its first and last layer's latents (NaN for 1-layer groups)."""
    return [float("nan") if c is None else float(c.mean()) for c in token_cosines(cache)]


@torch.no_grad()
def input_cosines(model, hidden: torch.Tensor, groups: list[list[int]]) -> list[torch.Tensor | None]:
    """Per group: cosine between the normalised inputs of its first and last layer's K/V projections per token.

    ``hidden``: ``(L+1, B, T, D)`` residual stream (row ℓ enters layer ℓ, as :func:`crosskv.core.capture.capture`
    returns it); each layer's own ``input_layernorm`` is applied, so this is what ``k_proj``/``v_proj`` see.
    Returns ``(B·T,)`` per group (``None`` for 1-layer groups) — the baseline the latents' cosine is compared to.
    """
    layers = decoder_layers(model)
    if not all(hasattr(layer, "input_layernorm") for layer in layers):
        raise ValueError(f"{type(layers[0]).__name__} has no input_layernorm: input_cosines needs the pre-attention norm")
    out = []
    for group in groups:
        if len(group) < 2:
            out.append(None)
            continue
        first, last = (layers[i].input_layernorm(hidden[i].to(model.dtype)).float().flatten(0, 1) for i in (group[0], group[-1]))
        out.append(torch.nn.functional.cosine_similarity(first, last, dim=-1))
    return out
