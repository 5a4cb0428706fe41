"""Model tools without a model: bundle manifests, the numpy head trainer, calibration maths."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from edgeagent.backends.calibration import (
    CalibrationError,
    PlattCalibration,
    read_calibration,
    write_calibration,
)
from edgeagent.bundle import (
    BundleError,
    fingerprint,
    read_manifest,
    sha256_file,
    write_manifest,
)
from edgeagent.heads.curves import (
    ece,
    escalation_curve,
    escalation_for,
    fit_temperature,
    nll,
    threshold_for_escalation,
    threshold_for_precision,
)
from edgeagent.heads.fit import TrainOptions, fit_logreg, stratified_split, train_head
from edgeagent.modeltools.calibrate_llm import fit_platt, load_labelled, out_of_fold
from edgeagent.modeltools.train import ExamplesError, load_examples


@pytest.fixture
def np() -> Any:
    """numpy, or skip (the manifest tests need only the standard library)."""
    return pytest.importorskip("numpy")


# -- bundle manifests ------------------------------------------------------------------


def _bundle(tmp_path: Path) -> Path:
    d = tmp_path / "b"
    d.mkdir()
    (d / "a.bin").write_bytes(b"weights")
    (d / "labels.json").write_text('["x", "y"]')
    write_manifest(d, {"kind": "classifier", "name": "t"}, ["a.bin", "labels.json"])
    return d


def test_manifest_round_trip(tmp_path: Path) -> None:
    d = _bundle(tmp_path)
    m = read_manifest(d, kind="classifier")
    assert m["files"]["a.bin"]["sha256"] == sha256_file(d / "a.bin")
    assert m["files"]["a.bin"]["bytes"] == 7
    assert m["fingerprint"] == fingerprint(m)
    assert (d / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_fingerprint_follows_every_file(tmp_path: Path) -> None:
    d = _bundle(tmp_path)
    before = read_manifest(d)["fingerprint"]
    (d / "labels.json").write_text('["x", "z"]')
    with pytest.raises(BundleError, match=r"sha256 mismatch|bytes"):
        read_manifest(d)
    after = write_manifest(d, {"kind": "classifier", "name": "t"}, ["a.bin", "labels.json"])
    assert after["fingerprint"] != before
    # The name is not part of the fingerprint, only what changes answers.
    same = write_manifest(d, {"kind": "classifier", "name": "u"}, ["a.bin", "labels.json"])
    assert same["fingerprint"] == after["fingerprint"]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.update(kind="decoder"), "kind"),
        (lambda m: m.update(files={}), "non-empty"),
        (lambda m: m["files"].update({"../evil": {"sha256": "00"}}), "relative path"),
        (lambda m: m["files"]["a.bin"].pop("sha256"), "lacks a sha256"),
        (lambda m: m.update(fingerprint="0" * 64), "fingerprint"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, mutate: object, match: str) -> None:
    d = _bundle(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    mutate(m)  # type: ignore[operator]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        read_manifest(d)


def test_wrong_kind_and_not_an_object(tmp_path: Path) -> None:
    d = _bundle(tmp_path)
    with pytest.raises(BundleError, match="expected a encoder bundle"):
        read_manifest(d, kind="encoder")
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="not a JSON object"):
        read_manifest(d)


# -- examples --------------------------------------------------------------------------


def test_load_examples_reports_the_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "ex.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    with pytest.raises(ExamplesError, match=r"ex\.jsonl:3"):
        load_examples(p)
    p.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(ExamplesError, match=r"ex\.jsonl:2: not JSON"):
        load_examples(p)
    p.write_text("\n")
    with pytest.raises(ExamplesError, match="no examples"):
        load_examples(p)


def test_stratified_split_is_seeded_and_keeps_every_label(np: Any) -> None:
    labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 1
    tr, ho = stratified_split(labels, 0.2, seed=3)
    assert sorted(tr + ho) == list(range(len(labels)))
    assert {labels[i] for i in tr} == {"a", "b", "c"}
    assert sum(labels[i] == "a" for i in ho) == 4 and sum(labels[i] == "b" for i in ho) == 2
    assert (tr, ho) == stratified_split(labels, 0.2, seed=3)
    assert (tr, ho) != stratified_split(labels, 0.2, seed=4)


# -- head training ---------------------------------------------------------------------


def _blobs(np: Any, n_per: int, k: int, dim: int, seed: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    x = np.concatenate([c + 0.6 * rng.normal(size=(n_per, dim)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), n_per)
    return x.astype(np.float32), y


def test_logreg_separates_blobs(np: Any) -> None:
    x, y = _blobs(np, 60, 4, 16, seed=0)
    head, _ = fit_logreg(x, y, 4, l2=1e-3)
    assert (head.logits(x).argmax(axis=1) == y).mean() > 0.97


def test_fit_temperature_recovers_the_true_temperature(np: Any) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(4000, 5)).astype(np.float32)
    true_t = 2.0
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(logits, y)
    assert abs(t - true_t) < 0.2
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    # Scaling the logits scales the temperature (the calibrated model is unchanged).
    assert abs(fit_temperature(logits * 3, y) - 3 * t) < 0.05 * 3 * t


def test_ece(np: Any) -> None:
    conf = np.array([0.9] * 10, dtype=np.float32)
    assert ece(conf, np.array([True] * 9 + [False])) < 1e-6
    assert abs(ece(conf, np.array([True] * 5 + [False] * 5)) - 0.4) < 1e-6


def test_train_head_with_oos_class_calibrates_and_reports(np: Any) -> None:
    x, y = _blobs(np, 40, 4, 16, seed=2)
    labels = ["a", "b", "c", "oos"]
    names = [labels[i] for i in y]
    trained = train_head(x, names, TrainOptions(held_out=0.25), log=lambda *_: None)
    head = trained.head
    assert head.labels == ["a", "b", "c", "oos"]  # oos last
    assert head.oos_label == "oos" and head.temperature > 0
    assert head.centroids.shape == (3, 16)
    m = trained.metrics
    for key in ("accuracy", "ece_before", "ece_after", "escalation_for_98", "escalation_for_99"):
        assert 0.0 <= m[key] <= 1.0
    probs = head.probabilities(x)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all()


def test_temperature_keeps_the_ranking_within_an_input(np: Any) -> None:
    """Calibration is monotone: a larger raw score never gets a smaller probability."""
    x, y = _blobs(np, 30, 3, 8, seed=5)
    trained = train_head(x, [str(i) for i in y], TrainOptions(), log=lambda *_: None)
    head = trained.head
    raw = head.log_scores(x)
    cal = head.probabilities(x)
    order = np.argsort(-raw, axis=1)
    cal_sorted = np.take_along_axis(cal, order, axis=1)
    assert (np.diff(cal_sorted, axis=1) <= 1e-7).all()


# -- out-of-scope scoring ----------------------------------------------------------------


def _unit(np: Any, x: Any) -> Any:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _far(np: Any, n: int, dim: int, seed: int) -> Any:
    """Directions unrelated to any blob: out of scope for a head trained on blobs."""
    return _unit(np, np.random.default_rng(seed).normal(size=(n, dim)))


def _flagged(preds: list[Any]) -> int:
    return sum(p.reason == "out_of_scope" for p in preds)


def test_task_without_oos_signal_never_flags_out_of_scope_by_default(np: Any) -> None:
    """No `oos` label and no out-of-scope examples: nothing is flagged unless the operator
    turns oos_distance on (Banking77 had 18 in-scope inputs flagged before)."""
    from edgeagent.backends.onnx import predict

    x, y = _blobs(np, 50, 5, 16, seed=3)
    head = train_head(x, [str(i) for i in y], TrainOptions(), log=lambda *_: None).head
    assert head.oos_label is None and head.oos_signal is False
    far = _far(np, 100, 16, seed=4)
    assert _flagged(predict(head, far)) == 0
    assert _flagged(predict(head, x)) == 0
    # The calibrated cut-off is still there for an operator who opts in.
    assert head.oos_cut is not None
    assert _flagged(predict(head, far, oos_distance=True)) >= 90


def test_oos_examples_train_out_of_scope_detection(np: Any) -> None:
    """Outlier exposure: texts known to be out of scope become the out-of-scope class, and
    unseen out-of-scope inputs are flagged while in-scope ones are kept."""
    from edgeagent.backends.onnx import predict

    x, y = _blobs(np, 50, 5, 16, seed=3)
    far = _far(np, 300, 16, seed=5)
    opts = TrainOptions(oos_target_loss=0.02)
    trained = train_head(x, [str(i) for i in y], opts, log=lambda *_: None, oos_emb=far[:150])
    head = trained.head
    assert head.labels[-1] == "oos" and head.oos_signal
    assert head.oos_score == "energy|oos_class"
    assert trained.metrics["oos"]["held_out_in_scope_loss"] <= 0.02 + 1e-9
    assert _flagged(predict(head, far[150:])) >= 140
    centres = np.random.default_rng(3).normal(size=(5, 16))  # the blobs' centres
    noise = np.random.default_rng(99).normal(size=(5, 40, 16))
    x_new = _unit(np, (centres[:, None, :] + 0.6 * noise).reshape(-1, 16))  # fresh draws
    assert _flagged(predict(head, x_new)) <= 10


def test_oos_score_survives_save_and_load(np: Any, tmp_path: Path) -> None:
    from edgeagent.backends.onnx import Head

    x, y = _blobs(np, 40, 4, 16, seed=6)
    far = _far(np, 80, 16, seed=7)
    opts = TrainOptions(oos_score="mahalanobis+knn")
    head = train_head(x, [str(i) for i in y], opts, log=lambda *_: None, oos_emb=far).head
    head.save(tmp_path)
    loaded = Head.from_bundle(tmp_path)
    assert loaded.oos_score == "mahalanobis+knn" and loaded.oos_cut == head.oos_cut
    assert np.allclose(
        loaded.oos_values(far, loaded.probabilities(far)),
        head.oos_values(far, head.probabilities(far)),
        atol=1e-2,  # knn_emb is stored as float16
    )


def test_knn_score_compares_with_the_likeliest_classes_only_and_per_input(np: Any) -> None:
    """The k-th-neighbour score looks only at the examples of each input's `knn_classes`
    most probable in-scope classes (cheap per job): an input's value is the same alone or
    in any batch, and an in-scope input's neighbours are in those classes anyway."""
    from edgeagent.backends.onnx import Head

    x, y = _blobs(np, 30, 12, 16, seed=8)
    far = _far(np, 40, 16, seed=9)
    opts = TrainOptions(oos_score="knn+oos_class", knn_classes=3)
    head = train_head(x, [str(i) for i in y], opts, log=lambda *_: None, oos_emb=far[:20]).head
    assert head.knn_classes == 3
    probe = np.concatenate([x[::7], far[20:]])
    probs = head.probabilities(probe)
    batch = head.knn_cos(probe, probs)
    alone = [head.knn_cos(probe[i : i + 1], probs[i : i + 1])[0] for i in range(len(probe))]
    assert np.allclose(batch, alone)
    full = Head(
        {
            "weight": head.weight,
            "bias": head.bias,
            "centroids": head.centroids,
            "knn_emb": head.knn_emb,
            "knn_label": head.knn_label,
        },
        head.labels,
        {**head.calibration, "knn_classes": 0},
    ).knn_cos(probe, probs)
    n_in = len(x[::7])
    assert np.allclose(batch[:n_in], full[:n_in], atol=1e-6)
    assert (batch <= full + 1e-6).all()  # fewer candidates: never a nearer neighbour


def test_calibration_from_before_oos_score_still_loads(np: Any) -> None:
    """A bundle written before the out-of-scope score fields: centroid cosine cut-off,
    applied by default only when the bundle has an out-of-scope class."""
    from edgeagent.backends.onnx import Head, predict

    x, y = _blobs(np, 30, 3, 8, seed=8)
    arrays = {
        "weight": np.zeros((8, 4), np.float32),
        "bias": np.zeros(4, np.float32),
        "centroids": _unit(np, np.stack([x[y == k].mean(axis=0) for k in range(3)])),
    }
    old = {"temperature": 1.0, "oos_label": "oos", "centroid_cos_min": 0.999}
    head = Head(arrays, ["a", "b", "c", "oos"], old)
    assert head.oos_score == "centroid" and head.oos_signal and head.oos_cut == -0.999
    assert _flagged(predict(head, x)) == len(x)
    assert _flagged(predict(head, x, oos_distance=False)) == 0
    arrays["weight"], arrays["bias"] = arrays["weight"][:, :3], arrays["bias"][:3]
    no_class = Head(arrays, ["a", "b", "c"], {**old, "oos_label": None})
    assert not no_class.oos_signal and _flagged(predict(no_class, x)) == 0


@pytest.mark.parametrize(
    ("score", "match"),
    [("bogus", "unknown oos_score"), ("knn", "needs knn_emb"), ("mahalanobis", "maha_mean")],
)
def test_bad_oos_score_is_refused_at_load(np: Any, score: str, match: str) -> None:
    from edgeagent.backends.onnx import Head

    arrays = {
        "weight": np.zeros((4, 2), np.float32),
        "bias": np.zeros(2, np.float32),
        "centroids": np.eye(2, 4, dtype=np.float32),
    }
    with pytest.raises(ValueError, match=match):
        Head(arrays, ["a", "b"], {"oos_score": score, "oos_cut": 0.0})


# -- escalation curve ------------------------------------------------------------------


def test_escalation_curve() -> None:
    conf = [0.99, 0.95, 0.9, 0.6, 0.5, 0.5, 0.3, 0.8]
    ok = [True, True, True, False, True, False, False, True]
    forced = [False] * 7 + [True]
    pts = escalation_curve(conf, ok, forced)
    assert pts[0].escalation == 1 / 8  # the forced one is always escalated
    assert pts[0].accuracy == (4 + 1) / 8
    assert pts[-1].escalation == 1.0 and pts[-1].accuracy == 1.0 and math.isinf(pts[-1].threshold)
    # ties move together: 0.5 and 0.5 leave in one step
    assert [p.threshold for p in pts] == [0.3, 0.5, 0.6, 0.9, 0.95, 0.99, math.inf]
    for a, b in itertools.pairwise(pts):
        assert b.escalation > a.escalation and b.accuracy >= a.accuracy
    assert escalation_for(pts, 1.0).threshold == 0.9
    assert threshold_for_precision(pts, 1.0).threshold == 0.9
    assert threshold_for_escalation(pts, 0.5).escalation <= 0.5
    assert threshold_for_escalation(pts, 0.0).escalation == 1 / 8


# -- Platt scaling of the llamacpp confidence (calibrate_llm) --------------------------


def _platt_nll(raw: list[float], ok: list[bool], a: float, b: float) -> float:
    cal = PlattCalibration(a, b, None, "m", "p")
    ps = [min(1 - 1e-12, max(1e-12, cal.apply(c))) for c in raw]
    return -sum(math.log(p) if y else math.log(1 - p) for p, y in zip(ps, ok, strict=True))


def test_fit_platt_recovers_the_true_mapping(np: Any) -> None:
    rng = np.random.default_rng(3)
    raw = rng.uniform(0.01, 0.99, size=6000)
    true_a, true_b = 2.0, -0.5
    p = 1 / (1 + np.exp(-(true_a * np.log(raw / (1 - raw)) + true_b)))
    ok = rng.uniform(size=raw.size) < p
    a, b = fit_platt(raw.tolist(), ok.tolist())
    assert abs(a - true_a) < 0.15 and abs(b - true_b) < 0.15
    nll_fit = _platt_nll(raw.tolist(), ok.tolist(), a, b)
    for da, db in ((0.1, 0), (-0.1, 0), (0, 0.1), (0, -0.1)):
        assert nll_fit <= _platt_nll(raw.tolist(), ok.tolist(), a + da, b + db)


@pytest.mark.parametrize("ok", [[], [True] * 5, [False] * 5])
def test_fit_platt_is_the_identity_with_nothing_to_learn(np: Any, ok: list[bool]) -> None:
    raw = [0.1, 0.3, 0.5, 0.7, 0.9][: len(ok)]
    assert fit_platt(raw, ok) == (1.0, 0.0)


def test_fit_platt_stays_finite_and_monotone_on_separable_data(np: Any) -> None:
    raw = [0.05, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9]
    ok = [False] * 4 + [True] * 4
    a, b = fit_platt(raw, ok)
    assert math.isfinite(a) and math.isfinite(b) and a > 0
    cal = PlattCalibration(a, b, None, "m", "p")
    assert cal.apply(0.3) < 0.5 < cal.apply(0.6)


def test_fit_platt_never_inverts_the_ranking(np: Any) -> None:
    """Raw confidence anti-correlated with correctness: a = 0, the (smoothed) base rate."""
    raw = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    ok = [True, True, True, False, False, True]
    a, b = fit_platt(raw, ok)
    assert a == 0.0
    smoothed = (4 * (5 / 6) + 2 * (1 / 4)) / 6  # targets (N+ + 1)/(N+ + 2) and 1/(N- + 2)
    assert PlattCalibration(a, b, None, "m", "p").apply(0.5) == pytest.approx(smoothed)


def test_out_of_fold_calibration_is_honest(np: Any) -> None:
    rng = np.random.default_rng(4)
    raw = rng.uniform(0.05, 0.95, size=400).tolist()
    ok = (rng.uniform(size=400) < 0.5).tolist()  # correctness unrelated to the confidence
    oof = out_of_fold(raw, ok)
    assert len(oof) == len(raw) and all(0.0 <= p <= 1.0 for p in oof)
    # No signal: every fold learns about the base rate, whatever the raw confidence.
    assert max(oof) - min(oof) < 0.2
    assert ece(np.array(oof, dtype=np.float32), np.array(ok)) < ece(
        np.array(raw, dtype=np.float32), np.array(ok)
    )


def test_platt_mapping_is_monotone_and_bounded() -> None:
    cal = PlattCalibration(3.0, 1.0, None, "m", "p")
    grid = [0.0, 1e-9, 1e-4, 0.01, 0.2, 0.5, 0.8, 0.99, 1 - 1e-9, 1.0]
    out = [cal.apply(c) for c in grid]
    assert all(0.0 <= p <= 1.0 for p in out)
    assert all(x <= y for x, y in itertools.pairwise(out))
    assert PlattCalibration(1.0, 0.0, None, "m", "p").apply(0.3) == pytest.approx(0.3)


def test_calibration_file_round_trip(tmp_path: Path) -> None:
    cal = PlattCalibration(0.7, -0.1, 0.62, "ab" * 32, "cd" * 32, info={"task": "reading"})
    path = tmp_path / "sub" / "reading.calibration.json"
    write_calibration(path, cal)
    back, sha = read_calibration(path)
    assert back == cal
    assert len(sha) == 64 and path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"a": -1.0}, "monotone"),
        ({"b": "x"}, "'b' must be a finite"),
        ({"a": True}, "'a' must be a finite"),
        ({"threshold": 1.5}, r"\[0, 1\]"),
        ({"format": "other"}, "not an edgeagent calibration"),
        ({"model_sha256": ""}, "model_sha256"),
    ],
)
def test_calibration_file_is_validated(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    doc = PlattCalibration(0.7, -0.1, 0.5, "ab" * 32, "cd" * 32).to_json() | change
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match=match):
        read_calibration(path)
    path.write_text('{"a": NaN')
    with pytest.raises(CalibrationError, match="not JSON"):
        read_calibration(path)


def test_load_labelled_accepts_outputs_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_text(
        '{"text": "a", "output": {"x": 1}}\n\n{"text": "b", "label": "on"}\n'
        '{"text": "c", "output": "off"}\n'
    )
    assert load_labelled(path, "classify") == [
        ("a", {"x": 1}),
        ("b", {"label": "on"}),
        ("c", {"label": "off"}),
    ]
    with pytest.raises(ExamplesError, match=r"l\.jsonl:3: expected"):
        load_labelled(path, "extract")  # a label is no extraction target
    path.write_text('{"text": 1, "output": {}}\n')
    with pytest.raises(ExamplesError, match=":1: expected"):
        load_labelled(path, "extract")
