"""The linear-time regex adapter (RE2) and the patterns outside rules/redaction."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeagent import regex
from edgeagent.cloud.prompts import parse_json_answer


@pytest.mark.parametrize(
    ("pattern", "hint"),
    [(r"(a)\1", True), (r"x(?=y)", True), (r"(?<!a)b", True), (r"(unclosed", False)],
)
def test_patterns_re2_cannot_run_are_refused_with_the_reason(pattern: str, hint: bool) -> None:
    with pytest.raises(regex.PatternError) as info:
        regex.compile(pattern)
    message = str(info.value)
    assert repr(pattern) in message and "RE2" in message
    assert ("lookahead/lookbehind" in message) is hint


def test_offsets_are_characters_and_surrogates_do_not_break_matching() -> None:
    rx = regex.compile(r"[0-9]+")
    text = "é\ud800 ½ 42 ４２"
    assert [m.span() for m in rx.finditer(text)] == [(5, 7)]
    assert regex.compile("ä", ignore_case=True).search("xÄ") is not None
    assert regex.compile(regex.escape("a.b(c")).fullmatch("a.b(c") is not None


def test_fenced_cloud_answer_is_parsed() -> None:
    assert parse_json_answer('```json\n{"label": "fire"}\n```') == {"label": "fire"}
    assert parse_json_answer('{"label": "fire"}') == {"label": "fire"}


LONG_FENCE = """
from edgeagent.cloud.prompts import parse_json_answer
text = "```" + " " * 65536 + "x {\\"label\\": \\"fire\\"}"
assert parse_json_answer(text) == {"label": "fire"}
print("done")
"""


def test_fence_parse_takes_linear_time() -> None:
    """With Python's re the fence pattern took 2 s for 8,000 spaces after a fence
    (quadratic: minutes for 64 KiB).  The timeout only stops a hung run."""
    proc = subprocess.run(
        [sys.executable, "-c", LONG_FENCE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
