"""Run a method on a task and measure it: scores, bytes held by the cache, time, peak memory.

Every method — crosskv's and the kvpress peers — is driven the same way (see
:mod:`crosskv.methods.base`) on the same token ids::

    runner = bind(config)                              # cached per (model, config) in this process
    with runner.applied():
        cache = runner.new_cache()
        with runner.prefill(cache): model(context)     # chat prefix + instruction + haystack
        runner.compress(cache)                         # → kv_bytes (after prefill)
        model(question + lead + gold[:-1])             # teacher-forced gold answer → gold_loglik, gold_match
        cache.crop(question end); greedy decoding      # exact match, on the first generate_samples samples
                                                       # → kv_bytes_end (after the last token appended)

**Gold-answer metric:** every generation sample scores its gold answer (:func:`gold_ids`: the answers in
order, joined by ", " or the task's answer format's separator) teacher-forced through the compressed cache in
one forward: ``gold_loglik`` (mean log-probability per gold token) and ``gold_match`` (1 when the argmax
reproduces every gold token, i.e. greedy decoding would). Paired across configurations on the same samples;
cheap (one pass, no decode loop). The gold is scored where the model would write it (:class:`GoldPlacement`):
after a RULER task's answer prefix; on a task without one (JSONL, LongBench) after the ``lead``, the full cache's
own greedy output up to the gold's first occurrence (one greedy decode per sample, shared by every configuration).
A gold token tied for the largest logit counts as reproduced (:func:`gold_scores`).

**One prefill, many caches:** :func:`evaluate_grid` runs several configurations on one task; those whose
``MethodConfig.plain_prefill`` holds share one plain prefill per sample (:class:`Prefill`), each compressing its
own copy (kvpress presses replay their hooks on it; KVSharer and its hybrid replay the layers below their
first consumer from it and run the rest), and the copies' low-rank factorisations share their Gram
matrices' eigendecompositions (:func:`crosskv.core.lowrank.shared_eigendecompositions`: xKV and Single SVD at
several ranks decompose each group once). Records equal separate :func:`evaluate` runs.

**Like for like:** only the context part is compressed. kvpress presses compress during the
context prefill and never see the question (kvpress's own default); crosskv's methods compress
the same context in ``compress`` and store the question and decoded tokens exactly. Positions are
absolute (``position_ids`` passed explicitly), so evicting methods keep correct RoPE positions.

Bytes: ``kv_bytes`` = :func:`crosskv.cache.storage.kv_bytes` of the cache after compression (the method's
own accounting); ``kv_bytes_held`` = the :mod:`crosskv.cache.census` of the same moment (every storage
reachable from the cache and the runner, model weights and the runner's pre-run state excluded),
``kept_held`` = kv_bytes_held / kv_bytes_full — equal to ``kept`` when the accounting is honest;
``kv_bytes_full`` = a plain ``DynamicCache`` on the same tokens, computed as
2·L·B·H_kv·T·d·element_size; ``kept`` = kv_bytes / kv_bytes_full, ``factor`` = 1 / kept,
``saved`` = 1 − kept. ``kept_16bit`` counts every float tensor as 16-bit against a 16-bit full cache
(the papers' baseline; equal to ``kept`` in bfloat16 runs). ``*_end`` are the same at the end of
decoding. Per-run values are means over samples. ``method_bytes`` (beside them, not in ``kept``): what the
method adds to the model while installed, minus model weights it lets a deployment drop
(:meth:`crosskv.methods.base.Runner.method_bytes`), once per model — not per token.

Timing: ``prefill_s`` (context forward, including any work the method does inside ``prefill``),
``compress_s``, ``decode_tok_s`` (greedy steps after the first token / their seconds),
``seconds`` (wall time of the whole run). ``peak_mem_bytes``: CUDA max allocated on GPU; on CPU the
process RSS high-water mark (VmHWM, reset at the start of the run through ``/proc/self/clear_refs``,
else ``ru_maxrss`` which cannot be reset — ``peak_mem_kind`` says which).

Under ``torch.distributed`` (``torchrun``), samples are sharded across ranks and gathered; every
rank returns the merged record and only rank 0 writes it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from transformers import DynamicCache

from crosskv.core import capture
from crosskv.core import fingerprint
from crosskv.core import lowrank
from crosskv.run import results
from crosskv.run.prefix_replay import replayed_layers
from crosskv.cache.census import RunCensus
from crosskv.cache.storage import kv_bytes
from crosskv.methods import MethodConfig, Runner, make_method
from crosskv.core.models import is_random, model_name
from crosskv.tasks import Sample, TaskConfig, encode, make_task
from crosskv.tasks.mix import MIX_CONTEXTS, TASK_MIX
from crosskv.core.progress import bar as progress_bar

log = logging.getLogger(__name__)

_RUNNERS = "_crosskv_runners"  # attribute of a bound model: (id of the model, {config: runner})
_CHUNK = 512  # rows of hidden states turned into logits at once when scoring perplexity


# --- binding, geometry, environment --------------------------------------------------------------------

def bind(model, tokenizer, config: MethodConfig) -> Runner:
    """``config.bind(model, tokenizer)``, cached per (model object, config) for the life of the model.

    The cache hangs on the model itself, so the library holds no reference to a model: once the caller
    drops it, the model and its runners (which refer to it) are freed together. A deep copy of the model
    does not inherit the original's runners.
    """
    owner, runners = vars(model).get(_RUNNERS, (None, None))
    if owner != id(model):
        runners = {}
        object.__setattr__(model, _RUNNERS, (id(model), runners))
    if config not in runners:
        runners[config] = config.bind(model, tokenizer)
    return runners[config]


def full_cache_bytes(model, tokens: int, batch: int = 1, element_size: int | None = None) -> int:
    """Bytes of a plain ``DynamicCache`` holding ``tokens`` tokens: 2·L·B·H_kv·T·d·element_size."""
    shape = capture.kv_shape(model)
    size = element_size or next(model.parameters()).element_size()
    return 2 * shape.layers * batch * shape.kv_heads * tokens * shape.head_dim * size


def max_positions(model) -> int | None:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA) before reading a clock; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a run: CUDA max allocated, or the process RSS high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.kind = "ru_maxrss"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_hwm":
            try:
                with open("/proc/self/status") as handle:
                    for line in handle:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024
            except OSError:
                pass
            self.kind = "ru_maxrss"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- one sample ------------------------------------------------------------------------------------

def _ids(values: list[int], device) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.long, device=device)


def _positions(start: int, count: int, device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device).unsqueeze(0)


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end greedy decoding: the model's generation-config and the tokenizer's end-of-sequence ids."""
    stops = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            stops.update(source if isinstance(source, (list, tuple)) else [source])
    return stops


def _bytes(model, cache, tokens: int, held: RunCensus) -> dict[str, int]:
    return {"kv_bytes": kv_bytes(cache), "kv_bytes_held": held.held(cache),
            "kv_bytes_full": full_cache_bytes(model, tokens),
            "kv_bytes_16bit": kv_bytes(cache, float_bytes=2),
            "kv_bytes_full_16bit": full_cache_bytes(model, tokens, element_size=2)}


def uneven(cache) -> bool:
    """True when the cache's layers attend to different token counts (per-layer or per-group eviction budgets,
    e.g. PyramidKV, alone or composed with a cross-layer method).

    transformers builds one attention mask from layer 0's sizes, so a multi-token forward would fail
    on such a cache; :func:`feed` then appends tokens one at a time (exact: single queries need no mask).
    Each full-attention layer's length is what its ``get_mask_sizes`` reports for one query.
    """
    one = torch.zeros(1, dtype=torch.long, device="cpu")  # get_mask_sizes reads its length only
    return len({layer.get_mask_sizes(one)[0] for layer in cache.layers if not getattr(layer, "is_sliding", False)}) > 1


def feed(model, cache, ids: list[int], start: int, device, hidden: bool = False, every: bool = False):
    """Append ``ids`` at absolute positions ``start…`` → last logits ``(vocab,)``, every position's logits
    ``(T, vocab)`` (``every``) or all hidden states ``(T, D)`` (``hidden``). One token per forward when the
    cache's layers hold different lengths; else one forward."""
    chunks = [ids[i:i + 1] for i in range(len(ids))] if uneven(cache) else [ids]
    outs, pos = [], start
    for chunk in chunks:
        kwargs = dict(input_ids=_ids(chunk, device), past_key_values=cache, use_cache=True,
                      position_ids=_positions(pos, len(chunk), device))
        if hidden:
            outs.append(capture.decoder(model)(**kwargs).last_hidden_state[0])
        else:
            outs.append(model(**kwargs, logits_to_keep=0 if every else 1).logits[0])  # (chunk | 1, vocab)
        pos += len(chunk)
    if hidden or every:
        return torch.cat(outs)
    return outs[-1][-1]


@dataclass
class Prefill:
    """A plain prefill of one sample's context (no method installed), captured once and replayed into the cache
    of every configuration that compresses a plain prefill (:attr:`crosskv.methods.MethodConfig.plain_prefill`).

    ``keys``/``values``: per layer ``(1, H_kv, T, d)`` (post-RoPE keys, as the cache stores them);
    ``logits``: the last position's ``(vocab,)`` (generation tasks) or ``None``; ``hidden``: every position's
    final hidden state ``(T, D)`` (perplexity tasks) or ``None``; ``seconds``: the context forward's time;
    ``outputs``: decoder layer index → that layer's output ``(1, T, D)``, for the layers asked for (the last
    plain layer of each runner that replays its first layers, :meth:`crosskv.methods.Runner.plain_layers`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    seconds: float
    attention: list[dict[str, Any]] | None = None  # per layer: the attention module's forward kwargs and weights
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def plain_prefill(model, ids: list[int], hidden: bool = False, attention: bool = False,
                  outputs_of: Iterable[int] = ()) -> Prefill:
    """Run the context ``ids`` through the unmodified model into a ``DynamicCache`` → :class:`Prefill`;
    ``attention``: also keep what each attention layer's forward hooks see (for runners that ``replay``);
    ``outputs_of``: decoder layer indices whose outputs to keep."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    kwargs = dict(input_ids=_ids(ids, device), past_key_values=cache, use_cache=True,
                  position_ids=_positions(0, len(ids), device))
    seen: list[dict[str, Any]] = []

    def keep(module, args, module_kwargs, output):
        seen.append({"kwargs": {k: v for k, v in module_kwargs.items() if k != "past_key_values"},
                     "weights": output[1]})

    outputs: dict[int, torch.Tensor] = {}

    def keep_output(index):
        def hook(module, args, output):
            outputs[index] = output
        return hook

    hooks = [m.register_forward_hook(keep, with_kwargs=True) for m in capture.attention_modules(model)] if attention else []
    layers = capture.decoder_layers(model)
    hooks += [layers[i].register_forward_hook(keep_output(i)) for i in sorted(set(outputs_of))]
    t0 = time.perf_counter()
    try:
        if hidden:
            out, logits = capture.decoder(model)(**kwargs).last_hidden_state[0], None
        else:
            out, logits = None, model(**kwargs, logits_to_keep=1).logits[0, -1]
        sync(device)
    finally:
        for hook in hooks:
            hook.remove()
    seconds = time.perf_counter() - t0
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError(f"{model_name(model)} has sliding-window layers: a shared prefill would replay truncated "
                         "layers; run these methods with evaluate, one at a time")
    return Prefill([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], logits, out,
                   seconds, seen if attention else None, outputs)


def _replay(cache, shared: Prefill) -> None:
    """Append a copy of every layer's prefill K/V to ``cache``, as the model's attention layers would."""
    for index, (keys, values) in enumerate(zip(shared.keys, shared.values)):
        cache.update(keys.clone(), values.clone(), index)


def _context(runner: Runner, cache, ids: list[int], device, hidden: bool, shared: Prefill | None):
    """The context into ``cache`` under the method's prefill → last logits ``(vocab,)`` or hidden states ``(T, D)``.
    With ``shared``, a copy of that plain prefill stands in for the forward; a runner with a ``replay`` (the
    kvpress presses) then applies its prefill hooks to the copy, layer by layer, with what they would have seen.
    A runner whose prefill is not plain gets ``shared`` only for its first :meth:`~Runner.plain_layers`, which are
    replayed from it (:func:`crosskv.run.prefix_replay.replayed_layers`); the layers above run."""
    model = runner.model
    count = runner.plain_layers() if shared is not None else 0
    if shared is not None and not count:
        if hasattr(runner, "replay"):
            _replay(cache, shared)
            runner.replay(cache, shared.attention)
        else:
            with runner.prefill(cache):
                _replay(cache, shared)
        return shared.hidden if hidden else shared.logits
    kwargs = dict(input_ids=_ids(ids, device), past_key_values=cache, use_cache=True,
                  position_ids=_positions(0, len(ids), device))
    lower = (replayed_layers(model, count, shared.keys, shared.values, shared.outputs[count - 1]) if count
             else contextlib.nullcontext())
    with runner.prefill(cache), lower:
        if hidden:
            return capture.decoder(model)(**kwargs).last_hidden_state[0]
        return model(**kwargs, logits_to_keep=1).logits[0, -1]


def _prefill(runner: Runner, cache, ids: list[int], device, hidden: bool, shared: Prefill | None = None):
    """:func:`_context` then ``runner.compress`` → (its output, prefill s, compress s). With ``shared`` the
    prefill time is the shared forward's seconds plus the copy's."""
    t0 = time.perf_counter()
    out = _context(runner, cache, ids, device, hidden, shared)
    sync(device)
    t1 = time.perf_counter()
    runner.compress(cache)
    sync(device)
    return out, t1 - t0 + (shared.seconds if shared is not None else 0.0), time.perf_counter() - t1


def gold_text(sample: Sample) -> str:
    """The gold answer's text: the sample's ``answers`` in their listed order, joined by the task's
    ``info["gold_separator"]`` (a RULER answer format's, :data:`crosskv.tasks.ruler.ANSWER_FORMATS`) or ``", "``."""
    return sample.info.get("gold_separator", ", ").join(sample.answers)


def gold_ids(tokenizer, sample: Sample) -> list[int]:
    """Token ids of the gold answer as the model should continue the question: :func:`gold_text`, after a space
    unless the question part already ends in whitespace (RULER's answer prefixes end in ``are``/``:`` or in
    ``: ``). Empty when the sample has no answers."""
    if not sample.answers:
        return []
    text = gold_text(sample)
    tail = tokenizer.decode(sample.question_ids[-1:]) if sample.question_ids else ""
    return encode(tokenizer, text if tail[-1:].isspace() else " " + text)


@dataclass(frozen=True)
class GoldPlacement:
    """Where one sample's gold answer is scored, shared by every configuration of the sample (scores stay paired):
    ``lead`` (token ids forced between the question and the gold answer), then ``gold`` (token ids, scored).

    ``where``: ``"answer_prefix"`` (the task's question ends with an answer prefix: the gold follows it, no lead);
    ``"full_output"`` (no answer prefix: the lead is the full cache's greedy output before the gold's first
    occurrence, e.g. "The access code for the Juniper vault is"); ``"question_end"`` (no answer prefix and the
    full cache's greedy output does not contain the gold: the gold follows the question, no lead); ``"none"``
    (the sample has no gold answer)."""

    where: str
    lead: list[int]
    gold: list[int]


def gold_placement(model, tokenizer, task: TaskConfig, sample: Sample, stops: set[int]) -> GoldPlacement:
    """Where ``sample``'s gold answer (:func:`gold_text`) is scored (:class:`GoldPlacement`). A task
    without an answer prefix (:attr:`~crosskv.tasks.TaskSpec.answer_prefix`: JSONL, LongBench) would otherwise
    score the gold as the reply's first words, which a chat model rarely writes: there the full cache decodes
    greedily (:func:`full_output`) until its output contains the gold; the output's tokens before the gold's
    first occurrence are the lead, and the tokens that spell the gold are the gold (as the model tokenized it)."""
    if not sample.answers:
        return GoldPlacement("none", [], [])
    if task.spec.answer_prefix:
        return GoldPlacement("answer_prefix", [], gold_ids(tokenizer, sample))
    text = gold_text(sample)
    ids = full_output(model, tokenizer, sample, stops, text)
    at = tokenizer.decode(ids, skip_special_tokens=True).find(text)
    if at < 0:
        return GoldPlacement("question_end", [], gold_ids(tokenizer, sample))
    ends = [len(tokenizer.decode(ids[:n], skip_special_tokens=True)) for n in range(len(ids) + 1)]
    lead = max(n for n, end in enumerate(ends) if end <= at)  # the last token boundary before the gold
    stop = min(n for n, end in enumerate(ends) if end >= at + len(text))  # the first one after it
    return GoldPlacement("full_output", ids[:lead], ids[lead:stop])


@torch.no_grad()
def full_output(model, tokenizer, sample: Sample, stops: set[int], until: str) -> list[int]:
    """The full cache's greedy output after the question → token ids, as :func:`run_generate` decodes it (context,
    then question, then one token per step), ending at a stop token, at ``sample.max_new_tokens`` or once the
    text contains ``until``."""
    runner = bind(model, tokenizer, make_method("full"))
    device = next(model.parameters()).device
    with runner.applied():
        cache = runner.new_cache()
        logits, _, _ = _prefill(runner, cache, sample.context_ids, device, False)
        if sample.question_ids:
            logits = feed(model, cache, sample.question_ids, len(sample.context_ids), device)
        ids, fed = [int(logits.argmax())], sample.prompt_tokens
        while (ids[-1] not in stops and len(ids) < sample.max_new_tokens
               and until not in tokenizer.decode(ids, skip_special_tokens=True)):
            logits = feed(model, cache, ids[-1:], fed, device)
            ids.append(int(logits.argmax()))
            fed += 1
    return ids


def gold_scores(logits: torch.Tensor, gold: list[int]) -> dict[str, Any]:
    """Teacher-forced scores of ``gold`` (M,) from the logits that predict each gold token ``(M, vocab)``:
    ``gold_loglik`` (mean log-probability per gold token), ``gold_match`` (1 when the gold token has the largest
    logit at every position, i.e. greedy decoding reproduces the gold answer; else 0), ``gold_tokens`` (M).
    A gold token tied with another for the largest logit counts as reproduced: in bfloat16 such ties are
    frequent, and which of the tied tokens a decode step picks depends on its own rounding."""
    target = torch.tensor(gold, device=logits.device)
    rows = torch.arange(len(gold), device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (M, vocab)
    greedy = logits[rows, target] >= logits.max(-1).values  # (M,)
    return {"gold_loglik": float(logp[rows, target].mean()), "gold_match": int(bool(greedy.all())),
            "gold_tokens": len(gold)}


@torch.no_grad()
def run_generate(runner: Runner, sample: Sample, stops: set[int], settled=None, gold: list[int] | None = None,
                 generate: bool = True, shared: Prefill | None = None, lead: list[int] | None = None) -> dict[str, Any]:
    """Prefill the context (or replay ``shared``), compress, then score the sample through the compressed cache.

    ``gold`` (token ids, :func:`gold_ids`): the question, ``lead`` (token ids, :class:`GoldPlacement`) and the
    gold answer are appended teacher-forced in one pass → :func:`gold_scores` of the gold tokens,
    ``gold_lead_tokens``. ``generate``: greedy decoding after the question (the cache is cropped back
    to the question's end first); decoding ends at a stop token, at ``sample.max_new_tokens``, or as soon as
    ``settled(prediction, sample)`` says more tokens cannot change the score (``details["settled"]``; see
    :class:`~crosskv.tasks.TaskSpec`). ``*_end`` bytes are measured after the last token appended.
    """
    model = runner.model
    device = next(model.parameters()).device
    question, lead = list(sample.question_ids), list(lead or [])
    detail: dict[str, Any] = {"generated": generate}
    with runner.applied():
        census = RunCensus(runner)
        cache = runner.new_cache()
        last, prefill_s, compress_s = _prefill(runner, cache, sample.context_ids, device, False, shared)
        after = _bytes(model, cache, len(sample.context_ids), census)
        asked = len(sample.context_ids) + len(question)  # tokens seen once the question is in
        fed = len(sample.context_ids)
        t0 = time.perf_counter()
        if gold:
            forced = question + lead + gold[:-1]
            logits = force(runner.model, cache, question, lead + gold[:-1], fed, device) if forced else last[None, :0]
            predictors = logits[len(question) - 1:] if question else torch.cat([last[None], logits])  # (L+M, vocab)
            first, fed = predictors[0], fed + len(forced)
            detail.update(gold_scores(predictors[len(lead):], gold), gold_lead_tokens=len(lead))
        elif question:
            first, fed = feed(model, cache, question, fed, device), asked
        else:
            first = last
        sync(device)
        detail["gold_s"] = time.perf_counter() - t0 if gold else None
        if generate:
            if fed > asked:  # drop the gold tokens: a negative crop counts from each layer's own end (evicted
                cache.crop(asked - fed)  # caches hold fewer tokens than they have seen, layers may differ)
                fed = asked
            detail.update(_decode(runner, cache, first, fed, sample, stops, settled, device))
            fed += detail["decode_steps"]
        end = _bytes(model, cache, fed, census)
    return {**detail, "prefill_s": prefill_s, "compress_s": compress_s, **after,
            **{f"{k}_end": v for k, v in end.items()}}


def force(model, cache, question: list[int], answer: list[int], start: int, device,
          hidden: bool = False) -> torch.Tensor:
    """Teacher-force ``question + answer`` from position ``start`` → every position's logits ``(Q+M, vocab)``
    (hidden states ``(Q+M, D)`` with ``hidden``), in one block (:func:`feed`): every cache scores a block of n
    tokens as n one-token forwards (selective reconstruction reads it as n decode steps itself)."""
    return feed(model, cache, question + answer, start, device, hidden=hidden, every=not hidden)


def _decode(runner: Runner, cache, first: torch.Tensor, fed: int, sample: Sample, stops: set[int], settled,
            device) -> dict[str, Any]:
    """Greedy decoding from the logits ``first`` (vocab,) with ``fed`` tokens in the cache → the prediction."""
    model, tokenizer = runner.model, runner.tokenizer
    token = int(first.argmax())
    generated = [token]
    sync(device)
    t0 = time.perf_counter()
    done = False
    while token not in stops and len(generated) < sample.max_new_tokens:
        if settled is not None and settled(tokenizer.decode(generated, skip_special_tokens=True), sample):
            done = True
            break
        out = model(input_ids=_ids([token], device), past_key_values=cache, use_cache=True,
                    position_ids=_positions(fed, 1, device), logits_to_keep=1)
        fed += 1
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
    sync(device)
    return {"prediction": tokenizer.decode(generated, skip_special_tokens=True), "generated_tokens": len(generated),
            "decode_steps": len(generated) - 1, "settled": done, "decode_s": time.perf_counter() - t0}


def _nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of ``targets`` (T,) from final hidden states (T, D), in chunks of logits."""
    head = model.get_output_embeddings()
    total = 0.0
    for start in range(0, len(targets), _CHUNK):
        logits = head(hidden[start:start + _CHUNK]).float()  # (chunk, vocab)
        total += float(torch.nn.functional.cross_entropy(logits, targets[start:start + _CHUNK], reduction="sum"))
    return total


@torch.no_grad()
def run_perplexity(runner: Runner, sample: Sample, shared: Prefill | None = None) -> dict[str, Any]:
    """``ppl``: NLL of the window under the method's prefill; ``ppl_cont`` (question_ids = continuation): NLL
    of the continuation fed teacher-forced through the compressed cache (:func:`force`). ``shared``: a plain
    prefill to replay."""
    model = runner.model
    device = next(model.parameters()).device
    ids = torch.tensor(sample.context_ids, device=device)
    with runner.applied():
        census = RunCensus(runner)
        cache = runner.new_cache()
        hidden, prefill_s, compress_s = _prefill(runner, cache, sample.context_ids, device, True, shared)  # (T, D)
        after = _bytes(model, cache, len(sample.context_ids), census)
        t0 = time.perf_counter()
        if not sample.question_ids:
            nll, scored = _nll(model, hidden[:-1], ids[1:]), len(ids) - 1
            fed = len(ids)
        else:
            cont = torch.tensor(sample.question_ids, device=device)
            cont_hidden = force(model, cache, [], sample.question_ids, len(ids), device, hidden=True)  # (M, D)
            predictors = torch.cat([hidden[-1:], cont_hidden[:-1]])  # (M, D)
            nll, scored = _nll(model, predictors, cont), len(cont)
            fed = len(ids) + len(cont)
        sync(device)
        end = _bytes(model, cache, fed, census)
    return {"nll": nll, "scored_tokens": scored, "prefill_s": prefill_s, "compress_s": compress_s,
            "continuation_s": time.perf_counter() - t0, **after, **{f"{k}_end": v for k, v in end.items()}}


# --- a run -----------------------------------------------------------------------------------------

def _check_length(model, task: TaskConfig, samples: list[Sample]) -> None:
    limit = max_positions(model)
    if limit is None:
        return
    for s in samples:
        need = s.prompt_tokens + s.max_new_tokens
        if need > limit:
            raise ValueError(f"task {task.name!r}: {s.prompt_tokens} prompt tokens + {s.max_new_tokens} new tokens "
                             f"exceed the model's max_position_embeddings={limit}")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def summarize(task: TaskConfig, details: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run numbers from per-sample details (score, mean bytes and their ratios, timings). Generation runs:
    ``score`` is the mean over the ``scored_samples`` decoded samples; ``gold_loglik`` / ``gold_match`` the
    means of the teacher-forced gold-answer scores over every sample; ``gold_placement`` where they are scored
    (``"answer_prefix"``, or ``"full_output"`` for a task without one: :class:`GoldPlacement`) and
    ``gold_unplaced`` the samples scored at the question's end instead (the full cache never wrote the gold)."""
    spec = task.spec
    if spec.kind == "generate":
        score = _mean([d.get("score") for d in details])
    else:
        score = math.exp(sum(d["nll"] for d in details) / sum(d["scored_tokens"] for d in details))
    out: dict[str, Any] = {"score": score, "metric": spec.metric, "higher_is_better": spec.higher_is_better}
    if spec.kind == "generate":
        out["scored_samples"] = sum(d.get("score") is not None for d in details)
        out["gold_loglik"] = _mean([d.get("gold_loglik") for d in details])
        out["gold_match"] = _mean([d.get("gold_match") for d in details])
        out["gold_placement"] = "answer_prefix" if spec.answer_prefix else "full_output"
        out["gold_unplaced"] = sum(d.get("gold_placement") == "question_end" for d in details)
    for name in ("kv_bytes", "kv_bytes_held", "kv_bytes_full", "kv_bytes_16bit", "kv_bytes_full_16bit",
                 "kv_bytes_end", "kv_bytes_held_end", "kv_bytes_full_end", "kv_bytes_16bit_end",
                 "kv_bytes_full_16bit_end"):
        out[name] = _mean([d.get(name) for d in details])
    out["kept"] = _ratio(out["kv_bytes"], out["kv_bytes_full"])
    out["factor"] = _ratio(1.0, out["kept"])
    out["saved"] = None if out["kept"] is None else 1.0 - out["kept"]
    out["kept_16bit"] = _ratio(out["kv_bytes_16bit"], out["kv_bytes_full_16bit"])
    out["kept_end"] = _ratio(out["kv_bytes_end"], out["kv_bytes_full_end"])
    out["kept_held"] = _ratio(out["kv_bytes_held"], out["kv_bytes_full"])
    out["kept_held_end"] = _ratio(out["kv_bytes_held_end"], out["kv_bytes_full_end"])
    out["prefill_s"] = _mean([d["prefill_s"] for d in details])
    out["compress_s"] = _mean([d["compress_s"] for d in details])
    steps = sum(d.get("decode_steps", 0) for d in details)
    decode_s = sum(d.get("decode_s", 0.0) for d in details)
    out["decode_tok_s"] = steps / decode_s if steps and decode_s > 0 else None
    out["prompt_tokens"] = _mean([d["prompt_tokens"] for d in details])
    return out


def _gather(details: list[dict], peak: int, world: int) -> tuple[list[dict], int]:
    if world == 1:
        return details, peak
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, (details, peak))
    merged = sorted((d for part, _ in parts for d in part), key=lambda d: d["index"])
    return merged, max(p for _, p in parts)


def _existing(key: str, results_dir, force: bool, world: int) -> dict | None:
    found = None if force else results.load_record(key, results_dir)
    if world > 1:  # every rank follows rank 0's view of the store
        box = [found]
        torch.distributed.broadcast_object_list(box, src=0)
        found = box[0]
    return found


def _task_config(task: TaskConfig | str, context: int, samples: int, seed: int, options: dict) -> TaskConfig:
    return task if isinstance(task, TaskConfig) else make_task(task, context, samples, seed, **options)


def _identity(model, config: MethodConfig, task: TaskConfig, generate_samples: int | None) -> dict[str, Any]:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    task_params = task.params()
    if generate_samples is not None and task.spec.kind == "generate":
        task_params["generate_samples"] = generate_samples
    return results.identity(model_name(model), dtype, config.name, config.params(), task_params,
                            model_fingerprint=fingerprint.model_fingerprint(model),
                            device_type=next(model.parameters()).device.type)


def _check_generate_samples(generate_samples: int | None) -> None:
    if generate_samples is not None and (isinstance(generate_samples, bool) or not isinstance(generate_samples, int)
                                         or generate_samples < 0):
        raise ValueError(f"generate_samples={generate_samples!r} must be None (every sample) or an int >= 0")


def _run_sample(runner: Runner, task: TaskConfig, sample: Sample, stops: set[int], generate_samples: int | None,
                shared: Prefill | None, placement: GoldPlacement | None) -> dict[str, Any]:
    """One sample's details: generation tasks get the gold-answer scores at ``placement`` and, for the first
    ``generate_samples`` sample indices (all when ``None``), exact match by greedy generation (``score``)."""
    spec = task.spec
    if spec.kind == "generate":
        generate = generate_samples is None or sample.index < generate_samples
        detail = run_generate(runner, sample, stops, spec.settled, placement.gold, generate, shared, placement.lead)
        detail["score"] = spec.score(detail["prediction"], sample, task) if generate else None
        detail.update(answers=sample.answers, gold_placement=placement.where)
    else:
        detail = run_perplexity(runner, sample, shared)
    detail.update(index=sample.index, prompt_tokens=sample.prompt_tokens, context_tokens=len(sample.context_ids),
                  info=sample.info)
    return detail


def evaluate(model, tokenizer, method: MethodConfig | str, task: TaskConfig | str, context: int = 2048,
             samples: int = 10, seed: int = 0, force: bool = False, store: bool = True, results_dir=None,
             progress: bool = True, generate_samples: int | None = None, **task_options: Any) -> dict[str, Any]:
    """Score ``method`` on ``task`` with ``model`` and return the run's record (see :mod:`crosskv.run.results`).

    ``method``: a :class:`~crosskv.methods.MethodConfig` or a registered name (default parameters).
    ``task``: a :class:`~crosskv.tasks.TaskConfig` or a task name, built with ``context`` (prompt tokens),
    ``samples``, ``seed`` and ``task_options``. Generation tasks score every sample's gold answer teacher-forced
    (``gold_loglik``, ``gold_match``) and the first ``generate_samples`` samples (all when ``None``) by greedy
    generation (``score``, exact match). A stored record with the same key is returned without running unless
    ``force``; ``store=False`` neither reads nor writes the store.
    """
    config = method if isinstance(method, MethodConfig) else make_method(method)
    return evaluate_grid(model, tokenizer, {config.name: config}, task, context, samples, seed, force, store,
                         results_dir, progress, generate_samples, **task_options)[config.name]


def evaluate_grid(model, tokenizer, methods: dict[str, MethodConfig], task: TaskConfig | str, context: int = 2048,
                  samples: int = 10, seed: int = 0, force: bool = False, store: bool = True, results_dir=None,
                  progress: bool = True, generate_samples: int | None = None,
                  **task_options: Any) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` of every configuration of ``methods`` (label → config) on one task → label → record.

    Configurations whose :attr:`~crosskv.methods.MethodConfig.plain_prefill` is true (they compress a plain
    prefill: eviction-free compositions, Single SVD / xKV non-strict, MiniCache, quantization) share one
    prefill per sample: the context runs once through the unmodified model and each configuration compresses
    its own copy (:class:`Prefill`). A configuration whose prefill departs from the model's only from some layer
    up (KVSharer and its hybrid from the first consumer: :meth:`~crosskv.methods.Runner.plain_layers`) replays
    the layers below from that prefill and runs the rest, when that saves work (:func:`_sharers`). The others
    run their own prefill. Every record is stored under its own
    key, with the same details, scores and bytes as a separate :func:`evaluate` call; its ``prefill_shared``
    says how many configurations shared each prefill (1: its own), ``seconds`` counts its own work plus its
    share of the shared prefills, and ``peak_mem_scope`` is ``"grid"`` when several configurations ran
    together (the peak then covers all of them).
    """
    _check_generate_samples(generate_samples)
    if not methods:
        raise ValueError("evaluate_grid needs at least one method configuration")
    for label, config in methods.items():
        if not isinstance(config, MethodConfig):
            raise ValueError(f"evaluate_grid: {label!r} is a {type(config).__name__}, not a MethodConfig")
    task_config = _task_config(task, context, samples, seed, task_options)
    rank, world = distributed()
    records: dict[str, dict[str, Any]] = {}
    todo: dict[str, tuple[MethodConfig, dict[str, Any], str]] = {}
    for label, config in methods.items():
        ident = _identity(model, config, task_config, generate_samples)
        key = results.run_key(ident)
        found = _existing(key, results_dir, force, world) if store else None
        if found is not None:
            log.info("skipping %s on %s: stored as %s", config.name, task_config.name, key[:12])
            records[label] = results.served(found, results.machine_name(next(model.parameters()).device.type))
        else:
            todo[label] = (config, ident, key)
    if todo:
        records.update(_run_grid(model, tokenizer, todo, task_config, generate_samples, store, results_dir, progress,
                                 rank, world))
    return {label: records[label] for label in methods}


def _sharers(plain: list[str], lower: dict[str, int], layers: int) -> list[str]:
    """The configurations that share a grid's plain prefill: every plain-prefill one and every one that replays
    its first ``lower[label]`` layers from it — when that saves work (the plain forward costs one prefill; each
    plain configuration saves one, each replaying one the fraction ``lower / layers`` of one); else none."""
    saved = len(plain) + sum(count / layers for count in lower.values())
    return [*plain, *lower] if saved > 1 else []


def _run_grid(model, tokenizer, todo: dict[str, tuple[MethodConfig, dict[str, Any], str]], task: TaskConfig,
              generate_samples: int | None, store: bool, results_dir, progress: bool, rank: int,
              world: int) -> dict[str, dict[str, Any]]:
    name = model_name(model)
    if is_random(model):
        log.warning("%s has random weights: %s scores are meaningless (speed and memory are not)", name, task.name)
    spec = task.spec
    samples_ = spec.build(task, tokenizer, range(rank, task.samples, world))
    _check_length(model, task, samples_)
    runners = {label: bind(model, tokenizer, config) for label, (config, _, _) in todo.items()}
    plain = [label for label, (config, _, _) in todo.items() if config.plain_prefill]
    lower = {label: runners[label].plain_layers() for label in todo if label not in plain}
    lower = {label: count for label, count in lower.items() if count}  # replay their first layers
    sharers = _sharers(plain, lower, len(capture.decoder_layers(model)))
    shared_by = len(sharers) if sharers else 1
    replays = any(hasattr(runners[label], "replay") for label in plain)
    outputs_of = {lower[label] - 1 for label in sharers if label in lower}
    device = next(model.parameters()).device
    peak = PeakMemory(device)
    peak.reset()
    stops = stop_ids(model, tokenizer)
    details: dict[str, list[dict]] = {label: [] for label in todo}
    seconds = dict.fromkeys(todo, 0.0)
    names = ", ".join(config.name for config, _, _ in todo.values())
    label_ = f"{names if len(todo) == 1 else f'{len(todo)} methods'} · {task.name} · {task.context}"
    for sample in progress_bar(samples_, enabled=progress and rank == 0, desc=label_, leave=False):
        placement = None
        if spec.kind == "generate":  # found once per sample, charged to every configuration in equal shares
            t0 = time.perf_counter()
            placement = gold_placement(model, tokenizer, task, sample, stops)
            for label in todo:
                seconds[label] += (time.perf_counter() - t0) / len(todo)
        shared = None
        if sharers:
            shared = plain_prefill(model, sample.context_ids, hidden=spec.kind != "generate", attention=replays,
                                   outputs_of=outputs_of)
            for label in sharers:
                seconds[label] += shared.seconds / shared_by
        with lowrank.shared_eigendecompositions() if shared is not None else contextlib.nullcontext():
            for label, runner in runners.items():
                t0 = time.perf_counter()
                share = shared if label in sharers else None
                details[label].append(_run_sample(runner, task, sample, stops, generate_samples, share, placement))
                seconds[label] += time.perf_counter() - t0  # the shared forward is counted above, once
    peak_bytes, scope = peak.read(), "grid" if len(todo) > 1 else "run"
    out = {}
    for label, (config, ident, key) in todo.items():
        merged, peak_all = _gather(details[label], peak_bytes, world)
        runner = runners[label]
        record = {"key": key, **{k: v for k, v in ident.items() if k != "task"}, "task": task.name,
                  "context": task.context, "samples": len(merged), "seed": task.seed,
                  "options": dict(task.options), **runner.record_fields(), **summarize(task, merged),
                  "generate_samples": generate_samples, "quant_storage": getattr(runner, "quant_storage", None),
                  "prefill_shared": shared_by if label in sharers else 1,
                  "peak_mem_bytes": peak_all, "peak_mem_kind": peak.kind, "peak_mem_scope": scope,
                  "method_bytes": runner.method_bytes(), "seconds": seconds[label], "device": str(device),
                  "machine": results.machine_name(device.type), "world_size": world,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  **results.environment(), "details": merged}
        if store and rank == 0:
            results.save_record(record, results_dir)
        log.info("%s on %s: score %s, kept %.3f", config.name, task.name, record["score"], record["kept"] or 0)
        out[label] = record
    return out


def evaluate_mix(model, tokenizer, method, tasks: Iterable[str] = TASK_MIX, contexts: Iterable[int] = MIX_CONTEXTS,
                 samples: int = 50, **common: Any) -> list[dict[str, Any]]:
    """:func:`evaluate` of ``method`` on every (task, context) → records, tasks outermost."""
    tasks, contexts = list(tasks), [int(c) for c in contexts]
    if not tasks or not contexts:
        raise ValueError(f"evaluate_mix needs at least one task and one context, got tasks={tasks}, contexts={contexts}")
    return [evaluate(model, tokenizer, method, task, context=context, samples=samples, **common)
            for task in tasks for context in contexts]
