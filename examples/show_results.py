"""Print `edgeagent submit` results (JSON lines on stdin) as a consumer would read them.

One line per result message, in arrival order: a provisional answer and the result that
supersedes it are two lines.  Used by `./install.sh --demo`; standard library only.
"""

from __future__ import annotations

import json
import sys


def describe(r: dict[str, object]) -> str:
    out = r.get("output")
    shown = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)
    parts = [f"status={r.get('status')}", f"source={r.get('source')}", f"output={shown}"]
    if r.get("confidence") is not None:
        parts.append(f"confidence={r['confidence']:.3f}")
    if r.get("latency_ms") is not None:
        parts.append(f"latency={r['latency_ms']:.1f} ms")
    if r.get("model"):
        parts.append(f"model={r['model']}")
    esc = r.get("escalation")
    if isinstance(esc, dict):
        parts.append(f"escalated({esc.get('reason')})")
    if r.get("provisional"):
        parts.append("PROVISIONAL")
    if r.get("supersedes"):
        parts.append(f"supersedes={r['supersedes']}")
    err = r.get("error")
    if isinstance(err, dict):
        parts.append(f"error={err.get('code')}")
    return "  ".join(parts)


def main() -> None:
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except ValueError:
            print("    " + line)
            continue
        print(f"    [{str(r.get('id', ''))[:8]}] " + describe(r), flush=True)


if __name__ == "__main__":
    main()
