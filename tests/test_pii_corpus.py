"""No personal data in the corpus (``tests/pii_corpus.py``) survives redaction.

Issue 9, item 5: cards separated by dots, no-break spaces or double spaces, cards in
full-width digits and a plain 10-digit phone number reached the cloud unredacted.
"""

from __future__ import annotations

from collections import Counter

from edgeagent.redact import Redactor, restore
from tests.pii_corpus import corpus, leaked


def test_corpus_is_large_and_varied() -> None:
    cases = corpus()
    assert len(cases) >= 200
    kinds = Counter(c.kind for c in cases)
    assert set(kinds) == {"email", "phone", "card", "iban", "ip"}
    assert min(kinds.values()) >= 20


def test_no_corpus_value_leaks_and_all_are_restored() -> None:
    redactors: dict[str, Redactor] = {}
    leaks: list[tuple[str, str, str]] = []
    for case in corpus():
        redactor = redactors.setdefault(case.region, Redactor(region=case.region))
        r = redactor.redact(case.text)
        if leaked(case, r.text):
            leaks.append((case.kind, case.text, r.text))
        assert restore(r.text, r.mapping) == case.text
    assert leaks == []
