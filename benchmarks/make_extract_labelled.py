"""Write ``examples/extract-labelled.jsonl``: sensor log lines with the object the
``reading`` task of ``examples/extract.toml`` should extract (seeded, reproducible).

    .venv/bin/python benchmarks/make_extract_labelled.py [--n 60] [--seed 4] [--out FILE]

Each line is ``{"text": ..., "output": {"device_id", "value", "unit"}}`` — the format
``edgeagent calibrate`` reads for extract tasks.  The lines mix log formats (syslog-ish,
key=value, bracketed, free text, JSON-ish), timestamps, levels, noise before and after
the reading, integers and decimals, negative temperatures and every unit of the schema.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# unit -> (quantity words, value range, decimals)
UNITS: dict[str, tuple[list[str], tuple[float, float], int]] = {
    "C": (["temperature", "temp", "water temp", "supply air"], (-25.0, 95.0), 1),
    "F": (["temperature", "temp", "outdoor temp"], (-10.0, 110.0), 1),
    "%": (["humidity", "rel. humidity", "fill level", "valve position"], (3.0, 99.0), 0),
    "bar": (["pressure", "line pressure", "inlet pressure"], (0.2, 12.0), 2),
    "hPa": (["air pressure", "baro", "barometric pressure"], (960.0, 1045.0), 1),
    "V": (["battery", "supply voltage", "bus voltage"], (2.8, 24.5), 2),
    "A": (["current", "motor current", "load current"], (0.1, 32.0), 2),
    "rpm": (["motor speed", "fan speed", "spindle speed"], (300.0, 6000.0), 0),
}
PREFIXES = ["th", "pump", "boiler", "fan", "ahu", "meter", "hvac", "tank", "ups", "press"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
LEVELS = ["INFO", "WARN", "DEBUG", "NOTICE", "ERROR", "ALARM"]
TEMPLATES = [
    "{ts} {level} device={dev} {what} {val} {unit}",
    "{ts} {level} sensor={dev} {what} {val} {unit}",
    "{date} {hm} {level} {dev}: {what} {val} {unit} above limit",
    "[{dev}] {what}={val}{unit} ok",
    "{ts} {dev} reports {what} of {val} {unit}",
    "<{pri}>{mon} {day} {hms} gw01 sensord[{pid}]: {dev} {what} {val} {unit}",
    "{ts} level={level_l} id={dev} {what_key}={val} unit={unit}",
    "{dev} | {what} | {val} {unit} | {level}",
    "{level} {ts}: reading from {dev}: {val} {unit} ({what})",
    "{hms} {dev} {what} now {val}{unit}, was {old}{unit}",
]


def _value(rng: random.Random, unit: str) -> float | int:
    _, (lo, hi), decimals = UNITS[unit]
    x = rng.uniform(lo, hi)
    if decimals == 0:
        return round(x)
    return round(x, rng.choice([1, decimals]) if decimals > 1 else decimals) + 0.0  # no -0.0


def _fmt(x: float | int) -> str:
    return str(x)


def make(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` labelled lines; the same ``seed`` gives the same lines."""
    rng = random.Random(seed)
    units = list(UNITS)
    out: list[dict[str, Any]] = []
    for i in range(n):
        unit = units[i % len(units)]
        words = UNITS[unit][0]
        what = rng.choice(words)
        dev = f"{rng.choice(PREFIXES)}-{rng.randint(1, 40)}"
        if rng.random() < 0.3:
            dev = dev.upper() if rng.random() < 0.5 else dev.replace("-", "_")
        val = _value(rng, unit)
        old = _value(rng, unit)
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        hh, mm, ss = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        level = rng.choice(LEVELS)
        fields = {
            "ts": f"2026-{month:02d}-{day:02d} {hh:02d}:{mm:02d}:{ss:02d}",
            "date": f"{month:02d}/{day:02d}",
            "hm": f"{hh:02d}:{mm:02d}",
            "hms": f"{hh:02d}:{mm:02d}:{ss:02d}",
            "mon": MONTHS[month - 1],
            "day": f"{day:2d}",
            "pri": rng.choice([13, 14, 28, 30]),
            "pid": rng.randint(100, 9999),
            "level": level,
            "level_l": level.lower(),
            "dev": dev,
            "what": what,
            "what_key": what.replace(" ", "_").replace(".", ""),
            "val": _fmt(val),
            "old": _fmt(old),
            "unit": unit,
        }
        text = TEMPLATES[rng.randrange(len(TEMPLATES))].format(**fields)
        out.append({"text": text, "output": {"device_id": dev, "value": val, "unit": unit}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "examples" / "extract-labelled.jsonl")
    args = ap.parse_args()
    rows = make(args.n, args.seed)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"wrote {len(rows)} lines to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
