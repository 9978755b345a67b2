"""kvsharer_xkv: KVSharer consumers + xKV groups over the producer layers."""
from __future__ import annotations

import pytest
import torch
from conftest import drive
from cache_checks import check_batch_refused, check_reset_forgets

from crosskv.core.capture import kv_shape
from crosskv.cache.storage import kv_bytes
from crosskv.methods import make_method
from crosskv.methods.kvsharer import SharedLayer, SharingStrategy

MAPPING = {5: 2, 9: 3, 20: 1}


@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(100, 20000, (1, 96), generator=generator), torch.randint(100, 20000, (1, 3), generator=generator)


@pytest.fixture(scope="module")
def strategy_file(tmp_path_factory):
    return str(SharingStrategy(mapping=MAPPING, num_layers=30).save(tmp_path_factory.mktemp("s") / "s.json"))


def _close(a, b):
    for got, want in zip(a, b):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.slow
def test_no_consumers_at_full_rank_equals_full(model32, prompt):
    model, tok = model32
    reference, _ = drive(model, make_method("full"), *prompt, tokenizer=tok)
    logits, cache = drive(model, make_method("kvsharer_xkv", shared_layers=0, group_size=4, rank_k=768, rank_v=768),
                          *prompt, tokenizer=tok)
    _close(logits, reference)
    assert not any(isinstance(layer, SharedLayer) for layer in cache.layers)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["factored", "reconstruct"])
def test_full_rank_equals_kvsharer_alone(model32, prompt, strategy_file, attention):
    model, tok = model32
    reference, _ = drive(model, make_method("kvsharer", strategy=strategy_file), *prompt, tokenizer=tok)
    method = make_method("kvsharer_xkv", strategy=strategy_file, shared_layers=None, group_size=4,
                         rank_k=768, rank_v=768, attention=attention)
    logits, cache = drive(model, method, *prompt, tokenizer=tok)
    _close(logits, reference)
    assert [i for i, layer in enumerate(cache.layers) if isinstance(layer, SharedLayer)] == sorted(MAPPING)


@pytest.mark.slow
def test_groups_run_over_producers_and_consumers_hold_nothing(model32, prompt, strategy_file):
    model, tok = model32
    method = make_method("kvsharer_xkv", strategy=strategy_file, shared_layers=None, group_size=4, kept=0.25)
    runner = method.bind(model, tok)
    groups = runner.config.groups(kv_shape(model))
    assert [layer for group in groups for layer in group] == [i for i in range(30) if i not in MAPPING]
    assert all(len(g) == 4 for g in groups[:-1])
    _, cache = drive(model, method, *prompt, tokenizer=tok)
    _, xkv_cache = drive(model, make_method("xkv", group_size=4, kept=0.25), *prompt, tokenizer=tok)
    assert kv_bytes(cache) < kv_bytes(xkv_cache)
    for consumer in MAPPING:
        assert cache.layers[consumer].keys is None and cache.layers[consumer].get_seq_length() == 96 + 3 + 2


def test_refusals(strategy_file):
    with pytest.raises(ValueError, match="strict=True is not supported"):
        make_method("kvsharer_xkv", strict=True)
    with pytest.raises(ValueError, match="start_layer=2"):
        make_method("kvsharer_xkv", start_layer=2)
    with pytest.raises(ValueError, match="criterion='x'"):
        make_method("kvsharer_xkv", criterion="x")


def test_census_equals_kv_bytes_after_every_step_with_a_consumer_after_the_last_group(tmp_path):
    """Layer 3 (a consumer of layer 0) runs after the last producer group (1, 2) and reads its producer's
    factored prefix: the forward's RoPE tables are released after the last layer, so nothing beyond the
    cache's own tensors is held between steps."""
    import crosskv
    from crosskv.cache.census import RunCensus

    model, tok = crosskv.load_model("random:tiny", device="cpu", dtype=torch.float32)
    path = SharingStrategy(mapping={3: 0}, num_layers=4).save(tmp_path / "s.json")
    runner = make_method("kvsharer_xkv", strategy=str(path), shared_layers=None, group_size=2,
                         kept=0.5).bind(model, tok)
    generator = torch.Generator().manual_seed(0)
    context, question = torch.randint(100, 1000, (1, 40), generator=generator), torch.randint(100, 1000, (1, 3),
                                                                                           generator=generator)
    with runner.applied(), torch.no_grad():
        census = RunCensus(runner)
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(context, past_key_values=cache)
        runner.compress(cache)
        assert isinstance(cache.layers[3], SharedLayer) and cache.groups[-1].layers[-1] < 3
        out = model(question, past_key_values=cache).logits
        held = [(census.held(cache), kv_bytes(cache))]
        for _ in range(3):
            out = model(out[:, -1:].argmax(-1), past_key_values=cache).logits
            held.append((census.held(cache), kv_bytes(cache)))
    assert all(census_bytes == reported for census_bytes, reported in held), held
    assert held[-1][1] > held[0][1]  # decoded tokens are held exactly


@pytest.fixture(scope="module")
def tiny_hybrid(random_tiny, tmp_path_factory):
    """kvsharer_xkv on random:tiny: layer 3 consumes layer 0; producers 0, 1, 2 in groups (0, 1), (2,)."""
    model, tok = random_tiny
    path = SharingStrategy(mapping={3: 0}, num_layers=4).save(tmp_path_factory.mktemp("s") / "s.json")
    return model, make_method("kvsharer_xkv", strategy=str(path), group_size=2, kept=0.5).bind(model, tok)


def test_reset_forgets_the_producers_and_renews_the_consumers_views(tiny_hybrid):
    model, runner = tiny_hybrid
    cache, _ = check_reset_forgets(model, runner)
    assert isinstance(cache.layers[3], SharedLayer) and cache.layers[3].producer is cache.layers[0]


def test_a_batch_of_different_sequences_is_refused_by_name(tiny_hybrid):
    """Refused by the hybrid's own name, not xKV's."""
    check_batch_refused(*tiny_hybrid, "kvsharer_xkv")
