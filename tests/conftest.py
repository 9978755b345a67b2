"""Shared fixtures: one embedded model per session (float32 for exactness tests, bfloat16 as run by default)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


def drive(model, method, context: torch.Tensor, question: torch.Tensor, decode_steps: int = 2, tokenizer=None):
    """Run ``method`` as the harness does: prefill ``context`` (1, T), compress, append ``question`` (1, Q),
    greedy-decode ``decode_steps`` tokens. Returns (logits per step, cache)."""
    runner = method.bind(model, tokenizer)
    logits = []
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(context, past_key_values=cache)
        runner.compress(cache)
        out = model(question, past_key_values=cache).logits
        logits.append(out)
        for _ in range(decode_steps):
            out = model(out[:, -1:].argmax(-1), past_key_values=cache).logits
            logits.append(out)
    return logits, cache


@pytest.fixture(scope="session")
def model32():
    """The embedded SmolLM2-135M in float32 (exactness tests) → (model, tokenizer)."""
    import crosskv

    return crosskv.load_model("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def model16():
    """The embedded SmolLM2-135M in bfloat16, the default runtime dtype → (model, tokenizer)."""
    import crosskv

    return crosskv.load_model("smollm2-135m", device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised 2-layer Llama (float32, GQA 4/2 heads, head_dim 16) with the embedded tokenizer
    → (model, tokenizer). Seconds to build; for harness plumbing tests where answers do not matter."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from crosskv.core import assets

    tokenizer = AutoTokenizer.from_pretrained(str(assets.require(assets.embedded_model_dir(), "embedded model")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    model.crosskv_name = "tiny-random-llama"
    return model, tokenizer
