"""A decode step that compiles: every method's decode under torch.compile(fullgraph=True) gives eager's tokens.

Dynamo (one graph, no break, its guards) is what the methods' code must survive; the tests compile with dynamo's
``eager`` backend, which runs the traced graph as it is (inductor's code generation is torch's own, and its cold
compile costs ~30 s per method here; the bench's static rows use it, tests/test_bench_modes.py).
"""
from __future__ import annotations

import functools

import pytest
import torch

from crosskv.run.bench import CompileRefused, compile_settings, decode_forward, decode_step, parse_method

METHODS = ["full", "xkv:group_size=2,rank_k=8", "svd:rank_k=8", "minicache:start_layer=0",
           "compose:base=full,bits=4,residual=16,group_size=16",
           "selective:base=xkv,base_params=group_size=2;rank_k=8,top_k=8,sinks=2,window=4",  # chooses 14 of 48
           "commonkv:group_size=2,rank_ratio=0.5,calibration=2,calibration_length=16", "kvsharer:rate=0.5"]


@pytest.fixture
def eager_backend(monkeypatch):
    """``torch.compile`` with dynamo's eager backend for the test's duration."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def _greedy(model, runner, forward, context, steps: int = 5) -> list[int]:
    tokens = []
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(context, past_key_values=cache)
        runner.compress(cache)
        token = model(context[:, -2:], past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(steps):  # crosses a KIVI group flush (residual 16 + group 16)
            logits = decode_step(forward, runner.config.name, input_ids=token, past_key_values=cache, use_cache=True)
            token = logits.logits[:, -1:].argmax(-1)
            tokens.append(token.item())
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_compiled_decode_gives_the_eager_tokens(tiny_model, method, eager_backend):
    model, tokenizer = tiny_model
    runner = parse_method(method).bind(model, tokenizer)
    context = torch.randint(100, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    eager = _greedy(model, runner, decode_forward(model, "eager"), context)
    torch._dynamo.reset()
    with compile_settings():
        compiled = _greedy(model, runner, decode_forward(model, "compiled"), context)
    assert compiled == eager


def test_a_decode_that_does_not_compile_is_refused_naming_the_method():
    from torch._dynamo.exc import Unsupported

    def forward(**inputs):
        raise Unsupported("graph break: data-dependent branch")

    with pytest.raises(CompileRefused, match="method 'commonkv'.*fullgraph=True.*data-dependent"):
        decode_step(forward, "commonkv", input_ids=None)
    with pytest.raises(ValueError, match="'graphs'"):
        decode_forward(None, "graphs")


@pytest.mark.slow
def test_bench_reports_eager_and_compiled_rows(tiny_model, eager_backend):
    from crosskv.run.bench import bench

    model, tokenizer = tiny_model
    table = bench(model, tokenizer, ["full", "minicache:start_layer=0"], contexts=(48,), repeats=1, warmup=1,
                  decode_tokens=2, modes=("eager", "compiled"), progress=False)
    assert sorted(zip(table["method"], table["mode"])) == sorted(
        (m, mode) for m in ("full", "minicache:start_layer=0") for mode in ("eager", "compiled"))
    assert table["refused"].isna().all() and (table["decode_tok_s"] > 0).all()
    with pytest.raises(ValueError, match="warmup=0"):
        bench(model, tokenizer, ["full"], contexts=(48,), warmup=0, modes=("compiled",), progress=False)
