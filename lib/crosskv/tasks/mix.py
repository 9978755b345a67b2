"""The default task mix every notebook scores methods on: one RULER task per family, as data.

A single needle (``niah_single_2``) is at ceiling for the embedded model already at 2K tokens, so it
cannot separate compression methods alone. The mix adds the families RULER uses to make retrieval
harder — several keys, several values, variable tracking and aggregation — where the full embedded
model (bf16) is neither at ceiling nor at floor. Measured (:data:`MEASURED`): variable tracking is at
the floor on the embedded model at 1K and 2K for 1, 2 and 4 hops (it repeats the noise), so it cannot
separate methods there; :data:`TASK_MIX` (the cpu default) leaves it out and :data:`FULL_MIX` (larger
models, the gpu profile) keeps it, with common-words extraction.

Notebooks take ``tasks`` (names), ``contexts`` (prompt tokens) and ``samples`` as parameters whose
defaults come from here; :func:`crosskv.run.harness.evaluate_mix` runs a method on every (task, context) and
:func:`crosskv.evidence.stats.pool` averages a method's records over the mix.
"""
from __future__ import annotations


FAMILIES = {
    "niah_single_2": "single key",
    "niah_multikey_1": "multi-key",
    "niah_multikey_2": "multi-key",
    "niah_multikey_3": "multi-key",
    "niah_multivalue": "multi-value",
    "niah_multiquery": "multi-query",
    "vt": "variable tracking",
    "cwe": "aggregation",
    "fwe": "aggregation",
}

TASK_MIX: tuple[str, ...] = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "fwe")
FULL_MIX: tuple[str, ...] = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "fwe", "cwe")
MIX_CONTEXTS: tuple[int, ...] = (1024,)

# Full embedded model (SmolLM2-135M, bf16, CPU, 1 thread), string_match_all, seed 0, RULER default options
# unless noted — the measurement behind TASK_MIX: (task, context) -> (score, samples).
MEASURED: dict[tuple[str, int], tuple[float, int]] = {
    ("niah_single_2", 2048): (1.0, 20),
    ("niah_single_2", 1024): (1.0, 10),
    ("niah_multikey_1", 1024): (0.6, 10),
    ("niah_multivalue", 1024): (0.825, 10),
    ("niah_multikey_1", 2048): (0.6, 10),
    ("fwe", 1024): (0.233, 10),
    ("vt", 1024): (0.0, 10),          # hops = 4; also 0.0 with hops = 1 and hops = 2 (10 samples each)
    ("vt", 2048): (0.02, 10),
}


def family(task: str) -> str:
    """The family of a mix task (``"other"`` for tasks outside :data:`FAMILIES`)."""
    return FAMILIES.get(task, "other")
