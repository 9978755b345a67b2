"""Decode steps through the Triton kernels, wired into the ``crosskv`` attention, give the channel's logits.

Where a kernel runs (CUDA; on CPU the interpreter child of :func:`test_fused_decode_under_the_interpreter`), a
one-query step over a factored (xKV), selective or KIVI-coded prefix goes through ``prefix.decode`` — one fused
launch per layer — instead of the channel's ``scores``/``apply``. On random:tiny (float32) three decode steps after
a compressed context and a question, dynamic and in the static layout, must launch the method's kernel and give
the logits of the same steps with the kernels off (≤ 1e-4: the channel's two calls; selective's eager decode step).
"""
from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from interpreter import run_interpreted

from crosskv.cache import attention
from crosskv.cache.kernels import launch
from crosskv.cache.kernels.launch import LAUNCHES
from crosskv.cache.static import freeze
from crosskv.methods import make_method

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
CONTEXT, QUESTION, STEPS = 40, 4, 3
TOLERANCE = 1e-4
CONFIGS = {  # method → (name, params, the kernel its decode steps launch)
    "xkv": ("xkv", {"group_size": 2, "kept": 0.5}, "factored"),
    "selective": ("selective", {"base_params": "group_size=2;kept=0.5", "top_k": 8, "sinks": 2, "window": 4},
                  "factored"),
    "kivi": ("compose", {"base": "full", "bits": 4, "group_size": 8, "residual": 8}, "kivi"),
}
on_kernel_device = pytest.mark.skipif(DEVICE is None, reason="on CPU this runs in the TRITON_INTERPRET=1 child "
                                                              "process of test_fused_decode_under_the_interpreter")


def decode_logits(runner, static: bool) -> torch.Tensor:
    """Context compressed, question appended, ``STEPS`` one-token steps (dynamic or static) → logits ``(STEPS, V)``."""
    model = runner.model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (1, CONTEXT + QUESTION + STEPS), generator=generator).to(DEVICE)
    with torch.no_grad(), runner.applied(), attention.installed(model):
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(ids[:, :CONTEXT], past_key_values=cache, position_ids=torch.arange(CONTEXT, device=DEVICE)[None])
        runner.compress(cache)
        model(ids[:, CONTEXT:CONTEXT + QUESTION], past_key_values=cache,
              position_ids=torch.arange(CONTEXT, CONTEXT + QUESTION, device=DEVICE)[None])
        start = CONTEXT + QUESTION
        target = freeze(cache, STEPS, start) if static else cache
        out = []
        for i in range(STEPS):
            position = torch.tensor([start + i], device=DEVICE)
            extra = {"cache_position": position} if static else {}
            logits = model(ids[:, start + i:start + i + 1], past_key_values=target, position_ids=position[None],
                           **extra).logits
            out.append(logits[0, -1])
    return torch.stack(out)


@on_kernel_device
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_fused_kernels_match_the_channel(method, static, random_tiny, monkeypatch):
    name, params, kernel = CONFIGS[method]
    model, tokenizer = random_tiny
    model = model if DEVICE == "cpu" else copy.deepcopy(model).to(DEVICE)
    runner = make_method(name, **params).bind(model, tokenizer)
    LAUNCHES.clear()
    fused = decode_logits(runner, static)
    assert LAUNCHES[kernel] >= STEPS, f"{method}: decode steps launched {dict(LAUNCHES)}, expected {kernel!r}"
    monkeypatch.setattr(launch, "triton_available", lambda: False)  # every kernel off: the eager paths
    channel = decode_logits(runner, static)
    diff = float((fused - channel).abs().max())
    assert diff <= TOLERANCE, f"{method} ({'static' if static else 'dynamic'}): fused decode differs by {diff:.3g}"


def test_fused_decode_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this is the interpreter child process")
    pytest.importorskip("triton")
    summary = run_interpreted(__file__, "fused_kernels_match")
    assert re.search(r"\b6 passed\b", summary) and not re.search(r"skipped|failed|error", summary), summary
