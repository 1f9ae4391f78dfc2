"""Print the fault suite's results table (from the rows the tests in tests/faults wrote) and,
with ``--write docs/reliability.md``, put it into that file between its table markers.

    python scripts/faults_table.py                       # print the newest row of each fault
    python scripts/faults_table.py --write docs/reliability.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("QA_FAULTS_RESULTS", ROOT / ".qaflow" / "faults" / "results.jsonl"))
BEGIN, END = "<!-- faults-table:begin -->", "<!-- faults-table:end -->"


def load(path: Path = RESULTS) -> list[dict]:
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["fault"].split(" (")[0] if r["fault"].startswith("malformed") else r["fault"]] = r
    return list(rows.values())


def table(rows: list[dict]) -> str:
    out = ["| fault | messages in flight | lost | duplicated | recovery time | same-id redeliveries (deduplicated) | test time | notes |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rec = f"{r['recovery_s']:.2f} s" if r.get("recovery_s") else "-"
        notes = r.get("detail", "").replace("|", "/")
        out.append(f"| {r['fault']} | {r['in_flight']} | {r['lost']} | {r['duplicated']} | {rec} | "
                   f"{r.get('redelivered_same_id', 0)} | {r.get('duration_s', 0):.0f} s | {notes} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", type=Path, default=None, help="a Markdown file with the table markers")
    args = ap.parse_args(argv)
    rows = load()
    if not rows:
        print(f"no results in {RESULTS}: run `make faults` first", file=sys.stderr)
        return 1
    text = table(rows)
    print(text)
    if args.write:
        doc = args.write.read_text()
        if BEGIN not in doc or END not in doc:
            print(f"{args.write} has no {BEGIN} ... {END} markers", file=sys.stderr)
            return 1
        head, rest = doc.split(BEGIN, 1)
        _old, tail = rest.split(END, 1)
        stamp = f"Run of {time.strftime('%Y-%m-%d %H:%M %Z')} on this machine (real RabbitMQ 3.10 + nx-27017).\n\n"
        args.write.write_text(f"{head}{BEGIN}\n{stamp}{text}{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
