"""Shared fixtures: one embedded model per session (float32 for exactness tests, bfloat16 as run by default).

The fast tier (``make test-fast``: ``-m "not slow"``) loads no model, enforced here: a test not marked
``slow`` that requests an embedded-model fixture (directly or through another fixture) errors in setup
before the model loads, and one that calls ``load_model`` on the embedded model errors at the call.
"""
from __future__ import annotations

import os

import pytest
import torch

EMBEDDED_FIXTURES = ("model32", "model16")


def pytest_configure(config):
    """Under pytest-xdist (``make test``: one worker per core) each worker and the processes it starts (notebook
    kernels, ``TRITON_INTERPRET`` children, scripts) use one torch thread, so the workers do not oversubscribe
    the cores (and reductions run in one fixed order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


# parametrized tests whose cases share one expensive module fixture (every notebook executed once): under
# pytest-xdist all cases of each run on one worker, so the fixture runs once (xdist 3.8's own `xdist_group`
# marks do not group under pytest 9, which ignores the node-id suffix they add)
ONE_WORKER = ("tests/test_notebooks.py::test_smoke_run_writes_figures_and_finite_results",
              "tests/test_notebooks.py::test_shrunk_gpu_profile_runs_every_notebook")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` (xdist's default ``--dist load``): one test at a time to the next free worker, except the cases
    of a function in :data:`ONE_WORKER`, sent together to one worker (and first: units go largest first)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFunctions(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            function = nodeid.split("[", 1)[0]
            return function if function in ONE_WORKER else nodeid

    return OneWorkerFunctions(config, log)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


def unmarked_model_use(item) -> list[str]:
    """The embedded-model fixtures ``item`` requests (its whole fixture closure) without a ``slow`` marker."""
    if item.get_closest_marker("slow") is not None:
        return []
    return [name for name in EMBEDDED_FIXTURES if name in getattr(item, "fixturenames", ())]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    used = unmarked_model_use(item)
    if used:
        pytest.fail(f"{item.nodeid} requests the embedded model ({', '.join(used)}) but is not marked "
                    "@pytest.mark.slow: the fast tier loads no model (use tiny_model or mark it slow)",
                    pytrace=False)


@pytest.fixture(autouse=True)
def no_embedded_model_in_fast_tests(request, monkeypatch):
    """Outside ``slow`` tests, resolving the embedded model's name (the first step of ``load_model``) fails."""
    if request.node.get_closest_marker("slow") is not None:
        return
    from crosskv.core import models

    resolve = models.resolve

    def guarded(name: str):
        if name in models.ALIASES and models.ALIASES[name].embedded:
            pytest.fail(f"{request.node.nodeid} loads the embedded model {name!r} but is not marked "
                        "@pytest.mark.slow: the fast tier loads no model", pytrace=False)
        return resolve(name)

    monkeypatch.setattr(models, "resolve", guarded)


def drive(model, method, context: torch.Tensor, question: torch.Tensor, decode_steps: int = 2, tokenizer=None):
    """Run ``method`` as the harness does: prefill ``context`` (1, T), compress, append ``question`` (1, Q),
    greedy-decode ``decode_steps`` tokens. Returns (logits per step, cache)."""
    runner = method.bind(model, tokenizer)
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        logits = drive_cache(model, runner, cache, context, question, decode_steps)
    return logits, cache


def drive_cache(model, runner, cache, context: torch.Tensor, question: torch.Tensor,
                decode_steps: int = 2) -> list[torch.Tensor]:
    """:func:`drive`'s steps on a given ``cache`` (call inside ``runner.applied()`` and ``torch.no_grad()``):
    the logits per step."""
    with runner.prefill(cache):
        model(context, past_key_values=cache)
    runner.compress(cache)
    out = model(question, past_key_values=cache).logits
    logits = [out]
    for _ in range(decode_steps):
        out = model(out[:, -1:].argmax(-1), past_key_values=cache).logits
        logits.append(out)
    return logits


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
def tokenizer():
    """The embedded model's tokenizer alone (no weights loaded)."""
    from transformers import AutoTokenizer

    from crosskv.core import assets

    return AutoTokenizer.from_pretrained(str(assets.require(assets.embedded_model_dir(), "embedded model")))


@pytest.fixture(scope="session")
def random_tiny():
    """``load_model("random:tiny")`` in float32 on the CPU (4 layers, GQA 4/2 heads, head_dim 16; seeded random
    weights) → (model, tokenizer), built once per session."""
    import crosskv

    return crosskv.load_model("random:tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A randomly initialised 2-layer Llama (float32, GQA 4/2 heads, head_dim 16) with the embedded tokenizer
    → (model, tokenizer). Seconds to build; for harness plumbing tests where answers do not matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    model.crosskv_name = "tiny-random-llama"
    return model, tokenizer
