"""Questions behind one fixed few-shot prefix: llama-cpp-python's prefix reuse against our passes.

    python -m benchmarks.prefix_reuse --model gemma3-270m --out benchmarks/results/prefix-reuse-gemma3-270m.json

A user who puts the same solved examples before every question and asks through llama-cpp-python's
`create_completion(max_tokens=1)` gets the prefix's KV cache reused from one call to the next: only
the new tokens run. Our engine clears its cache on every pass. For each category (calibration-side
cloze facts of `convert/cloze/cloze-broad.jsonl`, never the test split): its first `--shots` facts
are the prefix, the next `--limit` the questions; per question, interleaved in one process with the
same threads, in an order rotated from question to question: llama-cpp-python's completion (greedy,
one token; the call before it asked the previous question, so the prefix is in its cache),
`Llama.eval` after `reset()` (the issue's comparison: the same tokens, nothing reused), our
full-depth answer and our default answer (the speed guard off), and our default with
`load_model(reuse_prefix=True)` (a second runtime on the same weights, whose cache holds the
question before). Answers are compared by token text.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import llama_cpp_python, progress, save_json
from edge_spade import load_model
from edge_spade.bench.run import last_logits

log = logging.getLogger("benchmarks.prefix_reuse")
FACTS = Path(__file__).resolve().parents[1] / "convert" / "cloze" / "cloze-broad.jsonl"
RUNS = ("completion", "eval_reset", "full", "default", "reuse")


def questions(category: str, shots: int, limit: int) -> list[str]:
    facts = [r for r in map(json.loads, FACTS.read_text().splitlines()) if r["category"] == category]
    prefix = "".join(f"{r['prompt']}{r['answer']}\n" for r in facts[:shots])
    return [prefix + r["prompt"] for r in facts[shots : shots + limit]]


def completion(llm, q: str) -> str:
    return llm.create_completion(q, max_tokens=1, temperature=0.0)["choices"][0]["text"]


def eval_reset(rt, llm, tokens: list[int]) -> str:
    llm.reset()
    llm.eval(tokens)
    return rt.engine.token_text(int(np.argmax(last_logits(llm))))


def ask(rt, q: str, **options) -> str:
    return rt.ask(q, **options).answer


def run_category(rt, reuse, llm, category: str, shots: int, limit: int) -> dict:
    qs = questions(category, shots, limit)
    ms: dict[str, list[float]] = {k: [] for k in RUNS}
    same, same_reuse, reused, tokens = [], [], [], []
    for i, q in enumerate(progress(qs, len(qs), category)):
        prompt = rt.prompt(q, None)
        answers: dict[str, str] = {}
        calls = [
            ("completion", partial(completion, llm, q)),
            ("eval_reset", partial(eval_reset, rt, llm, prompt.tokens)),
            ("full", partial(ask, rt, q, full=True)),
            ("default", partial(ask, rt, q)),
            ("reuse", partial(reuse.ask, q)),
        ]
        for name, call in calls[i % len(calls) :] + calls[: i % len(calls)]:
            if name == "completion":  # its cache holds whatever ran last: put the previous question back
                completion(llm, qs[i - 1] if i else q)
            t0 = time.perf_counter()
            answers[name] = call()
            if i:  # the first question warms up graphs and caches
                ms[name].append((time.perf_counter() - t0) * 1000)
        same.append(answers["completion"] == answers["full"])
        same_reuse.append(answers["reuse"].answer == answers["full"])
        reused.append(answers["reuse"].reused_tokens)
        tokens.append(len(prompt.tokens))
    return {
        "category": category,
        "shots": shots,
        "n": len(qs),
        "prompt_tokens_median": float(np.median(tokens)),
        "median_ms": {k: round(statistics.median(v), 2) for k, v in ms.items()},
        "total_ms": {k: round(sum(v), 1) for k, v in ms.items()},
        "default_vs_completion_total": round(sum(ms["completion"]) / sum(ms["default"]), 3),
        "full_vs_eval_reset_total": round(sum(ms["eval_reset"]) / sum(ms["full"]), 3),
        "reuse_vs_completion_total": round(sum(ms["completion"]) / sum(ms["reuse"]), 3),
        "same_answer_as_completion": round(float(np.mean(same)), 3),
        "reuse_same_answer_as_full": round(float(np.mean(same_reuse)), 3),
        "reused_tokens_median": float(np.median(reused)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--categories", nargs="+", default=["capital", "addition"])
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rt = load_model(args.model, threads=args.threads, speed_guard=False)
    reuse = load_model(args.model, threads=args.threads, speed_guard=False, reuse_prefix=True, share_with=rt)
    llm = llama_cpp_python(rt)
    rows = [run_category(rt, reuse, llm, c, args.shots, args.limit) for c in args.categories]
    print(
        f"{'category':<12}{'tokens':>7}{'completion':>11}{'eval+reset':>11}{'full':>8}{'default':>8}{'reuse':>8}"
        f"{'dflt/compl':>11}{'reuse/compl':>12}"
    )
    for r in rows:
        m = r["median_ms"]
        print(
            f"{r['category']:<12}{r['prompt_tokens_median']:>7.0f}{m['completion']:>11.1f}{m['eval_reset']:>11.1f}"
            f"{m['full']:>8.1f}{m['default']:>8.1f}{m['reuse']:>8.1f}{r['default_vs_completion_total']:>11.2f}"
            f"{r['reuse_vs_completion_total']:>12.2f}"
            "   (median ms; ratio of totals, >1 = ours faster)"
        )
    if args.out:
        save_json({"model": rt.name, "threads": rt.engine.threads, "rows": rows}, args.out, [rt])
    reuse.close()
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
