"""Where an answer's time goes, and how it compares with llama-cpp-python on the same tokens.

    python -m benchmarks.answer_path --model gemma3-270m --out benchmarks/results/answer-path-gemma3-270m.json

For each prompt (the bench's sets from the cloze test split: free answers at 0, 3 and 8 shots
and choice questions; and ARC-Easy), interleaved in one process with the same threads, in an
order rotated from prompt to prompt (whichever runs right after another model's pass finds the
CPU caches holding that model's weights):
llama-cpp-python's `Llama.eval` on our prompt's tokens and the argmax of its last logits (what a
user would run instead), with its default (flash attention off) and with flash attention on (as
our engine lets llama.cpp choose on the CPU); our full-depth answer
(`Runtime.ask(full=True)`) and our default answer (`Runtime.ask()`, the speed guard off for
reproducible figures); and the parts of a full-depth free answer: building the prompt, the pass
with its logits, the top-k with probabilities (as shipped, and the former float64 softmax plus
argsort of the whole vocabulary, for the before/after), the token texts.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_path, llama_cpp_python, progress, save_json
from edge_spade import load_model
from edge_spade.bench.run import last_logits
from edge_spade.bench.sets import load_set
from edge_spade.convert.datasets import load_items
from edge_spade.runtime import softmax, top_probs

log = logging.getLogger("benchmarks.answer_path")
SETS = [("free-0", 0), ("free-3", 3), ("free-8", 8), ("choice", 0), ("arc/ARC-Easy-Test.jsonl", 0)]


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def llama_answer(llm, prompt) -> tuple[int, float]:
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(prompt.tokens)
    logits = last_logits(llm)
    return int(np.argmax(logits if prompt.ids is None else logits[prompt.ids])), ms(t0)


def timed_ask(rt, item, **options):
    t0 = time.perf_counter()
    answer = rt.ask(item.question, item.choices, **options)
    return answer, ms(t0)


def run_set(rt, llm, llm_fa, data: str, shots: int, limit: int) -> dict:
    if "/" in data:
        items = load_items(data_path(data), limit=limit, few_shot=shots)
    else:
        items = load_set(data)[:limit]
    engine = rt.engine
    t: dict[str, list[float]] = {
        k: []
        for k in ("llama_cpp", "llama_cpp_fa", "full", "default", "prompt", "pass", "topk", "topk_before", "texts")
    }
    agree, agree_fa, exits, tokens = [], [], [], []
    for i, item in enumerate(progress(items, len(items), f"{Path(data).stem} {shots}-shot")):
        prompt = rt.prompt(item.question, item.choices)
        answers, spent = {}, {}
        runs = [
            ("llama_cpp", partial(llama_answer, llm, prompt)),
            ("llama_cpp_fa", partial(llama_answer, llm_fa, prompt)),
            ("full", partial(timed_ask, rt, item, full=True)),
            ("default", partial(timed_ask, rt, item)),
        ]
        for name, run in runs[i % len(runs) :] + runs[: i % len(runs)]:  # each goes first as often
            answers[name], spent[name] = run()
        theirs, theirs_fa, full, default = (answers[k] for k in ("llama_cpp", "llama_cpp_fa", "full", "default"))
        t_llama, t_llama_fa, t_full, t_default = (spent[k] for k in ("llama_cpp", "llama_cpp_fa", "full", "default"))
        t0 = time.perf_counter()
        p = rt.prompt(item.question, item.choices)
        t_prompt = ms(t0)
        t0 = time.perf_counter()
        readout = engine.full(p.tokens, p.ids)
        t_pass = ms(t0)
        if p.ids is None:
            t0 = time.perf_counter()
            top, _ = top_probs(readout.logits, 5)
            t_topk = ms(t0)
            t0 = time.perf_counter()
            np.argsort(-softmax(readout.logits.astype(np.float64)))[:5]
            t_before = ms(t0)
            t0 = time.perf_counter()
            [engine.token_text(int(j)) for j in top]
            t_texts = ms(t0)
        else:
            t_topk = t_before = t_texts = 0.0
        if i == 0:
            continue  # warm-up: graphs, rows, caches
        for key, value in zip(t, (t_llama, t_llama_fa, t_full, t_default, t_prompt, t_pass, t_topk, t_before, t_texts)):
            t[key].append(value)
        if prompt.ids is None:  # the same next token as llama-cpp-python's argmax
            agree.append(theirs == full.token)
            agree_fa.append(theirs_fa == full.token)
        exits.append(default.exit_layer is not None)
        tokens.append(len(prompt.tokens))
    return {
        "data": data,
        "few_shot": shots,
        "n": len(tokens),
        "kind": "free" if items[0].choices is None else "choice",
        "prompt_tokens_median": float(np.median(tokens)),
        "median_ms": {k: round(statistics.median(v), 3) for k, v in t.items()},
        "total_ms": {k: round(sum(v), 1) for k, v in t.items()},
        "full_vs_llama_cpp_median": round(statistics.median(np.array(t["llama_cpp"]) / np.array(t["full"])), 3),
        "default_vs_llama_cpp_median": round(statistics.median(np.array(t["llama_cpp"]) / np.array(t["default"])), 3),
        "full_vs_llama_cpp_total": round(sum(t["llama_cpp"]) / sum(t["full"]), 3),
        "default_vs_llama_cpp_total": round(sum(t["llama_cpp"]) / sum(t["default"]), 3),
        "full_vs_llama_cpp_fa_total": round(sum(t["llama_cpp_fa"]) / sum(t["full"]), 3),
        "default_vs_llama_cpp_fa_total": round(sum(t["llama_cpp_fa"]) / sum(t["default"]), 3),
        "default_vs_full_total": round(sum(t["full"]) / sum(t["default"]), 3),
        "exit_rate": round(float(np.mean(exits)), 3),
        "free_answer_agrees_with_llama_cpp": round(float(np.mean(agree)), 3) if agree else None,
        "free_answer_agrees_with_llama_cpp_fa": round(float(np.mean(agree_fa)), 3) if agree_fa else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rt = load_model(args.model, threads=args.threads, speed_guard=False)
    llm, llm_fa = (llama_cpp_python(rt, flash_attn=fa) for fa in (False, True))
    rows = [run_set(rt, llm, llm_fa, data, shots, args.limit) for data, shots in SETS]
    result = {"model": rt.name, "threads": rt.engine.threads, "rows": rows}
    print(
        f"{'set':<28}{'tokens':>7}{'llama-cpp':>10}{'llc FA':>8}{'full':>8}{'default':>8}{'pass':>8}{'topk':>7}"
        f"{'before':>8}{'full/llc':>9}{'dflt/llc':>9}{'dflt/FA':>8}{'exits':>6}"
        "   (median ms; ratios: totals, >1 = ours faster)"
    )
    for r in rows:
        m = r["median_ms"]
        name = f"{Path(r['data']).stem} {r['few_shot']}-shot"
        print(
            f"{name:<28}{r['prompt_tokens_median']:>7.0f}"
            f"{m['llama_cpp']:>10.1f}{m['llama_cpp_fa']:>8.1f}{m['full']:>8.1f}{m['default']:>8.1f}{m['pass']:>8.1f}"
            f"{m['topk']:>7.2f}{m['topk_before']:>8.2f}{r['full_vs_llama_cpp_total']:>9.2f}"
            f"{r['default_vs_llama_cpp_total']:>9.2f}{r['default_vs_llama_cpp_fa_total']:>8.2f}{r['exit_rate']:>6.2f}"
        )
    if args.out:
        save_json(result, args.out, [rt])
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
