"""RULER synthetic tasks generated offline on the essay haystack: NIAH ×8, variable tracking, CWE, FWE.

Templates, needle format, answer prefixes, generation lengths and scoring (``string_match_all``)
follow RULER (Hsieh et al., 2024). Differences, all deliberate:

- ``context`` is the prompt length in tokens (chat template included; RULER instead reserves the
  generation budget inside ``max_seq_length``). Prompts land within 0.5% of it.
- Keys are ``word-word`` pairs from the essays' vocabulary (RULER: wonderwords adjective-noun).
- Essays are split into sentences with a regular expression (RULER: nltk ``sent_tokenize``).
- Needles sit at depths drawn from RULER's 40-point grid without replacement, or all at the option
  ``depth`` (percent); the noise and needle haystacks use the same grid (RULER: uniform indices).
- CWE lowers ``freq_cw`` when the common words would take over half the prompt (short contexts);
  FWE's coded words are random lowercase strings; vt, cwe and fwe carry one in-context example.
- NIAH answers list each query's values in the order the text holds them (RULER: the order drawn; its string
  match ignores the order, the gold-answer metrics do not). NIAH options beyond RULER's: ``keys`` and ``values``
  (needle counts), ``answer_format`` (:data:`ANSWER_FORMATS`); :data:`NIAH_VARIANTS` name RULER tasks with
  other defaults (the task mix's, :mod:`crosskv.tasks.mix`).

Each sample is generated from ``random.Random(f"{task}:{seed}:{index}")`` (a variant: its base task's), so any
sample can be rebuilt alone (ranks of a distributed run build only their share).
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re
import uuid
from dataclasses import dataclass
from typing import Callable

from crosskv.core import data
from crosskv.tasks.base import Sample, TaskConfig, TaskSpec, chat_prompt, register_task
from crosskv.tasks.scoring import string_match_all

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER's grid: 40 depths from 0 to 100 percent

NIAH_INSTRUCTION = ("Some special magic {type_needle_v} are hidden within the following text. "
                    "Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n")
NIAH_QUESTION = "\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, "
             "{num_v} variables are assigned the value {query}, they are: ")
CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the {num_cw} most common words in the above list?"
CWE_ANSWER = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. "
                   "Find the three most frequently appeared coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# NIAH option answer_format -> (text after RULER's answer prefix, separator of the values in the gold answer):
# "ruler" (RULER's prefix, values joined by ", "); "colon" (the prefix ends like a needle, "... is:"); "list" (a
# bulleted list, the form the embedded model writes several values in)
ANSWER_FORMATS = {"ruler": ("", ", "), "colon": (":", ", "), "list": (":\n\n*", "\n* ")}


@dataclass(frozen=True)
class NiahSetup:
    """One NIAH variant (RULER's synthetic.yaml): haystack kind, key/value types and needle counts."""

    haystack: str  # "noise" | "essay" | "needle"
    key_type: str  # "words" | "uuids"
    value_type: str  # "numbers" | "uuids"
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH_TASKS = {
    "niah_single_1": NiahSetup("noise", "words", "numbers"),
    "niah_single_2": NiahSetup("essay", "words", "numbers"),
    "niah_single_3": NiahSetup("essay", "words", "uuids"),
    "niah_multikey_1": NiahSetup("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahSetup("needle", "words", "numbers"),
    "niah_multikey_3": NiahSetup("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSetup("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahSetup("essay", "words", "numbers", keys=4, queries=4),
}
# crosskv's variants (the task mix, crosskv.tasks.mix): name -> (the RULER task whose samples it builds, with these
# option defaults). RULER's tasks in the answer format the embedded model writes, so that greedy reproduction of the
# gold answer measures retrieval rather than formatting; make_task(variant) builds exactly the samples of
# make_task(task, **defaults).
NIAH_VARIANTS = {
    "niah_single_3_colon": ("niah_single_3", {"answer_format": "colon"}),
    "niah_multikey_1_colon": ("niah_multikey_1", {"answer_format": "colon"}),
    "niah_multivalue2_list": ("niah_multivalue", {"values": 2, "answer_format": "list"}),
    "niah_multivalue3_list": ("niah_multivalue", {"values": 3, "answer_format": "list"}),
}


# --- random material -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lower-case alphabetic words of 4-10 letters from the essays, sorted."""
    words = set(re.findall(r"\b[a-z]{4,10}\b", " ".join(data.essays())))
    return tuple(sorted(words))


def random_item(rng: random.Random, kind: str) -> str:
    if kind == "words":
        vocab = vocabulary()
        return f"{rng.choice(vocab)}-{rng.choice(vocab)}"
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown item kind {kind!r}")


def sample_rng(config: TaskConfig, index: int) -> random.Random:
    return random.Random(f"{config.name}:{config.seed}:{index}")


# --- length control --------------------------------------------------------------------------------

def fit_length(render: Callable[[int], tuple[list[int], list[int], dict]], target: int, size: int,
               what: str) -> tuple[list[int], list[int], dict]:
    """Find the filler ``size`` whose rendered prompt has ``target`` tokens (secant steps on size → tokens).

    ``render(size)`` → (context_ids, question_ids, info); token count grows with ``size``. Starts from
    ``size = 0`` (the fixed overhead) and the guess ``size``; returns the closest prompt found, stopping
    within max(2, 0.5%) tokens of ``target``.
    """
    tolerance = max(2, int(0.005 * target))
    tried: dict[int, tuple[int, tuple]] = {}

    def run(s: int) -> int:
        out = render(s)
        tried[s] = (len(out[0]) + len(out[1]), out)
        return tried[s][0]

    if run(0) > target + tolerance:
        raise ValueError(f"{what}: context={target} tokens is too short for the prompt itself ({tried[0][0]} tokens)")
    size = max(size, 1)
    for _ in range(12):
        if size in tried or abs(run(size) - target) <= tolerance:
            break
        below = max((s for s in tried if tried[s][0] < target), default=None)
        above = min((s for s in tried if tried[s][0] > target), default=None)
        if below is not None and above is not None:
            if above - below <= 1:
                break
            n_lo, n_hi = tried[below][0], tried[above][0]
            step = round((target - n_lo) * (above - below) / max(n_hi - n_lo, 1))
            size = below + min(max(step, 1), above - below - 1)
        else:
            rate = (tried[size][0] - tried[0][0]) / size
            size = max(1, size + round((target - tried[size][0]) / max(rate, 1e-3)))
    best = min(tried, key=lambda s: abs(tried[s][0] - target))
    return tried[best][1]


def insert_at_depths(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert ``needles[i]`` before unit ``int(len(units) * depths[i] / 100)`` (stable for equal depths)."""
    slots = sorted(range(len(needles)), key=lambda i: (int(len(units) * depths[i] / 100), i))
    out, cursor = [], 0
    for i in slots:
        pos = int(len(units) * depths[i] / 100)
        out.extend(units[cursor:pos])
        out.append(needles[i])
        cursor = pos
    out.extend(units[cursor:])
    return out


class Filler:
    """Haystack material for one sample: ``units(budget)`` → sentences totalling about ``budget`` tokens."""

    def __init__(self, tokenizer, kind: str, rng: random.Random, max_tokens: int, item_kinds=("words", "numbers"),
                 type_needle_v: str = "numbers"):
        self.tokenizer = tokenizer
        self.kind = kind
        self.separator = " " if kind == "essay" else "\n"
        if kind == "essay":
            text = data.heldout_text(tokenizer, max_tokens, seed=rng.randrange(2 ** 31))
        elif kind == "noise":
            text = "\n".join([NOISE] * (max_tokens // 20 + 2))
        elif kind == "needle":
            text = "\n".join(NEEDLE.format(type_needle_v=type_needle_v, key=random_item(rng, item_kinds[0]),
                                           value=random_item(rng, item_kinds[1]))
                             for _ in range(max_tokens // 15 + 2))
        else:
            raise ValueError(f"unknown haystack {kind!r}")
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def units(self, budget: int) -> list[str]:
        text = self.tokenizer.decode(self.ids[:max(budget, 0)]).strip()
        if not text:
            return []
        parts = SENTENCE_END.split(text) if self.kind == "essay" else text.split("\n")
        return [p for p in parts if p.strip()]


def needle_positions(haystack: str, needles: list[str]) -> list[float]:
    """Fraction of the haystack's characters before each needle (the realised depth, 0..1)."""
    return [haystack.index(n) / max(len(haystack), 1) for n in needles]


# --- NIAH ------------------------------------------------------------------------------------------

def _singular(template: str, single: bool) -> str:
    if not single:
        return template
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def niah_counts(config: TaskConfig, setup: NiahSetup) -> tuple[int, int]:
    """(keys, values per key) of a NIAH sample: the variant's, or the options ``keys`` / ``values`` when set."""
    keys, values = config.option("keys"), config.option("values")
    keys = max(setup.keys, setup.queries) if keys is None else keys
    values = setup.values if values is None else values
    if keys < setup.queries:
        raise ValueError(f"{config.name}: keys={keys} is fewer than its {setup.queries} queried key(s)")
    if values < 1:
        raise ValueError(f"{config.name}: values={values} must be at least 1")
    if keys * values > len(DEPTHS):
        raise ValueError(f"{config.name}: keys={keys} x values={values} needles exceed the {len(DEPTHS)} depths")
    return keys, values


def build_niah(config: TaskConfig, tokenizer, index: int) -> Sample:
    base = NIAH_VARIANTS[config.name][0] if config.name in NIAH_VARIANTS else config.name
    setup = NIAH_TASKS[base]
    answer_format = config.option("answer_format")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"{config.name}: answer_format={answer_format!r} is not one of {', '.join(ANSWER_FORMATS)}")
    n_keys, n_values = niah_counts(config, setup)
    rng = sample_rng(dataclasses.replace(config, name=base), index)  # a variant draws its base task's samples
    keys = [random_item(rng, setup.key_type) for _ in range(n_keys)]
    values = {k: [random_item(rng, setup.value_type) for _ in range(n_values)] for k in keys}
    needle = {(k, v): NEEDLE.format(type_needle_v=setup.value_type, key=k, value=v) for k in keys for v in values[k]}
    needles = list(needle.values())
    rng.shuffle(needles)
    depth = config.option("depth")
    depths = [float(depth)] * len(needles) if depth is not None else [float(d) for d in rng.sample(DEPTHS, len(needles))]
    queries = rng.sample(keys, setup.queries)
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    single = setup.queries * n_values == 1
    type_v = setup.value_type[:-1] if single else setup.value_type
    instruction = _singular(NIAH_INSTRUCTION, single).format(type_needle_v=type_v)
    question = _singular(NIAH_QUESTION, single).format(type_needle_v=type_v, query=query)
    answer_prefix = _singular(NIAH_ANSWER, single).format(type_needle_v=type_v, query=query)
    answer_prefix += ANSWER_FORMATS[answer_format][0]
    filler = Filler(tokenizer, setup.haystack, rng, config.context + 64, (setup.key_type, setup.value_type),
                    setup.value_type)

    def render(budget: int):
        haystack = filler.separator.join(insert_at_depths(filler.units(budget), needles, depths))
        ctx, q = chat_prompt(tokenizer, instruction + haystack, question, answer_prefix)
        return ctx, q, {"needles": needles, "depths": depths, "positions": needle_positions(haystack, needles),
                        "haystack": setup.haystack, "gold_separator": ANSWER_FORMATS[answer_format][1]}

    ctx, q, info = fit_length(render, config.context, config.context - 150, config.name)
    position = dict(zip(needles, info["positions"]))
    # the answers query by query (the question's order), each query's values in the order the text holds them
    answers = [v for k in queries for v in sorted(values[k], key=lambda v: position[needle[k, v]])]
    return Sample(index, ctx, q, answers, config.option("max_new_tokens"), info)


# --- variable tracking -----------------------------------------------------------------------------

def _chain(rng: random.Random, hops: int, letters: int, value: str) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(letters))
        if name not in names:
            names.append(name)
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(hops)]
    return names, statements


def _vt_text(units: list[str], statements: list[str], rng: random.Random) -> str:
    slots = sorted(rng.sample(range(len(units) + 1), len(statements))) if len(units) + 1 >= len(statements) \
        else [0] * len(statements)
    depths = [100 * s / max(len(units), 1) for s in slots]
    return "\n".join(insert_at_depths(units, statements, depths)).replace(". \n", ".\n")


def build_vt(config: TaskConfig, tokenizer, index: int) -> Sample:
    rng = sample_rng(config, index)
    hops, chains = config.option("hops"), config.option("chains")
    example_names, example_chain = _chain(rng, hops, 3, "12345")
    example = (VT_INSTRUCTION + _vt_text([NOISE] * 5, example_chain, rng) + VT_QUESTION.format(query="12345")
               + VT_ANSWER.format(num_v=hops + 1, query="12345") + " ".join(example_names) + "\n\n")
    value = str(rng.randint(10000, 99999))
    answers, statements = _chain(rng, hops, 5, value)  # the queried chain
    for _ in range(chains - 1):  # distractor chains with other values
        statements += _chain(rng, hops, 5, str(rng.randint(10000, 99999)))[1]
    position_seed = rng.randrange(2 ** 31)
    filler = Filler(tokenizer, "noise", rng, config.context + 64)
    question = VT_QUESTION.format(query=value)
    answer_prefix = VT_ANSWER.format(num_v=hops + 1, query=value)

    def render(budget: int):
        haystack = _vt_text(filler.units(budget), statements, random.Random(position_seed))
        ctx, q = chat_prompt(tokenizer, example + VT_INSTRUCTION + haystack, question, answer_prefix)
        return ctx, q, {"chain": statements, "positions": needle_positions(haystack, [s.strip() for s in statements])}

    ctx, q, info = fit_length(render, config.context, config.context - 250, config.name)
    return Sample(index, ctx, q, answers, config.option("max_new_tokens"), info)


# --- common words extraction ---------------------------------------------------------------------------

def _cwe_context(rng: random.Random, common: list[str], uncommon: list[str], freq_cw: int, freq_ucw: int) -> str:
    words = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def build_cwe(config: TaskConfig, tokenizer, index: int) -> Sample:
    rng = sample_rng(config, index)
    num_cw, freq_ucw = config.option("num_cw"), config.option("freq_ucw")
    pool = list(vocabulary())
    rng.shuffle(pool)
    example_common, example_uncommon = pool[:num_cw], pool[num_cw:num_cw + 5]
    common = pool[num_cw + 5:2 * num_cw + 5]
    uncommon_pool = pool[2 * num_cw + 5:]
    # keep the common words under half the prompt on short contexts (RULER: freq_cw=30 at 4K and more)
    per_entry = len(tokenizer(_cwe_context(rng, common, [], 10, 0), add_special_tokens=False)["input_ids"]) / (10 * num_cw)
    freq_cw = max(freq_ucw + 1, min(config.option("freq_cw"), int(config.context / (2 * per_entry * num_cw))))
    example = (CWE_INSTRUCTION + _cwe_context(rng, example_common, example_uncommon, 2, 1)
               + CWE_QUESTION.format(num_cw=num_cw) + CWE_ANSWER.format(num_cw=num_cw) + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_common)) + "\n\n")
    shuffle_seed = rng.randrange(2 ** 31)
    question = CWE_QUESTION.format(num_cw=num_cw)
    answer_prefix = CWE_ANSWER.format(num_cw=num_cw)

    def render(n_uncommon: int):
        haystack = _cwe_context(random.Random(shuffle_seed), common, uncommon_pool[:n_uncommon], freq_cw, freq_ucw)
        ctx, q = chat_prompt(tokenizer, example + CWE_INSTRUCTION + haystack, question, answer_prefix)
        return ctx, q, {"freq_cw": freq_cw, "uncommon": n_uncommon}

    ctx, q, info = fit_length(render, config.context, config.context // 16, config.name)
    return Sample(index, ctx, q, common, config.option("max_new_tokens"), info)


# --- frequent words extraction -------------------------------------------------------------------------

def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


def _fwe_words(rng: random.Random, n: int, alpha: float, vocab_size: int = 1000) -> tuple[list[str], list[str]]:
    """``n`` Zipf(alpha)-distributed coded words (rank 1 is '....') → (words, the 3 most frequent non-dots)."""
    vocab = ["...."] + list(dict.fromkeys(_coded_word(rng) for _ in range(vocab_size)))
    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    words = rng.choices(vocab, weights=weights, k=n)
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted((w for w in counts if w != "...."), key=lambda w: (-counts[w], vocab.index(w)))
    return words, ranked[:3]


def build_fwe(config: TaskConfig, tokenizer, index: int) -> Sample:
    rng = sample_rng(config, index)
    alpha = config.option("alpha")
    example_words, example_top = _fwe_words(rng, 60, alpha)
    example = (FWE_INSTRUCTION + " ".join(example_words) + FWE_QUESTION + FWE_ANSWER + " "
               + " ".join(example_top) + "\n\n")
    words_seed = rng.randrange(2 ** 31)

    def render(n: int):
        words, top = _fwe_words(random.Random(words_seed), max(n, 10), alpha)
        ctx, q = chat_prompt(tokenizer, example + FWE_INSTRUCTION + " ".join(words), FWE_QUESTION, FWE_ANSWER)
        return ctx, q, {"top": top, "words": max(n, 10)}

    ctx, q, info = fit_length(render, config.context, config.context // 3, config.name)
    return Sample(index, ctx, q, info["top"], config.option("max_new_tokens"), info)


# --- registration ------------------------------------------------------------------------------------

def score_all(prediction: str, sample: Sample, config: TaskConfig) -> float:
    return string_match_all(prediction, sample.answers)


def all_found(prediction: str, sample: Sample) -> bool:
    """Every reference appears in ``prediction`` (case-insensitive): ``string_match_all`` is 1 and stays 1."""
    found = prediction.lower()
    return all(answer.lower() in found for answer in sample.answers)


def _builder(one: Callable[[TaskConfig, object, int], Sample]):
    def build(config: TaskConfig, tokenizer, indices=None) -> list[Sample]:
        return [one(config, tokenizer, i) for i in (range(config.samples) if indices is None else indices)]
    return build


def _register_niah(name: str, base: str, defaults: dict) -> None:
    setup = NIAH_TASKS[base]
    options = {"depth": (float | None, None), "keys": (int | None, None), "values": (int | None, None),
               "answer_format": (str, "ruler"), "max_new_tokens": (int, 128)}
    options.update({key: (options[key][0], value) for key, value in defaults.items()})
    counts = f"{defaults.get('keys', setup.keys)} key(s), {defaults.get('values', setup.values)} value(s)"
    register_task(TaskSpec(
        name, "generate", "string_match_all",
        f"RULER NIAH: {setup.haystack} haystack, {setup.key_type}→{setup.value_type}, {counts}, "
        f"{setup.queries} query(ies), answer format {options['answer_format'][1]}",
        _builder(build_niah), score_all, options, settled=all_found, answer_prefix=True))


for _name in NIAH_TASKS:
    _register_niah(_name, _name, {})
for _name, (_base, _defaults) in NIAH_VARIANTS.items():
    _register_niah(_name, _base, _defaults)
register_task(TaskSpec("vt", "generate", "string_match_all",
                       "RULER variable tracking: one chain of `hops` assignments in noise (one-shot)",
                       _builder(build_vt), score_all, {"hops": (int, 4), "chains": (int, 1), "max_new_tokens": (int, 30)},
                       settled=all_found, answer_prefix=True))
register_task(TaskSpec("cwe", "generate", "string_match_all",
                       "RULER common words extraction: the num_cw words repeated freq_cw times (one-shot)",
                       _builder(build_cwe), score_all,
                       {"num_cw": (int, 10), "freq_cw": (int, 30), "freq_ucw": (int, 3), "max_new_tokens": (int, 120)},
                       settled=all_found, answer_prefix=True))
register_task(TaskSpec("fwe", "generate", "string_match_all",
                       "RULER frequent words extraction: top-3 Zipf(alpha) coded words (one-shot)",
                       _builder(build_fwe), score_all, {"alpha": (float, 2.0), "max_new_tokens": (int, 50)},
                       settled=all_found, answer_prefix=True))
