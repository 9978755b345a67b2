"""Notebook prose rendered from results: Markdown built in code, so a re-run that flips a number flips the text.

Notebooks never type a measured number into a Markdown cell. They build the text from records and
:class:`crosskv.evidence.stats.Comparison` objects and show it with :func:`show`::

    report.show(report.bullets([
        stats.compare(xkv, svd, "xKV G=4", "Single SVD").sentence,
        f"Search took {report.seconds(search_s)} per run (n = {len(times)}).",
    ]), title="Findings")

:func:`verdicts` prints every comparison with its interval as an executed check (its table is the
evidence behind the sentences). A notebook opens with ``page = report.page("NN")`` (provenance line and an
Answer placeholder under its title) and ends with ``page.close(answer, findings)`` (the answer filled in, the
Findings shown once). :func:`equal_memory` refuses a comparison of two runs whose held kept differ by more
than 10 % relative.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any, Iterable, Sequence

import pandas as pd

from crosskv.evidence import stats
from crosskv.evidence.stats import Comparison, Interval, compare

PROFILE_ENV = "CROSSKV_PROFILE"  # set by crosskv.evidence.figures for the kernel it starts
MATCH_TOLERANCE = 0.10  # equal memory: held kept within 10 % relative


def bullets(lines: Iterable[str]) -> str:
    """Markdown bullet list of ``lines`` (empty lines skipped)."""
    return "\n".join(f"- {line}" for line in lines if line)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with the notebook extras
        return False
    return get_ipython() is not None


def _display(text: str, display_id: str | bool | None = None, metadata: dict | None = None):
    """Markdown output in a notebook (plain print elsewhere); the display handle when ``display_id`` is set."""
    if not _in_notebook():
        print(text)
        return None
    from IPython.display import Markdown, display

    return display(Markdown(text), display_id=display_id, metadata=metadata)


def show(text: str, title: str | None = None) -> None:
    """Display ``text`` as Markdown in a notebook (plain print elsewhere). Returns nothing, so a notebook cell
    that ends with it stores the Markdown once (no echoed string)."""
    _display(f"### {title}\n\n{text}" if title else text)


# ----------------------------------------------------------------------------- provenance, answer, findings

def provenance(profile: str | None = None) -> dict[str, Any]:
    """What produced a notebook's outputs: the git commit (``+dirty`` when ``lib/`` or ``pyproject.toml`` changed),
    the library's code fingerprint, the parameter profile (``$CROSSKV_PROFILE``, set by ``crosskv figures``;
    ``interactive`` otherwise) and the machine (CPU or device, cores, torch threads)."""
    from crosskv.core.fingerprint import code_fingerprint
    from crosskv.run.results import git_commit
    from crosskv.run.results import machine

    m = machine()
    device = m["gpu"] or m["cpu"]
    return {"commit": git_commit() or "unknown", "code_fingerprint": code_fingerprint(),
            "profile": profile or os.environ.get(PROFILE_ENV, "interactive"),
            "machine": f"{device}, {m['cores']} cores, {m['threads']} torch thread(s)"}


def provenance_line(info: dict[str, Any]) -> str:
    """One Markdown line: commit, code fingerprint, profile and machine."""
    return (f"<sub>crosskv commit `{info['commit']}` · code fingerprint `{info['code_fingerprint']}` · "
            f"profile `{info['profile']}` · {info['machine']}</sub>")


class _Collector(logging.Handler):
    """Keeps the library's warnings (deduplicated, counted) so a notebook states them in prose, not on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[record.getMessage()] += 1


class Page:
    """The opening and closing of a notebook: provenance and the answer at the top, the Findings at the end.

    Created in the notebook's first code cell, it displays the provenance line (its values also in the output's
    metadata under ``crosskv``, where a test reads the code fingerprint) and an *Answer* placeholder;
    :meth:`close` fills the placeholder with the one-sentence answer computed at the end (a display update, which
    papermill records in the executed notebook) and displays the Findings once. While the page is open the
    ``crosskv`` logger's warnings are collected instead of printed to stderr; :meth:`close` lists them under the
    Findings as *Library notes*, so a warning that is a finding is read as one.
    """

    def __init__(self, notebook: str, profile: str | None = None) -> None:
        self.notebook = notebook
        self.info = provenance(profile)
        self.closed = False
        self._collector = _Collector()
        self._logger = logging.getLogger("crosskv")
        self._propagate = self._logger.propagate
        self._logger.addHandler(self._collector)
        self._logger.propagate = False
        self._answer = _display(self._answer_text(None), display_id=f"crosskv-answer-{notebook}")
        _display(provenance_line(self.info), metadata={"crosskv": dict(self.info, notebook=notebook)})

    @staticmethod
    def _answer_text(answer: str | None) -> str:
        if answer is None:
            return "**Answer:** *(rendered from this run's results when the notebook finishes: see Findings)*"
        return f"**Answer:** {answer}"

    @property
    def notes(self) -> list[str]:
        """The library warnings collected so far, each once with its count."""
        return [m if c == 1 else f"{m} (×{c})" for m, c in self._collector.messages.items()]

    def close(self, answer: str, findings: Sequence[str]) -> None:
        """Render ``answer`` (one sentence) into the placeholder and the Findings (with the library notes) once."""
        if self.closed:
            raise RuntimeError(f"notebook {self.notebook}: its Findings were already shown")
        if not answer or not answer.strip():
            raise ValueError(f"notebook {self.notebook}: the answer is empty")
        self._logger.removeHandler(self._collector)
        self._logger.propagate = self._propagate
        self.closed = True
        text = self._answer_text(answer.strip())
        if self._answer is not None:
            from IPython.display import Markdown

            self._answer.update(Markdown(text))
        else:
            print(text)
        body = bullets(findings)
        if self.notes:
            body += "\n\n*Library notes (warnings raised while this notebook ran):*\n\n" + bullets(self.notes)
        show(body + "\n\n" + provenance_line(self.info), title="Findings")


def page(notebook: str) -> Page:
    """Open a notebook's :class:`Page` (its first code cell): ``page = report.page("03")``."""
    return Page(notebook)


# ----------------------------------------------------------------------------- equal-memory claims

def matched(kept_a: float, kept_b: float, tolerance: float = MATCH_TOLERANCE) -> bool:
    """Whether two held kept fractions are within ``tolerance`` of each other, relative to the larger."""
    if kept_a <= 0 or kept_b <= 0:
        raise ValueError(f"kept must be positive, got {kept_a} and {kept_b}")
    return abs(kept_a - kept_b) <= tolerance * max(kept_a, kept_b)


def equal_memory(a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str,
                 tolerance: float = MATCH_TOLERANCE, metric: str = "score") -> Comparison:
    """The paired comparison of two runs at equal memory, both held kepts in the labels; refused (``ValueError``
    naming both kepts) when they differ by more than ``tolerance`` relative: a better score bought with more
    memory is not a better method."""
    from crosskv.evidence.frontier import held_kept

    kept_a, kept_b = held_kept(a)[0], held_kept(b)[0]
    if not matched(kept_a, kept_b, tolerance):
        raise ValueError(f"{label_a} (kept {kept_a:.3f}) and {label_b} (kept {kept_b:.3f}) differ by more than "
                         f"{tolerance:.0%} relative kept: not an equal-memory comparison")
    return compare(a, b, f"{label_a} (kept {kept_a:.3f})", f"{label_b} (kept {kept_b:.3f})", metric=metric)


def verdicts(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    """One row per comparison: both scores with intervals, the paired difference and the verdict."""
    return pd.DataFrame([{
        "a": c.a, "b": c.b, "metric": c.metric,
        "score_a": c.score_a.estimate, "score_a_lo": c.score_a.lo, "score_a_hi": c.score_a.hi,
        "score_b": c.score_b.estimate, "score_b_lo": c.score_b.lo, "score_b_hi": c.score_b.hi,
        "diff": c.diff.estimate, "diff_lo": c.diff.lo, "diff_hi": c.diff.hi, "n": c.diff.n,
        "verdict": c.verdict} for c in comparisons])


def seconds(values: float | Sequence[float]) -> str:
    """``"12.3 s"`` for one value, ``"21.7–55.1 s (median 30.2)"`` for several."""
    if isinstance(values, (int, float)):
        return f"{values:.3g} s"
    v = sorted(values)
    if not v:
        raise ValueError("seconds() needs at least one value")
    median = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{v[0]:.3g}–{v[-1]:.3g} s (median {median:.3g}, n = {len(v)})"


def versus(iv: Interval, against: float, above: str, below: str, neither: str) -> str:
    """The sentence for an interval checked against a value: ``above`` when the whole interval lies above
    ``against``, ``below`` when below, ``neither`` otherwise; the interval and its n are appended."""
    text = above if iv.lo > against else below if iv.hi < against else neither
    return f"{text} ({iv.format()}, n = {iv.n}, 95 % bootstrap)"


def at_equal_memory(pairs: Iterable[tuple[dict[str, Any], dict[str, Any], str, str]],
                    tolerance: float = MATCH_TOLERANCE, metric: str = "score") -> tuple[list[Comparison], list[str]]:
    """:func:`equal_memory` over ``(a, b, label_a, label_b)`` pairs: the comparisons of the matched pairs, and one
    sentence per pair it refused (both kepts named), so a notebook states what it could not compare."""
    from crosskv.evidence.frontier import held_kept

    done, refused = [], []
    for a, b, label_a, label_b in pairs:
        kept_a, kept_b = held_kept(a)[0], held_kept(b)[0]
        if matched(kept_a, kept_b, tolerance):
            done.append(equal_memory(a, b, label_a, label_b, tolerance, metric))
        else:
            refused.append(f"Not compared: {label_a} (kept {kept_a:.3f}) and {label_b} (kept {kept_b:.3f}) differ by more "
                           f"than {tolerance:.0%} relative kept.")
    return done, refused


def retrieval_metric(record: dict[str, Any]) -> str:
    """``gold_loglik`` (the paired teacher-forced gold-answer metric) when a generation record carries it on every
    sample, else ``score`` (exact match from generation); perplexity records: ``score``."""
    if stats.is_perplexity(record):
        return "score"
    details = record.get("details") or []
    return "gold_loglik" if details and all(d.get("gold_loglik") is not None for d in details) else "score"


def detectable(a: dict[str, Any], b: dict[str, Any], label: str, metric: str | None = None) -> str:
    """A sentence with the minimum detectable effect of the paired comparison ``a`` vs ``b`` at its n
    (:func:`crosskv.evidence.stats.min_detectable_effect`: paired t, 80 % power, 5 % two-sided). Perplexity
    runs: on the per-window mean NLL per token (nats), since perplexity differences do not add up per window."""
    if stats.is_perplexity(a):
        def per_window(record):
            details = sorted(record["details"], key=lambda d: d["index"])
            return [d["index"] for d in details], [d["nll"] / d["scored_tokens"] for d in details]
        (ia, va), (ib, vb) = per_window(a), per_window(b)
        unit, name = "windows", "mean NLL per token (nats)"
    else:
        metric = metric or retrieval_metric(a)
        (ia, va), (ib, vb) = stats.unit_values(a, metric), stats.unit_values(b, metric)
        unit, name = "samples", metric
    if list(ia) != list(ib):
        raise ValueError(f"{label}: the two runs are not on the same {unit}")
    diffs = [x - y for x, y in zip(va, vb)]
    n = len(diffs)
    if n < 2:
        return f"{label}: n = {n} {unit}, too few for a minimum detectable effect."
    mde = stats.min_detectable_effect(diffs, n)
    return (f"Minimum detectable effect, {label}: {mde:.3g} in {name} at n = {n} {unit} (paired t-test, 80 % power, "
            f"5 % two-sided; smaller true differences are likely reported as ties).")

