"""Redaction benchmark: leaks on the PII corpus, false redactions on real requests, time.

    .venv/bin/python benchmarks/bench_redact.py [--old PATH_OR_GIT_REF] [--repeat 3]

Prints, for this redactor and the old one (the last ``edgeagent/redact.py`` in git
history before it used ``phonenumbers``, or ``--old``: a file or a git ref):

* leaks on ``tests/pii_corpus.py`` (430 values in sentences; a leak is the value, or
  any of its digits or its ``@``, left outside placeholders; goal 0);
* the false-redaction rate on the CLINC150 validation texts (3,100 ordinary assistant
  requests with no personal data: any placeholder is a false redaction), read from
  ``$EDGEAGENT_DATASETS/clinc150/validation.jsonl`` (skipped when absent);
* the per-input redaction time (median, p99) on the corpus and on CLINC150, and the
  worst case on 16 KiB adversarial inputs (digits, separators, ``@``, colons),
  each as new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeagent.redact import Redactor  # noqa: E402
from tests.pii_corpus import Case, corpus, leaked  # noqa: E402

ADVERSARIAL = {
    "digits": "1" * 16384,
    "digit groups": "4111 " * 3276,
    "dotted": "1." * 8192,
    "at signs": "a@" * 8192,
    "colons": "1:" * 8192,
    "mixed": ("+1 (555) 123-4567 a@b.co 10.0.0.1 DE89 " * 420)[:16384],
}


def load_old(spec: str | None) -> ModuleType | None:
    """The old redactor module, from a file, a git ref, or git history."""
    if spec and Path(spec).is_file():
        source = Path(spec).read_text()
    else:
        refs = [spec] if spec else _history()
        source = ""
        for ref in refs:
            text = _git("show", f"{ref}:edgeagent/redact.py")
            if text and (spec or "phonenumbers" not in text):
                source = text
                break
        if not source:
            return None
    module = ModuleType("old_redact")
    sys.modules["old_redact"] = module  # dataclasses look their module up
    exec(compile(source, "old_redact.py", "exec"), module.__dict__)
    return module


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def _history() -> list[str]:
    return _git("log", "--format=%H", "--", "edgeagent/redact.py").split()


def clinc_texts() -> list[str] | None:
    root = os.environ.get("EDGEAGENT_DATASETS")
    path = Path(root) / "clinc150" / "validation.jsonl" if root else None
    if path is None or not path.is_file():
        return None
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def timed(fn: Callable[[str], Any], texts: list[str], repeat: int) -> list[float]:
    """Per-input seconds: the best of ``repeat`` runs for each input."""
    out = []
    for text in texts:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn(text)
            best = min(best, time.perf_counter() - t)
        out.append(best)
    return out


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", help="the old redact.py: a file or a git ref (default: history)")
    ap.add_argument("--repeat", type=int, default=3, help="timing runs per input (best kept)")
    args = ap.parse_args()

    old_module = load_old(args.old)
    cases = corpus()
    new_by_region: dict[str, Redactor] = {}

    def new_redact(case: Case) -> str:
        r = new_by_region.setdefault(case.region, Redactor(region=case.region))
        return r.redact(case.text).text

    redactors: dict[str, Callable[[str], Any]] = {"new": Redactor().redact}
    if old_module is not None:
        redactors["old"] = old_module.Redactor().redact

    print(f"\nredaction benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cpu)\n")
    print(f"PII corpus: {len(cases)} values in sentences (tests/pii_corpus.py)")
    kinds = sorted({c.kind for c in cases})
    for name, fn in redactors.items():
        leaks: dict[str, int] = dict.fromkeys(kinds, 0)
        examples = []
        for case in cases:
            text = new_redact(case) if name == "new" else fn(case.text).text
            if leaked(case, text):
                leaks[case.kind] += 1
                examples.append(f"{case.text!r} -> {text!r}")
        total = sum(leaks.values())
        per_kind = ", ".join(f"{k} {v}" for k, v in leaks.items())
        print(f"  {name}: {total} leak(s) of {len(cases)} (goal 0)  [{per_kind}]")
        for line in examples[:5]:
            print(f"      e.g. {line}")

    texts = clinc_texts()
    if texts is None:
        print("\nCLINC150: skipped (set EDGEAGENT_DATASETS to the datasets directory)")
    else:
        print(f"\nCLINC150 validation: {len(texts)} requests without personal data")
        for name, fn in redactors.items():
            changed = [(t, fn(t)) for t in texts]
            hits = [(t, r.text) for t, r in changed if r.mapping]
            print(
                f"  {name}: {len(hits)} falsely redacted ({100.0 * len(hits) / len(texts):.2f} %)"
            )
            for t, red in hits[:5]:
                print(f"      e.g. {t!r} -> {red!r}")

    print(f"\nper-input time (best of {args.repeat} runs), milliseconds")
    sets = {"PII corpus": [c.text for c in cases]}
    if texts is not None:
        sets["CLINC150"] = texts
    times: dict[tuple[str, str], list[float]] = {}
    for label, inputs in sets.items():
        for name, fn in redactors.items():
            times[(label, name)] = timed(fn, inputs, args.repeat)
        new = times[(label, "new")]
        new_med, new_p99 = statistics.median(new) * 1e3, pct(new, 0.99) * 1e3
        line = f"  {label:12} new median {new_med:7.3f}  p99 {new_p99:7.3f}"
        if "old" in redactors:
            old = times[(label, "old")]
            old_med, old_p99 = statistics.median(old) * 1e3, pct(old, 0.99) * 1e3
            line += (
                f" | old median {old_med:7.3f}  p99 {old_p99:7.3f}"
                f" | new/old median x{new_med / old_med:.2f}  p99 x{new_p99 / old_p99:.2f}"
            )
        print(line)
    print("\n16 KiB adversarial inputs, milliseconds (one run each)")
    for label, text in ADVERSARIAL.items():
        line = f"  {label:13}"
        results = {}
        for name, fn in redactors.items():
            t = time.perf_counter()
            fn(text)
            results[name] = time.perf_counter() - t
            line += f" {name} {results[name] * 1e3:9.1f}"
        if "old" in results:
            line += f"  new/old x{results['new'] / results['old']:.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
