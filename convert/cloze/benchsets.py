"""The question sets `edge-spade bench` ships (edge_spade/bench/sets/), made from the cloze test split.

    python -m edge_spade.convert.cloze.benchsets

Every question comes from `cloze-broad-test.jsonl`, the facts no calibration and no tuning choice
has seen, so a user's benchmark measures questions the shipped heads were not fitted to. Free
answers come at 0, 3 and 8 shots (the examples are other test facts of the same category);
choice questions are a three-way multiple choice (the answer and two other answers of its
category) or a yes/no check of a stated answer (true for every other question). The sets are
written by this project and ship under its licence. The output is deterministic: a test checks
that the shipped files are what this script writes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from edge_spade.convert.datasets import load_items

HERE = Path(__file__).resolve().parent
TEST_FACTS = HERE / "cloze-broad-test.jsonl"
SETS = Path(__file__).resolve().parents[2] / "edge_spade" / "bench" / "sets"
PER_SET = 120
SHOTS = (0, 3, 8)


def spread(rows: list, n: int, group) -> list:
    """`n` rows, as many from each group as it allows, evenly spaced within each (arithmetic,
    the largest group, does not crowd out the rest)."""
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    quota, left = {}, n
    for g in sorted(groups, key=lambda g: (len(groups[g]), g)):
        quota[g] = min(len(groups[g]), left // (len(groups) - len(quota)))
        left -= quota[g]
    picked = []
    for g in sorted(groups):
        members, q = groups[g], quota[g]
        picked += [members[(i * len(members)) // q] for i in range(q)]
    return picked


def free_set(shots: int) -> list[dict]:
    items = spread(load_items(TEST_FACTS, few_shot=shots, seed=shots), PER_SET, lambda item: item.group)
    return [{"id": f"free{shots}-{item.key}", "question": item.question, "kind": f"free-{shots}"} for item in items]


def choice_set() -> list[dict]:
    facts = [json.loads(line) for line in TEST_FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers: dict[str, list[str]] = {}
    for f in facts:
        answers.setdefault(f["category"], [])
        if f["answer"].strip() not in answers[f["category"]]:
            answers[f["category"]].append(f["answer"].strip())
    usable = [f for f in facts if len(answers[f["category"]]) >= 3]
    rng = random.Random(0)
    out = []
    for i, f in enumerate(spread(usable, PER_SET, lambda f: f["category"])):
        right = f["answer"].strip()
        wrong = rng.sample([a for a in answers[f["category"]] if a != right], 2)
        if i % 2 == 0:
            choices = [right, *wrong]
            rng.shuffle(choices)
            out.append({"id": f"choice-{f['id']}", "question": f["prompt"], "choices": choices, "kind": "choice"})
        else:
            stated = right if i % 4 == 1 else wrong[0]
            question = f"{f['prompt']} {stated}. Is that true?"
            out.append({"id": f"yesno-{f['id']}", "question": question, "choices": ["yes", "no"], "kind": "choice"})
    return out


def render() -> dict[str, str]:
    """File name -> content of every shipped set."""
    sets = {f"free-{n}.jsonl": free_set(n) for n in SHOTS} | {"choice.jsonl": choice_set()}
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) for name, rows in sets.items()}


def write(folder: Path = SETS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render().items():
        (folder / name).write_text(text, encoding="utf-8")
        paths.append(folder / name)
    return paths


if __name__ == "__main__":
    if len(sys.argv) > 1:
        raise SystemExit("usage: python -m edge_spade.convert.cloze.benchsets")
    for path in write():
        print(path)
