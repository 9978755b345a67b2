"""crosskv.core.rotary: RoPE against transformers' own, its exact inverse, both layouts, per-forward tables."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half

from crosskv.core import rotary


def _tables(t=7, d=8, scale=1.0):
    """cos, sin ``(1, 1, T, d)`` of random angles, each multiplied by ``scale`` (an attention factor)."""
    angles = torch.arange(t)[:, None] * torch.rand(d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return scale * cos[None, None], scale * sin[None, None]


def _rotary(**rope) -> rotary.Rotary:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         **rope)
    return rotary.Rotary(LlamaRotaryEmbedding(config))


def test_apply_equals_transformers_rope_on_both_layouts():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 7, 8)                                              # (B, H, T, d)
    cos, sin = _tables()
    want = apply_rotary_pos_emb(keys, keys, cos[0], sin[0])[0]
    assert torch.equal(rotary.apply(keys, cos, sin), want)
    assert torch.equal(rotary.rotate_half(keys), rotate_half(keys))
    transposed = rotary.apply(keys.transpose(-1, -2), cos.transpose(-1, -2), sin.transpose(-1, -2), dim=-2)
    assert torch.equal(transposed, want.transpose(-1, -2))                      # (B, H, d, T)
    assert torch.equal(rotary.rotate_half(keys.transpose(-1, -2), dim=-2), rotate_half(keys).transpose(-1, -2))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_unrotate_is_the_exact_inverse_with_a_scale_folded_in(dtype, atol):
    torch.manual_seed(1)
    keys = torch.randn(2, 3, 7, 8)
    cos, sin = _tables(scale=1.7)
    rotated = rotary.apply(keys, cos, sin)
    assert not torch.allclose(rotated, keys, atol=0.1)
    back = rotary.unrotate(rotated.to(dtype), cos, sin)
    assert back.dtype == dtype and torch.allclose(back.float(), keys, atol=atol * keys.abs().max())
    back_t = rotary.unrotate(rotated.transpose(-1, -2), cos.transpose(-1, -2), sin.transpose(-1, -2), dim=-2)
    assert torch.allclose(back_t.transpose(-1, -2), keys, atol=1e-6)


def test_rotary_uses_the_embedding_modules_own_frequencies_and_scaling():
    rope = _rotary(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    positions = torch.tensor([0, 3, 300])
    cos, sin = rope.rotary_emb(torch.empty(0), positions[None])
    got_cos, got_sin = rope.cos_sin(positions, torch.empty(0))
    assert torch.equal(got_cos[0, 0], cos[0]) and torch.equal(got_sin[0, 0], sin[0])
    assert not torch.allclose(got_cos.square() + got_sin.square(), torch.ones(1))  # yarn folds a factor in
    keys = torch.randn(1, 2, 3, 16)
    assert torch.allclose(rope.unrotate(rope.rotate(keys, positions), positions), keys, atol=1e-6)


def test_tables_are_shared_per_positions_and_device_and_released():
    rope = _rotary()
    tables = rotary.RopeTables(rope)
    cos, sin = tables.at(range(4, 9), torch.device("cpu"))
    assert cos.shape == (1, 1, 5, 16) and cos.dtype == torch.float32
    assert tables.at(range(4, 9), torch.device("cpu"))[0] is cos                # one table per forward
    want_cos, _ = rope.cos_sin(torch.arange(4, 9), torch.empty(0))
    assert torch.equal(cos, want_cos)
    held = torch.tensor([0, 2, 5], dtype=torch.int32)
    other = held.clone()
    assert tables.at(held, "cpu")[0] is not tables.at(other, "cpu")[0]           # distinct tensors, distinct keys
    assert torch.equal(tables.at(held, "cpu")[0], tables.at(other, "cpu")[0])
    assert tables.at(range(4, 9), "cpu", torch.bfloat16)[0].dtype == torch.bfloat16
    transposed, _ = tables.at(range(4, 9), "cpu", transposed=True)              # for Kᵀ (…, d, T)
    assert transposed.is_contiguous() and torch.equal(transposed, cos.transpose(-1, -2))
    assert len(tables) == 5 and len(list(tables.tensors())) == 2 * 5 + 2        # + the two position tensors
    tables.release()
    assert len(tables) == 0


class _AnyDeviceRope(torch.nn.Module):
    """A rotary embedding that runs on any device, 'meta' included (transformers' autocast guard refuses it)."""

    def forward(self, x, position_ids):
        angles = position_ids[..., None].float() * torch.ones(4, device=position_ids.device)  # (B, T, d/2)
        emb = torch.cat([angles, angles], -1).to(x.dtype)
        return emb.cos(), emb.sin()


def test_tables_live_on_the_device_asked_for():
    tables = rotary.RopeTables(rotary.Rotary(_AnyDeviceRope()))
    held = torch.tensor([1, 4], dtype=torch.int32)                              # the same positions on two devices
    cpu_cos, _ = tables.at(held, torch.device("cpu"))
    meta_cos, meta_sin = tables.at(held, torch.device("meta"))
    assert cpu_cos.device.type == "cpu" and meta_cos.device.type == "meta" and meta_sin.device.type == "meta"
    assert meta_cos.shape == cpu_cos.shape == (1, 1, 2, 8)
    assert tables.at(range(3), "meta")[0].device.type == "meta" and len(tables) == 3
