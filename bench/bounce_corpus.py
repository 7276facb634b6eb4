"""Score the bounce parser/classifier on the labelled corpus of real bounces.

Prints the share of labelled recipients found, the share whose hard/soft
matches and the share whose reason matches, then a per-reason confusion
summary (label -> what we said). Exits non-zero when the corpus is missing
or a goal is not met (found >= 95%, hard/soft >= 95%, reason >= 85%).

    python bench/bounce_corpus.py [CORPUS_DIR] [--show-misses]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from fastsend.bounce import parse_bounce

GOALS = {"found": 0.95, "hard": 0.95, "reason": 0.85}
DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "bounces"


def score(corpus: Path, show_misses: bool = False) -> dict[str, float]:
    labels = json.loads((corpus / "labels.json").read_text())
    total = found = hard_ok = reason_ok = 0
    confusion: dict[str, Counter[str]] = defaultdict(Counter)
    t0 = time.perf_counter()
    for name, entries in sorted(labels.items()):
        recs = parse_bounce((corpus / "eml" / name).read_bytes())
        for e in entries:
            total += 1
            i = int(e["index"]) - 1
            if i >= len(recs):
                confusion[e["reason"]]["<missing>"] += 1
                if show_misses:
                    print(f"MISSING {name}#{e['index']} want {e['reason']}")
                continue
            r = recs[i]
            found += 1
            hard_ok += r.hard == bool(e["hard_bounce"])
            reason_ok += r.reason == e["reason"]
            confusion[e["reason"]][r.reason] += 1
            if show_misses and r.reason != e["reason"]:
                print(
                    f"MISS {name}#{e['index']} want {e['reason']} got {r.reason} "
                    f"[{r.status} {r.reply_code} {r.command}] {r.diagnostic[:160]!r}"
                )
    elapsed = time.perf_counter() - t0
    shares = {"found": found / total, "hard": hard_ok / total, "reason": reason_ok / total}
    print(f"corpus: {corpus} ({len(labels)} messages, {total} labelled recipients)")
    print(f"parse+classify: {elapsed * 1000 / len(labels):.2f} ms/message")
    print(f"found:     {shares['found']:.1%} (goal {GOALS['found']:.0%})")
    print(f"hard/soft: {shares['hard']:.1%} (goal {GOALS['hard']:.0%})")
    print(f"reason:    {shares['reason']:.1%} (goal {GOALS['reason']:.0%})")
    print("\nper reason: label  n  correct  -> most common wrong answers")
    for reason, c in sorted(confusion.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(c.values())
        wrong = ", ".join(f"{k}:{v}" for k, v in c.most_common() if k != reason)
        print(f"  {reason:16} {n:4} {c[reason]:4}  {wrong}")
    return shares


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args()
    if not (args.corpus / "labels.json").exists():
        print(f"corpus not found at {args.corpus}", file=sys.stderr)
        return 2
    shares = score(args.corpus, args.show_misses)
    return 0 if all(shares[k] >= GOALS[k] for k in GOALS) else 1


if __name__ == "__main__":
    sys.exit(main())
