"""The explicit cache → attention channel: a compressed prefix reaches only the crosskv attention, or raises."""
from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from crosskv.cache.attention import (ATTENTION, CompressedKV, CompressedPrefix, PrefixChannelError, compressed_kv,
                                     crosskv_attention)
from crosskv.methods import make_method


class _Module:
    num_key_value_groups = 2


class _Dense(CompressedPrefix):
    """A prefix held as plain K/V (the reference the channel must reproduce)."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    @property
    def length(self):
        return self.keys.shape[-2]

    def scores(self, q):
        return (q @ self.keys.transpose(-1, -2)).float()

    def apply(self, probs):
        return probs @ self.values


def test_channel_equals_sdpa_over_prefix_and_tail():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    query = torch.randn(1, 4, 1, 8)
    want, _ = sdpa_attention_forward(_Module(), query, keys, values, None, scaling=0.35)
    kv, same = compressed_kv(_Dense(keys[..., :6, :], values[..., :6, :]), keys[..., 6:, :], values[..., 6:, :], 3)
    assert kv is same and isinstance(kv, CompressedKV)
    got, _ = crosskv_attention(_Module(), query, kv, same, None, scaling=0.35)
    assert torch.allclose(got, want, atol=1e-5)


def test_other_attention_reading_a_compressed_prefix_raises():
    kv, _ = compressed_kv(_Dense(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)),
                          torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), layer_idx=5)
    with pytest.raises(PrefixChannelError, match="cache layer 5 .*4 tokens.*'crosskv'"):
        sdpa_attention_forward(_Module(), torch.zeros(1, 4, 1, 8), kv, kv, None)


@pytest.mark.parametrize("method", ["xkv:group_size=2,rank_k=8", "minicache:start_layer=0",
                                    "compose:base=full,bits=4,residual=0,group_size=8"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_compressed_cache_under_plain_attention_raises(tiny_model, method, implementation):
    """A compressed cache decoded under the model's own attention (the runner's applied() skipped) raises
    instead of attending to the exact tail alone; under applied() the same decode runs."""
    from crosskv.run.bench import parse_method

    model, tokenizer = tiny_model
    runner = parse_method(method).bind(model, tokenizer)
    context, question = torch.randint(100, 1000, (1, 40)), torch.randint(100, 1000, (1, 2))
    previous = model.config._attn_implementation
    with torch.no_grad():
        cache = runner.new_cache()
        with runner.applied(), runner.prefill(cache):
            model(context, past_key_values=cache)
        runner.compress(cache)
        assert model.config._attn_implementation == previous
        with runner.applied():
            assert model.config._attn_implementation == ATTENTION
            model(question, past_key_values=cache)
        model.set_attn_implementation(implementation)
        try:
            with pytest.raises(PrefixChannelError, match="compressed prefix"):
                model(question[:, :1], past_key_values=cache)
        finally:
            model.set_attn_implementation(previous)


def test_eager_style_reads_of_a_compressed_prefix_raise():
    kv, _ = compressed_kv(_Dense(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)),
                          torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), layer_idx=2)
    assert kv.shape == (1, 2, 5, 8)  # the held K shape: shape-only wrappers (kvpress's patch) pass it through
    for misuse in (lambda: kv[:, :, None], lambda: kv.transpose(2, 3), lambda: torch.matmul(torch.zeros(1), kv)):
        with pytest.raises(PrefixChannelError, match="cache layer 2"):
            misuse()
