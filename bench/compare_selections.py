"""Judge a text-selector candidate against the shipped one, case by case. Not a test.

    python bench/compare_selections.py --out base.jsonl                       # shipped heads, this checkout
    python bench/compare_selections.py --heads cand.safetensors --out cand.jsonl --against base.jsonl

Writes each held-out case's selection as JSON Lines (one run of this checkout's code: its clause
split and decision), and with --against prints, per set, how many cases each side got right and
the cases the candidate fixed and broke. By default it reads the sets that have already judged
(v3 to LAST_READ_SET of bench_selector.py) and, apart, the sets tuned on (v1, v2, dev), so a
candidate is screened without reading an unread set; pass --cases to read one, once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_selector import DATA, LAST_READ_SET

from diffplugin_cli.selector import NULL_KEY, TextSelector
from diffplugin_cli.selector_eval import read_cases

TUNED_SETS = ["selector_heldout", "selector_heldout_v2", "selector_dev"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", help="heads file (default: the shipped ones)")
    parser.add_argument("--cases", action="append", help="held-out JSONL (repeatable; default: v3 to the last read set, and the tuned sets)")
    parser.add_argument("--out", required=True, help="where to write the selections (JSON Lines)")
    parser.add_argument("--against", help="selections of the shipped side, written by this script")
    args = parser.parse_args()

    paths = args.cases or [str(DATA / f"selector_heldout_v{n}.jsonl") for n in range(3, LAST_READ_SET + 1)] + [str(DATA / f"{name}.jsonl") for name in TUNED_SETS]
    selector = TextSelector.from_file(args.heads)
    tasks = [label for label in selector.labels if label != NULL_KEY]
    rows = []
    for path in paths:
        cases = read_cases(path)
        for case, selection in zip(cases, selector.select_many([case["text"] for case in cases], tasks)):
            selected = sorted(selection.selected)
            rows.append({"set": Path(path).stem, "text": case["text"], "kind": case.get("kind"), "labels": sorted(case["labels"]),
                         "selected": selected, "right": selected == sorted(set(case["labels"]) & set(tasks))})
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    if args.against:
        compare([json.loads(line) for line in Path(args.against).read_text(encoding="utf-8").splitlines()], rows)


def compare(base: list[dict], candidate: list[dict]) -> None:
    """Right per set on each side, totals apart for the tuned sets, and every case that changed."""
    if [(row["set"], row["text"]) for row in base] != [(row["set"], row["text"]) for row in candidate]:
        raise SystemExit("--against was written for other cases")
    totals = {"judged": [0, 0, 0], "tuned": [0, 0, 0]}
    for name in dict.fromkeys(row["set"] for row in candidate):
        pairs = [(b, c) for b, c in zip(base, candidate) if c["set"] == name]
        right = [sum(b["right"] for b, _ in pairs), sum(c["right"] for _, c in pairs), len(pairs)]
        group = totals["tuned" if name in TUNED_SETS else "judged"]
        group[:] = [g + r for g, r in zip(group, right)]
        print(f"{name:>22}: shipped {right[0]:4d}  candidate {right[1]:4d}  of {right[2]}")
    for group, (b, c, n) in totals.items():
        print(f"{group:>22}: shipped {b:4d}  candidate {c:4d}  of {n}")
    for word, wanted in (("fixed", True), ("broken", False)):
        changed = [c for b, c in zip(base, candidate) if c["right"] == wanted and b["right"] != wanted]
        print(f"\n{word}: {len(changed)}")
        for row in changed:
            print(f"  [{row['set']}, {row['kind']}] {row['text']!r} wants {row['labels']}, candidate {row['selected']}")


if __name__ == "__main__":
    main()
