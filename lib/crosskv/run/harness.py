"""Run a method on a task and measure it: scores, bytes held by the cache, time, peak memory.

Every method — crosskv's and the kvpress peers — is driven the same way (see
:mod:`crosskv.methods.base`) on the same token ids::

    runner = bind(config)                              # cached per (model, config) in this process
    with runner.applied():
        cache = runner.new_cache()
        with runner.prefill(cache): model(context)     # chat prefix + instruction + haystack
        runner.compress(cache)                         # → kv_bytes (after prefill)
        model(question)                                # question + generation prompt, appended exactly
        greedy decoding, one token per step            # → kv_bytes_end

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

import logging
import math
import resource
import time
from datetime import datetime, timezone
from typing import Any, Iterable

import torch

from crosskv.core import capture
from crosskv.core import fingerprint
from crosskv.run import results
from crosskv.cache.census import RunCensus
from crosskv.cache.storage import kv_bytes
from crosskv.methods import MethodConfig, Runner, make_method
from crosskv.core.models import is_random, model_name
from crosskv.tasks import Sample, TaskConfig, make_task
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


def feed(model, cache, ids: list[int], start: int, device, hidden: bool = False):
    """Append ``ids`` at absolute positions ``start…`` → last logits ``(vocab,)`` or all hidden states ``(T, D)``."""
    chunks = [ids[i:i + 1] for i in range(len(ids))] if uneven(cache) else [ids]
    outs, pos = [], start
    for chunk in chunks:
        kwargs = dict(input_ids=_ids(chunk, device), past_key_values=cache, use_cache=True,
                      position_ids=_positions(pos, len(chunk), device))
        if hidden:
            outs.append(capture.decoder(model)(**kwargs).last_hidden_state[0])
        else:
            outs.append(model(**kwargs, logits_to_keep=1).logits[0, -1])
        pos += len(chunk)
    return torch.cat(outs) if hidden else outs[-1]


def _prefill(runner: Runner, cache, ids: list[int], device, hidden: bool):
    """Context forward under ``runner.prefill`` then ``runner.compress`` → (output, prefill s, compress s)."""
    model = runner.model
    t0 = time.perf_counter()
    with runner.prefill(cache):
        if hidden:
            out = capture.decoder(model)(input_ids=_ids(ids, device), past_key_values=cache, use_cache=True,
                                         position_ids=_positions(0, len(ids), device))
        else:
            out = model(input_ids=_ids(ids, device), past_key_values=cache, use_cache=True,
                        position_ids=_positions(0, len(ids), device), logits_to_keep=1)
    sync(device)
    t1 = time.perf_counter()
    runner.compress(cache)
    sync(device)
    return out, t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def run_generate(runner: Runner, sample: Sample, stops: set[int], settled=None) -> dict[str, Any]:
    """Prefill the context, compress, append the question exactly, decode greedily → the sample's details.

    Decoding ends at a stop token, at ``sample.max_new_tokens``, or as soon as ``settled(prediction, sample)``
    says more tokens cannot change the score (``details["settled"]``; see :class:`~crosskv.tasks.TaskSpec`).
    """
    model, tokenizer = runner.model, runner.tokenizer
    device = next(model.parameters()).device
    with runner.applied():
        census = RunCensus(runner)
        cache = runner.new_cache()
        out, prefill_s, compress_s = _prefill(runner, cache, sample.context_ids, device, hidden=False)
        after = _bytes(model, cache, len(sample.context_ids), census)
        fed = len(sample.context_ids)
        logits = out.logits[0, -1]
        if sample.question_ids:
            logits = feed(model, cache, sample.question_ids, fed, device)
            fed += len(sample.question_ids)
        token = int(logits.argmax())
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
        decode_s = time.perf_counter() - t0
        end = _bytes(model, cache, fed, census)
    prediction = tokenizer.decode(generated, skip_special_tokens=True)
    return {"prediction": prediction, "generated_tokens": len(generated), "decode_steps": len(generated) - 1, "settled": done,
            "decode_s": decode_s, "prefill_s": prefill_s, "compress_s": compress_s, **after,
            **{f"{k}_end": v for k, v in end.items()}}


def _nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of ``targets`` (T,) from final hidden states (T, D), in chunks of logits."""
    head = model.get_output_embeddings()
    total = 0.0
    for start in range(0, len(targets), _CHUNK):
        logits = head(hidden[start:start + _CHUNK]).float()  # (chunk, vocab)
        total += float(torch.nn.functional.cross_entropy(logits, targets[start:start + _CHUNK], reduction="sum"))
    return total


@torch.no_grad()
def run_perplexity(runner: Runner, sample: Sample) -> dict[str, Any]:
    """``ppl``: NLL of the window under the method's prefill; ``ppl_cont`` (question_ids = continuation): NLL
    of the continuation fed teacher-forced through the compressed cache."""
    model = runner.model
    device = next(model.parameters()).device
    ids = torch.tensor(sample.context_ids, device=device)
    with runner.applied():
        census = RunCensus(runner)
        cache = runner.new_cache()
        out, prefill_s, compress_s = _prefill(runner, cache, sample.context_ids, device, hidden=True)
        after = _bytes(model, cache, len(sample.context_ids), census)
        hidden = out.last_hidden_state[0]  # (T, D)
        t0 = time.perf_counter()
        if not sample.question_ids:
            nll, scored = _nll(model, hidden[:-1], ids[1:]), len(ids) - 1
            fed = len(ids)
        else:
            cont = torch.tensor(sample.question_ids, device=device)
            cont_hidden = feed(model, cache, sample.question_ids, len(ids), device, hidden=True)  # (M, D)
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
    """Per-run numbers from per-sample details (score, mean bytes and their ratios, timings)."""
    spec = task.spec
    if spec.kind == "generate":
        score = _mean([d["score"] for d in details])
    else:
        score = math.exp(sum(d["nll"] for d in details) / sum(d["scored_tokens"] for d in details))
    out: dict[str, Any] = {"score": score, "metric": spec.metric, "higher_is_better": spec.higher_is_better}
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


def evaluate(model, tokenizer, method: MethodConfig | str, task: TaskConfig | str, context: int = 2048,
             samples: int = 10, seed: int = 0, force: bool = False, store: bool = True, results_dir=None,
             progress: bool = True, **task_options: Any) -> dict[str, Any]:
    """Score ``method`` on ``task`` with ``model`` and return the run's record (see :mod:`crosskv.run.results`).

    ``method``: a :class:`~crosskv.methods.MethodConfig` or a registered name (default parameters).
    ``task``: a :class:`~crosskv.tasks.TaskConfig` or a task name, built with ``context`` (prompt tokens),
    ``samples``, ``seed`` and ``task_options``. A stored record with the same key is returned without
    running unless ``force``; ``store=False`` neither reads nor writes the store.
    """
    config = method if isinstance(method, MethodConfig) else make_method(method)
    task_config = task if isinstance(task, TaskConfig) else make_task(task, context, samples, seed, **task_options)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    name = model_name(model)
    device = next(model.parameters()).device
    ident = results.identity(name, dtype, config.name, config.params(), task_config.params(),
                             model_fingerprint=fingerprint.model_fingerprint(model), device_type=device.type)
    key = results.run_key(ident)
    machine = results.machine_name(device.type)
    rank, world = distributed()
    if store:
        found = _existing(key, results_dir, force, world)
        if found is not None:
            log.info("skipping %s on %s: stored as %s", config.name, task_config.name, key[:12])
            return results.served(found, machine)
    if is_random(model):
        log.warning("%s has random weights: %s scores are meaningless (speed and memory are not)", name,
                    task_config.name)
    started = time.perf_counter()
    spec = task_config.spec
    samples_ = spec.build(task_config, tokenizer, range(rank, task_config.samples, world))
    _check_length(model, task_config, samples_)
    runner = bind(model, tokenizer, config)
    peak = PeakMemory(device)
    peak.reset()
    stops = stop_ids(model, tokenizer)
    details = []
    label = f"{config.name} · {task_config.name} · {task_config.context}"
    for sample in progress_bar(samples_, enabled=progress and rank == 0, desc=label, leave=False):
        if spec.kind == "generate":
            detail = run_generate(runner, sample, stops, spec.settled)
            detail["score"] = spec.score(detail["prediction"], sample, task_config)
            detail["answers"] = sample.answers
        else:
            detail = run_perplexity(runner, sample)
        detail.update(index=sample.index, prompt_tokens=sample.prompt_tokens,
                      context_tokens=len(sample.context_ids), info=sample.info)
        details.append(detail)
    details, peak_bytes = _gather(details, peak.read(), world)
    record = {"key": key, **{k: v for k, v in ident.items() if k != "task"}, "task": task_config.name,
              "context": task_config.context, "samples": len(details), "seed": task_config.seed,
              "options": dict(task_config.options), **runner.record_fields(), **summarize(task_config, details),
              "quant_storage": getattr(runner, "quant_storage", None), "method_bytes": runner.method_bytes(),
              "peak_mem_bytes": peak_bytes, "peak_mem_kind": peak.kind, "seconds": time.perf_counter() - started,
              "device": str(device), "machine": machine, "world_size": world,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **results.environment(), "details": details}
    if store and rank == 0:
        results.save_record(record, results_dir)
    log.info("%s on %s: score %.4g, kept %.3f", config.name, task_config.name, record["score"], record["kept"] or 0)
    return record


def evaluate_mix(model, tokenizer, method, tasks: Iterable[str] = TASK_MIX, contexts: Iterable[int] = MIX_CONTEXTS,
                 samples: int = 50, **common: Any) -> list[dict[str, Any]]:
    """:func:`evaluate` of ``method`` on every (task, context) → records, tasks outermost."""
    tasks, contexts = list(tasks), [int(c) for c in contexts]
    if not tasks or not contexts:
        raise ValueError(f"evaluate_mix needs at least one task and one context, got tasks={tasks}, contexts={contexts}")
    return [evaluate(model, tokenizer, method, task, context=context, samples=samples, **common)
            for task in tasks for context in contexts]
