"""Composition: evict (kvpress scores) → cross-layer method → quantize, in that order; positions stay absolute."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from crosskv.census import held_bytes, held_tensors
from crosskv.methods import REGISTRY, kv_bytes, make_method
from crosskv.methods.kvsharer import SharingStrategy
from crosskv.methods.compose import STAGES, EvictedLayer, parse_params
from crosskv.methods.quant import KiviLayer
from test_commonkv import ids, run, tiny_model


def test_parse_params():
    assert parse_params("rank_ratio=0.8; unmerged_ratio=0.4,weights=uniform") == {
        "rank_ratio": "0.8", "unmerged_ratio": "0.4", "weights": "uniform"}
    assert parse_params("") == {}
    with pytest.raises(ValueError, match="'rank'"):
        parse_params("rank")


def test_order_evict_then_merge_then_quantize():
    model = tiny_model("llama")
    tokens = ids(130)
    config = make_method("compose", base="commonkv", evict="snapkv", evict_ratio="0.5", window_size="16", bits="4",
                         residual="8", base_params="rank=48;unmerged_ratio=0.5;weights=uniform;recent_tokens=8")
    runner = config.bind(model)
    _, cache = run(runner, model, tokens, 120)
    assert runner.stages == list(STAGES) == ["evict", "compress", "quantize"]
    assert runner.evicted_kept == pytest.approx(0.5, abs=0.01)
    for g, layers in enumerate(runner.base.groups):
        store = cache.stores[g]
        assert len(store) > 0
        for i in layers:  # merged tokens were chosen among the tokens every layer of the group kept
            assert not torch.isin(store.pos, cache.layers[i].pos).any()
        assert store.qlat is not None and store.lat is None  # the merged entries were quantized afterwards
    assert all(layer.qlat is not None for layer in cache.layers)
    assert cache.get_seq_length() == 130
    alone = run(make_method("commonkv", rank="48", unmerged_ratio="0.5", weights="uniform",
                            recent_tokens="8").bind(model), model, tokens, 120)[1]
    assert kv_bytes(cache) < 0.35 * kv_bytes(alone)


def test_eviction_keeps_true_rope_positions():
    model = tiny_model("qwen2")
    tokens = ids(200)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens, past_key_values=ref)
    config = make_method("compose", base="commonkv", base_params="rank_ratio=1;unmerged_ratio=1", evict="pyramidkv",
                         evict_ratio="0.6", window_size="4")
    runner = config.bind(model)
    _, cache = run(runner, model, tokens, 200)
    lengths = {layer.pos.numel() for layer in cache.layers}
    assert len(lengths) > 1  # PyramidKV: per-layer budgets
    for i, layer in enumerate(cache.layers):
        keys, values = layer.rebuild()
        pos = layer.pos.long()
        assert torch.allclose(keys, ref.layers[i].keys[:, :, pos], atol=1e-4)
        assert torch.allclose(values, ref.layers[i].values[:, :, pos], atol=1e-4)


def test_full_base_evicted_then_kivi_counts_absolute_positions():
    model = tiny_model("llama")
    tokens = ids(140)
    runner = make_method("compose", base="full", evict="snapkv", evict_ratio="0.75", window_size="16", bits="2",
                         group_size="16", residual="16").bind(model)
    logits, cache = run(runner, model, tokens, 136)
    assert runner.quant_storage == "real"
    assert all(isinstance(layer, KiviLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 140
    assert cache.layers[0].get_mask_sizes(torch.arange(140, 141)) == (34 + 4 + 1, 140 - 38)
    assert torch.isfinite(logits).all()
    plain = make_method("compose", base="full", evict="snapkv", evict_ratio="0.75", window_size="16").bind(model)
    _, evicted = run(plain, model, tokens, 136)
    assert isinstance(evicted.layers[0], EvictedLayer)
    assert kv_bytes(evicted) == 30 * 0 + 6 * 2 * 2 * 16 * (34 + 4) * 4


@pytest.mark.parametrize("base", ["xkv", "minicache"])
def test_quantization_wraps_other_cross_layer_methods(base):
    if base not in REGISTRY:
        pytest.skip(f"{base} not registered")
    model = tiny_model("llama")
    tokens = ids(80)
    alone = run(make_method(base).bind(model), model, tokens, 72)[1]
    runner = make_method("compose", base=base, bits="4", residual="0").bind(model)
    logits, cache = run(runner, model, tokens, 72)
    assert runner.stages == ["compress", "quantize"]
    assert torch.isfinite(logits).all()
    assert kv_bytes(cache) < 0.5 * kv_bytes(alone)
    assert held_bytes(cache) == kv_bytes(cache)  # codes and scales only: no float copy of the method's tensors
    floats = [t for t in held_tensors(cache) if t.is_floating_point() and t.dtype != torch.float16]
    # the only floats left: K/V tails (B, H, t, d) of the 8 appended tokens plus ≤ 8 prompt tokens that do not
    # fill a whole key group of 32 in the plain layers
    assert floats and all(t.dim() == 4 and t.shape[-2] <= 16 for t in floats)


@pytest.mark.parametrize("bits, atol", [(8, 0.05), (2, None)])
def test_quantized_kvsharer_consumers_read_the_producer_codes(tmp_path, bits, atol):
    model = tiny_model("llama")
    strategy = SharingStrategy(mapping={3: 2, 5: 4}, num_layers=6).save(tmp_path / "s.json")
    tokens = ids(80)
    plain_logits_, plain = run(make_method("kvsharer", strategy=str(strategy)).bind(model), model, tokens, 72)
    runner = make_method("compose", base="kvsharer", base_params=f"strategy={strategy}", bits=str(bits),
                         group_size="16", residual="0").bind(model)
    logits, cache = run(runner, model, tokens, 72)
    producers = [layer for i, layer in enumerate(cache.layers) if i not in (3, 5)]
    assert all(isinstance(layer, KiviLayer) for layer in producers)
    assert cache.layers[3].producer is cache.layers[2] and cache.layers[5].producer is cache.layers[4]
    assert held_bytes(cache) == kv_bytes(cache) < 0.6 * kv_bytes(plain)
    if atol is not None:  # 8-bit codes: the sharing model's logits, up to quantization error
        assert torch.allclose(logits[:, 72:], plain_logits_[:, 72:], atol=atol)


@pytest.mark.parametrize("params, message", [
    ({"base": "nope"}, "base='nope'"),
    ({"base": "compose"}, "base='compose'"),
    ({"evict": "h2o"}, "evict='h2o'"),
    ({"evict_ratio": "1.5"}, "evict_ratio=1.5"),
    ({"bits": "3"}, "bits=3"),
    ({"base_params": "rank=abc"}, "rank='abc'"),
])
def test_bad_input(params, message):
    with pytest.raises(ValueError, match=message):
        make_method("compose", **params)
