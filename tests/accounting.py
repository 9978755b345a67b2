"""Predicted bytes held by each method's cache for a configuration: the formulas ``kv_bytes`` must match.

Every function takes the model geometry (:class:`crosskv.core.capture.KVShape`), the prompt length
``tokens`` (T, compressed after prefill), the number of tokens ``appended`` afterwards (question +
decoded, stored exactly in every layer), ``batch`` B and the size of one floating element
``float_bytes`` (2 for a bfloat16 cache or the papers' 16-bit baseline, 4 for float32). Integer
tensors (MiniCache's row indices) count at their real size. W = H_kv·d below.
"""
from __future__ import annotations

from crosskv.core.capture import KVShape


def plain_layer_bytes(shape: KVShape, tokens: int, batch: int = 1, float_bytes: int = 2) -> int:
    """One uncompressed layer: K and V, ``2·B·T·W`` elements."""
    return 2 * batch * tokens * shape.width * float_bytes


def full_bytes(shape: KVShape, tokens: int, batch: int = 1, float_bytes: int = 2) -> int:
    """A plain cache of ``tokens`` tokens in all L layers: ``2·L·B·T·W`` elements."""
    return shape.layers * plain_layer_bytes(shape, tokens, batch, float_bytes)


def xkv_bytes(config, shape: KVShape, tokens: int, appended: int = 0, batch: int = 1, float_bytes: int = 2) -> int:
    """An ``xkv``/``svd`` cache (``config``: :class:`crosskv.methods.svd.XKV`).

    Per group of G' layers with effective ranks r_k, r_v (= min(rank, T)): bases ``B·T·(r_k + r_v)``
    + factors ``B·G'·(r_k + r_v)·W`` elements; layers outside the range hold ``2·B·T·W``; appended
    tokens ``2·L·B·appended·W`` everywhere.
    """
    plans = config.plan(shape, tokens)
    elements = 0
    for plan in plans:
        rank_k, rank_v = plan.effective(tokens)
        elements += batch * (rank_k + rank_v) * (tokens + len(plan.layers) * shape.width)
    in_range = sum(len(plan.layers) for plan in plans)
    plain = (shape.layers - in_range) * plain_layer_bytes(shape, tokens, batch, float_bytes)
    return elements * float_bytes + plain + full_bytes(shape, appended, batch, float_bytes)


def minicache_bytes(config, shape: KVShape, tokens: int, retained_k: int, retained_v: int, appended: int = 0,
                    batch: int = 1, float_bytes: int = 2, index_bytes: int = 4) -> int:
    """A ``minicache`` cache (``config``: :class:`crosskv.methods.minicache.MiniCache`).

    Per merged pair, for K and for V: one direction ``B·T·W`` + two layers' magnitudes ``2·B·T·H_kv``
    elements; over all pairs, each retained row costs both layers' vectors ``2·d`` elements plus one
    index (``retained_k``/``retained_v`` are totals over pairs — data-dependent, read them from
    ``cache.retained_rows()``); unpaired layers hold ``2·B·T·W``; appended tokens are exact.
    """
    pairs = len(config.pairs(shape))
    merged = pairs * 2 * batch * tokens * (shape.width + 2 * shape.kv_heads)
    retained = retained_k + retained_v
    plain = (shape.layers - 2 * pairs) * plain_layer_bytes(shape, tokens, batch, float_bytes)
    return ((merged + retained * 2 * shape.head_dim) * float_bytes + retained * index_bytes + plain
            + full_bytes(shape, appended, batch, float_bytes))


def commonkv_bytes(ranks: list[int], group_sizes: list[int], tokens: int, merged: list[int], batch: int = 1,
                   float_bytes: int = 2, index_bytes: int = 4) -> int:
    """A ``commonkv`` latent cache after ``tokens`` tokens (prompt + appended, all stored as latents).

    A group of G layers with rank r_g and M_g merged tokens holds G·(T − M_g) per-layer latents and
    M_g group latents (each merged entry stored once), each ``B·r_g`` elements with one int32 position:
    ``(G·T − (G − 1)·M_g)·(B·r_g·float_bytes + index_bytes)`` (RoPE tables live one forward: none held).
    """
    total = 0
    for rank, size, count in zip(ranks, group_sizes, merged):
        total += (size * tokens - (size - 1) * count) * (batch * rank * float_bytes + index_bytes)
    return total


def quantized_bytes(rows: int, width: int, bits: int, group_size: int, scale_bytes: int = 2) -> int:
    """``rows`` vectors of ``width`` values quantized in groups of ``group_size`` along the width: packed
    codes (``bits/8`` bytes per value, the last group padded to a whole group) + a float16 scale and zero per group."""
    groups = -(-width // group_size)
    return rows * groups * (group_size * bits // 8 + 2 * scale_bytes)
