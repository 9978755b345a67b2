"""KIVI-style quantization: packing, round-trip error ≤ half a step, storage paths, bad input; a KIVI layer's
appended stream: blocks = one-token forwards, exact drops back to the context, census = stored bytes."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import accounting
from crosskv.cache.storage import kv_bytes
from crosskv.cache.census import held_bytes
from crosskv.cache.quant import KiviLayer, QTensor, QuantSpec, dense, quantize, quantize_cache, step_size
from crosskv.methods import make_method


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


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_are_packed_in_planes(bits):
    """Byte ``j`` of a group of ``n`` values holds values ``j, j + n/per, …`` from its lowest bits up (the layout the
    KIVI kernel reads); the values here are their own codes (min 0, step 1)."""
    per, levels = 8 // bits, 2 ** bits - 1
    values = (torch.arange(32) * 7 % (levels + 1)).float()
    values[0], values[1] = 0, levels                                   # scale exactly 1, zero exactly 0
    q = quantize(values[None], bits, 32)
    plane = 32 // per
    want = sum(values[s * plane:(s + 1) * plane].to(torch.int64) << (s * bits) for s in range(per))
    assert torch.equal(q.codes[0, 0].to(torch.int64), want)
    assert torch.equal(q.dequantize()[0], values)


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
    assert layer.prefix_len == 200 and layer.tail_len() == 0  # the context: codes and its fixed float rows
    assert layer.qkeys.length == 128 and layer.residual_keys.shape[-2] == 72  # 136 → 128 (whole key groups)
    assert layer.qkeys.axis == 3 - 1 and layer.qvalues.axis == 3  # keys grouped along tokens, values along channels
    assert torch.equal(layer.residual_keys, keys[..., 128:, :])
    kv, _ = layer.update(torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1, 64))  # the attention channel's pair
    assert kv.prefix.length == 200 and kv.keys.shape[-2] == 1
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


def kivi_layer_bytes(coded: int, floats: int, bits: int, group_size: int, heads: int = 3, dim: int = 64) -> int:
    """One KIVI layer (batch 1, float32): ``coded`` tokens as codes (K per channel, V per token) + ``floats`` rows."""
    keys = accounting.quantized_bytes(heads * dim, coded, bits, group_size)
    values = accounting.quantized_bytes(heads * coded, dim, bits, group_size)
    return keys + values + 2 * heads * floats * dim * 4


def test_appended_tokens_are_quantized_in_groups_and_kept_end_stays_at_its_target():
    """KIVI's residual window over the appended stream: after 256 decoded tokens the stream holds whole groups of
    codes and at most ``residual + group_size`` float rows (its last query's groups are stored at the next append)."""
    spec = QuantSpec(bits=4, group_size=32, residual=64)
    cache = plain_cache(512)
    quantize_cache(cache, spec)
    for step in range(256):
        for i in range(2):
            cache.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64), i)
        layer = cache.layers[0]
        assert min(step + 1, spec.residual) <= layer.tail_len() <= spec.residual + spec.group_size
        assert layer.appended_coded() % spec.group_size == 0 and layer.held() == 512 + step + 1
        assert layer.residual_keys.shape[-2] == 64 and layer.qkeys.length == 448  # the context never changes
    # context: 448 coded + 64 float; stream of 256: 160 coded (groups left the window by token 255) + 96 float
    assert kv_bytes(cache) == held_bytes(cache) == 2 * (kivi_layer_bytes(448 + 160, 64 + 96, 4, 32))
    kept_end = kv_bytes(cache) / (2 * 2 * 3 * 768 * 64 * 4)
    assert kept_end < 0.36  # a float tail growing with every token would give ≈ 0.42 here
    first = cache.layers[0]
    with pytest.raises(ValueError, match="cannot crop the KiviLayer of layer 0 to 671 tokens: .* the first 672"):
        first.crop(first.get_seq_length() - first.tail_len() - 1)


def compose_kivi(bits: int):
    return make_method("compose", base="full", bits=bits, group_size=8, residual=16)


def compressed_cache(runner, model, context: torch.Tensor):
    """Prefill ``context`` (1, T) and compress it (inside ``runner.applied()`` and ``torch.no_grad()``)."""
    cache = runner.new_cache()
    with runner.prefill(cache):
        model(context, past_key_values=cache)
    runner.compress(cache)
    return cache


def continue_in_blocks(model, method, context: torch.Tensor, tokens: torch.Tensor, blocks: list[list[int]]):
    """Compress ``context`` (1, T), then feed ``tokens`` (1, N): for each part of ``blocks`` (block sizes summing
    to N), the blocks in turn, the cache cropped back to the context after each part → logits per part."""
    runner = method.bind(model)
    parts = []
    with runner.applied(), torch.no_grad():
        cache = compressed_cache(runner, model, context)
        for sizes in blocks:
            at, logits = 0, []
            for n in sizes:
                logits.append(model(tokens[:, at:at + n], past_key_values=cache).logits)
                at += n
            parts.append(torch.cat(logits, 1))
            cache.crop(context.shape[1])
    return parts


def random_ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(100, 1000, (1, count), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("blocks", [[40], [1, 7, 25, 40]])
def test_a_block_gives_the_logits_of_one_token_forwards(tiny_model, bits, blocks):
    """Context 96, residual 16, groups of 8: blocks crossing the window's and groups' boundaries read each appended
    token through codes exactly where one-token forwards would."""
    model, _ = tiny_model
    context, tokens = random_ids(96, 0), random_ids(sum(blocks), 1)
    block, steps = continue_in_blocks(model, compose_kivi(bits), context, tokens, [blocks, [1] * sum(blocks)])
    assert (block - steps).abs().max() <= 1e-4


def test_answers_over_one_context_equal_fresh_contexts_and_drop_exactly(tiny_model):
    """Three 12-token questions, each with a forced 24-token answer, over one compressed context cropped back between
    them: each gives the logits of a fresh context, and every crop leaves the layers byte for byte as compressed."""
    model, _ = tiny_model
    context = random_ids(96, 0)
    asks = [random_ids(36, seed) for seed in (2, 3, 4)]
    runner = compose_kivi(2).bind(model)
    with runner.applied(), torch.no_grad():
        cache = compressed_cache(runner, model, context)
        compressed = [[t.clone() for t in layer.stored()] for layer in cache.layers]
        for ask in asks:
            shared = torch.cat([model(ask[:, :12], past_key_values=cache).logits,
                                model(ask[:, 12:], past_key_values=cache).logits], 1)
            model(ask[:, :1], past_key_values=cache)  # one more step: the answer's groups are stored as codes
            assert cache.layers[0].appended_coded() == 16
            cache.crop(96)
            for layer, before in zip(cache.layers, compressed):
                after = list(layer.stored())
                assert len(after) == len(before) and all(
                    a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after, before))
            (fresh,) = continue_in_blocks(model, compose_kivi(2), context, ask, [[12, 24]])
            assert (shared - fresh).abs().max() <= 1e-5


def test_crop_into_the_quantized_appended_stream_is_refused(tiny_model):
    model, _ = tiny_model
    runner = compose_kivi(2).bind(model)
    tokens = random_ids(41, 1)
    with runner.applied(), torch.no_grad():
        cache = compressed_cache(runner, model, random_ids(96, 0))
        model(tokens[:, :40], past_key_values=cache)
        model(tokens[:, 40:], past_key_values=cache)  # 41 appended: the 24 read as codes are stored as codes
        with pytest.raises(ValueError, match=r"KiviLayer of layer 0 to 110 tokens: its context holds 96 tokens "
                                             r"and the first 120 of the 137 seen are quantized"):
            cache.crop(110)
        cache.crop(125)  # inside the stream's float window
        assert cache.get_seq_length() == 125
        cache.crop(96)   # the context: the whole stream goes
        assert all(layer.appended_coded() == layer.tail_len() == 0 for layer in cache.layers)
        cache.reset()
        assert cache.get_seq_length() == 0 and kv_bytes(cache) == held_bytes(cache) == 0


def test_census_equals_the_stored_bytes_at_every_step(tiny_model):
    """``held_bytes`` (what is reachable) = ``kv_bytes`` (what the layers say they store) after prefill, compression,
    a question, every decode step and after dropping the appended stream."""
    model, _ = tiny_model
    runner = compose_kivi(2).bind(model)
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(random_ids(96, 0), past_key_values=cache)
        counts = [(held_bytes(cache, exclude=[model]), kv_bytes(cache))]
        runner.compress(cache)
        compressed = kv_bytes(cache)
        out = model(random_ids(20, 1), past_key_values=cache).logits
        counts.append((held_bytes(cache, exclude=[model]), kv_bytes(cache)))
        for _ in range(30):
            out = model(out[:, -1:].argmax(-1), past_key_values=cache).logits
            counts.append((held_bytes(cache, exclude=[model]), kv_bytes(cache)))
        cache.crop(96)
        counts.append((held_bytes(cache, exclude=[model]), kv_bytes(cache)))
    assert all(held == stored for held, stored in counts), counts
    assert counts[-1][1] == compressed < counts[0][1]
