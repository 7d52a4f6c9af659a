"""Wall-clock cost of an answer: full depth vs SPADE at fixed layers, several models, interleaved.

    python -m benchmarks.speed --models gemma3-270m smollm2-135m --data arc/ARC-Easy-Dev.jsonl \
        --limit 40 --fractions 0.33 0.5 0.75 --out results/speed.json

Everything runs in one process with the same threads; for each question every model and mode
is timed in turn (round robin), so drifts in machine load hit all of them alike. Reports the
median `timings_ms.total` of each and the ratio of full-depth to SPADE medians per question.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_path, progress, save_json
from edge_spade import load_model
from edge_spade.convert.datasets import load_items


def run(models: list[str], data: str, limit: int, fractions: list[float], threads: int | None, repeat: int) -> dict:
    runtimes = [load_model(m, threads=threads) for m in models]
    items = load_items(data_path(data), limit=limit)
    times: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    tokens: dict[str, list[int]] = {rt.name: [] for rt in runtimes}
    for rt in runtimes:  # warm-up: first calls build graphs and dequantize rows
        rt.ask(items[0].question, items[0].choices, full=True)
    for item in progress(items, len(items), "speed"):
        for rt in runtimes:
            modes = [("full", None)] + [(f"spade@{f:g}", round(f * (rt.n_layers - 1))) for f in fractions]
            per_mode: dict[str, float] = {}
            for _ in range(repeat):
                for mode, layer in modes:
                    a = rt.ask(item.question, item.choices, layer=layer, full=layer is None)
                    per_mode[mode] = min(per_mode.get(mode, float("inf")), a.timings_ms["total"])
            tokens[rt.name].append(a.prompt_tokens)
            for mode, ms in per_mode.items():
                times.setdefault((rt.name, mode), []).append(ms)
                if mode != "full":
                    ratios.setdefault((rt.name, mode), []).append(per_mode["full"] / ms)
    rows = []
    for (name, mode), ms in times.items():
        rows.append(
            {
                "model": name,
                "mode": mode,
                "median_ms": statistics.median(ms),
                "median_speedup": statistics.median(ratios[(name, mode)]) if mode != "full" else 1.0,
                "median_prompt_tokens": statistics.median(tokens[name]),
            }
        )
    return {"data": data, "n": len(items), "threads": threads, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    p.add_argument("--data", default="arc/ARC-Easy-Dev.jsonl")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--fractions", type=float, nargs="*", default=[0.33, 0.5, 0.75], help="SPADE layer / depth")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="timings per question and mode (the minimum is kept)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = run(args.models, args.data, args.limit, args.fractions, args.threads, args.repeat)
    print(f"{'model':<16}{'mode':<14}{'median ms':>10}{'speedup':>9}{'tokens':>8}")
    for r in result["rows"]:
        print(
            f"{r['model']:<16}{r['mode']:<14}{r['median_ms']:>10.1f}{r['median_speedup']:>9.2f}"
            f"{r['median_prompt_tokens']:>8.0f}"
        )
    if args.out:
        save_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
