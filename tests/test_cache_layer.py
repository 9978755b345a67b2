"""The one cache-layer base: seen/held bookkeeping, crop, reset, batch reorder and mask sizes for every layer kind."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from crosskv.cache.eviction import EvictedLayer
from crosskv.cache.layer import HeldLayer
from crosskv.cache.prefix import PrefixLayer
from crosskv.cache.quant import KiviLayer, QuantSpec, is_plain
from crosskv.methods.commonkv.cache import CommonKVLayer
from crosskv.methods.kvsharer import SharedLayer
from crosskv.methods.minicache import MergedLayer


def _plain(tokens: int, batch: int = 2) -> DynamicLayer:
    layer = DynamicLayer()
    layer.update(torch.randn(batch, 3, tokens, 8), torch.randn(batch, 3, tokens, 8))
    return layer


def _kinds():
    evicted = EvictedLayer(_plain(40), torch.arange(0, 40, 2))
    kivi = KiviLayer(_plain(40), QuantSpec(bits=4, group_size=8, residual=8))
    return {"evicted": evicted, "kivi": kivi}


def test_every_layer_kind_shares_the_base():
    for cls in (PrefixLayer, EvictedLayer, KiviLayer, MergedLayer):
        assert issubclass(cls, HeldLayer)
        for name in ("crop", "reset", "reorder_cache", "get_mask_sizes", "get_seq_length", "held",
                     "batch_repeat_interleave", "batch_select_indices"):
            assert getattr(cls, name) is getattr(HeldLayer, name), (cls, name)
    for cls in (CommonKVLayer, SharedLayer):  # their own rows: they say how many they hold and may cut
        for name in ("crop", "reset", "reorder_cache", "get_mask_sizes", "get_seq_length"):
            assert getattr(cls, name) is getattr(HeldLayer, name), (cls, name)


@pytest.mark.parametrize("kind", ["evicted", "kivi"])
def test_seen_held_mask_and_crop(kind):
    layer = _kinds()[kind]
    held = layer.held()
    assert layer.get_seq_length() == 40 and held == (20 if kind == "evicted" else 40)
    assert layer.get_mask_sizes(torch.arange(3)) == (held + 3, 40 - held)
    for _ in range(3):
        layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    assert layer.get_seq_length() == 43 and layer.held() == held + 3
    layer.crop(41)
    assert layer.get_seq_length() == 41 and layer.held() == held + 1
    assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4  # copied out: no view of the longer tail
    with pytest.raises(ValueError, match="cannot crop .* to 39 tokens"):
        layer.crop(39)


@pytest.mark.parametrize("kind", ["evicted", "kivi"])
def test_reorder_repeat_select_over_the_batch(kind):
    layer = _kinds()[kind]
    current = getattr(layer, "current_kv", lambda: (layer.keys, layer.values))
    keys, values = (x.clone() for x in current())
    layer.reorder_cache(torch.tensor([1, 0]))
    got_k, got_v = current()
    assert torch.equal(got_k, keys.flip(0)) and torch.equal(got_v, values.flip(0))
    layer.batch_repeat_interleave(2)
    assert current()[0].shape[0] == 4
    layer.batch_select_indices(torch.tensor([2]))
    assert torch.equal(current()[0], keys[:1])


def test_reset_forgets_everything():
    for layer in _kinds().values():
        layer.reset()
        assert layer.get_seq_length() == layer.held() == 0
        assert list(getattr(layer, "stored", lambda: iter(()))()) == []


def test_kivi_drops_its_appended_stream_back_to_the_context_byte_for_byte():
    kivi = _kinds()["kivi"]  # context of 40: 32 coded, 8 float rows
    kivi.layer_idx = 5
    compressed = [t.clone() for t in kivi.stored()]
    for _ in range(2):
        kivi.update(torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8))
        kivi.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))  # the 8 tokens read as codes are stored so
        assert kivi.appended_coded() == 8 and kivi.tail_len() == 13
        with pytest.raises(ValueError, match="KiviLayer of layer 5 to 43 tokens: its context holds 40 tokens and "
                                             "the first 48 of the 61 seen are quantized"):
            kivi.crop(43)
        kivi.crop(40)
        stored = list(kivi.stored())
        assert kivi.held() == kivi.get_seq_length() == 40 and len(stored) == len(compressed)
        assert all(torch.equal(a, b) and a.untyped_storage().nbytes() == a.numel() * a.element_size()
                   for a, b in zip(stored, compressed))


def test_kivi_after_reset_holds_plain_rows_until_quantized_again():
    kivi = _kinds()["kivi"]
    kivi.reset()
    assert is_plain(kivi)
    keys, _ = kivi.update(torch.randn(2, 3, 30, 8), torch.randn(2, 3, 30, 8))
    assert isinstance(keys, torch.Tensor) and keys.shape[-2] == 30  # no codes: attention reads plain K/V


def test_compressed_prefix_refuses_reorder_and_reset_naming_the_layer():
    layer = PrefixLayer()
    layer.update(torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8))
    layer.take_tail()
    layer.prefix_len = 6
    with pytest.raises(NotImplementedError, match="PrefixLayer cannot reorder"):
        layer.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(NotImplementedError, match="PrefixLayer cannot be reset"):
        layer.reset()
    with pytest.raises(ValueError, match="first 6 were"):
        layer.crop(5)


def test_a_consumer_reads_its_producer_and_crops_only_its_counter():
    producer = EvictedLayer(_plain(40), torch.arange(0, 40, 2))
    consumer = SharedLayer(producer, 0)
    consumer.seen = 40
    assert consumer.get_mask_sizes(torch.arange(3)) == producer.get_mask_sizes(torch.arange(3)) == (23, 20)
    new = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    producer.update(*new)
    keys, values = consumer.update(*new)
    assert keys is producer.keys and consumer.get_seq_length() == 41
    with pytest.raises(RuntimeError, match="producer layer 0 has seen 41 tokens but its consumer has seen 42"):
        consumer.update(*new)
    consumer.seen = 41
    consumer.reorder_cache(torch.tensor([1, 0]))  # the producer reorders the rows; nothing here to move
    assert producer.keys is keys
    producer.crop(40)
    consumer.crop(40)
    assert consumer.get_seq_length() == 40 and consumer.held() == producer.held() == 20
    consumer.reset()
    assert consumer.get_seq_length() == 0 and producer.get_seq_length() == 40
