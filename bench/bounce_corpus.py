"""Score the bounce parser/classifier on the labelled corpus of real bounces.

Prints the share of labelled recipients found, the share whose hard/soft
matches and the share whose reason matches, then a per-reason confusion
summary (label -> what we said). Exits non-zero when the corpus is missing
or a goal is not met (found >= 95%, hard/soft >= 95%, reason >= 85%).

    python bench/bounce_corpus.py [CORPUS_DIR] [--show-misses] [--split tune|holdout]

``--split holdout`` scores only a fixed 30% of the messages (chosen by a
seeded hash of the file name, so the split never changes), ``--split tune``
the other 70%. Tune rules on ``tune`` only (``--show-misses`` refuses to
list the hold-out's misses), and check that ``holdout`` does not drop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from fastsend.bounce import parse_bounce

GOALS = {"found": 0.95, "hard": 0.95, "reason": 0.85}
HOLDOUT_SEED = "fastsend-bounce-holdout-1"
HOLDOUT_SHARE = 30  # percent
DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "bounces"


def in_holdout(name: str) -> bool:
    """Whether ``name`` belongs to the fixed 30% hold-out split."""
    h = hashlib.sha256(f"{HOLDOUT_SEED}:{name}".encode()).digest()
    return int.from_bytes(h[:4], "big") % 100 < HOLDOUT_SHARE


def score(corpus: Path, show_misses: bool = False, split: str = "all") -> dict[str, float]:
    labels = json.loads((corpus / "labels.json").read_text())
    if split != "all":
        want = split == "holdout"
        labels = {k: v for k, v in labels.items() if in_holdout(k) == want}
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
            if show_misses and (r.reason != e["reason"] or r.hard != bool(e["hard_bounce"])):
                hard = "" if r.hard == bool(e["hard_bounce"]) else f" HARD={r.hard}"
                print(
                    f"MISS {name}#{e['index']} want {e['reason']} got {r.reason}{hard} "
                    f"[{r.status} {r.reply_code} {r.command}] {r.diagnostic[:160]!r}"
                )
    elapsed = time.perf_counter() - t0
    shares = {"found": found / total, "hard": hard_ok / total, "reason": reason_ok / total}
    print(f"corpus: {corpus} [{split}] ({len(labels)} messages, {total} labelled recipients)")
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
    ap.add_argument("--split", choices=("all", "tune", "holdout"), default="all")
    args = ap.parse_args()
    if args.show_misses and args.split != "tune":
        ap.error("--show-misses lists only the tune split's misses (use --split tune)")
    if not (args.corpus / "labels.json").exists():
        print(f"corpus not found at {args.corpus}", file=sys.stderr)
        return 2
    shares = score(args.corpus, args.show_misses, args.split)
    return 0 if all(shares[k] >= GOALS[k] for k in GOALS) else 1


if __name__ == "__main__":
    sys.exit(main())
