"""The cache contract, proven for every registered method and every accepted composition (random:tiny, float32).

Every configuration — each method in :data:`crosskv.methods.REGISTRY` with the small parameters of
:data:`TINY_PARAMS`, and each accepted ``(base, evict)`` pair of :func:`crosskv.methods.compose.composition_matrix`,
unquantized and at one bit width rotated so every base and every eviction meets every width (:func:`_compositions`)
— is checked on a compressed context for each property below; hypothesis draws context lengths, block lengths (crossing KIVI's
float window of ``residual=16`` tokens and its groups of 8) and conversations (derandomized: CI sees the same
examples every run; no shrinking, so a failure costs one example).

(a) a block of n tokens gives the logits of n one-token forwards (max abs ≤ 1e-4);
(b) a question and its answer appended after the context are dropped exactly (every layer cropped back to its
    length after compression, as ``Compressed.reset`` does: ``cache.crop(T)`` on a crosskv cache): re-asking gives
    the first logits again (≤ 1e-5), any number of times, and three questions with 24-token greedy answers,
    dropped between, give the answers of fresh contexts;
(c) ``cache.reset()`` then a new prompt scores as on a fresh cache (≤ 1e-5), or reset raises naming the method;
(d) batch rows are independent: two contexts of different lengths (left padding, ``attention_mask``) give each row
    what it gives alone (≤ 1e-4), or the batch is refused with an error naming the method;
(e) every tensor the cache keeps is on the model's device, and no stored tensor is a view pinning a larger storage;
(f) held bytes (the census, :class:`crosskv.cache.census.RunCensus`) equal ``kv_bytes`` exactly after the prefill,
    after compression, after every decode step and after a drop.

A new registered method without an entry in :data:`TINY_PARAMS` fails
:func:`test_every_registered_method_has_tiny_params` (and is still checked with its defaults).
The bfloat16 check on the embedded model (``slow``) compares greedy tokens, block against steps.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from crosskv.cache.census import RunCensus, held_tensors
from crosskv.cache.storage import kv_bytes, stored_tensors
from crosskv.core import capture
from crosskv.methods import REGISTRY, make_method
from crosskv.methods.compose import composition_matrix
from crosskv.run.harness import feed
from crosskv.run.session import layer_lengths, rewind

pytestmark = pytest.mark.contract

STRATEGY = "{strategy}"  # the KVSharer strategy file (consumer 3 reads producer 0), written by a fixture
GROUP, RESIDUAL = 8, 16  # KIVI groups and float window of every quantized configuration
TINY_PARAMS: dict[str, dict] = {  # parameters on random:tiny (4 layers, 2 KV heads of 16 channels)
    "full": {},
    "xkv": {"group_size": 2, "kept": 0.5},
    "svd": {"kept": 0.5},
    "selective": {"base_params": "group_size=2;kept=0.5", "top_k": 8, "sinks": 2, "window": 4},
    "minicache": {},
    "commonkv": {"weights": "uniform", "group_size": 2, "sink_tokens": 2, "recent_tokens": 4},
    "kvsharer": {"strategy": STRATEGY},
    "kvsharer_xkv": {"strategy": STRATEGY, "group_size": 2, "kept": 0.5},
    "kvpress:snapkv": {"window_size": 8},
    "kvpress:pyramidkv": {"window_size": 8},
    "kvpress:knorm": {},
    "kvpress:streaming_llm": {"n_sink": 2},
    "kvpress:expected_attention": {"n_sink": 2, "n_future_positions": 64},
    # every accepted composition-matrix row runs with these beside its base, evict and bits
    "compose": {"window_size": 8, "group_size": GROUP, "residual": RESIDUAL},
}
EVICT_RATIO = 0.5
BLOCK_TOL, DROP_TOL = 1e-4, 1e-5
ANSWER = 24  # tokens of each greedy answer in (b)
SEEDS = st.integers(0, 2 ** 16)  # token ids are seeded random draws
CONTEXTS = st.integers(RESIDUAL + GROUP, RESIDUAL + 4 * GROUP)  # from one coded group + the float window
CROSSING = RESIDUAL + GROUP + 1  # appended tokens that cross the float window and a group boundary
EXAMPLES = {"method": 2, "composition": 1}  # hypothesis examples per property: each method alone, each composition row


def _joined(params: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in params.items())


def _base_params(base: str) -> dict:
    """A method's :data:`TINY_PARAMS` as a composition's ``base_params``: without a nested ``base_params``
    (compose splits its ``base_params`` on ``;``), so selective under compose keeps its default xKV base."""
    return {k: v for k, v in TINY_PARAMS.get(base, {}).items() if k != "base_params"}


def _compositions() -> list[dict]:
    """The accepted rows of the composition matrix checked here: every accepted ``(base, evict)`` pair
    unquantized and at one bit width, the width rotated over the pairs so every base and every eviction meets
    every width (the widths share one storage path; their packing is unit-tested in test_quant). A base accepted
    under fewer evictions than there are widths keeps every width."""
    accepted = [row for row in composition_matrix() if row["supported"]]
    pairs = list(dict.fromkeys((row["base"], row["evict"]) for row in accepted))
    bases = list(dict.fromkeys(base for base, _ in pairs))
    widths = sorted({row["bits"] for row in accepted} - {0})

    def checked(row) -> bool:
        evictions = [evict for base, evict in pairs if base == row["base"]]
        if row["bits"] == 0 or len(evictions) < len(widths):
            return True
        turn = bases.index(row["base"]) + evictions.index(row["evict"])
        return row["bits"] == widths[turn % len(widths)]

    return [row for row in accepted if checked(row)]


def _configurations() -> list[tuple[str, str, dict]]:
    """``(id, method name, params)`` for every registered method (compose as its matrix rows) and every
    composition of :func:`_compositions`."""
    specs = [(name, name, TINY_PARAMS.get(name, {})) for name in sorted(REGISTRY) if name != "compose"]
    for row in _compositions():
        params = {**TINY_PARAMS["compose"], "base": row["base"], "evict": row["evict"], "bits": row["bits"],
                  "base_params": _joined(_base_params(row["base"])),
                  "evict_ratio": EVICT_RATIO if row["evict"] != "none" else 0.0}
        specs.append((f"compose[{row['base']},{row['evict']},{row['bits']}]", "compose", params))
    return specs


CONFIGURATIONS = _configurations()
EACH = pytest.mark.parametrize("configuration", [pytest.param(spec, id=spec[0]) for spec in CONFIGURATIONS])
SETTINGS = settings(deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow], print_blob=False)


def prove(check, configuration, runners, **strategies) -> None:
    """Run ``check(configuration, runner, **drawn)`` on hypothesis draws from ``strategies``: ``EXAMPLES["method"]``
    examples for a method alone, ``EXAMPLES["composition"]`` for a composition row."""
    runner = runners(configuration)
    kind = "composition" if configuration[1] == "compose" else "method"

    @settings(SETTINGS, max_examples=EXAMPLES[kind])
    @given(**strategies)
    def drawn(**values):
        with torch.no_grad(), runner.applied():
            check(configuration, runner, **values)

    drawn()


# --- fixtures and drivers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strategy(tmp_path_factory, random_tiny):
    from crosskv.methods.kvsharer import SharingStrategy

    layers = random_tiny[0].config.num_hidden_layers
    path = tmp_path_factory.mktemp("contract") / "strategy.json"
    SharingStrategy(mapping={layers - 1: 0}, num_layers=layers).save(path)
    return str(path)


@pytest.fixture(scope="module")
def runners(random_tiny, strategy):
    """``runner(configuration)`` → that configuration bound to random:tiny, once per module."""
    model, tokenizer = random_tiny
    bound = {}

    def runner(configuration):
        spec_id, name, params = configuration
        if spec_id not in bound:
            params = {k: v.replace(STRATEGY, strategy) if isinstance(v, str) else v for k, v in params.items()}
            bound[spec_id] = make_method(name, **params).bind(model, tokenizer)
        return bound[spec_id]

    return runner


def tokens(seed: int, *lengths: int) -> list[torch.Tensor]:
    """Seeded random token ids ``(1, n)`` for each of ``lengths``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 20000, (1, n), generator=generator) for n in lengths]


def positions(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count).unsqueeze(0)


def compressed(runner, context: torch.Tensor, cache=None):
    """``context`` ``(1, T)`` prefilled under the method and compressed, in ``cache`` or a new one."""
    cache = runner.new_cache() if cache is None else cache
    with runner.prefill(cache):
        runner.model(context, past_key_values=cache, position_ids=positions(0, context.shape[1]))
    runner.compress(cache)
    return cache


def block(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """``ids`` ``(1, n)`` at positions ``start…`` in one forward → logits ``(n, vocab)``."""
    return model(ids, past_key_values=cache, position_ids=positions(start, ids.shape[1])).logits[0]


def steps(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """``ids`` ``(1, n)`` one token per forward → logits ``(n, vocab)``."""
    return torch.cat([block(model, cache, ids[:, i:i + 1], start + i) for i in range(ids.shape[1])])


def advance(model, cache, ids: torch.Tensor, start: int) -> None:
    """``ids`` ``(1, n)`` one token per forward through the decoder alone (no logits: cheaper decode steps)."""
    for i in range(ids.shape[1]):
        capture.decoder(model)(ids[:, i:i + 1], past_key_values=cache, position_ids=positions(start + i, 1))


def append(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """``ids`` appended as the harness does (:func:`crosskv.run.harness.feed`) → logits ``(n, vocab)``."""
    return feed(model, cache, ids[0].tolist(), start, ids.device, every=True)


def answer(model, cache, logits: torch.Tensor, start: int, length: int = ANSWER) -> list[int]:
    """Greedy answer of ``length`` tokens after ``logits`` ``(vocab,)``, each token fed into the cache."""
    out = []
    for i in range(length):
        out.append(int(logits.argmax()))
        logits = block(model, cache, torch.tensor([[out[-1]]]), start + i)[-1]
    return out


def names(configuration) -> list[str]:
    """What an error may name to refuse: the method, and for a composition its base and eviction press."""
    _, name, params = configuration
    return [name] + [params[k] for k in ("base", "evict") if k in params and params[k] != "none"]


def check_refusal(err: Exception, configuration, what: str) -> None:
    """``err`` must be a ``ValueError`` or ``NotImplementedError`` whose message names the method."""
    message = str(err).lower()
    named = any(re.search(rf"(?<![\w:]){re.escape(n.lower())}(?![\w])", message) for n in names(configuration))
    if not isinstance(err, (ValueError, NotImplementedError)) or not named:
        raise AssertionError(f"{configuration[0]}: {what} raised {type(err).__name__}: {err!s:.300} — a refusal "
                             f"must be a ValueError naming the method ({' or '.join(names(configuration))})") from err


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --- the registry is covered ---------------------------------------------------------------------------

def test_every_registered_method_has_tiny_params():
    missing = sorted(set(REGISTRY) - set(TINY_PARAMS))
    assert not missing, (f"registered method(s) {missing} have no entry in TINY_PARAMS (tests/test_contract.py): "
                         "give each its small valid parameters for random:tiny ({} if the defaults fit)")
    assert not sorted(set(TINY_PARAMS) - set(REGISTRY)), "TINY_PARAMS names methods that are not registered"


def test_the_compositions_checked_cover_every_pair_base_eviction_and_width():
    """Every accepted ``(base, evict)`` pair is checked unquantized, and every ``(base, bits)`` and
    ``(evict, bits)`` the composition matrix accepts is checked in some row."""
    accepted = [row for row in composition_matrix() if row["supported"]]
    checked = [params for _, name, params in CONFIGURATIONS if name == "compose"]
    for keys in (("base", "evict"), ("base", "bits"), ("evict", "bits")):
        want = {tuple(row[k] for k in keys) for row in accepted if "bits" in keys or row["bits"] == 0}
        missing = want - {tuple(params[k] for k in keys) for params in checked if "bits" in keys or params["bits"] == 0}
        assert not missing, f"no composition checked for {keys} = {sorted(missing)}"


# --- (a) a block scores as its steps ---------------------------------------------------------------------

def check_block(configuration, runner, context, lead, length, seed):
    model = runner.model
    ctx, first, rest = tokens(seed, context, lead, length)
    results = []
    for forward in (block, steps):
        cache = compressed(runner, ctx)
        advance(model, cache, first, context)
        results.append(forward(model, cache, rest, context + lead))
    diff = max_diff(*results)
    assert diff <= BLOCK_TOL, f"{configuration[0]}: a {length}-token block after {context}+{lead} tokens differs " \
                              f"from its one-token forwards by {diff:.3g} (max abs logit)"


@EACH
def test_block_gives_the_logits_of_its_steps(configuration, runners):
    """(a) After the context (and ``lead`` tokens fed one by one), a block of ``length`` tokens gives the logits of
    ``length`` one-token forwards."""
    prove(check_block, configuration, runners, context=CONTEXTS, lead=st.integers(0, GROUP),
          length=st.integers(CROSSING, CROSSING + GROUP), seed=SEEDS)


# --- (b) an appended conversation drops exactly ------------------------------------------------------------

def check_drop(configuration, runner, context, questions, reasks, seed):
    model = runner.model
    ctx, *asked = tokens(seed, context, *questions)
    cache = compressed(runner, ctx)
    checkpoint = layer_lengths(cache)
    first, answers = [], []
    for question in asked:
        first.append(append(model, cache, question, context))
        answers.append(answer(model, cache, first[-1][-1], context + question.shape[1]))
        rewind(cache, checkpoint)
    for i in reasks:
        diff = max_diff(append(model, cache, asked[i], context), first[i])
        rewind(cache, checkpoint)
        assert diff <= DROP_TOL, f"{configuration[0]}: question {i} re-asked after drops differs by {diff:.3g}"
    for i, question in enumerate(asked[1:], 1):  # the first question was asked of a fresh context already
        fresh = compressed(runner, ctx)
        logits = append(model, fresh, question, context)
        diff = max_diff(logits, first[i])
        assert diff <= DROP_TOL, f"{configuration[0]}: question {i} after {i} dropped answers differs from a " \
                                 f"fresh context by {diff:.3g}"
        assert answer(model, fresh, logits[-1], context + question.shape[1]) == answers[i], \
            f"{configuration[0]}: question {i}'s answer after {i} dropped answers is not a fresh context's"


@EACH
def test_a_dropped_conversation_leaves_the_context_as_compressed(configuration, runners):
    """(b) Three questions, each with a 24-token greedy answer, dropped between: each gives the logits and answer
    of a fresh compressed context; re-asking any of them (dropped between) gives its first logits again."""
    prove(check_drop, configuration, runners, context=CONTEXTS,
          questions=st.lists(st.integers(2, GROUP), min_size=3, max_size=3),
          reasks=st.lists(st.integers(0, 2), min_size=1, max_size=3), seed=SEEDS)


# --- (c) reset forgets everything or refuses ---------------------------------------------------------------

def check_reset(configuration, runner, contexts, question, seed):
    model = runner.model
    old, new, asked = tokens(seed, contexts[0], contexts[1], question)
    cache = compressed(runner, old)
    logits = append(model, cache, asked, contexts[0])
    answer(model, cache, logits[-1], contexts[0] + question, length=3)
    try:
        cache.reset()
    except Exception as err:  # noqa: BLE001  (checked: a refusal must name the method)
        check_refusal(err, configuration, "cache.reset()")
        return
    assert cache.get_seq_length() == 0, f"{configuration[0]}: reset leaves {cache.get_seq_length()} tokens"
    reused = append(model, compressed(runner, new, cache), asked, contexts[1])
    fresh = append(model, compressed(runner, new), asked, contexts[1])
    diff = max_diff(reused, fresh)
    assert diff <= DROP_TOL, f"{configuration[0]}: after reset, a new prompt differs from a fresh cache by {diff:.3g}"


@EACH
def test_reset_then_a_new_prompt_is_a_fresh_cache(configuration, runners):
    """(c) After a context, a question and a few decoded tokens, ``cache.reset()`` then a new context (compressed)
    and question give what a fresh cache gives; or reset raises an error naming the method."""
    prove(check_reset, configuration, runners, contexts=st.lists(CONTEXTS, min_size=2, max_size=2),
          question=st.integers(2, GROUP), seed=SEEDS)


# --- (d) batch rows are independent or the batch is refused -----------------------------------------------

def check_batch(configuration, runner, short, extra, question, seed):
    model = runner.model
    lengths = (short + extra, short)
    long_ctx, short_ctx, q0, q1 = tokens(seed, *lengths, question, question)
    width = lengths[0]
    padded = torch.cat([long_ctx, torch.cat([torch.zeros(1, extra, dtype=torch.long), short_ctx], 1)])  # (2, W)
    mask = torch.ones(2, width + question, dtype=torch.long)
    mask[1, :extra] = 0
    where = (mask.cumsum(-1) - 1).clamp_min(0)  # (2, W + Q): each row's own positions
    try:
        cache = runner.new_cache()
        with runner.prefill(cache):
            model(padded, attention_mask=mask[:, :width], position_ids=where[:, :width], past_key_values=cache)
        runner.compress(cache)
        batched = model(torch.cat([q0, q1]), attention_mask=mask, position_ids=where[:, width:],
                        past_key_values=cache).logits
    except Exception as err:  # noqa: BLE001  (checked: a refusal must name the method)
        check_refusal(err, configuration, "a batch of 2 different rows")
        return
    alone = [block(model, compressed(runner, ctx), q, ctx.shape[1]) for ctx, q in ((long_ctx, q0), (short_ctx, q1))]
    for row in range(2):
        diff = max_diff(batched[row], alone[row])
        assert diff <= BLOCK_TOL, f"{configuration[0]}: batch row {row} (context {lengths[row]}, padded to " \
                                  f"{width}) differs from the row alone by {diff:.3g}"


@EACH
def test_batch_rows_are_independent_or_refused(configuration, runners):
    """(d) Two contexts of different lengths, left-padded with an ``attention_mask``, then a question each: every
    row gives what it gives alone (≤ 1e-4), or the batch is refused with an error naming the method."""
    prove(check_batch, configuration, runners, short=CONTEXTS, extra=st.integers(1, 2 * GROUP),
          question=st.integers(2, GROUP), seed=SEEDS)


# --- (e) devices and storages, (f) held bytes = census -------------------------------------------------------

def moments(runner, context: torch.Tensor, question: torch.Tensor, decoded: torch.Tensor):
    """The cache at each moment of a run → ``(label, cache)``: after the prefill, after compression, after the
    question, after each decode step (one token of ``decoded`` ``(1, n)`` per forward), after the drop and
    after the question again."""
    model, t, q = runner.model, context.shape[1], question.shape[1]
    cache = runner.new_cache()
    with runner.prefill(cache):
        model(context, past_key_values=cache, position_ids=positions(0, t))
    yield "prefill", cache
    runner.compress(cache)
    checkpoint = layer_lengths(cache)
    yield "compression", cache
    append(model, cache, question, t)
    yield "question", cache
    for i in range(decoded.shape[1]):
        advance(model, cache, decoded[:, i:i + 1], t + q + i)
        yield f"decode step {i + 1}", cache
    rewind(cache, checkpoint)
    yield "drop", cache
    append(model, cache, question, t)
    yield "question after the drop", cache


def check_devices(configuration, runner, context, question, decoded, seed):
    device = next(runner.model.parameters()).device
    for when, cache in moments(runner, *tokens(seed, context, question, decoded)):
        away = {str(t.device) for t in held_tensors(cache, exclude=[runner.model]) if t.device != device}
        assert not away, f"{configuration[0]} after {when}: tensors on {away}, the model is on {device}"
        pinning = [(tuple(t.shape), t.untyped_storage().nbytes()) for t in stored_tensors(cache)
                   if t.untyped_storage().nbytes() != t.numel() * t.element_size()]
        assert not pinning, f"{configuration[0]} after {when}: views pin larger storages (shape, bytes) {pinning}"


@EACH
def test_every_stored_tensor_is_on_the_model_device_and_owns_its_storage(configuration, runners):
    """(e) At every moment of a run, every tensor reachable from the cache is on the model's device, and every
    tensor the cache reports storing covers its whole storage (no view pins a larger one)."""
    prove(check_devices, configuration, runners, context=CONTEXTS, question=st.integers(2, GROUP),
          decoded=st.integers(CROSSING, CROSSING + GROUP), seed=SEEDS)


def check_census(configuration, runner, context, question, decoded, seed):
    census = RunCensus(runner)
    for when, cache in moments(runner, *tokens(seed, context, question, decoded)):
        reported, held = kv_bytes(cache), census.held(cache)
        assert held == reported, f"{configuration[0]} after {when}: census {held} bytes, kv_bytes {reported}"


@EACH
def test_held_bytes_equal_the_census_at_every_moment(configuration, runners):
    """(f) The census of cache and runner equals ``kv_bytes`` exactly after the prefill, after compression,
    after every decode step and after a drop."""
    prove(check_census, configuration, runners, context=CONTEXTS, question=st.integers(2, GROUP),
          decoded=st.integers(CROSSING, CROSSING + GROUP), seed=SEEDS)


# --- the embedded model in bfloat16: greedy tokens, block against steps ------------------------------------

BF16_METHODS = {"full": {},  # the reference: a plain cache's own bfloat16 block-vs-steps difference
                "xkv": {"group_size": 2, "kept": 0.5},
                "compose[full,none,2]": {"base": "full", "bits": 2, "group_size": 32, "residual": 32},
                "selective": {"top_k": 64, "window": 16}}
BF16_CONTEXT, BF16_BLOCK = 256, 48
# block against steps in bfloat16 (logits span ≈ ±40): the plain cache itself differs by 0.83 at most, 0.10 on
# average (a block and single tokens take different kernels, rounded to 8 bits of mantissa through 30 layers)
BF16_MAX, BF16_MEAN = 1.0, 0.2


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(BF16_METHODS))
@torch.no_grad()
def test_embedded_bfloat16_block_gives_the_greedy_tokens_of_its_steps(model16, label):
    """On SmolLM2-135M in bfloat16, a 48-token block after a 256-token compressed context gives the logits of its
    48 one-token forwards within ``BF16_MAX`` (max abs) and ``BF16_MEAN`` (mean abs), and the same greedy token
    wherever the steps' top two logits are more than ``2·BF16_MAX`` apart (closer ones may swap within it)."""
    from crosskv.core.data import heldout_text

    model, tok = model16
    name = "compose" if label.startswith("compose") else label
    runner = make_method(name, **BF16_METHODS[label]).bind(model, tok)
    ids = tok(heldout_text(tok, BF16_CONTEXT + BF16_BLOCK + 50), return_tensors="pt").input_ids
    ctx, rest = ids[:, :BF16_CONTEXT], ids[:, BF16_CONTEXT:BF16_CONTEXT + BF16_BLOCK]
    with runner.applied():
        got = block(model, compressed(runner, ctx), rest, BF16_CONTEXT).float()
        want = steps(model, compressed(runner, ctx), rest, BF16_CONTEXT).float()
    diff, mean = max_diff(got, want), float((got - want).abs().mean())
    assert diff <= BF16_MAX and mean <= BF16_MEAN, f"{label}: block and steps differ by {diff:.3g} at most, " \
                                                   f"{mean:.3g} on average (max abs logit)"
    top = want.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * BF16_MAX
    swapped = ((got.argmax(-1) != want.argmax(-1)) & clear).nonzero().flatten().tolist()
    assert not swapped, f"{label}: block and steps pick different greedy tokens at positions {swapped}"
