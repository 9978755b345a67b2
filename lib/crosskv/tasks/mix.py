"""The default task mix every notebook scores methods on: retrieval tasks where the full cache is informative, as data.

A comparison of caches on a task says nothing where the full cache already sits at the floor or the ceiling. The
notebooks chart ``gold_match`` (greedy decoding reproduces the gold answer, :mod:`crosskv.run.harness`), so
:data:`TASK_MIX` (the cpu default, 2K tokens) holds RULER NIAH tasks on which the full embedded model (bf16) scores
``gold_match`` in [0.25, 0.9] (:data:`GOLD_MATCH_2K`): RULER's own templates leave it at 1.0 (one needle) or 0.0
(four values; aggregation), and its answer prefix "... is" lets the model write ": 1234567" or a bulleted list,
which a bare gold answer never reproduces. The mix's tasks are :data:`crosskv.tasks.ruler.NIAH_VARIANTS`: a uuid
value and four keys in the answer format that ends the prefix like a needle ("... is:"), two and three values as a
bulleted list. :data:`FULL_MIX` (larger models, the gpu profile) keeps RULER's templates, variable tracking and
common-words extraction.

Notebooks take ``tasks`` (names), ``contexts`` (prompt tokens) and ``samples`` as parameters whose
defaults come from here; :func:`crosskv.run.harness.evaluate_mix` runs a method on every (task, context) and
:func:`crosskv.evidence.stats.pool` averages a method's records over the mix.
"""
from __future__ import annotations


FAMILIES = {
    "niah_single_2": "single key",
    "niah_single_3_colon": "single key",
    "niah_multikey_1": "multi-key",
    "niah_multikey_1_colon": "multi-key",
    "niah_multikey_2": "multi-key",
    "niah_multikey_3": "multi-key",
    "niah_multivalue": "multi-value",
    "niah_multivalue2_list": "multi-value",
    "niah_multivalue3_list": "multi-value",
    "niah_multiquery": "multi-query",
    "vt": "variable tracking",
    "cwe": "aggregation",
    "fwe": "aggregation",
}

TASK_MIX: tuple[str, ...] = ("niah_single_3_colon", "niah_multikey_1_colon", "niah_multivalue2_list",
                             "niah_multivalue3_list")
FULL_MIX: tuple[str, ...] = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "fwe", "cwe")
MIX_CONTEXTS: tuple[int, ...] = (2048,)

# Full embedded model (SmolLM2-135M, bf16, CPU, 1 thread), seed 0, 2048 tokens, generate_samples=0: the full
# cache's gold_match — the measurement behind TASK_MIX: task (and options) -> (gold_match, samples). Samples are
# the first n of the task, so a 12-sample screen is the start of the 25-sample run.
GOLD_MATCH_2K: dict[str, tuple[float, int]] = {
    "niah_single_3_colon": (0.52, 25),
    "niah_multikey_1_colon": (0.64, 25),
    "niah_multivalue2_list": (0.40, 25),
    "niah_multivalue3_list": (0.40, 25),
    # outside [0.25, 0.9], or inside only by formatting misses
    "niah_single_2": (1.0, 25),             # ceiling (issue 29, library e0e6be22e91fcdc1)
    "niah_multikey_1": (0.33, 12),          # in band, but some correct answers are written ": 6804782"
    "niah_multivalue": (0.0, 12),           # floor: the model lists the four values as "* 2759499" bullets
    "fwe": (0.0, 25),                       # floor (issue 29)
    "niah_single_3": (0.0, 12),             # floor: the uuid is written after ":\n"
    "niah_multikey_2": (0.17, 12),
    "niah_multikey_2 answer_format=colon": (0.20, 25),
    "niah_multikey_3": (0.0, 12),
    "niah_multiquery": (0.0, 12),
    "niah_multiquery answer_format=list": (0.0, 12),
    "niah_multivalue answer_format=list": (0.17, 12),
    "niah_multikey_1 answer_format=colon keys=8": (0.33, 12),
}

# Full embedded model, string_match_all (exact match by greedy generation), seed 0, RULER's options unless noted
# — the measurement behind FULL_MIX: (task, context) -> (score, samples).
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
