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
than 10 % relative. :func:`uses_answer` renders the Answer of several uses from their decision table
(:func:`crosskv.evidence.frontier.decide`), and :func:`answer_names_missing` lists any configuration an Answer
names that its table does not hold. :func:`metric_label` names a metric with its context (``ppl_cont@2K``).
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any, Iterable, Sequence

import pandas as pd

from crosskv.evidence import stats
from crosskv.evidence.stats import MATCH_TOLERANCE, Comparison, Interval, compare, matched
from crosskv.evidence.tables import context_label, metric_label

PROFILE_ENV = "CROSSKV_PROFILE"  # set by crosskv.evidence.figures for the kernel it starts


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


def verdicts(comparisons: Sequence[Comparison], alpha: float = 0.05) -> pd.DataFrame:
    """One row per comparison: both scores with intervals, the paired difference, the verdict of its interval, its
    permutation ``p``, ``p_holm`` (Holm over ``comparisons``, the family) and ``call``: the verdict where
    ``p_holm < alpha`` and the interval decides, else ``"not called"``."""
    frame = pd.DataFrame([{
        "a": c.a, "b": c.b, "metric": c.metric,
        "score_a": c.score_a.estimate, "score_a_lo": c.score_a.lo, "score_a_hi": c.score_a.hi,
        "score_b": c.score_b.estimate, "score_b_lo": c.score_b.lo, "score_b_hi": c.score_b.hi,
        "diff": c.diff.estimate, "diff_lo": c.diff.lo, "diff_hi": c.diff.hi, "n": c.diff.n,
        "verdict": c.verdict, "p": c.p} for c in comparisons])
    if frame.empty:
        return frame.assign(p_holm=[], call=[])
    tested = frame["p"].notna()
    frame["p_holm"] = stats.holm(frame.loc[tested, "p"])["p_holm"].reindex(frame.index)
    decided = frame["verdict"].isin(["better", "worse"]) & (frame["p_holm"] < alpha)
    frame["call"] = frame["verdict"].where(decided, "not called")
    return frame


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



# ----------------------------------------------------------------------------- answers per use

# what each class of cache keeps: the reason two uses can pick different classes at the same memory
MECHANISMS = {
    "eviction": "eviction keeps the recent (and most attended) tokens at full precision, which continuing the text "
                "needs, and drops older tokens, where a fact to retrieve may sit",
    "cross-layer": "cross-layer sharing and low rank keep every token, each at lower fidelity",
    "quantization": "quantization keeps every token, each at lower precision",
    "composition": "a composition stacks eviction, cross-layer and quantization stages",
}


def _num(value: float, signed: bool = False) -> str:
    return f"{value:{'+' if signed else ''}.3g}"


def decision_sentence(row: Any) -> str:
    """One budget's decision (a row of :func:`crosskv.evidence.frontier.best_at_budget`) as a clause, every number
    from the row."""
    budget = f"≤ {row.budget:g}"
    if row.decision == "none under budget":
        return f"{budget}: nothing holds this little"
    leader = f"**{row.leader}** (kept {row.kept_leader:.3f})"
    if row.decision == "only candidate":
        return f"{budget}: only {leader} fits, so nothing is tested"
    if row.decision == "too few":
        return f"{budget}: {leader} leads on half A; half B has too few samples to test it (n = {int(row.n_confirm)})"
    extra = getattr(row, "leader_gold_match", None)
    match = (f"; gold_match {row.leader_gold_match:.2f} vs {row.rival_gold_match:.2f}"
             if extra is not None and extra == extra else "")
    versus = (f"{row.rival}, kept {row.kept_rival:.3f}: {_num(row.leader_estimate)} vs {_num(row.rival_estimate)}, "
              f"difference {_num(row.diff, True)} [{_num(row.ci_low, True)}, {_num(row.ci_high, True)}], "
              f"Holm p = {row.p_holm:.2g}{match}")
    if row.decision == "winner":
        return f"{budget}: {leader}, ahead of all {int(row.rivals)} rivals (closest {versus})"
    return (f"{budget}: no decision: {leader} leads, ahead of {int(row.beaten)} of {int(row.rivals)} rivals but not "
            f"of {versus}")


def use_sentence(decisions: pd.DataFrame, use: Any) -> str:
    """The decisions of one use (a :class:`crosskv.evidence.frontier.Use`, or its name) at every budget, in one
    sentence."""
    from crosskv.evidence import frontier

    use = frontier.use_of(use)
    rows = decisions[decisions["use"] == use.name]
    if rows.empty:
        raise ValueError(f"no decision rows for use {use.name!r} (uses present: {sorted(decisions['use'].unique())})")
    metric = rows["metric"].iloc[0]
    tested = rows.dropna(subset=["n_confirm"])
    split = (f"; leaders selected on half A (n = {int(tested['n_select'].max())}), confirmed on half B "
             f"(n = {int(tested['n_confirm'].max())}) against every rival, Holm over each distinct pair once"
             if len(tested) else "")
    return (f"**{use.name.capitalize()}** ({use.data}; {metric}, {'higher' if use.higher_is_better else 'lower'} "
            f"is better{split}): " + "; ".join(decision_sentence(r) for r in rows.itertuples()) + ".")


def disagreement_sentence(decisions: pd.DataFrame, uses: Sequence[str] = ("retrieve", "continue")) -> str:
    """Where two uses' leaders differ at one budget, with what each leader's class keeps (:data:`MECHANISMS`);
    or that they agree at every budget both reach."""
    first, second = (decisions[decisions["use"] == u].dropna(subset=["leader"]).set_index("budget") for u in uses)
    budgets = [b for b in first.index if b in second.index]
    differ = [b for b in budgets if first.loc[b, "leader"] != second.loc[b, "leader"]]
    if not budgets:
        return f"The uses {uses[0]} and {uses[1]} share no budget with a leader."
    if not differ:
        return f"The uses agree at every budget both reach ({', '.join(f'≤ {b:g}' for b in budgets)})."

    def pick(frame, b, use):
        row = frame.loc[b]
        state = "decided" if row["decision"] == "winner" else "not decided"
        return f"{use} → {row['leader']} ({row['class_leader']}, {state})"
    clauses = [f"≤ {b:g}: {pick(first, b, uses[0])}, {pick(second, b, uses[1])}" for b in differ]
    classes = dict.fromkeys(c for b in differ for c in (first.loc[b, "class_leader"], second.loc[b, "class_leader"]))
    why = [MECHANISMS[c] for c in classes if c in MECHANISMS]
    same_class = all(first.loc[b, "class_leader"] == second.loc[b, "class_leader"] for b in differ)
    reason = ("the leaders differ in configuration, not in kind" if same_class else "; ".join(why))
    return f"The uses disagree at {len(differ)} of {len(budgets)} budgets ({'; '.join(clauses)}): {reason}."


def uses_answer(decisions: pd.DataFrame, uses: Sequence[str] = ("retrieve", "continue")) -> str:
    """The Answer for several uses from their decision frame (:func:`crosskv.evidence.frontier.decide`): one
    sentence per use, then where the first two disagree. Every number and name comes from ``decisions``."""
    present = [u for u in uses if (decisions["use"] == u).any()]
    if not present:
        raise ValueError(f"the decision frame has none of the uses {list(uses)}")
    text = [use_sentence(decisions, u) for u in present]
    if len(present) >= 2:
        text.append(disagreement_sentence(decisions, present[:2]))
    return " ".join(text)


def answer_names_missing(answer: str, table: pd.DataFrame, names: Iterable[str] | None = None) -> list[str]:
    """The configuration or family names an Answer mentions that its table does not hold (empty: every name it
    uses is backed by the table). ``names``: the labels to look for (default: every chart family of
    :data:`crosskv.evidence.plotting.FAMILIES` but ``full``); longer names are matched first and masked, so
    ``"KVSharer + xKV G=4"`` is not also read as ``"xKV G=4"``. A name is in the table when a text cell contains
    it (a family named in prose is backed by its configurations' rows)."""
    if names is None:
        from crosskv.evidence.plotting import FAMILIES

        names = [f for f in FAMILIES.index if f != "full"]
    cells = [str(v) for column in table.columns if table[column].dtype == object for v in table[column].dropna()]
    text, missing = answer, []
    for name in sorted(set(names), key=len, reverse=True):
        if name and name in text:
            text = text.replace(name, "\0")
            if not any(name in cell for cell in cells):
                missing.append(name)
    return sorted(missing)
