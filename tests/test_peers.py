"""kvpress presses as peers: configs, lazy import, measured eviction, and no side effect on our methods."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import crosskv
from crosskv.run import harness
from crosskv.methods import REGISTRY, make_method

PEERS = ["kvpress:snapkv", "kvpress:pyramidkv", "kvpress:knorm", "kvpress:streaming_llm", "kvpress:expected_attention"]


def test_every_peer_is_registered_with_a_compression_ratio():
    for name in PEERS:
        assert name in REGISTRY
        assert make_method(name, compression_ratio="0.25").compression_ratio == 0.25


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(ValueError, match=f"compression_ratio={ratio}"):
        make_method("kvpress:snapkv", compression_ratio=ratio)


@pytest.mark.parametrize("name, field, value", [
    ("kvpress:snapkv", "window_size", "0"), ("kvpress:snapkv", "kernel_size", "-1"),
    ("kvpress:pyramidkv", "beta", "0"), ("kvpress:streaming_llm", "n_sink", "-1"),
    ("kvpress:expected_attention", "epsilon", "nan"), ("kvpress:expected_attention", "n_future_positions", "0"),
])
def test_out_of_range_press_fields_are_refused(name, field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        make_method(name, **{field: value})


def test_importing_crosskv_does_not_import_kvpress():
    code = "import sys, crosskv.methods, crosskv.run.harness, crosskv.integrations.cli, crosskv.tasks; " \
           "crosskv.tasks.get_task('ppl'); print('kvpress' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", PEERS)
def test_peer_prunes_the_context_only(tiny_model, name):
    rec = harness.evaluate(*tiny_model, make_method(name, compression_ratio=0.5), "niah_single_1", context=256,
                           samples=1, store=False, progress=False, max_new_tokens=4)
    d = rec["details"][0]
    assert rec["kept"] == pytest.approx(0.5, abs=0.01)
    # question and decoded tokens are stored exactly on top of the pruned context
    appended = d["kv_bytes_full_end"] - d["kv_bytes_full"]
    assert d["kv_bytes_end"] - d["kv_bytes"] == appended


def test_kvpress_import_leaves_our_logits_unchanged(tmp_path):
    """`full` gives identical logits in a clean interpreter and in one where kvpress was imported first
    (a seeded random model: the fast tier loads no model)."""
    script = textwrap.dedent("""
        import sys, torch
        if sys.argv[1] == "import":
            import kvpress  # noqa: F401  (patches transformers' attention functions)
        import crosskv
        from crosskv.run.harness import run_generate
        from crosskv.methods import make_method
        from crosskv.tasks import make_task
        assert ("kvpress" in sys.modules) == (sys.argv[1] == "import")
        torch.set_num_threads(1)
        model, tok = crosskv.load_model("random:tiny", device="cpu", dtype=torch.float32)  # no weights to load
        config = make_task("niah_single_2", 192, 1)
        (sample,) = config.spec.build(config, tok)
        runner = make_method("full").bind(model, tok)
        ids = torch.tensor([sample.context_ids + sample.question_ids])
        with torch.no_grad(), runner.applied():
            logits = model(ids, past_key_values=runner.new_cache(), use_cache=True).logits
        torch.save(logits, sys.argv[2])
    """)
    outs = {}
    for mode in ("clean", "import"):
        outs[mode] = tmp_path / f"{mode}.pt"
        subprocess.run([sys.executable, "-c", script, mode, str(outs[mode])], check=True, capture_output=True)
    clean, patched = torch.load(outs["clean"]), torch.load(outs["import"])
    assert torch.equal(clean, patched)


@pytest.mark.parametrize("name, params", [("kvpress:snapkv", {}),
                                          ("compose", {"base": "full", "evict": "snapkv", "evict_ratio": 0.5})])
def test_a_press_run_through_its_own_prefill_leaves_the_model_as_it_was(tiny_model, name, params):
    """kvpress's ``press(model)`` hangs the decoder's ``rotary_emb`` on every attention module; after the
    prefill the model has exactly its own modules and buffers again (its fingerprint reads them)."""
    model, tokenizer = tiny_model
    before = [buffer for buffer, _ in model.named_buffers(remove_duplicate=False)]
    with crosskv.compressed(model, make_method(name, **params), tokenizer) as session:
        session.prefill(torch.arange(5, 133).unsqueeze(0))
    assert [buffer for buffer, _ in model.named_buffers(remove_duplicate=False)] == before
    assert not any(hasattr(layer.self_attn, "rotary_emb") for layer in model.model.layers)


def test_crosskv_attention_is_reclaimed_from_kvpress_wrapper():
    """Importing kvpress wraps every registered attention function: building a press (the first kvpress import of
    a run already inside ``installed``) and ``installed`` itself map ``crosskv`` back to crosskv_attention."""
    script = textwrap.dedent("""
        import torch
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from crosskv.cache.attention import ATTENTION, crosskv_attention, installed
        from crosskv.core.models import load_model
        from crosskv.methods import make_method

        make_method("kvpress:knorm").make_press()  # the first kvpress import
        assert ALL_ATTENTION_FUNCTIONS[ATTENTION] is crosskv_attention
        import kvpress.attention_patch
        kvpress.attention_patch.patch_attention_functions()  # what importing kvpress does
        assert ALL_ATTENTION_FUNCTIONS[ATTENTION] is not crosskv_attention
        model, _ = load_model("random:tiny", device="cpu", dtype=torch.float32)
        with installed(model):
            assert ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation] is crosskv_attention
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def _compressed(runner, context: torch.Tensor):
    """``context`` ``(B, T)`` prefilled under the press (compressed inside its hooks) → the cache."""
    cache = runner.new_cache()
    with runner.prefill(cache):
        runner.model(context, past_key_values=cache)
    runner.compress(cache)
    return cache


@torch.no_grad()
def test_pyramidkv_layers_hold_different_counts_and_a_block_scores_as_its_steps(random_tiny):
    """PyramidKV's per-layer budgets leave layers of different lengths; each layer gets its own mask, so a block
    after the context gives the logits of its one-token forwards (transformers builds one mask from layer 0)."""
    model, _ = random_tiny
    runner = make_method("kvpress:pyramidkv", window_size=8).bind(model)
    context, rest = torch.arange(100, 164).unsqueeze(0), torch.arange(300, 320).unsqueeze(0)
    with runner.applied():
        cache = _compressed(runner, context)
        assert len({layer.get_seq_length() for layer in cache.layers}) > 1
        block = model(rest, past_key_values=cache).logits[0]
        cache = _compressed(runner, context)
        steps = torch.cat([model(rest[:, i:i + 1], past_key_values=cache).logits[0] for i in range(rest.shape[1])])
    assert (block - steps).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("name, params", [("kvpress:knorm", {}), ("kvpress:pyramidkv", {"window_size": 8})])
def test_a_press_refuses_a_batch_of_different_rows_naming_it(random_tiny, name, params):
    """A press scores padding as tokens and keeps one count per row: two different rows are refused by name;
    identical rows (the bench's batches) give each row what one sequence gives."""
    model, _ = random_tiny
    runner = make_method(name, **params).bind(model)
    rows = torch.stack([torch.arange(100, 148), torch.arange(200, 248)])
    with runner.applied():
        with pytest.raises(ValueError, match=f"{name}: a batch of 2 different sequences"):
            _compressed(runner, rows)
        question = torch.arange(400, 404).unsqueeze(0)
        same = model(question.expand(2, -1), past_key_values=_compressed(runner, rows[:1].expand(2, -1))).logits
        alone = model(question, past_key_values=_compressed(runner, rows[:1])).logits
    assert torch.allclose(same[0], alone[0], atol=1e-5) and torch.equal(same[0], same[1])
