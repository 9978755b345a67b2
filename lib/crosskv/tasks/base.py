"""The task protocol: :class:`Sample`, :class:`TaskSpec`, :class:`TaskConfig`, the task registry and prompt
encoding (the kinds and task names: :mod:`crosskv.tasks`). Task modules import this module, never the package."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from crosskv.core.params import coerce

KINDS = ("generate", "ppl", "ppl_cont")


class TaskUnavailableError(RuntimeError):
    """A task needs a resource (the Hugging Face hub) that is not reachable."""


@dataclass
class Sample:
    """One prompt: ``context_ids`` (compressible) then ``question_ids`` (appended exactly), token id lists."""

    index: int
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: how to build samples and how to score predictions.

    ``options`` maps each accepted option to ``(type, default)``; ``build(config, tokenizer, indices=None)``
    returns the config's samples (only those of ``indices`` when given: a rank's share); ``score(prediction, sample, config)`` scores one generated answer in [0, 1].
    ``settled(prediction, sample)``, when given, is True once more generated text can no longer change the
    score (e.g. every reference already appears under ``string_match_all``): greedy decoding stops there, and
    the score is exactly the one a full-length decode gets.
    ``answer_prefix``: the question part ends with an answer prefix (RULER's "… The special magic number for X
    is"), so the gold answer is scored right after the question; without one it is scored where the full cache's
    greedy output writes it (:func:`crosskv.run.harness.gold_placement`).
    """

    name: str
    kind: str
    metric: str
    description: str
    build: Callable[..., list[Sample]]
    score: Callable[[str, Sample, "TaskConfig"], float] | None = None
    options: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    higher_is_better: bool = True
    settled: Callable[[str, Sample], bool] | None = None
    answer_prefix: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task kind {self.kind!r} of {self.name!r} is not one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class TaskConfig:
    """A task's identity: name, context length in tokens, sample count, seed and all options (defaults filled)."""

    name: str
    context: int = 2048
    samples: int = 10
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.context < 16:
            raise ValueError(f"context={self.context} is too short (at least 16 tokens)")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be at least 1")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.name)

    def option(self, name: str) -> Any:
        return dict(self.options)[name]

    def params(self) -> dict[str, Any]:
        """The config as a plain dict (part of the results key)."""
        return {"task": self.name, "context": self.context, "samples": self.samples, "seed": self.seed,
                "options": dict(self.options)}


TASKS: dict[str, TaskSpec] = {}
FAMILIES: dict[str, Callable[[str], TaskSpec]] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


def register_family(prefix: str, factory: Callable[[str], TaskSpec]) -> None:
    """Tasks named ``prefix:<arg>`` are built by ``factory(arg)`` (e.g. ``jsonl:PATH``)."""
    FAMILIES[prefix] = factory


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; unknown names raise ``ValueError`` listing the known ones. :data:`TASKS` holds
    every task: importing this module runs the ``crosskv.tasks`` package first, which imports each task module."""
    if name in TASKS:
        return TASKS[name]
    prefix, sep, arg = name.partition(":")
    if sep and prefix in FAMILIES:
        return FAMILIES[prefix](arg)
    known = ", ".join(sorted(TASKS)) + ", " + ", ".join(f"{p}:<arg>" for p in sorted(FAMILIES))
    raise ValueError(f"unknown task {name!r}; known: {known}")


def make_task(name: str, context: int = 2048, samples: int = 10, seed: int = 0, **options: Any) -> TaskConfig:
    """Build a validated :class:`TaskConfig`; options may be CLI strings and are coerced to their types."""
    spec = get_task(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for task {name!r}; "
                         f"it takes: {', '.join(spec.options) or 'none'}")
    filled = {key: default for key, (_, default) in spec.options.items()}
    for key, value in options.items():
        filled[key] = coerce(value, spec.options[key][0], key)
    return TaskConfig(name, int(context), int(samples), int(seed), tuple(sorted(filled.items())))


def plain_ids(encoded) -> list[int]:
    """Token ids as a plain list from whatever a tokenizer call returned (list, BatchEncoding, tensor)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (chat templates carry their own)."""
    return plain_ids(tokenizer(text, add_special_tokens=False))


def chat_prompt(tokenizer, context: str, question: str, answer_prefix: str = "",
                history: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Render one user turn ``context + question`` with the model's chat template → (context_ids, question_ids).

    The split is at the end of ``context``: the chat prefix and ``context`` form the compressible
    part; ``question``, the end of the turn, the generation prompt and ``answer_prefix`` form the
    question part. Both parts are tokenized separately, so every method sees exactly the same ids.
    Without a chat template the prompt is plain text with the tokenizer's special tokens.
    """
    messages = list(history or []) + [{"role": "user", "content": context + question}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        text += answer_prefix
        start = text.rfind(context + question)
        if start < 0:
            raise ValueError("the chat template altered the user message; cannot split context from question")
        cut = start + len(context)
        return encode(tokenizer, text[:cut]), encode(tokenizer, text[cut:])
    prefix = plain_ids(tokenizer("", add_special_tokens=True))
    return prefix + encode(tokenizer, context), encode(tokenizer, question + answer_prefix)
