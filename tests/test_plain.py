"""Plain cache storage (crosskv.cache.plain) and each layer's own mask (crosskv.cache.masks), on small tensors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from crosskv.cache.eviction import EvictedLayer, evict_plain
from crosskv.cache.masks import fit_mask
from crosskv.cache.plain import PlainCache, PlainLayer
from crosskv.cache.storage import kv_bytes

CONFIG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2)


def kv(batch: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V ``(batch, 2, tokens, 16)``."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, tokens, 16, generator=generator) for _ in range(2))


def test_crop_keeps_copies_of_the_first_rows():
    layer = PlainLayer()
    keys, values = kv(1, 10)
    layer.update(keys, values)
    layer.crop(6)
    assert layer.get_seq_length() == 6 and torch.equal(layer.keys, keys[..., :6, :])
    assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()  # no view
    layer.crop(-2)
    assert torch.equal(layer.values, values[..., :4, :])
    layer.crop(9)  # longer than held: nothing to cut
    assert layer.get_seq_length() == 4


def test_reset_forgets_every_token_and_the_batch_size():
    layer = PlainLayer()
    layer.update(*kv(1, 10))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys is None
    keys, values = kv(3, 4, seed=1)
    out_keys, _ = layer.update(keys, values)
    assert torch.equal(out_keys, keys)


def test_cache_reset_gives_back_fresh_plain_layers_after_eviction():
    cache = PlainCache(CONFIG)
    assert all(type(layer) is PlainLayer for layer in cache.layers)
    for idx in range(2):
        cache.update(*kv(1, 8, seed=idx), idx)
    cache.layers[0] = evict_plain(cache.layers[0], torch.tensor([1, 5]))
    assert isinstance(cache.layers[0], EvictedLayer) and kv_bytes(cache) == 2 * (2 + 8) * 2 * 16 * 4
    with pytest.raises(ValueError, match="cannot evict tokens from a EvictedLayer"):  # evicted once already
        evict_plain(cache.layers[0], torch.tensor([0]))
    cache.reset()
    assert all(type(layer) is PlainLayer for layer in cache.layers) and cache.get_seq_length() == 0


@pytest.mark.parametrize("dtype, visible", [(torch.bool, True), (torch.float32, 0.0)])
def test_a_layer_mask_sees_its_held_rows_then_the_block_causally(dtype, visible):
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    block = causal if dtype == torch.bool else torch.zeros(3, 3).masked_fill(~causal, float("-inf"))
    layer0 = torch.cat([torch.full((3, 5), visible, dtype=dtype), block], -1)[None, None]  # (1, 1, 3, 5 + 3)
    fitted = fit_mask(layer0, 2 + 3)
    assert fitted.shape == (1, 1, 3, 5) and fitted.dtype == dtype
    assert torch.equal(fitted[0, 0, :, :2], torch.full((3, 2), visible, dtype=dtype))
    assert torch.equal(fitted[0, 0, :, 2:], block)
    with pytest.raises(ValueError, match="width 2 cannot hold a block of 3"):
        fit_mask(layer0, 2)
