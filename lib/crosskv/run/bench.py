"""Speed and memory benchmark: prefill, compress and decode time, held bytes and peak memory per method.

:func:`bench` runs each method × context × batch size the way the harness does (prefill the context
under the method, compress, append a short question exactly, then decode) but with a fixed number of
greedy decode steps (end-of-sequence ignored), so every method decodes the same number of tokens.
One process; ``warmup`` untimed rounds over all methods first; then ``repeats`` rounds, each over
all methods in an order shuffled with ``seed``; the row reports the median over the repeats. Each
row states the machine, torch threads and the load average at the start and end of the whole run.
Not a test: timings depend on the machine's load.

Decode modes (:data:`MODES`): ``eager``; ``compiled`` (``torch.compile(fullgraph=True, dynamic=True)`` on the
growing cache); ``static`` (the cache frozen after the question into a preallocated layout,
:func:`crosskv.cache.static.freeze`, stepped by ``torch.compile(mode="reduce-overhead", fullgraph=True,
dynamic=False)``: CUDA graphs on a GPU). The decode loop makes no host round-trip: its position tensors are
built before the loop and the greedy token stays on the device. ``memory_gb`` turns the bench into
throughput at fixed memory: each method runs at the largest batch that fits the budget (:func:`fit_batch`).

Contexts: a held-out window of the embedded essay corpus for real models, seeded random token ids
for ``random:`` models (their text does not matter and they may need more tokens than the corpus has).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import statistics
import time
from typing import Any

import torch

from crosskv.core.data import heldout_windows
from crosskv.core.fingerprint import code_fingerprint
from crosskv.core.capture import kv_shape
from crosskv.run.harness import PeakMemory, bind, full_cache_bytes, sync
from crosskv.run.results import git_commit, machine
from crosskv.cache.census import RunCensus
from crosskv.cache.kernels.launch import LAUNCHES
from crosskv.cache.attention import installed
from crosskv.cache.static import StaticRefused, compile_static, freeze
from crosskv.methods import MethodConfig, make_method
from crosskv.methods.base import module_bytes
from crosskv.methods.svd import XKV
from crosskv.core.models import is_random, model_name
from crosskv.core.progress import bar as progress_bar

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("full", "kvsharer:rate=0.25", "minicache", "xkv:kept=0.25,group_size=2", "svd:kept=0.25",
                   "commonkv")
MODES = ("eager", "compiled", "static")
DEFAULT_MODES = ("eager",)
GB = 2 ** 30  # bytes in the ``memory_gb`` budget's unit (GiB, as torch.cuda reports memory)
QUESTION = "\n\nIn one sentence, what is the text above about?"
COLUMNS = ("method", "mode", "context", "batch", "prefill_s", "compress_s", "decode_tok_s", "decode_vs_full",
           "rebuild_gmac", "attention_gmac", "floor_tok_s", "vs_floor", "held_bytes", "kept", "method_bytes",
           "peak_mem_mb", "peak_delta_mb", "recompiles", "memory_gb", "fit_batch", "row_mb", "repeats", "refused",
           "path", "device", "machine", "threads", "load_start", "load_end", "model", "dtype", "commit", "code")


def parse_method(spec: str | MethodConfig) -> MethodConfig:
    """``"name"`` or ``"name:key=value,key=value"`` (e.g. ``xkv:kept=0.25,group_size=2``,
    ``kvpress:snapkv:compression_ratio=0.5``) → a method config."""
    if isinstance(spec, MethodConfig):
        return spec
    name, params = spec, {}
    if "=" in spec:
        name, _, body = spec.rpartition(":")
        if not name:
            raise ValueError(f"method spec {spec!r}: expected name:key=value,…")
        for item in body.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"method spec {spec!r}: {item!r} is not key=value")
            params[key.strip()] = value.strip()
    return make_method(name, **params)


def method_label(config: MethodConfig, spec: str | MethodConfig) -> str:
    return spec if isinstance(spec, str) else config.name


def overhead(model, tokenizer, methods) -> "pandas.DataFrame":
    """``method_bytes`` of each of ``methods`` (specs or configs) bound to ``model`` → one row per method:
    ``method``, ``method_bytes``, ``method_mib`` and ``model_bytes`` (the model's own weights, for scale).

    Binding only (no forward), so a model built on the meta device (``load_model("random:llama-3.1-8b",
    device="meta")``) gives the numbers from shapes without allocating; a method that cannot bind there
    (one that must read weights or run calibration) raises, naming the method.
    """
    import pandas as pd

    weights = module_bytes([model])
    rows = []
    for spec in methods:
        config = parse_method(spec)
        try:
            runner = config.bind(model, tokenizer)
        except (NotImplementedError, RuntimeError) as err:
            raise ValueError(f"method {method_label(config, spec)!r} cannot bind to {model_name(model)} on "
                             f"{next(model.parameters()).device}: {err}") from err
        value = runner.method_bytes()
        rows.append({"method": method_label(config, spec), "method_bytes": value, "method_mib": value / 2 ** 20,
                     "model_bytes": weights})
    return pd.DataFrame(rows)


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so the RSS high-water mark of the next run starts low."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(model, tokenizer, context: int, batch: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Context ids ``(B, T)`` (the same sequence in every row) and question ids ``(B, Q)``."""
    if is_random(model):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, len(tokenizer), (1, context), generator=generator, device="cpu")  # seeded on the CPU
    else:
        ids = heldout_windows(tokenizer, n=1, length=context, seed=seed)
    question = torch.tensor([tokenizer(QUESTION, add_special_tokens=False).input_ids], device="cpu")
    return ids.expand(batch, -1).to(device), question.expand(batch, -1).to(device)


class CompileRefused(RuntimeError):
    """A method's decode step cannot run under ``torch.compile(fullgraph=True)``."""


def decode_forward(model, mode: str):
    """The callable each decode step runs: ``model`` itself (``eager``); ``compiled``:
    ``torch.compile(model, fullgraph=True, dynamic=True)``, one graph per step, no graph breaks, shapes
    symbolic so a growing cache does not recompile; ``static``: :func:`crosskv.cache.static.compile_static`
    (``mode="reduce-overhead"``, ``dynamic=False``), for a cache frozen by :func:`crosskv.cache.static.freeze`.
    Prefill and compression stay eager in every mode. Run compiled steps inside :func:`compile_settings`."""
    if mode not in MODES:
        raise ValueError(f"bench mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "static":
        return compile_static(model)
    return model if mode == "eager" else torch.compile(model, fullgraph=True, dynamic=True)


def compile_settings():
    """Dynamo settings for compiled decode: room for one graph per method and cache kind, and a
    recompile-limit hit raises instead of silently running eager."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)


def decode_step(forward, name: str, **inputs):
    """One decode forward through ``forward``; a compile failure is re-raised as :class:`CompileRefused`
    naming the method ``name``."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    try:
        return forward(**inputs)
    except (TorchDynamoException, FailOnRecompileLimitHit) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CompileRefused(f"method {name!r}: its decode step does not run under torch.compile(fullgraph=True) "
                             f"({type(err).__name__}: {first})") from err


def _positions(start: int, count: int, batch: int, device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device).unsqueeze(0).expand(batch, -1)


def step_inputs(start: int, count: int, batch: int, device, static: bool = False) -> list[dict[str, torch.Tensor]]:
    """Position inputs of ``count`` decode steps from absolute position ``start``, built before the decode loop
    so that no step waits on the host: ``position_ids`` ``(B, 1)`` and, for a static cache, ``cache_position``
    ``(1,)`` (long, on ``device``; filled on the device from host integers, no copy)."""
    steps = []
    for position in range(start, start + count):
        inputs = {"position_ids": torch.full((batch, 1), position, dtype=torch.long, device=device)}
        if static:
            inputs["cache_position"] = torch.full((1,), position, dtype=torch.long, device=device)
        steps.append(inputs)
    return steps


def graphs_compiled() -> int:
    """Frames dynamo has compiled in this process so far (``counters["stats"]["unique_graphs"]``)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def greedy_steps(forward, name: str, cache, token: torch.Tensor, steps: list[dict]) -> torch.Tensor:
    """Greedy decode steps from ``token`` ``(B, 1)``, one per entry of ``steps`` (:func:`step_inputs`), through
    ``forward`` → the last token ``(B, 1)``. No host round-trip: the token stays on the device."""
    for inputs in steps:
        out = decode_step(forward, name, input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1,
                          **inputs)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return token


@torch.no_grad()
def measure(runner, context_ids: torch.Tensor, question_ids: torch.Tensor, decode_tokens: int,
            forward=None, static: bool = False) -> dict[str, Any]:
    """One run: prefill, compress, question, ``decode_tokens`` greedy steps through ``forward`` (default: the
    model, eager; see :func:`decode_forward`) → timings, bytes (``held_bytes`` for ``held_tokens`` tokens), peak
    memory and ``recompiles`` (frames dynamo compiled during the decode steps; None for the eager model).

    ``static``: the cache is frozen after the question (:func:`crosskv.cache.static.freeze`, room for
    ``decode_tokens`` + 1 rows: one untimed step first, so CUDA graphs are recorded for the run's new buffers
    before the clock starts) and the source cache dropped, so ``held_bytes`` is what the frozen cache holds (its
    prefix and buffers) instead of the cache right after compression; raises
    :class:`crosskv.cache.static.StaticRefused` for a cache kind without a static layout."""
    model = runner.model
    forward = model if forward is None else forward
    device = context_ids.device
    batch, context = context_ids.shape
    if device.type == "cpu":
        _release_freed_memory()
    peak = PeakMemory(device)
    start_bytes = _resident(device)
    peak.reset()
    with runner.applied():
        census = RunCensus(runner)  # before the cache exists: the runner's per-model state is not held by the run
        cache = runner.new_cache()
        t0 = time.perf_counter()
        with runner.prefill(cache):
            model(input_ids=context_ids, past_key_values=cache, use_cache=True,
                  position_ids=_positions(0, context, batch, device), logits_to_keep=1)
        sync(device)
        t1 = time.perf_counter()
        runner.compress(cache)
        sync(device)
        t2 = time.perf_counter()
        held, held_tokens = census.held(cache), context
        fed = context + question_ids.shape[1]
        logits = model(input_ids=question_ids, past_key_values=cache, use_cache=True,
                       position_ids=_positions(context, question_ids.shape[1], batch, device), logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        warm = 1 if static else 0  # a static run's first step is untimed: CUDA graphs record for its new buffers
        if static:
            cache = freeze(cache, decode_tokens + warm, fed)  # the source dropped: the census sees the static one
            held, held_tokens = census.held(cache), fed + decode_tokens + warm
        steps = step_inputs(fed, decode_tokens + warm, batch, device, static)
        with installed(model) if static else contextlib.nullcontext():  # a static cache is read by crosskv attention
            token = greedy_steps(forward, runner.config.name, cache, token, steps[:warm])
            sync(device)
            t3 = time.perf_counter()
            LAUNCHES.clear()
            graphs = graphs_compiled()
            greedy_steps(forward, runner.config.name, cache, token, steps[warm:])
            sync(device)
            t4 = time.perf_counter()
        recompiles = None if forward is model else graphs_compiled() - graphs
    peak_bytes = peak.read()
    return {"prefill_s": t1 - t0, "compress_s": t2 - t1,
            "decode_tok_s": batch * decode_tokens / (t4 - t3) if decode_tokens else None,
            "held_bytes": held, "held_tokens": held_tokens, "peak_mem_mb": peak_bytes / 2 ** 20, "path": decode_path(),
            "peak_delta_mb": (peak_bytes - start_bytes) / 2 ** 20, "recompiles": recompiles}


def attention_macs(model, context: int, batch: int) -> int:
    """Multiply-adds of a plain cache's attention per decode step: q·Kᵀ and P·V over T tokens, all layers."""
    shape = kv_shape(model)
    return 2 * batch * shape.layers * shape.heads * context * shape.head_dim


def rebuild_gemms(config: MethodConfig, model, context: int) -> list[tuple[int, int, int]]:
    """The key-rebuild GEMMs of one decode step of an xKV/SVD cache: ``(T_c, r_k, H_kv·d)`` per layer.

    An exact low-rank key cache must rebuild ``K = basis·factor`` every step (RoPE differs per position,
    so the up-projection cannot be absorbed into the query): ``T_c·r_k·H_kv·d`` multiply-adds per layer.
    Empty for other methods and for xKV's ``reconstruct`` path (it rebuilds V too).
    """
    if not isinstance(config, XKV) or config.attention != "factored":
        return []
    shape = kv_shape(model)
    gemms = []
    for plan in config.plan(shape, context):
        rank_k, _ = plan.effective(context)
        gemms += [(context, rank_k, shape.width)] * len(plan.layers)
    return gemms


def gemm_seconds(gemms: list[tuple[int, int, int]], batch: int, device, dtype, repeats: int = 5) -> float:
    """Median seconds of running ``gemms`` ``(T, r, W)`` as ``factorᵀ·basisᵀ`` once each, on random data."""
    operands = {}
    for t, r, w in set(gemms):
        operands[(t, r, w)] = (torch.randn(batch, t, r, device=device, dtype=dtype),
                               torch.randn(batch, r, w, device=device, dtype=dtype))
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for key in gemms:
            basis, factor = operands[key]
            factor.transpose(1, 2) @ basis.transpose(1, 2)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def decode_path() -> str:
    """The attention path the decode steps just measured took: the Triton kernels launched
    (:data:`crosskv.cache.kernels.launch.LAUNCHES`), or ``"eager"`` when none was."""
    return ", ".join(f"triton {name}" for name in sorted(LAUNCHES)) or "eager"


def fit_batch(budget_bytes: float, fixed_bytes: float, row_bytes: float) -> int:
    """The largest batch B with ``fixed_bytes + B · row_bytes ≤ budget_bytes`` (0 when not even one row fits)."""
    if row_bytes <= 0:
        raise ValueError(f"row_bytes={row_bytes}: a batch row must cost memory")
    return max(0, int((budget_bytes - fixed_bytes) // row_bytes))


def _fit(runner, label: str, context_ids: torch.Tensor, question_ids: torch.Tensor, decode_tokens: int,
         memory_gb: float) -> tuple[int, float, str | None]:
    """The batch ``runner`` runs at within ``memory_gb`` → (fit batch, bytes of one row, why it does not fit or
    None), by the rule of :func:`bench` from an eager batch-1 run (after one untimed run of the same, which warms
    the allocator)."""
    for _ in range(2):
        probe = measure(runner, context_ids[:1], question_ids[:1], decode_tokens)
    row = max(probe["held_bytes"], probe["peak_delta_mb"] * 2 ** 20)
    fixed = module_bytes([runner.model]) + runner.method_bytes()
    batch = fit_batch(memory_gb * GB, fixed, row)
    log.info("bench %s: weights + method %.4g GB, one row %.4g GB → batch %d in %s GB", label, fixed / GB,
             row / GB, batch, memory_gb)
    if batch >= 1:
        return batch, row, None
    return 0, row, (f"method {label!r}: batch 1 needs {(fixed + row) / GB:.4g} GB (weights + method "
                    f"{fixed / GB:.4g} GB, one row {row / GB:.4g} GB), more than memory_gb={memory_gb}")


def _batch_refusal(label: str, batch: int, err: Exception) -> str:
    """Why ``label`` did not run at ``batch`` (out of memory, or a method refusing the batch), in one line."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"method {label!r} at batch {batch}: {type(err).__name__}: {first}"


def _timed_runs(runners, forwards, refused, inputs, batches, modes, repeats, warmup, decode_tokens, seed,
                context) -> tuple[dict[tuple[str, str], list[dict]], dict[tuple[str, str], str]]:
    """``warmup + repeats`` shuffled rounds over (method, mode) at one context, each method at ``batches[label]``
    (``inputs(batch)`` gives its ids) → (timed results per (label, mode), refusals at this context and batch).

    A compile or static-layout refusal is the method's own and is added to ``refused`` (kept for every context);
    running out of memory, or a ``ValueError`` at a batch above 1 (a method refusing the batch), is recorded for
    this context only. Methods without a batch (``batches[label] == 0``, they do not fit) are skipped."""
    runs: dict[tuple[str, str], list[dict]] = {(label, mode): [] for label in runners for mode in modes}
    here: dict[tuple[str, str], str] = {}
    for round_ in range(warmup + repeats):
        order = list(runs)
        random.Random(seed * 1000 + round_).shuffle(order)
        for label, mode in order:
            batch = batches[label]
            if (label, mode) in refused or (label, mode) in here or batch == 0:
                continue
            try:
                result = measure(runners[label], *inputs(batch), decode_tokens, forwards[label, mode],
                                 static=mode == "static")
            except CompileRefused as err:
                refused[label, mode] = str(err)
                log.warning("bench %s: %s", label, err)
                continue
            except StaticRefused as err:
                refused[label, mode] = f"method {label!r}: {err}"
                log.warning("bench %s", refused[label, mode])
                continue
            except (torch.OutOfMemoryError, ValueError) as err:
                if batch == 1 and not isinstance(err, torch.OutOfMemoryError):
                    raise
                here[label, mode] = _batch_refusal(label, batch, err)
                log.warning("bench %s", here[label, mode])
                continue
            if round_ >= warmup:
                runs[label, mode].append(result)
            log.info("bench %s %s T=%d B=%d round %d: %s", label, mode, context, batch, round_, result)
    return runs, here


def _row(model, label: str, config, runner, mode: str, context: int, batch: int, results: list[dict],
         refusal: str | None, device) -> dict:
    """One row of :func:`bench` from the timed ``results`` of (method, mode, context, batch), before the
    columns derived across rows."""
    row = {"method": label, "mode": mode, "context": context, "batch": batch, "repeats": len(results),
           "refused": refusal, "path": results[0]["path"] if results else None}
    for key in ("prefill_s", "compress_s", "decode_tok_s", "held_bytes", "peak_mem_mb", "peak_delta_mb"):
        row[key] = _median([r[key] for r in results])
    recompiles = [r["recompiles"] for r in results if r["recompiles"] is not None]
    row["recompiles"] = max(recompiles) if recompiles else None
    tokens = results[0]["held_tokens"] if results else context
    row["kept"] = row["held_bytes"] / full_cache_bytes(model, tokens, batch) if row["held_bytes"] is not None else None
    row["method_bytes"] = runner.method_bytes()
    row["attention_gmac"] = attention_macs(model, context, batch) / 1e9
    gemms = rebuild_gemms(config, model, context)
    row["rebuild_gmac"] = batch * sum(t * r * w for t, r, w in gemms) / 1e9 if gemms else None
    row["rebuild_s"] = gemm_seconds(gemms, batch, device, next(model.parameters()).dtype) if gemms else None
    return row


def _rows(model, tokenizer, configs, runners, forwards, refused, jobs, modes, repeats, warmup, decode_tokens, seed,
          progress, device, memory_gb=None) -> list[dict]:
    """The measured rows of :func:`bench` (one per method, mode, context and batch, or per method, mode and context
    at the batch that fits ``memory_gb``), before the columns derived across rows."""
    rows = []
    for context, batch in progress_bar(jobs, enabled=progress, desc="bench", leave=False):
        ids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            if size not in ids:
                ids[size] = _inputs(model, tokenizer, context, size, seed, device)
            return ids[size]

        fits, rows_bytes, misfits = {}, {}, {}
        if memory_gb is None:
            batches = {label: batch for label in runners}
        else:
            for label in runners:
                fits[label], rows_bytes[label], misfits[label] = _fit(runners[label], label, *inputs(1),
                                                                      decode_tokens, memory_gb)
            batches = dict(fits)
        runs, here = _timed_runs(runners, forwards, refused, inputs, batches, modes, repeats, warmup, decode_tokens,
                                 seed, context)
        for (label, mode), results in runs.items():
            refusal = refused.get((label, mode)) or misfits.get(label) or here.get((label, mode))
            row = _row(model, label, dict(configs)[label], runners[label], mode, context, batches[label] or 1,
                       results, refusal, device)
            row["memory_gb"], row["fit_batch"] = memory_gb, fits.get(label)
            row["row_mb"] = rows_bytes[label] / 2 ** 20 if label in rows_bytes else None
            rows.append(row)
    return rows


def bench(model, tokenizer, methods=DEFAULT_METHODS, contexts=(2048, 4096), batch_sizes=(1,), repeats: int = 3,
          warmup: int = 1, decode_tokens: int = 32, seed: int = 0, modes=DEFAULT_MODES, progress: bool = True,
          memory_gb: float | None = None):
    """Benchmark ``methods`` (names, ``name:key=value,…`` specs or configs) → ``pandas.DataFrame``.

    One row per (method, mode, context, batch), medians over ``repeats`` timed runs after ``warmup``
    untimed rounds; within each round the method order is shuffled (seeded by ``seed`` and the round).

    **Throughput at fixed memory** (``memory_gb`` given; ``batch_sizes`` must stay ``(1,)``): per method and
    context, one eager batch-1 run (after an untimed one) gives the bytes of one batch row,
    ``row = max(held_bytes, peak_delta)``, taken to scale linearly in B (cache, activations and temporaries all
    grow with the batch; an estimate: the row at B reports its measured ``peak_delta_mb`` beside it);
    the method then runs at the largest B with ``weights + method_bytes + B · row ≤ memory_gb`` GiB
    (:func:`fit_batch`). A method whose batch 1 does not fit, that runs out of memory, or that refuses the batch
    (a ``ValueError`` at B > 1; the bench's rows are identical, so the batch refusals of
    :mod:`crosskv.cache.batch` pass) is listed in ``refused``. On CPU, peak memory is the process RSS: a rehearsal
    of the GPU measurement, not a result.

    Columns:

    - ``method``: the spec as given; ``mode``: ``eager`` (the model's own forward), ``compiled`` (decode
      steps through ``torch.compile(fullgraph=True, dynamic=True)`` on the growing cache) or ``static`` (the
      cache frozen after the question into a preallocated layout with room for ``decode_tokens`` rows,
      steps through ``torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)``); both compiled
      during the warm-up round (:func:`decode_forward`); ``refused``: why a method's decode does not compile
      or has no static layout, or does not fit ``memory_gb`` or refuses its batch (its row then has no timings),
      else empty;
    - ``context`` T (prompt tokens compressed), ``batch`` B (the same sequence in every row; with ``memory_gb``
      the batch measured, 1 for a method that does not fit);
    - ``prefill_s``: the context forward (including work a method does inside it), seconds;
    - ``compress_s``: the method's post-prefill compression, seconds;
    - ``decode_tok_s``: B × ``decode_tokens`` / seconds of the greedy decode steps after the question;
    - ``decode_vs_full``: ``decode_tok_s`` / that of ``full`` at the same (mode, context, batch) in this run
      (empty when ``full`` is not among the methods); with ``memory_gb``, at the same (mode, context) and
      budget, each at its own batch: the throughput ratio at fixed memory;
    - ``rebuild_gmac``: for xKV/SVD (factored), the multiply-adds of rebuilding the prefix keys per decode
      step, Σ_layers B·T_c·r_k·H_kv·d — the arithmetic floor of an exact low-rank key cache;
      ``attention_gmac``: a plain cache's attention multiply-adds per step (2·B·L·Hq·T·d), for scale;
    - ``floor_tok_s``: B / (B / full's decode_tok_s + seconds of those rebuild GEMMs alone, timed here on
      random data): the decode speed if the rest of the step cost what full's whole step costs (empty when
      full ran at another batch);
      ``vs_floor`` = decode_tok_s / floor_tok_s (≥ 1 means at or above that floor);
    - ``held_bytes``: bytes the cache (and the runner beside it) holds right after compression, found by the
      memory census (:class:`crosskv.cache.census.RunCensus`: every storage reachable, whole, model weights out);
      in ``static`` mode what the frozen cache holds after the question (its prefix and the preallocated rows);
      ``kept``: held_bytes / a plain cache of the same tokens (2·L·B·H_kv·T·d·element size; T the context, in
      ``static`` mode the context, question and ``decode_tokens`` rows);
      ``method_bytes``: what the method adds to the model while installed, minus weights it lets a
      deployment drop (:meth:`crosskv.methods.base.Runner.method_bytes`; once per model, not per token);
    - ``peak_mem_mb``: peak during the run — CUDA max allocated, or on CPU the process RSS high-water mark
      (model weights included); ``peak_delta_mb``: that peak minus what was resident at the run's start
      (the run's own working set: activations, cache, SVD buffers);
    - ``recompiles``: frames dynamo compiled during the timed decode steps of a run (after the warm-up round;
      the ``unique_graphs`` counter of ``torch._dynamo``), the most over the repeats: 0 when a compiled decode
      reuses its graphs every step; empty in ``eager`` mode;
    - ``memory_gb``: the budget in GiB (2³⁰ bytes), ``fit_batch``: the largest batch that fits it by the rule
      above (0: not even one row) and ``row_mb``: the rule's bytes of one row (MiB; compare B · row_mb with the
      ``peak_delta_mb`` measured at B), all empty without ``memory_gb``;
    - ``repeats``; ``device``, ``machine`` (host, processor, cores or GPU name), ``threads`` (torch
      threads), ``load_start``/``load_end`` (1-minute load average at the start and end of the whole
      benchmark), ``model``, ``dtype``;
    - ``commit`` (the project's git commit, ``+dirty`` when tracked files changed) and ``code`` (the library's
      :func:`~crosskv.core.fingerprint.code_fingerprint`): what produced the numbers.
    """
    import pandas as pd

    modes = list(dict.fromkeys(modes))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"bench mode(s) {unknown} not available; implemented: {', '.join(MODES)}")
    compiling = [m for m in modes if m != "eager"]
    if compiling and warmup < 1:
        raise ValueError(f"warmup={warmup}: the {' and '.join(compiling)} mode compiles during a warm-up round; "
                         "use warmup ≥ 1")
    if memory_gb is not None and (memory_gb <= 0 or tuple(batch_sizes) != (1,)):
        raise ValueError(f"memory_gb={memory_gb} must be > 0 and picks each method's batch: leave batch_sizes "
                         f"(given {tuple(batch_sizes)}) at (1,)")
    if "static" in modes and decode_tokens < 1:
        raise ValueError(f"decode_tokens={decode_tokens}: the static mode preallocates room for the decode steps; "
                         "use decode_tokens ≥ 1")
    if repeats < 1 or warmup < 0 or decode_tokens < 0:
        raise ValueError(f"repeats={repeats} must be ≥ 1, warmup={warmup} and decode_tokens={decode_tokens} ≥ 0")
    configs = [(method_label(parse_method(m), m), parse_method(m)) for m in methods]
    labels = [label for label, _ in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods {labels} repeat a label")
    device = next(model.parameters()).device
    start = machine()
    runners = {label: bind(model, tokenizer, config) for label, config in configs}
    forwards = {(label, mode): decode_forward(model, mode) for label in labels for mode in modes}
    refused: dict[tuple[str, str], str] = {}
    jobs = [(c, b) for c in contexts for b in batch_sizes]
    with compile_settings():
        rows = _rows(model, tokenizer, configs, runners, forwards, refused, jobs, modes, repeats, warmup,
                     decode_tokens, seed, progress, device, memory_gb)
    end = machine()
    table = pd.DataFrame(rows)
    full = table[table["method"] == "full"]
    same_batch = full.set_index(["mode", "context", "batch"])["decode_tok_s"]
    same_budget = full.set_index(["mode", "context"])["decode_tok_s"] if memory_gb is not None else same_batch
    compared = [same_budget.get((r.mode, r.context) if memory_gb is not None else (r.mode, r.context, r.batch))
                for r in table.itertuples()]
    table["decode_vs_full"] = [r.decode_tok_s / ref if ref and r.decode_tok_s else None
                               for r, ref in zip(table.itertuples(), compared)]
    reference = [same_batch.get((r.mode, r.context, r.batch)) for r in table.itertuples()]
    table["floor_tok_s"] = [r.batch / (r.batch / ref + r.rebuild_s) if ref and r.rebuild_s and r.decode_tok_s else None
                            for r, ref in zip(table.itertuples(), reference)]
    table["vs_floor"] = [r.decode_tok_s / r.floor_tok_s if r.floor_tok_s else None for r in table.itertuples()]
    table[["recompiles", "fit_batch"]] = table[["recompiles", "fit_batch"]].astype("Int64")  # counts, or empty
    table["device"] = str(device)
    where = f"cuda: {start['gpu']}" if start["gpu"] else f"cpu: {start['cpu']}, {start['cores']} cores"
    table["machine"] = f"{start['host']} · {where}"
    table["threads"] = start["threads"]
    table["load_start"], table["load_end"] = start["load_1min"], end["load_1min"]
    table["model"] = model_name(model)
    table["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    table["commit"], table["code"] = git_commit(), code_fingerprint()
    return table[list(COLUMNS)]

