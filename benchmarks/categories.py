"""Where an early SPADE-K answer goes wrong, by cloze category: agreement with the full model and
the wrong exits a probe threshold would let through.

    python -m benchmarks.categories --model gemma3-270m --data convert/cloze-calibration.jsonl \
        --variants 3 --tail 4 --layer 4 --threshold 2 --out benchmarks/results/categories-gemma3-270m-ours.json
    python -m benchmarks.categories --model gemma3-270m --data cloze/facts.jsonl --tail 4 --layer 4 --threshold 2

It reads calibration's cached traces (`edge_spade.calibrate.collect`), so running it on the
prompts just calibrated costs nothing; other prompts are traced once (SPADE-K at every layer).
This is how a calibration set's difficulty can be compared with the prompts it is meant for.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_path, progress, save_json
from edge_spade import load_model
from edge_spade.convert.datasets import load_items
from edge_spade.convert.trace import collect
from edge_spade.heads import FREE_TOP_K

log = logging.getLogger("benchmarks.categories")


def run(
    model: str | None,
    data: str,
    tail: int,
    layers: list[int],
    threshold: float,
    variants: int,
    few_shot: int,
    examples: int = 8,
) -> dict:
    rt = load_model(model, tail_models=False)
    L = rt.engine.n_layers
    items = [i for i in load_items(data_path(data), few_shot=few_shot, variants=variants) if not i.choices]
    samples = collect(rt, items, tail=tail, progress=lambda it: progress(it, len(items), f"trace {rt.name}"))
    if len(samples) != len(items):
        raise SystemExit(f"{len(items) - len(samples)} prompts could not be traced")
    groups = np.array([i.group for i in items])
    full = np.array([s.answer(L - 1) for s in samples])
    result = {
        "model": rt.name,
        "data": str(data),
        "tail_k": tail,
        "threshold": threshold,
        "few_shot": few_shot,
        "variants": variants,
        "n": len(items),
        "layers": {},
    }
    for layer in layers:
        answers = np.array([s.answer(layer) for s in samples])
        ent = np.array([s.entropy(layer, FREE_TOP_K) for s in samples])
        agree, exits = answers == full, ent <= threshold
        rows = {}
        for cat in [*sorted(set(groups)), "all"]:
            m = groups == cat if cat != "all" else np.ones(len(items), bool)
            rows[cat] = {
                "n": int(m.sum()),
                "agreement": round(float(agree[m].mean()), 4),
                "exit_rate": round(float(exits[m].mean()), 4),
                "wrong_exits": int((exits & ~agree & m).sum()),
            }
        wrong = np.where(exits & ~agree)[0][:examples]
        result["layers"][str(layer)] = {
            "by_category": rows,
            "wrong_exit_examples": [
                {
                    "prompt": items[i].question.splitlines()[-1],
                    "entropy": round(float(ent[i]), 3),
                    "early": rt.engine.token_text(int(answers[i])),
                    "full": rt.engine.token_text(int(full[i])),
                }
                for i in wrong
            ],
        }
    return result


def print_table(result: dict) -> None:
    print(
        f"{result['model']} on {result['data']} (n={result['n']}, {result['few_shot']}-shot): "
        f"SPADE-{result['tail_k']} against the full answer; exits at <= {result['threshold']} nats"
    )
    for layer, block in result["layers"].items():
        print(f"layer {layer}:  {'category':<10}{'n':>6}{'agree':>8}{'exits':>7}{'wrong':>7}")
        for cat, r in block["by_category"].items():
            print(f"{'':10}{cat:<10}{r['n']:>6}{r['agreement']:>8.2f}{r['exit_rate']:>7.2f}{r['wrong_exits']:>7}")
        for ex in block["wrong_exit_examples"]:
            print(f"{'':10}wrong exit: {ex['prompt']!r} -> {ex['early']!r} (full {ex['full']!r}, {ex['entropy']} nats)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="registry name or .gguf path (default model if omitted)")
    p.add_argument("--data", required=True, help="cloze facts file (a path, or relative to ../shared/data)")
    p.add_argument("--tail", type=int, default=4)
    p.add_argument("--layer", type=int, nargs="+", default=[4])
    p.add_argument("--threshold", type=float, default=2.0, help="probe threshold (nats, top-32 entropy)")
    p.add_argument("--variants", type=int, default=1, help="few-shot prefixes per fact (calibration used 3)")
    p.add_argument("--few-shot", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = run(args.model, args.data, args.tail, args.layer, args.threshold, args.variants, args.few_shot)
    print_table(result)
    if args.out:
        save_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
