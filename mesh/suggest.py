"""Did-you-mean hints for misspelled keys, groups and host names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """The candidates closest to word, best first (empty when none is close)."""
    return difflib.get_close_matches(word, list(candidates), n=limit, cutoff=0.6)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A hint such as "did you mean 'hosts'?", or None when nothing is close."""
    matches = closest(word, candidates)
    if not matches:
        return None
    return "did you mean " + " or ".join(f"'{match}'" for match in matches) + "?"
