"""Write a *held-out values* split of a BIO-tagged data set: whole slot values (e.g. city
names) that never occur in training, as well as unseen sentences.

    python benchmarks/tagger_value_split.py --train ../shared/datasets/atis/train.jsonl \\
        --valid ../shared/datasets/atis/validation.jsonl --out /tmp/atis-split

A seeded random quarter of the distinct values of the slots whose name ends in
``--slot-suffix`` (default ``city_name``: ATIS's from/to/stop city slots), among values
that occur in at most ``--max-sentences`` training sentences (so no hub city takes a
tenth of the data with it), is held out.  Every sentence (of train or validation) that
mentions one of them goes to ``test_values.jsonl``; the other validation sentences to
``test_sentences.jsonl``; the rest of train to ``train.jsonl``.  Half of the held-out
values (seeded) also make ``calibrate_values.jsonl`` (sentences with only those) and
``test_other_values.jsonl`` (the rest of ``test_values``): a threshold calibrated on the
first is measured on values it never saw.  ``split.json`` lists the held-out values.
Train a tagger on ``train.jsonl`` and run ``bench_tagger.py`` on the test files: the gap
between them is what unseen values cost.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def slot_values(row: dict[str, Any], suffix: str) -> set[str]:
    """The values (lower-cased, words joined by spaces) of the row's slots ending in suffix."""
    out: set[str] = set()
    cur: list[str] = []
    slot = None
    for word, tag in [*zip(row["tokens"], row["tags"], strict=True), ("", "O")]:
        if tag.startswith("I-") and tag[2:] == slot:
            cur.append(word)
            continue
        if slot is not None and slot.endswith(suffix):
            out.add(" ".join(cur).lower())
        slot, cur = (tag[2:], [word]) if tag != "O" else (None, [])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--valid", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slot-suffix", default="city_name")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--max-sentences", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, valid = _rows(args.train), _rows(args.valid)
    counts = Counter(v for r in train for v in slot_values(r, args.slot_suffix))
    pool = sorted(v for v, n in counts.items() if n <= args.max_sentences)
    rng = random.Random(args.seed)
    held = set(rng.sample(pool, round(len(pool) * args.fraction)))

    def has(row: dict[str, Any]) -> bool:
        return bool(slot_values(row, args.slot_suffix) & held)

    # Half of the held-out values (seeded) make a calibration set of their own: a threshold
    # fitted there is measured on the other half, values it never saw either.
    cal_values = set(random.Random(args.seed + 1).sample(sorted(held), len(held) // 2))

    def only_cal(row: dict[str, Any]) -> bool:
        found = slot_values(row, args.slot_suffix) & held
        return bool(found) and found <= cal_values

    out = {
        "train": [r for r in train if not has(r)],
        "test_values": [r for r in train + valid if has(r)],
        "test_sentences": [r for r in valid if not has(r)],
        "calibrate_values": [r for r in train + valid if only_cal(r)],
        "test_other_values": [r for r in train + valid if has(r) and not only_cal(r)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in out.items():
        with (args.out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    info = {
        "held_out_values": sorted(held),
        "calibration_values": sorted(cal_values),
        "distinct_values": len(counts),
        "pool": len(pool),
        **{name: len(rows) for name, rows in out.items()},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "split.json").write_text(json.dumps(info, indent=2) + "\n", "utf-8")
    print(json.dumps({k: v for k, v in info.items() if k != "args"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
