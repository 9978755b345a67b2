"""KIVI-style quantization: packing, round-trip error ≤ half a step, storage paths, bad input."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import accounting
from crosskv.cache.storage import kv_bytes
from crosskv.cache.census import held_bytes
from crosskv.cache.quant import KiviLayer, QTensor, QuantSpec, dense, quantize, quantize_cache, step_size


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_round_trip_error_within_half_a_step(bits, axis):
    x = torch.randn(2, 3, 70, 48) * 3 + 1
    q = quantize(x, bits, 32, axis=axis)
    assert q.codes.dtype == torch.uint8
    err = (q.dequantize() - x).abs()
    step = step_size(q)
    assert step.shape == x.shape
    assert (err <= step / 2 + 1e-5).all()
    assert err.max() > 0


def test_more_bits_less_error_and_packing_size():
    x = torch.randn(4, 256)
    errors = [(quantize(x, b, 32).dequantize() - x).abs().mean().item() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    for bits in (2, 4, 8):
        q = quantize(x, bits, 32)
        assert sum(t.numel() * t.element_size() for t in q.tensors()) == accounting.quantized_bytes(4, 256, bits, 32)


def test_constant_group_and_dtype_preserved():
    x = torch.full((3, 64), 2.5, dtype=torch.bfloat16)
    q = quantize(x, 2, 32)
    assert q.dequantize().dtype == torch.bfloat16
    assert torch.allclose(q.dequantize().float(), x.float(), atol=1e-2)


@pytest.mark.parametrize("kwargs, message", [({"bits": 3}, "bits=3"), ({"group_size": 6}, "group_size=6"),
                                             ({"residual": -1}, "residual=-1")])
def test_bad_spec(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def plain_cache(tokens: int = 200, layers: int = 2) -> DynamicCache:
    cache = DynamicCache()
    torch.manual_seed(0)
    for i in range(layers):
        cache.update(torch.randn(1, 3, tokens, 64), torch.randn(1, 3, tokens, 64), i)
    return cache


def test_plain_cache_packed_keys_per_channel_values_per_token_residual_float():
    cache = plain_cache(200)
    keys = cache.layers[0].keys.clone()
    assert quantize_cache(cache, QuantSpec(bits=2, group_size=32, residual=64)) == "real"
    layer = cache.layers[0]
    assert isinstance(layer, KiviLayer)
    assert layer.prefix_len == 128 and layer.keys.shape[-2] == 72  # 136 → 128 (whole key groups), the rest stays float
    assert layer.qkeys.axis == 3 - 1 and layer.qvalues.axis == 3  # keys grouped along tokens, values along channels
    assert torch.equal(layer.keys, keys[..., 128:, :])
    kv, _ = layer.update(torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1, 64))  # the attention channel's pair
    assert kv.prefix.length == 128 and kv.keys.shape[-2] == 73
    k_full, _ = layer.current_kv()
    assert k_full.shape[-2] == 201 and layer.get_seq_length() == 201
    assert ((k_full[..., :128, :] - keys[..., :128, :]).abs() <= step_size(layer.qkeys) / 2 + 1e-5).all()
    codes = 2 * 3 * 128 * 64 // 4  # K and V, 2 bits
    scales = 2 * 2 * (3 * 64 * 128 // 32)  # a float16 scale and zero per group of 32, K and V
    tails = (73 + 72) * 2 * 3 * 64 * 4  # layer 0 got one appended token, layer 1 none; float32 K and V
    assert kv_bytes(cache) == 2 * (codes + scales * 2) + tails
    assert held_bytes(cache) == kv_bytes(cache)  # no dequantized prefix survives the step


def test_cache_defined_quantization_holds_codes_only():
    class Layer(DynamicLayer):
        """A method-specific layer whose method tensor is read through ``dense`` (as xKV's bases are)."""

        def quantize_(self, spec):
            self.basis = quantize(self.basis, spec.bits, spec.group_size)

    class Custom(DynamicCache):
        def stored_tensors(self):
            for layer in self.layers:
                yield from (layer.basis.tensors() if isinstance(layer.basis, QTensor) else (layer.basis,))

        def quantize_(self, spec):
            for layer in self.layers:
                layer.quantize_(spec)

    cache = Custom()
    cache.layers = [Layer()]
    cache.layers[0].basis = torch.randn(1, 64, 64)
    before = cache.layers[0].basis.clone()
    assert quantize_cache(cache, QuantSpec(bits=4, group_size=32, residual=0)) == "real"
    assert (dense(cache.layers[0].basis) - before).abs().max() < (before.max() - before.min()) / 15
    assert kv_bytes(cache) == held_bytes(cache) == accounting.quantized_bytes(64, 64, 4, 32)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 16), (8, 32)])
def test_attention_on_the_codes_equals_attention_on_the_dequantized_prefix(bits, group_size):
    """QuantizedPrefix (key scales folded into the query, value scales into the weights) = sdpa on dequantized K/V."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from crosskv.cache.attention import crosskv_attention

    class _Module:
        num_key_value_groups = 3

    torch.manual_seed(0)
    layer = DynamicLayer()
    layer.update(torch.randn(2, 3, 100, 64) * 2 + 0.5, torch.randn(2, 3, 100, 64))
    kivi = KiviLayer(layer, QuantSpec(bits=bits, group_size=group_size, residual=20))
    for q_len in (1, 3):
        new_k, new_v = torch.randn(2, 3, q_len, 64), torch.randn(2, 3, q_len, 64)
        kv, _ = kivi.update(new_k, new_v)
        keys, values = kivi.current_kv()
        query = torch.randn(2, 9, q_len, 64)
        mask = torch.ones(1, 1, q_len, keys.shape[-2], dtype=torch.bool).tril(keys.shape[-2] - q_len)
        want, _ = sdpa_attention_forward(_Module(), query, keys, values, mask, scaling=0.125)
        got, _ = crosskv_attention(_Module(), query, kv, kv, mask, scaling=0.125)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_appended_tokens_are_quantized_in_groups_and_kept_end_stays_at_its_target():
    """KIVI's residual window: after 256 decoded tokens, held bytes / a plain cache of all tokens stays within
    the float window's share of the target (at most group_size − 1 extra float tokens per layer)."""
    spec = QuantSpec(bits=4, group_size=32, residual=64)
    cache = plain_cache(512)
    quantize_cache(cache, spec)
    plain = lambda tokens: 2 * 2 * 3 * tokens * 64 * 4  # two layers, K and V, float32
    kept = kv_bytes(cache) / plain(512)
    for step in range(256):
        for i in range(2):
            cache.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64), i)
        layer = cache.layers[0]
        assert spec.residual <= layer.tail_len() < spec.residual + spec.group_size
        assert layer.prefix_len % spec.group_size == 0 and layer.held() == 512 + step + 1
    kept_end = kv_bytes(cache) / plain(768)
    float_token = 2 * 2 * 3 * 64 * 4  # one float token in both layers, K and V
    assert abs(kept_end - kept) <= (spec.group_size - 1) * float_token / plain(768) + 1e-9, (kept, kept_end)
    assert kept_end < 0.3  # a float tail growing with every token would give ≈ 0.42 here
    first = cache.layers[0]
    with pytest.raises(ValueError, match="cannot crop"):
        first.crop(first.get_seq_length() - first.tail_len() - 1)
