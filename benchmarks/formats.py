"""Do exit rules hold across prompt formats? Agreement with full depth.

    python -m benchmarks.formats --model gemma3-270m --out benchmarks/results/formats-gemma3-270m.json

The free-answer certificate holds for prompts drawn like the calibration's: cloze facts with a
few-shot prefix of other facts, one per line. People also write `Q: ... A:` pairs, or `... ->`
arrows. This takes five facts of every category of the calibration side of the broad corpus
(convert/cloze/cloze-broad.jsonl), or of `--data` (the test split, once every choice is made:
a cascade may be calibrated on these formats, convert/cascade.py `--formats`), builds 3- and
8-shot prompts in three formats (prefixes drawn from the fact's own category), and answers each
with every exit rule the heads carry (the default, and each signal by name) and at full depth, in
one process; where the heads carry a domain gate, the rules that run heads also without it.
Agreement only: no timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import progress, save_json
from edge_spade import load_model
from edge_spade.convert.datasets import CLOZE_FORMATS, Shot
from edge_spade.manifest import HeadsMismatchError
from edge_spade.policy import ExitPolicy

CORPUS = Path(__file__).resolve().parents[1] / "convert" / "cloze" / "cloze-broad.jsonl"
PER_CATEGORY = 5


def prompts(
    shots: int, seed: int = 7, per_category: int = PER_CATEGORY, corpus: Path = CORPUS
) -> list[tuple[str, str]]:
    """(format, prompt) for `per_category` facts of each category, prefixes from the same category."""
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    by_category: dict[str, list[Shot]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    rng = random.Random(seed)
    out = []
    for category in sorted(by_category):
        facts = by_category[category]
        for fact in rng.sample(facts, min(per_category, len(facts))):
            others = [f for f in facts if f is not fact]
            prefix = rng.sample(others, min(shots, len(others)))
            out.extend((name, build(prefix, fact)) for name, build in CLOZE_FORMATS.items())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--heads", default=None, help="heads folder (default: the shipped ones)")
    p.add_argument("--shots", type=int, nargs="+", default=[3, 8])
    p.add_argument("--per-category", type=int, default=PER_CATEGORY, help="facts per category and cell")
    p.add_argument("--default-only", action="store_true", help="only the default rule (a larger run, sooner)")
    p.add_argument(
        "--data",
        type=Path,
        default=CORPUS,
        help="cloze facts (default: the calibration side; convert/cloze/cloze-broad-test.jsonl, the test split, "
        "once every choice is made)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    rt = load_model(args.model, heads=args.heads, speed_guard=False)  # the guard off: the rules as calibrated
    free = rt.manifest.sets["free"]
    rules: dict[str, dict] = {"default": {}}
    for signal in ("lspade", "spade", "cascade"):
        try:
            ExitPolicy.from_head_set(free, signal=signal)
        except HeadsMismatchError:  # the heads carry no such rule
            continue
        rules[signal] = {"signal": signal}
    if args.default_only:
        rules = {"default": {}}
    gates = rt.heads["free"].domain
    # what the heads' domain gate (edge_spade/domain.py) prevents: the rules that run heads, without it
    if gates and not args.default_only:
        rules.update({f"{r} ungated": {"signal": r} for r in ("lspade", "cascade") if r in rules})
    rows = []
    for shots in args.shots:
        items = prompts(shots, per_category=args.per_category, corpus=args.data)
        tally: dict[tuple[str, str], list[int]] = {}
        for name, prompt in progress(items, len(items), f"formats {args.model} {shots}-shot"):
            full = rt.ask(prompt, full=True).token
            for rule, options in rules.items():
                rt.heads["free"].domain = {} if rule.endswith("ungated") else gates
                a = rt.ask(prompt, **options)
                t = tally.setdefault((name, rule), [0, 0, 0])
                t[0] += a.token == full
                t[1] += a.exit_layer is not None
                t[2] += 1
        for (name, rule), (agree, exits, n) in tally.items():
            rows.append(
                {
                    "format": name,
                    "shots": shots,
                    "rule": rule,
                    "n": n,
                    "agreement": round(agree / n, 4),
                    "exit_rate": round(exits / n, 4),
                }
            )
            print(f"{args.model} {shots}-shot {name:<6} {rule:<16} agreement {agree / n:.3f}  exits {exits / n:.2f}")
    result = {
        "model": rt.name,
        "signal": free.signal,
        "cascade": free.cascade,
        "per_category": args.per_category,
        "data": args.data.name,
        "rows": rows,
    }
    if args.out:
        save_json(result, args.out, [rt])
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
