"""Triton decode kernels (``crosskv.cache.kernels``) against their eager references, and their dispatch.

On CPU the kernels run under Triton's interpreter, which Triton 3.9 fixes when ``triton`` is first imported
(``import transformers`` already imports it): :func:`test_kernel_comparisons_pass_under_the_interpreter` reruns
the ``match_eager`` tests of this file in a child process started with ``TRITON_INTERPRET=1``. In that
child, or on a CUDA machine, those tests run directly. Shapes are tiny: the interpreter is an emulator.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from interpreter import run_interpreted

from crosskv.cache.kernels import launch
from crosskv.cache.kernels.factored import (factored_decode_attention, factored_decode_attention_eager,
                                            factored_decode_scores, factored_decode_scores_eager)
from crosskv.cache.kernels.kivi import kivi_decode_attention, kivi_decode_attention_eager
from crosskv.cache.kernels.selective import selective_decode_attention, selective_decode_attention_eager
from crosskv.cache.quant import quantize

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
TOLERANCE = 1e-4  # max abs error against eager, float32
B, H, G = 2, 2, 2  # batch, KV heads, query heads per KV head

on_kernel_device = pytest.mark.skipif(
    DEVICE is None, reason="on CPU these run in the TRITON_INTERPRET=1 child process of "
                           "test_kernel_comparisons_pass_under_the_interpreter")


def rope_tables(positions: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``(T, d)`` (rotate-half layout) at ``positions``, as transposed views like ``FactoredPrefix.cos[0, 0].T``."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions.float()[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)                               # (T, d)
    return angles.cos().T.contiguous().T, angles.sin().T.contiguous().T        # strides (1, T)


def factored_inputs(tokens: int, d: int, rank_k: int, rank_v: int, tail: int, seed: int = 0,
                    device: str | None = DEVICE) -> dict:
    """Random factored prefix on ``device``: query, bases, factors, RoPE at kept (gapped) positions, tail."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    positions = torch.randperm(4 * tokens, generator=gen)[:tokens].sort().values
    cos, sin = rope_tables(positions, d)
    return dict(q=randn(B, H, G, d), basis_k=randn(B, tokens, rank_k), factor_k=randn(B, rank_k, H * d, scale=rank_k ** -0.5),
                basis_v=randn(B, tokens, rank_v), factor_v=randn(B, rank_v, H * d, scale=rank_v ** -0.5),
                cos=cos.to(device), sin=sin.to(device), tail_k=randn(B, H, tail, d), tail_v=randn(B, H, tail, d))


def padding_bias(tokens: int, masked: int) -> torch.Tensor:
    """``(B, tokens)`` additive bias: the second sequence's first ``masked`` tokens are padding (-inf)."""
    bias = torch.zeros(B, tokens)
    bias[1, :masked] = float("-inf")
    return bias.to(DEVICE)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def kernel_on():
    """Fails unless the dispatchers would take the kernel path for a tensor on :data:`DEVICE`."""
    assert launch.use_kernel(torch.zeros(1, device=DEVICE)), "the kernel path is off: every comparison would be eager"


@on_kernel_device
@pytest.mark.parametrize("tokens, d, rank", [(50, 16, 6), (64, 32, 8)])
def test_factored_scores_match_eager(kernel_on, tokens, d, rank):
    x = factored_inputs(tokens, d, rank, rank, tail=0)
    args = (x["q"], x["basis_k"], x["factor_k"], x["cos"], x["sin"])
    scores = factored_decode_scores(*args, block_t=16)
    assert scores.shape == (B, H, G, tokens)
    assert max_error(scores, factored_decode_scores_eager(*args)) <= TOLERANCE


@on_kernel_device
@pytest.mark.parametrize("tokens, d, rank_k, rank_v, tail, splits, masked", [
    (50, 16, 6, 8, 3, None, 0),   # a partial last tile, default splits
    (50, 16, 6, 8, 3, 2, 0),      # two splits of two tiles
    (20, 32, 8, 5, 4, 8, 0),      # more splits than tiles: empty splits merge as nothing
    (64, 32, 8, 8, 0, 3, 40),     # no tail; padding masks a whole split of the second sequence
])
def test_factored_attention_match_eager(kernel_on, tokens, d, rank_k, rank_v, tail, splits, masked):
    x = factored_inputs(tokens, d, rank_k, rank_v, tail)
    bias = padding_bias(tokens + tail, masked) if masked else None
    out = factored_decode_attention(**x, bias=bias, block_t=16, splits=splits)
    assert out.shape == (B, H, G, d)
    assert max_error(out, factored_decode_attention_eager(**x, bias=bias)) <= TOLERANCE


@on_kernel_device
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_attention_match_eager(kernel_on, bits):
    gen = torch.Generator().manual_seed(bits)
    tokens, d, tail = 48, 32, 3
    q, keys, values = (torch.randn(B, H, n, d, generator=gen).to(DEVICE) for n in (G, tokens, tokens))
    tail_k, tail_v = (torch.randn(B, H, tail, d, generator=gen).to(DEVICE) for _ in range(2))
    qkeys = quantize(keys, bits, 16, axis=-2)      # per channel, groups of 16 tokens
    qvalues = quantize(values, bits, 8, axis=-1)   # per token, groups of 8 channels
    bias = padding_bias(tokens + tail, 5)
    out = kivi_decode_attention(q, qkeys, qvalues, tail_k, tail_v, bias=bias, block_t=16, splits=2)
    reference = kivi_decode_attention_eager(q, qkeys, qvalues, tail_k, tail_v, bias=bias)
    assert max_error(out, reference) <= TOLERANCE


@on_kernel_device
def test_selective_attention_match_eager(kernel_on):
    tokens, d, chosen = 64, 16, 20
    x = factored_inputs(tokens, d, 6, 8, tail=3, seed=1)
    gen = torch.Generator().manual_seed(2)
    index = torch.stack([torch.randperm(tokens, generator=gen)[:chosen].sort().values
                         for _ in range(B * H)]).view(B, H, chosen).to(DEVICE)
    bias = padding_bias(tokens + 3, 10)
    out = selective_decode_attention(**x, index=index, bias=bias, block_t=16, splits=2)
    reference = selective_decode_attention_eager(**x, index=index, bias=bias)
    assert max_error(out, reference) <= TOLERANCE


@on_kernel_device
def test_selective_over_every_token_match_eager_factored(kernel_on):
    tokens, d = 40, 16
    x = factored_inputs(tokens, d, 6, 8, tail=2, seed=3)
    index = torch.arange(tokens, device=DEVICE).expand(B, H, tokens)
    out = selective_decode_attention(**x, index=index, block_t=16)
    assert max_error(out, factored_decode_attention_eager(**x)) <= TOLERANCE


def test_kernel_comparisons_pass_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this is the interpreter child process")
    pytest.importorskip("triton")
    summary = run_interpreted(__file__, "match_eager")
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"skipped|failed|error", summary), summary


def test_dispatchers_pick_eager_on_cpu_when_not_forced(monkeypatch):
    for name in launch.FORCE_ENV:
        monkeypatch.delenv(name, raising=False)
    x = factored_inputs(24, 16, 4, 4, tail=2, device="cpu")
    assert not launch.use_kernel(x["q"])
    assert torch.equal(factored_decode_attention(**x), factored_decode_attention_eager(**x))
    scores_args = (x["q"], x["basis_k"], x["factor_k"], x["cos"], x["sin"])
    assert torch.equal(factored_decode_scores(*scores_args), factored_decode_scores_eager(*scores_args))


def test_forcing_the_kernels_on_cpu_without_the_interpreter_raises(monkeypatch):
    if INTERPRETED:
        pytest.skip("the interpreter is on in this process")
    pytest.importorskip("triton")
    monkeypatch.setenv("CROSSKV_TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        launch.use_kernel(torch.zeros(1))


def test_mismatched_factor_is_rejected_naming_its_shape():
    x = factored_inputs(24, 16, 4, 4, tail=0, device="cpu")
    with pytest.raises(ValueError, match=r"factor has shape \(2, 3, 32\); expected"):
        factored_decode_scores(x["q"], x["basis_k"], x["factor_k"][:, :3], x["cos"], x["sin"])


@on_kernel_device
def test_xkv_decode_through_the_kernel_match_eager(monkeypatch):
    """End to end: xKV's decode steps on random:tiny (float32) score the prefix with the factored kernel (CUDA, or
    the interpreter here) and give the eager path's logits."""
    import crosskv
    from crosskv.methods import make_method, svd
    from conftest import drive

    model, _ = crosskv.load_model("random:tiny", device=DEVICE, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 44), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def logits() -> torch.Tensor:
        steps, _ = drive(model, make_method("xkv", group_size=2, kept=0.5), ids[:, :40], ids[:, 40:], decode_steps=3)
        return torch.cat([step[:, -1] for step in steps])

    kernel = logits()
    monkeypatch.setattr(svd, "use_kernel", lambda x: False)
    assert max_error(kernel, logits()) <= TOLERANCE
