"""KVSharer: strategy data and validation, the sharing cache (exactness, lengths, bytes), the search."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from conftest import drive_cache
from crosskv.cache.census import held_bytes
from crosskv.core.capture import Rotary, attention_modules
from crosskv.methods import kvsharer as kvs
from crosskv.methods import kvsharer_search as kss
from crosskv.cache.storage import kv_bytes
from crosskv.methods.base import make_method

L = 30
CONFIG_30 = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, hidden_size=576, num_attention_heads=9)


# ----------------------------------------------------------------------------- strategy data

def test_strategy_json_round_trip(tmp_path):
    s = kvs.SharingStrategy({20: 10, 25: 3, 29: 10}, L, model="m", search={"metric": "euclidean"},
                            search_seconds=1.5, candidates_tried=7,
                            trace=({"consumer": 20, "producer": 10, "cosine": 0.9, "accepted": True},))
    assert kvs.SharingStrategy.from_json(s.to_json()) == s
    assert kvs.SharingStrategy.load(s.save(tmp_path / "s.json")) == s
    assert s.producers == [i for i in range(L) if i not in (20, 25, 29)]
    assert s.layers_kept == pytest.approx(27 / 30)


@pytest.mark.parametrize("mapping, message", [
    ({10: 20}, "consumer 10 maps to layer 20, which is not an earlier layer"),
    ({5: 5}, "consumer 5 maps to layer 5, which is not an earlier layer"),
    ({20: 10, 10: 3}, "consumer 20 maps to layer 10, which is itself a consumer"),
    ({30: 1}, r"consumer 30 \(entry 30 → 1\) is out of range \[0, 30\)"),
    ({4: -1}, r"producer -1 \(entry 4 → -1\) is out of range"),
    ({"4": 1}, "consumer index '4'"),
])
def test_strategy_validation_names_the_bad_entry(mapping, message):
    with pytest.raises(ValueError, match=message):
        kvs.SharingStrategy(mapping, L)


def test_strategy_layer_count_checked_against_model():
    s = kvs.SharingStrategy({20: 10}, 32, model="llama")
    with pytest.raises(ValueError, match="made for 32 layers .*the model has 30"):
        s.check_model(CONFIG_30)
    assert kvs.SharingStrategy({20: 10}, 30).check_model(CONFIG_30).mapping == {20: 10}


@pytest.mark.parametrize("text, message", [
    ("{not json", "malformed strategy JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"num_layers": 30}', "lacks the required key 'mapping'"),
    ('{"mapping": {"3": 1}}', "lacks the required key 'num_layers'"),
    ('{"mapping": {"x": 1}, "num_layers": 30}', "entry 'x' → 1 is not a pair of layer indices"),
    ('{"mapping": {"3": 7}, "num_layers": 30}', "consumer 3 maps to layer 7"),
    ('{"mapping": {"3": 1}, "num_layers": 30, "format": "other/9"}', "format 'other/9'"),
])
def test_malformed_strategy_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        kvs.SharingStrategy.load(path)
    assert "bad.json" in str(err.value)


def test_missing_strategy_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no strategy file"):
        kvs.SharingStrategy.load(tmp_path / "absent.json")


# ----------------------------------------------------------------------------- search pieces and configs

def test_with_pair_resolves_chains_both_ways():
    assert kss.with_pair({}, 20, 10) == {20: 10}
    assert kss.with_pair({20: 10}, 25, 20) == {20: 10, 25: 10}       # producer is a consumer → its source
    assert kss.with_pair({20: 10}, 10, 5) == {20: 5, 10: 5}           # consumer was a producer → redirect
    kvs.SharingStrategy(kss.with_pair({20: 10, 25: 10}, 10, 2), L)    # result stays valid


def test_candidate_orders():
    d = torch.tensor([[0.0, 1.0, 5.0], [1.0, 0.0, 3.0], [5.0, 3.0, 0.0]])
    assert [(i, j) for i, j, _ in kss.candidate_pairs(d, "dissimilar")] == [(2, 0), (2, 1), (1, 0)]
    assert [(i, j) for i, j, _ in kss.candidate_pairs(d, "similar")] == [(1, 0), (2, 1), (2, 0)]
    big = torch.rand(10, 10)
    r0, r1 = kss.candidate_pairs(big, "random", seed=0), kss.candidate_pairs(big, "random", seed=1)
    assert r0 == kss.candidate_pairs(big, "random", seed=0) and r0 != r1
    assert sorted(r0) == sorted(kss.candidate_pairs(big, "dissimilar")) and all(i > j for i, j, _ in r0)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of shared_layers or rate"),
    ({"shared_layers": 4, "rate": 0.1}, "exactly one of shared_layers or rate"),
    ({"shared_layers": -1}, "shared_layers=-1"),
    ({"rate": 1.0}, r"rate=1.0 must lie in \[0, 1\)"),
    ({"shared_layers": 4, "metric": "manhattan"}, "metric='manhattan'"),
    ({"shared_layers": 4, "order": "sideways"}, "order='sideways'"),
    ({"shared_layers": 4, "threshold": 2.0}, "threshold=2.0"),
    ({"shared_layers": 4, "calibration_samples": 0}, "calibration_samples=0"),
])
def test_search_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kvs.SearchConfig(**kwargs)


def test_consumer_count_from_rate_and_limit():
    assert kvs.SearchConfig(rate=0.25).consumers(32) == 8
    assert kvs.SearchConfig(shared_layers=29).consumers(30) == 29
    with pytest.raises(ValueError, match="shared_layers=30 exceeds the 29 layers"):
        kvs.SearchConfig(shared_layers=30).consumers(30)


def test_method_config_from_cli_strings():
    m = make_method("kvsharer", shared_layers="8", order="random", threshold="0.7")
    assert (m.shared_layers, m.order, m.threshold) == (8, "random", 0.7)
    assert m.search_config().consumers(30) == 8
    with pytest.raises(ValueError, match="do not also give shared_layers=4"):
        make_method("kvsharer", strategy="s.json", shared_layers="4")
    with pytest.raises(ValueError, match="exactly one of shared_layers or rate"):
        make_method("kvsharer")


# ----------------------------------------------------------------------------- the sharing cache on the model

def _forced_run(model, cache, prompt: torch.Tensor, steps: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill of ``prompt`` (1, T) and of each forced decode token in ``steps`` (k,)."""
    with torch.no_grad():
        out = [model(prompt, past_key_values=cache, use_cache=True).logits]
        for token in steps.tolist():
            out.append(model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits)
    return out


def _prompt(tokenizer, length: int = 40) -> torch.Tensor:
    from crosskv.core.data import heldout_windows

    return heldout_windows(tokenizer, n=1, length=length, seed=3)


@pytest.mark.slow
def test_no_shared_layers_equals_plain_cache(model32):
    model, tok = model32
    prompt, steps = _prompt(tok), torch.tensor([11, 2000, 345])
    plain = _forced_run(model, DynamicCache(config=model.config), prompt, steps)
    shared = _forced_run(model, kvs.SharingCache(model.config, {}), prompt, steps)
    for a, b in zip(plain, shared):
        assert torch.allclose(a, b, atol=1e-5)


def _manual_attention(attn, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Attention of ``attn``'s queries from ``hidden`` (B, t, D) over ``keys``/``values`` (B, H_kv, S, d), causal."""
    batch, t, _ = hidden.shape
    d = keys.shape[-1]
    total = keys.shape[-2]
    q = attn.q_proj(hidden).view(batch, t, -1, d).transpose(1, 2)  # (B, Hq, t, d)
    q = rotary.rotate(q, torch.arange(total - t, total))
    group = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # (B, Hq, S, d)
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5
    query_pos = torch.arange(total - t, total)[:, None]
    scores = scores.masked_fill(torch.arange(total)[None, :] > query_pos, float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # (B, Hq, t, d)
    return attn.o_proj(out.transpose(1, 2).reshape(batch, t, -1))


@pytest.mark.slow
def test_hand_built_strategy_matches_manual_attention(model32):
    """Layer 20 → 10 with the sharing cache equals a plain-cache forward whose layer-20 attention is recomputed by hand over layer 10's K/V."""
    model, tok = model32
    consumer, producer = 20, 10
    prompt, steps = _prompt(tok), torch.tensor([11, 2000, 345])
    shared = _forced_run(model, kvs.SharingCache(model.config, {consumer: producer}), prompt, steps)

    plain_cache = DynamicCache(config=model.config)
    rotary = Rotary(model)

    def replace_output(module, args, kwargs, output):
        layer = plain_cache.layers[producer]  # already holds this forward's tokens
        return (_manual_attention(module, kwargs["hidden_states"], layer.keys, layer.values, rotary), None)

    handle = attention_modules(model)[consumer].register_forward_hook(replace_output, with_kwargs=True)
    try:
        reference = _forced_run(model, plain_cache, prompt, steps)
    finally:
        handle.remove()
    untouched = _forced_run(model, DynamicCache(config=model.config), prompt, steps)
    for a, b, c in zip(shared, reference, untouched):
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
        assert not torch.allclose(b, c, atol=1e-2)  # the sharing changes the output: the test can fail


@pytest.mark.slow
def test_cache_lengths_and_bytes_after_decoding(model32):
    model, tok = model32
    mapping = {5: 4, 20: 10, 25: 10, 29: 3}
    prompt = _prompt(tok, 48)
    cache = kvs.SharingCache(model.config, mapping)
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits
        for _ in range(20):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
    assert all(cache.get_seq_length(i) == 48 + 20 for i in range(L))
    for i, layer in enumerate(cache.layers):
        if i in mapping:
            assert isinstance(layer, kvs.SharedLayer) and layer.keys is None and layer.values is None
        else:
            assert layer.keys.shape[-2] == layer.values.shape[-2] == 48 + 20
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, past_key_values=full, use_cache=True)
    shared = kvs.SharingCache(model.config, mapping)
    with torch.no_grad():
        model(prompt, past_key_values=shared, use_cache=True)
    assert kv_bytes(shared) * L == kv_bytes(full) * (L - len(mapping))


@pytest.mark.slow
def test_generate_runs_with_sharing_cache(model32):
    model, tok = model32
    prompt = _prompt(tok, 24)
    cache = kvs.SharingCache(model.config, {20: 10})
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                         max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 29)
    assert cache.get_seq_length(20) == cache.get_seq_length(10) == 28


# ----------------------------------------------------------------------------- the search

@pytest.mark.slow
def test_search_returns_c_consumers_mapped_earlier(model32):
    model, tok = model32
    config = kvs.SearchConfig(shared_layers=4, calibration_samples=6, calibration_length=32)
    s = kss.search(model, tok, config, progress=False)
    assert len(s.mapping) == 4 and all(p < c for c, p in s.mapping.items())
    assert not set(s.mapping.values()) & set(s.mapping)
    assert s.candidates_tried == len(s.trace) >= 4 and s.search_seconds > 0
    assert all(t["cosine"] > 0.5 for t in s.trace if t["accepted"])
    distances = kss.layer_distances(model, __import__("crosskv.core.data", fromlist=["x"]).calibration_set(
        tok, n=6, length=32, seed=0))
    first = s.trace[0]
    assert distances[first["consumer"], first["producer"]] == pytest.approx(float(distances.tril(-1).max()), rel=1e-6)
    assert kvs.SharingStrategy.from_json(s.to_json()) == s


@pytest.mark.slow
def test_method_searches_once_and_caches(model32, tmp_path, monkeypatch):
    model, tok = model32
    monkeypatch.setenv("CROSSKV_DATA", str(tmp_path))
    method = make_method("kvsharer", shared_layers="2", calibration_samples="4", calibration_length="16")
    runner = method.bind(model, tok)
    assert len(runner.strategy.mapping) == 2
    assert len(list((tmp_path / "cache" / "kvsharer").glob("*.json"))) == 1

    def no_search(*args, **kwargs):
        raise AssertionError("searched again although the strategy is cached")

    monkeypatch.setattr(kss, "search", no_search)
    again = method.bind(model, tok)
    assert again.strategy.mapping == runner.strategy.mapping
    cache = again.new_cache()
    assert isinstance(cache, kvs.SharingCache) and cache.mapping == runner.strategy.mapping
    path = tmp_path / "fixed.json"
    runner.strategy.save(path)
    fixed = make_method("kvsharer", strategy=str(path)).bind(model, tok)
    assert fixed.strategy.mapping == runner.strategy.mapping
    json.loads(path.read_text())  # plain JSON on disk


def test_search_cache_key_follows_code_and_weights(tmp_path, monkeypatch):
    import copy

    from crosskv.core import fingerprint

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    config = kvs.SearchConfig(shared_layers=1)
    first = kss.cache_path(model, config, tmp_path)
    assert kss.cache_path(model, config, tmp_path) == first
    other = copy.deepcopy(model)
    other.__dict__.pop("_crosskv_fingerprint", None)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.mul_(2)
    assert kss.cache_path(other, config, tmp_path) != first
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: "changed-code")
    assert kss.cache_path(model, config, tmp_path) != first


@pytest.mark.slow
def test_search_cli_writes_a_valid_strategy(tmp_path):
    out = tmp_path / "strategy.json"
    from crosskv.integrations.cli import main

    assert main(["search", "--shared-layers", "1", "--calibration-samples", "2", "--calibration-length", "16",
                           "--order", "similar", "--out", str(out)]) == 0
    s = kvs.SharingStrategy.load(out)
    assert len(s.mapping) == 1 and s.search["order"] == "similar" and s.num_layers == L


def test_reset_forgets_the_first_prompt(tiny_model, tmp_path):
    """After ``reset`` a second prompt scores as on a fresh cache, and the cache holds what it reports."""
    model, _ = tiny_model
    path = kvs.SharingStrategy({1: 0}, 2).save(tmp_path / "strategy.json")
    runner = make_method("kvsharer", strategy=str(path)).bind(model)
    tokens = torch.randint(0, 500, (2, 60), generator=torch.Generator().manual_seed(0))
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        drive_cache(model, runner, cache, tokens[:1, :48], tokens[:1, 48:54])
        cache.reset()
        assert cache.get_seq_length() == 0 and held_bytes(cache) == kv_bytes(cache) == 0
        again = drive_cache(model, runner, cache, tokens[1:, :30], tokens[1:, 30:36])
        assert held_bytes(cache) == kv_bytes(cache) > 0
        fresh = drive_cache(model, runner, runner.new_cache(), tokens[1:, :30], tokens[1:, 30:36])
    assert cache.get_seq_length() == 30 + 6 + 2  # context, question, two decoded tokens
    for a, b in zip(again, fresh):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_consumers_skip_their_projections_and_logits_are_unchanged(arch):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch](**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    mapping = {2: 0, 3: 1}
    strategy = kvs.SharingStrategy(mapping=mapping, num_layers=4)
    runner = kvs.KVSharerRunner(kvs.KVSharer(shared_layers=2), model, None, strategy)
    prompt, steps = torch.randint(0, 64, (1, 12)), [5, 9, 17]

    def forward(cache):
        with torch.no_grad():
            out = [model(prompt, past_key_values=cache).logits]
            for token in steps:
                out.append(model(torch.tensor([[token]]), past_key_values=cache).logits)
        return out

    reference = forward(kvs.SharingCache(model.config, mapping))  # consumers compute and discard K/V
    attns = attention_modules(model)
    calls = {i: 0 for i in range(4)}
    originals = [(attns[i].k_proj, attns[i].v_proj) for i in range(4)]
    handles = [proj.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in range(4) for proj in originals[i]]
    try:
        with runner.applied():
            assert all(isinstance(getattr(attns[i], n), kvs.SkippedProjection) for i in mapping for n in ("k_proj",
                                                                                                        "v_proj"))
            skipped = forward(runner.new_cache())
    finally:
        for handle in handles:
            handle.remove()
    assert calls[2] == calls[3] == 0 and calls[0] == calls[1] == 2 * (1 + len(steps))
    assert [(attns[i].k_proj, attns[i].v_proj) for i in range(4)] == originals  # restored on exit
    for a, b in zip(skipped, reference):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_sweep_prefix_equals_its_own_search(model32, tmp_path, monkeypatch):
    model, tok = model32
    monkeypatch.setenv("CROSSKV_DATA", str(tmp_path))
    options = dict(calibration_samples=4, calibration_length=16, order="random")
    direct = kss.search(model, tok, kvs.SearchConfig(shared_layers=2, **options))
    swept = kss.search_sweep(model, tok, make_method("kvsharer", shared_layers=4, **options), [2, 4])
    assert swept[2].mapping == direct.mapping and swept[2].candidates_tried == direct.candidates_tried
    assert len(swept[4].mapping) == 4
    bound = make_method("kvsharer", shared_layers=2, **options).bind(model, tok)  # resolves from the cache
    assert bound.strategy.mapping == direct.mapping
    with pytest.raises(ValueError, match="count=5"):
        kss.first_consumers(swept[4], 5)


def test_next_token_kl_is_zero_for_identical_and_positive_otherwise(tiny_model):
    model, _ = tiny_model
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, model.config.hidden_size)
    assert kss.next_token_kl(model, hidden, hidden, chunk=3) == pytest.approx(0.0, abs=1e-6)
    assert kss.next_token_kl(model, hidden + torch.randn_like(hidden), hidden, chunk=3) > 0.01


@pytest.mark.slow
def test_kl_criterion_is_stricter_and_its_prefixes_replay(model32):
    model, tok = model32
    base = dict(shared_layers=3, calibration_samples=4, calibration_length=16)
    loose = kss.search(model, tok, kvs.SearchConfig(**base), progress=False)
    strict = kss.search(model, tok, kvs.SearchConfig(**base, criterion="kl", max_kl=0.05, max_candidates=12),
                        progress=False)  # capped: a strict test would otherwise try all L(L-1)/2 pairs
    assert strict.candidates_tried <= 12
    assert all(t["kl"] <= 0.05 for t in strict.trace if t["accepted"])
    assert all(t["kl"] > 0.05 for t in strict.trace if not t["accepted"])
    # the cosine test accepts the first candidates it sees; the KL test rejects at least one of them here
    assert not all(t["accepted"] for t in strict.trace)
    assert strict.trace[0]["consumer"] == loose.trace[0]["consumer"]
    shorter = kss.search(model, tok, kvs.SearchConfig(**dict(base, shared_layers=2)), progress=False)
    assert kss.first_consumers(loose, 2).mapping == shorter.mapping
    assert kss.first_consumers(loose, 0).mapping == {}
    capped = kss.search(model, tok, kvs.SearchConfig(**base, criterion="kl", max_kl=1e-6, max_candidates=2))
    assert capped.candidates_tried == 2 and capped.mapping == {}
    with pytest.raises(ValueError, match="count=4"):
        kss.first_consumers(loose, 4)


def test_kl_criterion_options_are_validated():
    with pytest.raises(ValueError, match="criterion='l2'"):
        kvs.SearchConfig(shared_layers=1, criterion="l2")
    with pytest.raises(ValueError, match="max_kl=0"):
        kvs.SearchConfig(shared_layers=1, max_kl=0)
    with pytest.raises(ValueError, match="max_candidates=0"):
        kvs.SearchConfig(shared_layers=1, max_candidates=0)
    assert make_method("kvsharer", shared_layers="2", criterion="kl", max_kl="0.2").search_config().max_kl == 0.2
