"""The rules backend: keywords and patterns on RE2, linear in the input.

Issue 9, item 4: with Python's backtracking ``re`` the example ``reading`` task took
~12 s of CPU (holding the GIL) on one 16 KiB string of digits, freezing every task.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.backends.rules import RulesBackend
from edgeagent.config import TaskConfig, load_settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "rules.toml"


def example_task(name: str) -> RulesBackend:
    settings, _ = load_settings(EXAMPLE)
    return RulesBackend(name, settings.tasks[name])


def classify(rules: list[dict[str, object]], **extra: object) -> RulesBackend:
    task = TaskConfig.model_validate(
        {"kind": "classify", "backend": {"type": "rules", "rules": rules, **extra}}
    )
    return RulesBackend("t", task)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sensor device=th-12 temp 21.5 C", {"device_id": "th-12", "value": 21.5, "unit": "C"}),
        ("device: x1 reads -3.25F", {"device_id": "x1", "value": -3.25, "unit": "F"}),
        ("device=a humidity 55 %", {"device_id": "a", "value": 55, "unit": "%"}),
        ("humidity 45% device=z", {"device_id": "z", "value": 45, "unit": "%"}),
        ("device=b pressure 1013 hPa", {"device_id": "b", "value": 1013, "unit": "hPa"}),
    ],
)
def test_example_reading_task_extracts(text: str, expected: dict[str, object]) -> None:
    [pred] = example_task("reading").infer_batch([text])
    assert pred.output == expected and pred.confidence == 1.0


def test_example_alarm_task_classifies() -> None:
    backend = example_task("alarm")
    texts = ["SMOKE in hall 3", "water leak under sink", "mains failure at 02:00", "all quiet"]
    labels = [p.output["label"] if p.output else None for p in backend.infer_batch(texts)]
    assert labels == ["fire", "water_leak", "power", None]


def test_keywords_are_whole_words_in_any_script() -> None:
    backend = classify(
        [{"label": "cafe", "keywords": ["café"]}, {"label": "tag", "keywords": ["#urgent"]}]
    )
    texts = ["Café is open", "cafés are open", "x#urgent", "an #urgent call", "#urgently"]
    labels = [p.output["label"] if p.output else None for p in backend.infer_batch(texts)]
    assert labels == ["cafe", None, "tag", "tag", None]


def test_lone_surrogate_input_is_answered() -> None:
    backend = classify([{"label": "fire", "patterns": ["fire"]}])
    [pred] = backend.infer_batch(["fire \ud800 alarm"])
    assert pred.output == {"label": "fire"}


ADVERSARIAL = """
import sys
from pathlib import Path
from edgeagent.backends.rules import RulesBackend
from edgeagent.config import load_settings
settings, _ = load_settings(Path(sys.argv[1]))
inputs = ["1" * 262144, "water " * 43690, "device=" * 37449, "-1." * 87381]
for name in ("alarm", "reading"):
    RulesBackend(name, settings.tasks[name]).infer_batch(inputs)
print("done")
"""


def test_adversarial_inputs_take_linear_time() -> None:
    """256 KiB of digits and repeated keywords through every example pattern.

    With a backtracking engine the first input alone needs hours (quadratic: ~12 s at
    16 KiB); with RE2 the run takes well under a second.  The timeout only stops a
    hung run; it is not a performance threshold.
    """
    proc = subprocess.run(
        [sys.executable, "-c", ADVERSARIAL, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
