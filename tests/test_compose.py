"""Composition: evict (kvpress scores) → cross-layer method → quantize, in that order; positions stay absolute."""
from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from transformers import DynamicCache

from crosskv.cache.census import held_bytes, held_tensors
from crosskv.cache.storage import kv_bytes
from crosskv.methods import REGISTRY, make_method
from crosskv.methods.compose import STAGES, parse_params
from crosskv.cache.eviction import EvictedLayer
from crosskv.methods.kvsharer import SharingStrategy
from crosskv.cache.quant import KiviLayer
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

    def latent_bytes(c):  # without the RoPE tables, the same in both caches whatever they store
        return kv_bytes(c) - sum(t.numel() * t.element_size() for t in c.rope.tensors())

    assert latent_bytes(cache) < 0.35 * latent_bytes(alone)


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


# ----------------------------------------------------------------------------- unit rule (small tensors)

def test_token_sets_pool_scores_and_mean_budget_per_unit():
    from crosskv.cache.eviction import token_sets

    scores = {0: torch.tensor([5., 0, 0, 1, 9]), 1: torch.tensor([0., 5, 0, 2, 9]), 2: torch.tensor([1., 2, 3, 4, 5])}
    kept = token_sets(scores, {0: 1, 1: 4, 2: 2}, [(0, 1), (2,)])
    assert kept[0].tolist() == kept[1].tolist() == [0, 1, 4]  # pooled (2.5, 2.5, 0, 1.5, 9), budget 2.5 → 3
    assert kept[2].tolist() == [3, 4]
    with pytest.raises(ValueError, match="unscored"):
        token_sets(scores, {0: 1, 1: 1, 2: 1}, [(0, 1, 3)])



@pytest.mark.parametrize("evict", ["snapkv", "knorm"])
def test_eviction_refuses_a_batch_of_different_rows_naming_the_press(evict):
    """One token set serves the whole batch: two different rows are refused by name; identical rows (the bench's
    batches) give each row what one sequence gives."""
    model = tiny_model("llama", layers=2)
    config = make_method("compose", base="full", evict=evict, evict_ratio="0.5", window_size="4")
    runner = config.bind(model)
    two = torch.cat([ids(40, seed=1), ids(40, seed=2)])
    with pytest.raises(ValueError, match=f"evict='{evict}'.*batch of 2 different sequences"):
        run(runner, model, two, 36)
    assert_identical_rows_run_as_one(runner, model)


def assert_identical_rows_run_as_one(runner, model) -> None:
    """A batch of two identical rows (the bench's batches) gives each row what one sequence gives."""
    same = ids(40, seed=1)
    batched, _ = run(runner, model, same.expand(2, -1), 36)
    alone, _ = run(runner, model, same, 36)
    assert torch.allclose(batched[0], alone[0], atol=1e-5) and torch.equal(batched[0], batched[1])


@pytest.mark.parametrize("bits", [2, 8])
def test_quantization_refuses_a_batch_of_different_rows_naming_the_composition(bits):
    """A padded row's quantization groups would start at its padding: two different rows are refused by name
    before quantizing; identical rows give each row what one sequence gives."""
    model = tiny_model("llama", layers=2)
    runner = make_method("compose", base="full", bits=str(bits), group_size="8", residual="8").bind(model)
    two = torch.cat([ids(40, seed=1), ids(40, seed=2)])
    with pytest.raises(ValueError, match=rf"compose \(base=full, bits={bits}\).*batch of 2 different sequences"):
        run(runner, model, two, 36)
    assert_identical_rows_run_as_one(runner, model)


def test_eviction_holds_no_scores_or_positions_after_the_prefill():
    """The scorer's scores and the kept positions live only inside the prefill: the census of cache and runner
    equals the cache's own bytes right after it (and after compression)."""
    from crosskv.cache.census import RunCensus

    model = tiny_model("llama", layers=2)
    runner = make_method("compose", base="full", evict="snapkv", evict_ratio="0.5", window_size="4").bind(model)
    census = RunCensus(runner)
    with torch.no_grad(), runner.applied():
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(ids(40), past_key_values=cache)
        assert runner.stages == ["evict"] and census.held(cache) == kv_bytes(cache)
        runner.compress(cache)
        assert census.held(cache) == kv_bytes(cache) == 2 * 2 * 2 * 20 * 16 * 4

# ----------------------------------------------------------------------------- brute-force references (embedded model)

CONTEXT, QUESTION, STEPS = 384, 6, 4


def held(layer) -> int:
    """Rows a cache layer attends to (before the next token): its mask length for one query, minus one."""
    return layer.get_mask_sizes(torch.arange(1))[0] - 1


@torch.no_grad()
def composed(model, tokenizer, config, tokens):
    """As the harness runs a method: prefill the context at explicit positions, compress, feed the question
    (one forward unless layer lengths differ), then one token per step → (logits (1, Q+S, V) of those tokens, cache,
    runner, the kept absolute positions per evicted layer as given to ``evict_cache``: the runner keeps none)."""
    from crosskv.methods import compose
    from crosskv.run.harness import feed

    context = tokens.shape[1] - QUESTION - STEPS
    runner = config.bind(model, tokenizer)
    with runner.applied(), mock.patch.object(compose, "evict_cache", wraps=compose.evict_cache) as evict:
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(tokens[:, :context], past_key_values=cache, position_ids=torch.arange(context)[None])
        runner.compress(cache)
        question = tokens[0, context:context + QUESTION].tolist()
        logits = [feed(model, cache, question, context, "cpu")]
        for step in range(context + QUESTION, tokens.shape[1]):
            logits.append(feed(model, cache, [int(tokens[0, step])], step, "cpu"))
    assert evict.call_count == 1
    return torch.stack(logits), cache, runner, evict.call_args.args[1]


@torch.no_grad()
def evicted_reference(model, tokens, kept: dict[int, torch.Tensor], mapping: dict[int, int] | None = None):
    """Brute force: a plain (or KVSharer) cache, prefill, slice every evicted layer's rows to ``kept[layer]``,
    then feed every later token alone at its absolute position → logits at the same points as :func:`composed`."""
    from crosskv.methods.kvsharer import SharingCache

    context = tokens.shape[1] - QUESTION - STEPS
    cache = SharingCache(model.config, mapping) if mapping else DynamicCache(config=model.config)
    model(tokens[:, :context], past_key_values=cache)
    for i, index in kept.items():
        layer = cache.layers[i]
        layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]
    for consumer, producer in (mapping or {}).items():  # consumers count what their producer holds
        cache.layers[consumer].seen = cache.layers[producer].keys.shape[-2]
    out = []
    for step in range(context, tokens.shape[1]):
        out.append(model(tokens[:, step:step + 1], past_key_values=cache, position_ids=torch.tensor([[step]])).logits)
    logits = torch.cat(out, dim=1)[0]
    return torch.cat([logits[QUESTION - 1:QUESTION], logits[QUESTION:]])


@pytest.fixture(scope="module")
def essay(model32):
    from crosskv.core.data import heldout_windows

    return heldout_windows(model32[1], n=1, length=CONTEXT + QUESTION + STEPS)


def check_against_reference(model, tokenizer, tokens, config, units, mapping=None, atol=2e-3):
    """Composed run == brute-force eviction with the run's own token sets (within ``atol``, float32);
    one set per unit; every layer's held and absolute lengths exact."""
    got, cache, runner, kept = composed(model, tokenizer, config, tokens)
    assert runner.stages[0] == "evict" and kept
    for unit in units:
        assert all(torch.equal(kept[i], kept[unit[0]]) for i in unit), unit
    ref = evicted_reference(model, tokens, kept, mapping)
    assert torch.allclose(got, ref, atol=atol, rtol=0), (got - ref).abs().max()
    assert cache.get_seq_length() == tokens.shape[1]
    for i, layer in enumerate(cache.layers):
        source = (mapping or {}).get(i, i)
        expected = kept[source].numel() if source in kept else tokens.shape[1] - QUESTION - STEPS
        assert held(layer) == expected + QUESTION + STEPS, i
        assert layer.get_seq_length() == tokens.shape[1]
    return kept


@pytest.mark.slow
@pytest.mark.parametrize("evict", ["snapkv", "pyramidkv"])
def test_xkv_lossless_after_eviction_equals_eviction_alone(model32, essay, evict):
    model, tokenizer = model32
    config = make_method("compose", base="xkv", base_params="group_size=4;rank_k=768;rank_v=768;end_layer=30",
                         evict=evict, evict_ratio="0.5", window_size="8")
    groups = [tuple(range(s, min(s + 4, 30))) for s in range(0, 30, 4)]
    kept = check_against_reference(model, tokenizer, essay, config, groups)
    if evict == "pyramidkv":  # one budget per group: the mean of its layers' pyramid budgets
        assert len({kept[g[0]].numel() for g in groups}) > 1


@pytest.mark.slow
def test_svd_lossless_after_eviction_equals_eviction_alone(model32, essay):
    model, tokenizer = model32
    config = make_method("compose", base="svd", base_params="rank_k=192;rank_v=192;start_layer=3;end_layer=9",
                         evict="pyramidkv", evict_ratio="0.5", window_size="8")
    kept = check_against_reference(model, tokenizer, essay, config, [])
    assert len({k.numel() for k in kept.values()}) > 1  # per-layer budgets, layers alone


@pytest.mark.slow
def test_minicache_retaining_everything_after_eviction_equals_eviction_alone(model32, essay):
    model, tokenizer = model32
    config = make_method("compose", base="minicache", base_params="gamma=1;start_layer=10;end_layer=20",
                         evict="pyramidkv", evict_ratio="0.5", window_size="8")
    check_against_reference(model, tokenizer, essay, config, [(i, i + 1) for i in range(10, 20, 2)])


@pytest.mark.slow
def test_commonkv_full_rank_after_eviction_equals_eviction_alone(model32, essay):
    model, tokenizer = model32
    config = make_method("compose", base="commonkv", base_params="rank=576;unmerged_ratio=1",
                         evict="pyramidkv", evict_ratio="0.5", window_size="8")
    check_against_reference(model, tokenizer, essay, config, [tuple(range(s, s + 4)) for s in range(0, 28, 4)])


TINY_BASES = {  # lossless settings of every base on the 6-layer tiny model, and its units of layers
    "full": ("", [(i,) for i in range(6)]),
    "xkv": ("group_size=2;rank_k=64;rank_v=64", [(0, 1), (2, 3), (4, 5)]),
    "svd": ("rank_k=32;rank_v=32", [(i,) for i in range(6)]),
    "minicache": ("gamma=1", [(3, 4)]),
    "commonkv": ("rank=64;unmerged_ratio=1", [(0, 1, 2, 3), (4, 5)]),
    "kvsharer": ("", [(0,), (1,), (2,), (4,), (5,)]),
}
TINY_SHARING = {3: 1}


@pytest.mark.parametrize("evict", ["snapkv", "pyramidkv", "knorm", "streaming_llm", "expected_attention"])
@pytest.mark.parametrize("base", sorted(TINY_BASES))
def test_every_base_and_press_lossless_after_eviction_equals_eviction_alone(base, evict, tmp_path):
    from crosskv.methods.kvsharer import SharingStrategy

    model = tiny_model("llama")
    tokens = ids(140 + QUESTION + STEPS)
    params, units = TINY_BASES[base]
    mapping = None
    if base == "kvsharer":
        mapping = TINY_SHARING
        params = f"strategy={SharingStrategy(mapping=mapping, num_layers=6).save(tmp_path / 's.json')}"
    config = make_method("compose", base=base, base_params=params, evict=evict, evict_ratio="0.5", window_size="4")
    check_against_reference(model, None, tokens, config, units, mapping, atol=2e-4)  # logits ≈ 0.5: tight


# ----------------------------------------------------------------------------- refusals and the matrix

@pytest.mark.parametrize("params, message", [
    ({"base": "kvpress:snapkv"}, "base='kvpress:snapkv': a kvpress press evicts tokens.*evict='snapkv'"),
    ({"base": "xkv", "base_params": "strict=true", "evict": "snapkv", "evict_ratio": "0.5"},
     "evict=snapkv × base=xkv strict=true"),
    ({"base": "svd", "base_params": "strict=true", "evict": "knorm", "evict_ratio": "0.5", "bits": "4"},
     "evict=knorm × base=svd strict=true"),
    ({"base": "full", "evict_ratio": "0.5"}, "evict_ratio=0.5 with evict='none'"),
    ({"base": "full", "evict": "snapkv", "window_size": "0"}, "window_size=0"),
    ({"base": "kvsharer_xkv", "base_params": "shared_layers=2", "evict": "snapkv", "evict_ratio": "0.5"},
     "evict=snapkv × base=kvsharer_xkv × bits=0: its consumers view a compressed producer group"),
])
def test_unsupported_compositions_refused_at_config_time(params, message):
    with pytest.raises(ValueError, match=message):
        make_method("compose", **params)


def test_composition_matrix_lists_every_base_evict_bits_and_agrees_with_config():
    from crosskv.methods.compose import EVICTIONS, UNEVICTABLE, bases, composition_matrix
    from crosskv.cache.quant import BITS

    rows = composition_matrix()
    assert {r["base"] for r in rows} == set(bases(include_refused=True))
    assert {r["base"] for r in rows if r["supported"]} == set(bases()) >= {"full", "xkv", "svd", "minicache",
                                                                           "commonkv", "kvsharer"}
    assert {r["base"] for r in rows if not r["supported"]} == {n for n in REGISTRY if n.startswith("kvpress:")} | set(UNEVICTABLE)
    assert all(not r["supported"] for r in rows if r["base"] in UNEVICTABLE and r["evict"] != "none")
    assert len(rows) == len(bases(include_refused=True)) * len(EVICTIONS) * (1 + len(BITS))
    assert all(r["rule"] for r in rows)
    for row in rows:
        if row["base"] == "kvsharer":
            continue  # needs a strategy file or a search to build its config
        params = {"base": row["base"], "evict": row["evict"], "bits": str(row["bits"]),
                  "evict_ratio": "0.5" if row["evict"] != "none" else "0"}
        if row["supported"]:
            make_method("compose", **params)
        else:
            with pytest.raises(ValueError, match=re.escape(row["rule"])):
                make_method("compose", **params)
    xkv = next(r for r in rows if (r["base"], r["evict"], r["bits"]) == ("xkv", "pyramidkv", 2))
    assert xkv["supported"] and "one token set per group" in xkv["rule"]


def test_list_shows_the_composition_matrix(capsys):
    from crosskv.integrations.cli import main

    assert main(["list", "compositions"]) == 0
    out = capsys.readouterr().out
    assert "Compositions" in out and "pyramidkv" in out and "mean of" in out and "refused" in out
