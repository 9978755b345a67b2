"""Scorers: RULER's string matches, LongBench's qa F1 / ROUGE-L / classification, perplexity.

Every scorer maps (prediction, references) to a number in [0, 1] for one sample; a task's score is
the mean over samples (RULER and LongBench report ×100; crosskv keeps fractions).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence


def string_match_all(prediction: str, references: Sequence[str], case_sensitive: bool = False) -> float:
    """RULER ``string_match_all``: the fraction of references found in the prediction."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction if case_sensitive else prediction.lower()
    hits = [(ref if case_sensitive else ref.lower()) in pred for ref in references]
    return sum(hits) / len(references)


def string_match_part(prediction: str, references: Sequence[str], case_sensitive: bool = False) -> float:
    """RULER ``string_match_part`` (qa tasks): 1 if any reference is found in the prediction."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    pred = prediction if case_sensitive else prediction.lower()
    return float(any((ref if case_sensitive else ref.lower()) in pred for ref in references))


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, references: Sequence[str]) -> float:
    """LongBench ``qa_f1_score``: best token F1 of the normalised prediction against any reference."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(ref).split()) for ref in references)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens, best over references (LongBench's ``rouge_score``)."""
    best = 0.0
    pred = prediction.lower().split()
    for ref in references:
        ref_tokens = ref.lower().split()
        lcs = _lcs(pred, ref_tokens) if pred and ref_tokens else 0
        if lcs:
            p, r = lcs / len(pred), lcs / len(ref_tokens)
            best = max(best, 2 * p * r / (p + r))
    return best


def classification(prediction: str, references: Sequence[str], all_classes: Sequence[str]) -> float:
    """LongBench ``classification_score``: 1/k when the true class is among the k classes named."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in references[0] and c != references[0])]
    return 1.0 / len(named) if references[0] in named else 0.0


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood) from a summed NLL over ``tokens`` predictions."""
    if tokens < 1:
        raise ValueError(f"perplexity needs at least one scored token, got {tokens}")
    return math.exp(nll_sum / tokens)

