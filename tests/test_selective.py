"""Selective reconstruction: latent scorer, token choice, exact rebuild, config refusals, model decode."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from conftest import drive
from cache_checks import check_batch_refused, check_reset_forgets
from crosskv.cache.attention import compressed_kv, crosskv_attention
from crosskv.cache.storage import kv_bytes
from crosskv.methods import make_method
from crosskv.methods.selective import (SelectivePrefix, head_mass, latent_scores, low_frequencies, rebuild_selected,
                                       scorer_recall, select_tokens)
from crosskv.methods.svd import FactoredPrefix
from crosskv.run.harness import bind, feed, force, run_perplexity
from crosskv.tasks import Sample


class _Module:
    num_key_value_groups = 3


def _prefix(b=2, h_kv=3, d=8, prefix=40, r=6, dtype=torch.float32):
    """A random factored prefix and its RoPE tables (``cos``, ``sin`` ``(T_c, d)``)."""
    basis_k, factor_k = torch.randn(b, prefix, r), torch.randn(b, r, h_kv * d)
    basis_v, factor_v = torch.randn(b, prefix, r + 2), torch.randn(b, r + 2, h_kv * d)
    angles = torch.arange(prefix)[:, None] * torch.rand(d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    tables = cos.T[None, None], sin.T[None, None]                                      # (1, 1, d, T_c) each
    return FactoredPrefix(*(x.to(dtype) for x in (basis_k, factor_k, basis_v, factor_v)), *tables), cos, sin


def _selective(base, top_k, sinks=2, window=3, d=8, angle=None, frequencies=None):
    """``base`` wrapped with a query at a position whose RoPE angles are ``angle`` ``(d/2,)`` (0: identity)."""
    angle = torch.zeros(d // 2) if angle is None else angle
    cos, sin = torch.cat([angle.cos()] * 2).view(1, 1, 1, d), torch.cat([angle.sin()] * 2).view(1, 1, 1, d)
    return SelectivePrefix(base, top_k, sinks, window, None, cos, sin,
                           torch.ones(d) if frequencies is None else frequencies)


def test_latent_scores_equal_query_times_pre_rope_keys():
    torch.manual_seed(0)
    prefix, _, _ = _prefix()
    b, h_kv, g, d = 2, 3, 3, 8
    q = torch.randn(b, h_kv, g, d)
    keys = (prefix.basis_k @ prefix.factor_k).view(b, -1, h_kv, d).transpose(1, 2)   # (B, H_kv, T_c, d)
    assert torch.allclose(latent_scores(q, prefix.basis_k, prefix.factor_k), q @ keys.transpose(-1, -2), atol=1e-4)
    truncated = (prefix.basis_k[..., :2] @ prefix.factor_k[:, :2]).view(b, -1, h_kv, d).transpose(1, 2)
    assert torch.allclose(latent_scores(q, prefix.basis_k, prefix.factor_k, score_rank=2),
                          q @ truncated.transpose(-1, -2), atol=1e-4)


def test_select_tokens_keeps_sinks_window_and_the_top_k_of_the_rest():
    mass = torch.zeros(1, 2, 20)
    mass[0, 0, [0, 7, 12, 19]] = torch.tensor([9.0, 5.0, 4.0, 8.0])  # 0 and 19 are sink/window anyway
    mass[0, 1, [3, 15, 16]] = torch.tensor([1.0, 3.0, 2.0])
    index = select_tokens(mass, top_k=2, sinks=2, window=3)
    assert sorted(index[0, 0].tolist()) == [0, 1, 7, 12, 17, 18, 19] and index[0, 0, :5].tolist() == [0, 1, 17, 18, 19]
    assert sorted(index[0, 1].tolist()) == [0, 1, 15, 16, 17, 18, 19]
    assert select_tokens(mass, top_k=15, sinks=2, window=3)[0, 1].tolist() == list(range(20))


def test_rebuilt_tokens_equal_the_rotated_reconstruction():
    torch.manual_seed(1)
    prefix, cos, sin = _prefix()
    b, h_kv, d = 2, 3, 8
    pre = (prefix.basis_k @ prefix.factor_k).view(b, -1, h_kv, d).transpose(1, 2)
    keys = pre * cos + rotate_half(pre) * sin  # transformers' RoPE
    values = (prefix.basis_v @ prefix.factor_v).view(b, -1, h_kv, d).transpose(1, 2)
    index = torch.randint(0, 40, (b, h_kv, 5))
    got_k, got_v = rebuild_selected(prefix, index)
    expand = index[..., None].expand(-1, -1, -1, d)
    assert torch.allclose(got_k, keys.gather(2, expand), atol=1e-4)
    assert torch.allclose(got_v, values.gather(2, expand), atol=1e-4)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_choosing_every_token_equals_factored_attention(dtype, atol):
    torch.manual_seed(2)
    base, _, _ = _prefix(dtype=dtype)
    b, h_kv, g, d, tail = 2, 3, 3, 8, 4
    query = torch.randn(b, h_kv * g, 1, d).to(dtype)
    tail_k, tail_v = torch.randn(b, h_kv, tail, d).to(dtype), torch.randn(b, h_kv, tail, d).to(dtype)
    want, _ = crosskv_attention(_Module(), query, *compressed_kv(base, tail_k, tail_v), None, scaling=0.3)
    for top_k in (35, 40, 1000):  # top_k + sinks + window ≥ T_c = 40
        prefix = _selective(base, top_k, angle=torch.rand(d // 2))
        got, _ = crosskv_attention(_Module(), query, *compressed_kv(prefix, tail_k, tail_v), None, scaling=0.3)
        assert torch.allclose(got.float(), want.float(), atol=atol), (got.float() - want.float()).abs().max()


def test_fewer_tokens_attend_exactly_over_the_chosen_ones_and_the_tail():
    torch.manual_seed(3)
    base, _, _ = _prefix()
    b, h_kv, g, d, tail = 2, 3, 3, 8, 4
    query = torch.randn(b, h_kv * g, 1, d)
    tail_k, tail_v = torch.randn(b, h_kv, tail, d), torch.randn(b, h_kv, tail, d)
    mask = torch.ones(b, 1, 1, 40 + tail, dtype=torch.bool)
    mask[1, ..., 10:20] = False  # sequence 1: prompt tokens 10…19 are padding
    prefix = _selective(base, top_k=6, angle=torch.rand(d // 2))
    q = query.view(b, h_kv, g, d)
    index = prefix.choose(q, d ** -0.5)[:, :, 0]  # one decode step; scores() ranks with the standard 1/√d temperature
    assert index.shape == (b, h_kv, 11) and (index[..., :2] == torch.tensor([0, 1])).all()
    assert (index[..., 2:5] == torch.tensor([37, 38, 39])).all()
    keys, values = rebuild_selected(base, index)
    bias = torch.zeros(b, 40 + tail).masked_fill(~mask.view(b, -1), float("-inf"))
    scores = torch.cat([q @ keys.transpose(-1, -2), q @ tail_k.transpose(-1, -2)], -1) * 0.3
    scores = scores + torch.cat([bias[:, None, :40].expand(b, h_kv, 40).gather(-1, index),
                                 bias[:, None, 40:].expand(b, h_kv, tail)], -1).unsqueeze(-2)
    want = scores.softmax(-1) @ torch.cat([values, tail_v], -2)                 # (B, H_kv, g, d)
    got, _ = crosskv_attention(_Module(), query, *compressed_kv(prefix, tail_k, tail_v), mask, scaling=0.3)
    assert torch.allclose(got.view(b, h_kv, g, d), want, atol=1e-5)
    assert torch.isinf(prefix.scores(q)).sum(-1).eq(40 - 11).all()
    # the channel's two calls (a block's path) read the same step alike: -inf off the chosen tokens, factored values
    channel = torch.cat([prefix.scores(q), q @ tail_k.transpose(-1, -2)], -1) * 0.3 + bias[:, None, None]
    probs = channel.softmax(-1)
    assert torch.allclose(prefix.apply(probs[..., :40]) + probs[..., 40:] @ tail_v, want, atol=1e-5)


def test_unrotate_undoes_rope_at_the_query_position():
    torch.manual_seed(4)
    d, angle = 8, torch.rand(4) * 3
    base, _, _ = _prefix()
    prefix = _selective(base, 4, angle=angle)
    pre = torch.randn(1, 3, 3, d)
    assert torch.allclose(prefix.unrotate(pre * prefix.cos + rotate_half(pre) * prefix.sin), pre, atol=1e-5)


def test_recall_is_one_when_rope_is_the_identity_and_lower_with_it():
    torch.manual_seed(5)
    b, h_kv, g, d, t, r = 1, 3, 3, 8, 200, 6
    basis, factor = torch.randn(b, t, r), torch.randn(b, r, h_kv * d)
    flat = FactoredPrefix(basis, factor, basis, factor, torch.ones(1, 1, d, t), torch.zeros(1, 1, d, t))
    q = torch.randn(b, h_kv, g, d)
    assert scorer_recall(_selective(flat, 16), q) == (1.0, 1.0)
    angles = torch.arange(t)[:, None] * torch.logspace(0, -3, d // 2)        # (T, d/2), fast to slow
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    turned = FactoredPrefix(basis, factor, basis, factor, cos.T[None, None], sin.T[None, None])
    recall, mass = scorer_recall(_selective(turned, 16), q)
    assert 0.0 <= recall < 1.0 and 0.0 < mass <= 1.0 + 1e-6


def test_low_frequencies_keep_the_slowest_pairs_in_both_halves():
    class _Rotary:
        class rotary_emb:
            inv_freq = torch.tensor([1.0, 0.1, 0.01, 0.001])

    assert low_frequencies(_Rotary(), 0.5).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert low_frequencies(_Rotary(), 0.01).tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("params, message", [
    ({"base": "commonkv"}, "base='commonkv' is not supported by selective reconstruction"),
    ({"base": "minicache"}, "base='minicache' is not supported"),
    ({"top_k": "0"}, "top_k=0 must be positive"),
    ({"sinks": "-1"}, "sinks=-1"),
    ({"window": "-2"}, "window=-2"),
    ({"score_rank": "0"}, "score_rank=0"),
    ({"score_frequencies": "1.5"}, "score_frequencies=1.5"),
    ({"base_params": "attention=reconstruct"}, "attention='reconstruct'"),
    ({"base_params": "rank_k=-3"}, "rank_k=-3"),
])
def test_bad_config_names_the_value(params, message):
    with pytest.raises(ValueError, match=message):
        make_method("selective", **params)


# --- the embedded model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, 20000, (1, 160), generator=generator), torch.randint(100, 20000, (1, 3), generator=generator)


@pytest.mark.slow
@pytest.mark.parametrize("base, base_params", [("xkv", "group_size=4;rank_k=64;rank_v=96"),
                                               ("svd", "rank_k=32;rank_v=48")])
def test_every_token_chosen_decodes_as_the_base_and_holds_its_bytes(model32, prompt, base, base_params):
    model, tokenizer = model32
    want, base_cache = drive(model, make_method(base, **dict(p.split("=") for p in base_params.split(";"))),
                             *prompt, decode_steps=4, tokenizer=tokenizer)
    config = make_method("selective", base=base, base_params=base_params, top_k="160", sinks="4", window="16")
    got, cache = drive(model, config, *prompt, decode_steps=4, tokenizer=tokenizer)
    assert [int(x[0, -1].argmax()) for x in got] == [int(x[0, -1].argmax()) for x in want]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    assert kv_bytes(cache) == kv_bytes(base_cache)
    assert len(cache.rope) == 0  # no RoPE table of the steps outlives them


@pytest.mark.slow
def test_census_holds_what_the_cache_reports_after_decoding(model32, prompt):
    from crosskv.cache.census import RunCensus

    model, tokenizer = model32
    runner = make_method("selective", base_params="group_size=4;rank_k=64;rank_v=96", top_k="8").bind(model, tokenizer)
    context, question = prompt
    with runner.applied(), torch.no_grad():
        census = RunCensus(runner)
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(context, past_key_values=cache)
        runner.compress(cache)
        out = model(question, past_key_values=cache).logits
        for _ in range(3):
            out = model(out[:, -1:].argmax(-1), past_key_values=cache).logits
        assert census.held(cache) == kv_bytes(cache)


@pytest.mark.slow
def test_few_tokens_chosen_changes_decode_but_not_bytes(model32, prompt):
    model, tokenizer = model32
    base_params = "group_size=4;rank_k=64;rank_v=96"
    want, base_cache = drive(model, make_method("xkv", group_size=4, rank_k=64, rank_v=96), *prompt,
                             decode_steps=2, tokenizer=tokenizer)
    got, cache = drive(model, make_method("selective", base_params=base_params, top_k="8", sinks="2", window="4"),
                       *prompt, decode_steps=2, tokenizer=tokenizer)
    for a, b in zip(got, want):  # the question block's queries and each decode step attend 14 of 160 prompt tokens
        assert not torch.allclose(a, b, atol=1e-3)
    assert kv_bytes(cache) == kv_bytes(base_cache)


@pytest.mark.slow
def test_continuation_perplexity_is_scored_one_decode_step_at_a_time(model32, prompt):
    """``ppl_cont`` through selective reconstruction: each continuation token attends only its chosen tokens,
    as a decode step does — the NLL equals a hand-driven one-token-per-forward loop, not the base's block."""
    model, tokenizer = model32
    context, continuation = prompt[0][0].tolist(), prompt[0][0, :6].tolist()
    sample = Sample(0, context, continuation)
    config = make_method("selective", base_params="group_size=4;rank_k=64;rank_v=96", top_k="8", sinks="2", window="4")
    got = run_perplexity(bind(model, tokenizer, config), sample)["nll"]
    base = run_perplexity(bind(model, tokenizer, make_method("xkv", group_size=4, rank_k=64, rank_v=96)), sample)["nll"]

    runner = config.bind(model, tokenizer)
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        with runner.prefill(cache):
            logits = [model(torch.tensor([context]), past_key_values=cache, logits_to_keep=1).logits[0, -1]]
        runner.compress(cache)
        for position, token in enumerate(continuation[:-1], start=len(context)):
            logits.append(model(torch.tensor([[token]]), past_key_values=cache,
                                position_ids=torch.tensor([[position]])).logits[0, -1])
    want = float(torch.nn.functional.cross_entropy(torch.stack(logits).float(), torch.tensor(continuation),
                                                   reduction="sum"))
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(got - base) > 1e-3  # the base's block forward attends every prompt token


def test_a_block_of_decode_steps_attends_as_one_step_at_a_time():
    """A block of n queries is n decode steps: each chooses its own prompt tokens and attends over them and
    the causal tail — the same output as n one-token forwards."""
    torch.manual_seed(5)
    base, _, _ = _prefix()
    b, h_kv, g, d, n = 2, 3, 3, 8, 4
    angles = torch.rand(n, d // 2) * 3                      # RoPE angles at each step's position
    cos, sin = torch.cat([angles.cos()] * 2, -1).view(1, 1, n, d), torch.cat([angles.sin()] * 2, -1).view(1, 1, n, d)
    query = torch.randn(b, h_kv * g, n, d)
    tail_k, tail_v = torch.randn(b, h_kv, n, d), torch.randn(b, h_kv, n, d)
    block = SelectivePrefix(base, 6, 2, 3, None, cos, sin, torch.ones(d))
    got, _ = crosskv_attention(_Module(), query, *compressed_kv(block, tail_k, tail_v), None, scaling=0.3)
    chosen = block.choose(query.view(b, h_kv, g * n, d), d ** -0.5)          # (B, H_kv, n, K)
    assert chosen.shape == (b, h_kv, n, 11) and not (chosen == chosen[:, :, :1]).all()  # the steps choose apart
    for i in range(n):
        step = SelectivePrefix(base, 6, 2, 3, None, cos[:, :, i:i + 1], sin[:, :, i:i + 1], torch.ones(d))
        want, _ = crosskv_attention(_Module(), query[:, :, i:i + 1],
                                    *compressed_kv(step, tail_k[:, :, :i + 1], tail_v[:, :, :i + 1]), None, scaling=0.3)
        assert torch.allclose(got[:, i:i + 1], want, atol=1e-5), (got[:, i:i + 1] - want).abs().max()


@pytest.mark.slow
def test_a_gold_answer_forced_in_one_block_equals_one_decode_step_per_token(model32, prompt):
    """The gold-answer path (:func:`harness.force`): question and answer in one block, read as decode steps —
    every position's logits equal feeding the answer one token per forward."""
    model, tokenizer = model32
    context, question = prompt[0][0].tolist(), prompt[1][0].tolist()
    answer = prompt[0][0, 10:16].tolist()
    config = make_method("selective", base_params="group_size=4;rank_k=64;rank_v=96", top_k="8", sinks="2", window="4")
    cpu = torch.device("cpu")

    def forced(block: bool) -> torch.Tensor:
        runner = config.bind(model, tokenizer)
        with runner.applied(), torch.no_grad():
            cache = runner.new_cache()
            with runner.prefill(cache):
                model(torch.tensor([context]), past_key_values=cache)
            runner.compress(cache)
            if block:
                return force(model, cache, question, answer, len(context), cpu)
            start = len(context) + len(question)
            return torch.cat([feed(model, cache, question, len(context), cpu, every=True),
                              *(feed(model, cache, [token], start + i, cpu, every=True)
                                for i, token in enumerate(answer))])

    got, want = forced(True), forced(False)
    assert got.shape == (len(question) + len(answer), want.shape[-1])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


# --- random:tiny (float32): the cache contract through plain model calls ---------------------------

@pytest.fixture(scope="module")
def tiny32():
    import crosskv

    return crosskv.load_model("random:tiny", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("method", [
    make_method("selective", base="xkv", base_params="group_size=2;kept=0.3", top_k="8", sinks="2", window="4"),
    make_method("selective", base="svd", base_params="kept=0.3", top_k="8", sinks="2", window="4"),
    make_method("xkv", group_size=2, kept=0.3),
    make_method("svd", kept=0.3)], ids=["selective-xkv", "selective-svd", "xkv", "svd"])
def test_a_block_after_compression_equals_one_token_forwards(tiny32, method):
    """Whoever calls the model (lm-eval, kvpress's pipeline, a user's loop): 40 tokens appended in one plain
    ``model(...)`` call after compression give the logits of 40 one-token calls."""
    model, tokenizer = tiny32
    generator = torch.Generator().manual_seed(0)
    context, block = torch.randint(100, 1000, (1, 120), generator=generator), torch.randint(100, 1000, (1, 40),
                                                                                           generator=generator)

    def logits(one_at_a_time: bool) -> torch.Tensor:
        runner = method.bind(model, tokenizer)
        with runner.applied(), torch.no_grad():
            cache = runner.new_cache()
            with runner.prefill(cache):
                model(context, past_key_values=cache)
            runner.compress(cache)
            if not one_at_a_time:
                return model(block, past_key_values=cache).logits
            return torch.cat([model(block[:, i:i + 1], past_key_values=cache).logits for i in range(40)], dim=1)

    got, want = logits(False), logits(True)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_reset_forgets_the_compressed_prompt(tiny32):
    model, tokenizer = tiny32
    check_reset_forgets(model, make_method("selective", base_params="group_size=2;kept=0.5", top_k="8", sinks="2",
                                           window="4").bind(model, tokenizer))


def test_a_batch_of_different_sequences_is_refused_by_name(tiny32):
    """Refused by selective's own name, not its base's."""
    model, tokenizer = tiny32
    check_batch_refused(model, make_method("selective", base_params="group_size=2;kept=0.5", top_k="8", sinks="2",
                                           window="4").bind(model, tokenizer), "selective")
