"""MiniCache: SLERP and retention rules on random tensors; exactness at gamma=1; decode; bytes = accounting."""
from __future__ import annotations

import pytest
import torch

from conftest import drive
from cache_checks import check_batch_refused, check_reset_forgets
from accounting import full_bytes, minicache_bytes
from crosskv.core.capture import KVShape, kv_shape
from crosskv.cache.storage import kv_bytes
from crosskv.methods import make_method
from crosskv.methods.minicache import MiniCache, merge_pair, retained_mask, slerp_directions

SMOL = KVShape(layers=30, kv_heads=3, head_dim=64, hidden=576, heads=9)


def test_slerp_endpoints_and_unit_norm():
    a, b = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    start, omega = slerp_directions(a, b, 0.0)
    end, _ = slerp_directions(a, b, 1.0)
    mid, _ = slerp_directions(a, b, 0.5)
    assert torch.allclose(start, a / a.norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.allclose(end, b / b.norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.allclose(mid.norm(dim=-1), torch.ones(2, 3, 5), atol=1e-5)
    # the midpoint is equally far (in angle) from both endpoints
    cos_a = (mid * start).sum(-1)
    cos_b = (mid * end).sum(-1)
    assert torch.allclose(cos_a, cos_b, atol=1e-5) and torch.allclose(torch.arccos(cos_a), omega / 2, atol=1e-3)
    same, zero = slerp_directions(a, a, 0.6)  # parallel vectors: no NaN, direction unchanged
    assert torch.allclose(same, start, atol=1e-5) and torch.all(zero < 1e-3)


def test_retention_readings_and_sink():
    omega = torch.tensor([[[3.0, 0.0, 0.1, 0.5, 0.9, 1.0]]])  # token 0 (sink) is an outlier, excluded from min/max
    paper = retained_mask(omega, 0.2, "paper")
    xkv = retained_mask(omega, 0.2, "xkv")
    assert paper.tolist() == [[[True, False, False, False, True, True]]]   # Ω ≥ 1.0 − 0.2·1.0: most dissimilar
    assert xkv.tolist() == [[[True, True, True, False, False, False]]]     # Ω ≤ 0.0 + 0.2·1.0: most similar
    for rule in ("paper", "xkv"):
        assert retained_mask(omega, 1.0, rule).all()
        assert retained_mask(omega, 0.0, rule).sum() == 2  # the sink + the extreme row


def test_retention_range_is_the_pairs_not_each_heads():
    """Head 0 spans Ω ∈ [0, 1], head 1 only [0.4, 0.5]: one range [0, 1] for the pair, so head 1 (all inside
    the middle) retains nothing with γ = 0.2; a per-head range would retain its extremes."""
    omega = torch.tensor([[[9.0, 0.0, 0.5, 1.0], [9.0, 0.4, 0.45, 0.5]]])  # (B=1, H=2, T=4)
    paper = retained_mask(omega, 0.2, "paper")
    xkv = retained_mask(omega, 0.2, "xkv")
    assert paper.tolist() == [[[True, False, False, True], [True, False, False, False]]]
    assert xkv.tolist() == [[[True, True, False, False], [True, False, False, False]]]
    batched = torch.stack([omega[0], omega[0] * 2])  # each sequence of a batch has its own range
    assert (retained_mask(batched, 0.2, "paper")[1] == paper[0]).all()


def test_merge_pair_rebuild_is_exact_on_retained_rows_and_keeps_norms():
    a, b = torch.randn(1, 3, 20, 8), torch.randn(1, 3, 20, 8)
    merged = merge_pair(a, b, 0.6, 0.3, "paper")
    for which, x in enumerate((a, b)):
        rebuilt = merged.rebuild(which)
        assert torch.allclose(rebuilt.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
        keep = torch.zeros(3 * 20, dtype=torch.bool)
        keep[merged.indices.long()] = True
        keep = keep.view(1, 3, 20)
        assert torch.equal(rebuilt[keep], x[keep]) and not torch.allclose(rebuilt[~keep], x[~keep])
    full = merge_pair(a, b, 0.6, 1.0, "xkv")
    assert torch.equal(full.rebuild(0), a) and torch.equal(full.rebuild(1), b)


@pytest.mark.parametrize("params, message", [
    (dict(t=1.2), "t=1.2"), (dict(gamma=-0.1), "gamma=-0.1"),
    (dict(retention="both"), "retention='both'"), (dict(start_layer=-1), "start_layer=-1"),
])
def test_bad_config_names_the_value(params, message):
    with pytest.raises(ValueError, match=message):
        MiniCache(**params)


@pytest.mark.parametrize("params, message", [
    (dict(start_layer=30), "start_layer=30"), (dict(end_layer=31), "end_layer=31"),
    (dict(start_layer=10, end_layer=11), r"\[10, 11\) holds no pair"),
])
def test_bad_geometry_names_the_value(params, message):
    with pytest.raises(ValueError, match=message):
        MiniCache(**params).pairs(SMOL)


def test_default_pairs_start_at_the_middle():
    assert MiniCache().pairs(SMOL) == [(i, i + 1) for i in range(15, 29, 2)]  # layer 29 stays plain
    assert MiniCache(start_layer=0).pairs(SMOL)[-1] == (28, 29)


# --- integration tests on the embedded model --------------------------------------------------

@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(100, 20000, (1, 128), generator=generator), torch.randint(100, 20000, (1, 3), generator=generator)


@pytest.mark.slow
@pytest.mark.parametrize("retention", ["paper", "xkv"])
def test_gamma_one_is_exact_and_appends_exactly(model32, prompt, retention):
    model, _ = model32
    logits, cache = drive(model, MiniCache(gamma=1.0, retention=retention, start_layer=0), *prompt)
    reference, plain = drive(model, make_method("full"), *prompt)
    for got, want in zip(logits, reference):
        assert torch.allclose(got, want, atol=1e-4)
    tokens = prompt[0].shape[1]
    for layer, plain_layer in zip(cache.layers, plain.layers):
        assert layer.prefix_len == tokens
        assert torch.allclose(layer.keys, plain_layer.keys[..., tokens:, :], atol=1e-4)
        assert torch.allclose(layer.values, plain_layer.values[..., tokens:, :], atol=1e-4)


@pytest.mark.slow
def test_default_merge_saves_memory_and_bytes_match_accounting(model32, prompt):
    model, _ = model32
    method = MiniCache()
    logits, cache = drive(model, method, *prompt)
    shape, tokens, appended = kv_shape(model), prompt[0].shape[1], prompt[1].shape[1] + 2
    retained_k, retained_v = cache.retained_rows()
    pairs = len(method.pairs(shape))
    assert pairs * 3 <= retained_k < pairs * 3 * tokens  # at least the sink per head, far from everything
    assert kv_bytes(cache) == minicache_bytes(method, shape, tokens, retained_k, retained_v, appended, float_bytes=4)
    kept = kv_bytes(cache) / full_bytes(shape, tokens + appended, float_bytes=4)
    assert 0.7 < kept < 0.85, kept  # half the layers merged at ≈ (1 + 2/d)/2 of their bytes
    assert all(torch.isfinite(x).all() for x in logits)


@pytest.mark.parametrize("retention,gamma", [("paper", 0.3), ("xkv", 0.5), ("paper", 1.0)])
def test_decode_from_direction_magnitude_and_rows_equals_attention_on_the_rebuilt_pair(retention, gamma):
    """The channel's MergedPrefix (no merged K/V materialised) equals attention over the rebuilt layers."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from crosskv.cache.attention import compressed_kv, crosskv_attention
    from crosskv.methods.minicache import MergedPair, MergedLayer

    class _Module:
        num_key_value_groups = 2

    torch.manual_seed(1)
    shape = (2, 3, 17, 8)
    pair = MergedPair((0, 1))
    pair.keys = merge_pair(torch.randn(shape), torch.randn(shape), 0.6, gamma, retention)
    pair.values = merge_pair(torch.randn(shape), torch.randn(shape), 0.6, gamma, retention)
    tail_k, tail_v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    for which in (0, 1):
        layer = MergedLayer(pair, which)
        keys = torch.cat([pair.keys.rebuild(which), tail_k], -2)
        values = torch.cat([pair.values.rebuild(which), tail_v], -2)
        query = torch.randn(2, 6, 1, 8)
        want, _ = sdpa_attention_forward(_Module(), query, keys, values, None, scaling=0.4)
        kv, _ = compressed_kv(layer.compressed_prefix(), tail_k, tail_v)
        got, _ = crosskv_attention(_Module(), query, kv, kv, None, scaling=0.4)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


# --- random:tiny (float32): reset and batches ---------------------------------------------------------

def test_reset_forgets_every_pair(random_tiny):
    """After ``reset`` no pair holds a merge and the plain layers below the pairs hold nothing; a second prompt
    is merged anew and scores as on a fresh cache."""
    model, tokenizer = random_tiny
    cache, fresh = check_reset_forgets(model, make_method("minicache").bind(model, tokenizer))
    assert cache.retained_rows() == fresh.retained_rows() and cache.pairs[0].keys is not None


def test_a_batch_of_different_sequences_is_refused_by_name(random_tiny):
    model, tokenizer = random_tiny
    check_batch_refused(model, make_method("minicache").bind(model, tokenizer), "minicache")
