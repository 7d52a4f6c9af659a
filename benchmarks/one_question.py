"""A one-question `edge-spade ask` against the same with `--full`: whole processes, paired, alternating.

    python -m benchmarks.one_question --out benchmarks/results/one-question-gemma3-270m.json

A user typing one question pays for starting the process and loading the model; the answer's
own time (`timings_ms.total`) is reported beside the wall time, as the default rule's speed
promise ("never slower than --full") is about both.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_json

_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Peru", "Lima")]
_CAPITALS += [("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Canada", "Ottawa")]
_MORE = [("Spain", "Madrid"), ("Greece", "Athens"), ("Cuba", "Havana"), ("Ghana", "Accra"), ("Iran", "Tehran")]
_MORE += [("Chad", "N'Djamena"), ("Mali", "Bamako"), ("Laos", "Vientiane"), ("Nepal", "Kathmandu")]
QUESTIONS = [
    ("The capital city of Chile is", None),
    ("One mouse, two", None),
    ("Monday, Tuesday, Wednesday,", None),
    ("Is water wet?", ["yes", "no"]),
    # few-shot prompts of 55 to 150 tokens: plans by length, one-question ones included
    ("".join(f"The capital of {c} is {city}.\n" for c, city in _CAPITALS) + "The capital of Chile is", None),
    ("".join(f"The capital of {c} is {city}.\n" for c, city in _CAPITALS + _MORE) + "The capital of Chile is", None),
    ("".join(f"{a} + {b} = {a + b}\n" for a, b in [(2, 3), (4, 1), (7, 2), (5, 5), (6, 3), (8, 1)]) + "3 + 4 =", None),
]


def ask(model: str, question: str, choices: list[str] | None, full: bool) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "edge_spade.cli", "-q", "ask", question, "--model", model, "--json"]
    argv += ["--choices", *choices] if choices else []
    argv += ["--full"] if full else []
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return (time.perf_counter() - t0) * 1000, json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ask(args.model, "warm-up", None, True)  # caches (index, sha256 markers) and the page cache
    rows = []
    for question, choices in QUESTIONS:
        wall = {"default": [], "full": []}
        answer_ms = {"default": [], "full": []}
        answers = {}
        for i in range(args.repeat):
            for mode in ("default", "full") if i % 2 == 0 else ("full", "default"):
                ms, a = ask(args.model, question, choices, mode == "full")
                wall[mode].append(ms)
                answer_ms[mode].append(a["timings_ms"]["total"])
                answers[mode] = a["answer"]
                if mode == "default":
                    plan, guard, exit_layer = a.get("plan"), a.get("guard"), a.get("exit_layer")
        rows.append(
            {
                "question": question,
                "choices": choices,
                "same_answer": answers["default"] == answers["full"],
                "plan": plan,
                "guard": guard,
                "exit_layer": exit_layer,
                **{f"wall_ms_{m}": round(statistics.median(v), 1) for m, v in wall.items()},
                **{f"answer_ms_{m}": round(statistics.median(v), 2) for m, v in answer_ms.items()},
                "wall_ratio_full_over_default": round(
                    statistics.median(wall["full"]) / statistics.median(wall["default"]), 3
                ),
            }
        )
        r = rows[-1]
        print(
            f"{question[:32].replace(chr(10), ' '):<34}{r['wall_ms_full']:>8.0f}{r['wall_ms_default']:>8.0f} ms wall  "
            f"{r['answer_ms_full']:>7.1f}{r['answer_ms_default']:>7.1f} ms answer  plan {plan} ({guard})"
        )
    if args.out:
        save_json({"model": args.model, "repeat": args.repeat, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
