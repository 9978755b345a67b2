"""kvsharer_xkv: KVSharer consumers + xKV groups over the producer layers."""
from __future__ import annotations

import pytest
import torch
from conftest import drive

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
