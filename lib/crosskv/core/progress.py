"""Progress bars for loops a person waits on: drawn on a terminal, silent elsewhere (notebooks run by
papermill, CI logs), so executed notebooks store no progress noise."""
from __future__ import annotations

from tqdm import tqdm


def bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` shown only when ``enabled`` and stderr is a terminal."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
