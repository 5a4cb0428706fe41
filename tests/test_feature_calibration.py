"""The feature calibration of generative extraction (issue 14): answer features, the
logistic fit, its file (and the Platt files written before it), the cross-validated
threshold.  Pure: no model (the model-backed checks are in test_llamacpp_backend.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from edgeagent.backends.calibration import (
    FEATURE_FORMAT,
    FEATURES,
    FEATURES_VERSION,
    CalibrationError,
    FeatureCalibration,
    PlattCalibration,
    ValueTokens,
    answer_features,
    read_calibration,
    write_calibration,
)
from edgeagent.grounding import leaves

np = pytest.importorskip("numpy")

from edgeagent.modeltools.calibrate_llm import (  # noqa: E402
    fit_calibration,
    fit_logistic,
    out_of_fold_features,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "device_id": {"type": "string"},
        "value": {"type": "number"},
        "unit": {"type": "string", "enum": ["C", "F", "%"]},
    },
}


def feature_cal(**change: Any) -> FeatureCalibration:
    base: dict[str, Any] = {
        "features": ("min_lp", "closed_in_input"),
        "weights": (1.5, 2.0),
        "bias": 0.3,
        "mean": (-1.0, 0.8),
        "scale": (0.5, 0.4),
        "features_version": FEATURES_VERSION,
        "threshold": 0.9,
        "model_sha256": "ab" * 32,
        "prompt_fingerprint": "cd" * 32,
        "info": {"task": "reading"},
    }
    return FeatureCalibration(**(base | change))


def test_leaves_follow_document_order_and_say_what_is_copied() -> None:
    out = {"device_id": "th-14", "value": 95, "unit": "F"}
    found = leaves(out, SCHEMA, "[th-14] humidity=95% ok")
    assert [(x.path, x.copied, x.grounded) for x in found] == [
        ("$.device_id", True, True),
        ("$.value", True, True),
        ("$.unit", False, True),  # an enum label is not grounding-checked ...
    ]
    assert [x.value for x in found] == ["th-14", 95, "F"]


def test_answer_features_see_a_guessed_enum_label_and_the_weakest_token() -> None:
    values = [
        ValueTokens(True, (-0.1, -0.2), (3.0, 2.5), True),
        ValueTokens(True, (-1.5,), (0.2,), True),
        ValueTokens(False, (-0.3,), (1.0,), False),  # ... but "F" is not in the input
    ]
    f = answer_features(0.22, values, "[th-14] humidity=95% ok", numbers=2)
    assert set(f) == set(FEATURES)
    assert f["raw"] == 0.22 and f["min_lp"] == -1.5 and f["copied_min_lp"] == -1.5
    assert f["closed_min_lp"] == -0.3 and f["min_margin"] == 0.2
    assert f["mean_lp"] == pytest.approx((-0.1 - 0.2 - 1.5 - 0.3) / 4)
    assert f["closed_in_input"] == 0.0 and f["fields"] == 3.0
    assert f["numbers_in_input"] == pytest.approx(math.log(3))
    floor = answer_features(0.0, [ValueTokens(True, (-80.0,), (-90.0,), True)], "x", 0)
    assert floor["min_lp"] == floor["min_margin"] == -20.0  # clipped: no single token dominates
    assert floor["closed_in_input"] == 1.0  # no closed value: nothing guessed


def test_feature_calibration_round_trips(tmp_path: Path) -> None:
    cal = feature_cal()
    path = tmp_path / "reading.calibration.json"
    write_calibration(path, cal)
    back, sha = read_calibration(path)
    assert back == cal and len(sha) == 64
    assert json.loads(path.read_text())["format"] == FEATURE_FORMAT
    row = {"min_lp": -0.4, "closed_in_input": 1.0, "mean_lp": 0.0}
    z = 0.3 + 1.5 * (-0.4 + 1.0) / 0.5 + 2.0 * (1.0 - 0.8) / 0.4
    assert back.apply_features(row) == pytest.approx(1 / (1 + math.exp(-z)))


def test_platt_files_written_before_still_load_and_apply(tmp_path: Path) -> None:
    """The format the example shipped before issue 14 (edgeagent.platt-calibration/1)."""
    doc = {
        "a": 0.7760752396126043,
        "b": 1.8277157098755685,
        "confidence": "min",
        "format": "edgeagent.platt-calibration/1",
        "method": "platt",
        "model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "prompt_fingerprint": "9ed1500d1c9999069cf887c4d0836d65852f614dd69438592558784c059a4955",
        "task": "reading",
        "threshold": 0.857063912456306,
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    cal, _ = read_calibration(path)
    assert isinstance(cal, PlattCalibration)
    assert cal.apply_features({"raw": 0.5, "min_lp": -3.0}) == cal.apply(0.5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "edgeagent.feature-calibration/2"}, "newer edgeagent"),
        ({"format": "something"}, "not an edgeagent calibration"),
        ({"weights": [1.0]}, "one number per feature"),
        ({"scale": [1.0, 0.0]}, "'scale' must be > 0"),
        ({"features": ["a", "a"]}, "distinct feature names"),
        ({"features_version": "1"}, "'features_version' must be an integer"),
        ({"bias": None}, "'bias' must be a finite"),
        ({"mean": [0.0, float("nan")]}, "must be a finite"),
    ],
)
def test_feature_calibration_file_is_validated(
    tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(feature_cal().to_json() | change))
    with pytest.raises(CalibrationError, match=match):
        read_calibration(path)


def test_fit_logistic_learns_each_features_direction() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3000, 3))
    z = 2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.5
    y = rng.uniform(size=3000) < 1 / (1 + np.exp(-z))
    weights, _, _, scale = fit_logistic(x.tolist(), y.tolist(), l2=0.01)
    w = np.array(weights) / np.array(scale)  # back to the unstandardised coefficients
    assert abs(w[0] - 2.0) < 0.25 and abs(w[1] + 1.0) < 0.2 and abs(w[2]) < 0.15


def test_fit_logistic_stays_finite_on_separable_and_constant_features() -> None:
    x = [[v, 1.0] for v in (0.1, 0.2, 0.3, 0.7, 0.8, 0.9)]
    ok = [False, False, False, True, True, True]
    weights, bias, _, scale = fit_logistic(x, ok)
    assert all(math.isfinite(v) for v in [*weights, bias]) and weights[0] > 0
    assert weights[1] == 0.0 and scale[1] == 1.0  # the constant column learns nothing
    assert fit_logistic(x, [True] * 6)[0] == [0.0, 0.0]  # nothing to learn: the base rate


def test_cross_validated_confidences_do_not_see_their_own_label() -> None:
    """A feature that is pure noise: in-sample the fit can memorise; out of fold it
    falls back to about the base rate, so a threshold chosen on it stays honest."""
    rng = np.random.default_rng(5)
    rows = [{"min_lp": float(v)} for v in rng.normal(size=200)]
    ok = (rng.uniform(size=200) < 0.7).tolist()
    oof = out_of_fold_features(rows, ok, ("min_lp",), "features")
    assert max(oof) - min(oof) < 0.25
    cal = fit_calibration(rows, ok, ("min_lp",), "features")
    assert isinstance(cal, FeatureCalibration) and cal.features == ("min_lp",)
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(rows, ok, ("min_lp",), "isotonic")
