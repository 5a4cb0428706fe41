"""Learned extraction answers as BIO-tagged training data for ``edgeagent train`` (tagger).

A cloud answer to an extract task is an object ``{slot: value}``; a tagger learns from
``{"tokens": [...], "tags": ["O", "B-slot", "I-slot", ...]}``.  Each value (or each item of
an array value) is located in the input as a run of words, split exactly as the tagger
backend splits them at run time, compared case-insensitively.  An answer with a value
that does not occur verbatim in the input (a normalised number, a paraphrase) cannot be
aligned and is skipped: fine-tuning stays off the device, the operator retrains with
``edgeagent train TASK --examples FILE``.
"""

from __future__ import annotations

from typing import Any

from edgeagent.backends.tagger import split_words


def to_bio(text: str, output: Any) -> dict[str, list[str]] | None:
    """``{"tokens", "tags"}`` for one answer, or None when a value cannot be aligned."""
    if not isinstance(output, dict):
        return None
    spans = split_words(text)
    tokens = [text[a:b] for a, b in spans]
    folded = [t.casefold() for t in tokens]
    tags = ["O"] * len(tokens)
    for slot, value in output.items():
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                return None
            item_text = str(item)
            words = [item_text[a:b].casefold() for a, b in split_words(item_text)]
            if not words or not _place(folded, tags, words, str(slot)):
                return None
    return {"tokens": tokens, "tags": tags}


def _place(folded: list[str], tags: list[str], words: list[str], slot: str) -> bool:
    """Tag the first untagged occurrence of ``words``; False when there is none."""
    n = len(words)
    for i in range(len(folded) - n + 1):
        if folded[i : i + n] == words and all(t == "O" for t in tags[i : i + n]):
            tags[i] = f"B-{slot}"
            for j in range(i + 1, i + n):
                tags[j] = f"I-{slot}"
            return True
    return False
