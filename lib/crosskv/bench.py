"""Speed and memory benchmark: prefill seconds, decode tokens/s, KV bytes and peak memory per method.

Runs ``niah_single_2`` (short answers, ``new_tokens`` decode steps at most) through
:func:`crosskv.harness.evaluate` without the results store, for each method and context length.
kvpress peers run at ``compression_ratio=ratio``. Not a test: timings depend on the machine's load.
"""
from __future__ import annotations

import logging

from crosskv.harness import evaluate
from crosskv.methods import make_method

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("full", "kvpress:snapkv", "kvpress:pyramidkv", "kvpress:knorm", "kvpress:streaming_llm",
                   "kvpress:expected_attention")
COLUMNS = ("method", "context", "score", "prefill_s", "decode_tok_s", "kv_bytes", "kept", "peak_mem_mb")


def bench_table(model, tokenizer, contexts=(2048, 4096), methods=DEFAULT_METHODS, ratio: float = 0.5,
                samples: int = 2, new_tokens: int = 32):
    """One row per (method, context) with the columns of :data:`COLUMNS` → ``pandas.DataFrame``."""
    import pandas as pd

    rows = []
    for context in contexts:
        for name in methods:
            config = make_method(name, compression_ratio=ratio) if name.startswith("kvpress:") else make_method(name)
            record = evaluate(model, tokenizer, config, "niah_single_2", context=context, samples=samples,
                              store=False, max_new_tokens=new_tokens)
            row = {k: record[k] for k in COLUMNS if k in record}
            row["peak_mem_mb"] = record["peak_mem_bytes"] / 2 ** 20
            rows.append(row)
            log.info("bench %s", row)
    return pd.DataFrame(rows, columns=list(COLUMNS))
