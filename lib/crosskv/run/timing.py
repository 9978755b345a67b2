"""Decode timings that can be compared: one process, a warm-up, the median of repeats, shuffled order.

Every method decodes the same prompt (one ``niah_single_2`` sample of ``context`` tokens) for exactly
``new_tokens`` greedy steps (no stop token, no early stop), after one untimed warm-up run each; the
method order is shuffled per repeat (seeded) so drifting machine load does not favour one method.
:func:`crosskv.run.results.machine` states the conditions every timing table carries (CPU, threads, load).
"""
from __future__ import annotations

import random

import pandas as pd
from crosskv.run import harness
from crosskv.run.results import machine
from crosskv.methods import MethodConfig
from crosskv.tasks import make_task


def decode_timing(model, tokenizer, methods: dict[str, MethodConfig], context: int = 512, new_tokens: int = 16,
                  repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """Median prefill seconds (prefill + compression) and decode tokens/s per method label → one row per label.

    Columns: ``method``, ``prefill_s``, ``decode_tok_s`` (medians), ``decode_tok_s_min`` / ``_max`` (over
    repeats), ``repeats``, ``context``, ``new_tokens`` and the :func:`~crosskv.run.results.machine` conditions measured after
    the runs (load included).
    """
    if repeats < 3:
        raise ValueError(f"repeats={repeats}: timings need the median of at least 3 repeats")
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 (decode speed is measured after the first token)")
    config = make_task("niah_single_2", context, 1, seed, max_new_tokens=new_tokens)
    (sample,) = config.spec.build(config, tokenizer)
    runners = {label: harness.bind(model, tokenizer, method) for label, method in methods.items()}
    for runner in runners.values():  # warm-up
        harness.run_generate(runner, sample, stops=set())
    rng = random.Random(seed)
    rows = []
    for repeat in range(repeats):
        order = list(runners)
        rng.shuffle(order)
        for label in order:
            d = harness.run_generate(runners[label], sample, stops=set())
            rows.append({"method": label, "repeat": repeat, "prefill_s": d["prefill_s"] + d["compress_s"],
                         "decode_tok_s": d["decode_steps"] / d["decode_s"]})
    runs = pd.DataFrame(rows)
    out = runs.groupby("method", sort=False).agg(prefill_s=("prefill_s", "median"), decode_tok_s=("decode_tok_s", "median"),
                                                 decode_tok_s_min=("decode_tok_s", "min"),
                                                 decode_tok_s_max=("decode_tok_s", "max"), repeats=("repeat", "count"))
    out = out.reindex(list(methods)).reset_index()
    return out.assign(context=sample.prompt_tokens, new_tokens=new_tokens, **machine())
