"""Per-layer accuracy and agreement with the full model: logit lens vs SPADE (the paper's Figure 3).

    python -m benchmarks.layerwise --model gemma3-270m --data arc/ARC-Easy-Dev.jsonl --limit 200 \
        --out results/layerwise-gemma-arc-easy.json [--tail 1 4]

One trace pass per question keeps the tail rows after every layer; SPADE at each layer is
then its own short pass over the whole vocabulary, and the logit lens is numpy on the last
row. Decision-set answers (choices) and vocabulary top-1 both come from the same logits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_path, progress, pyplot, save_json
from benchmarks.metrics import accuracy, agreement, cohen_kappa, constant_agreement
from edge_spade import load_model
from edge_spade.convert.datasets import load_items

log = logging.getLogger("benchmarks.layerwise")


def decide(prompt, vocab_logits: np.ndarray):
    """(answer, vocab top-1): a choice index for choice questions, else the token id."""
    top1 = int(np.argmax(vocab_logits))
    return (top1 if prompt.ids is None else prompt.decide(vocab_logits[prompt.ids])), top1


def run(model: str | None, data: str, limit: int | None, tails: list[int], threads: int | None = None) -> dict:
    rt = load_model(model, threads=threads)
    engine = rt.engine
    L = engine.n_layers
    items = load_items(data_path(data), limit=limit)
    methods = ["logit_lens"] + [f"spade_k{k}" if k != 1 else "spade" for k in tails]
    answers = {m: [[] for _ in range(L)] for m in methods}
    top1 = {m: [[] for _ in range(L)] for m in methods}
    full_answers, full_top1, gold = [], [], []
    for item in progress(items, len(items), f"layerwise {rt.name}"):
        prompt = rt.prompt(item.question, item.choices)
        trace = engine.trace(prompt.tokens, None, tail=max(tails))
        full = decide(prompt, trace.full.logits)
        full_answers.append(full[0])
        full_top1.append(full[1])
        gold.append(item.gold if item.choices else _gold_token(engine, item.gold))
        for layer in range(L):
            lens = decide(prompt, engine.lens(trace.last[layer], None))
            answers["logit_lens"][layer].append(lens[0])
            top1["logit_lens"][layer].append(lens[1])
            for k, method in zip(tails, methods[1:]):
                if layer == L - 1:
                    out = full
                else:
                    keep = [i for i, pos in enumerate(trace.tail_rows) if pos == 0 or pos >= len(prompt.tokens) - k]
                    logits = engine.spade_tail(
                        trace.states[layer][keep], layer, None, [prompt.tokens[trace.tail_rows[i]] for i in keep]
                    )
                    out = decide(prompt, logits)
                answers[method][layer].append(out[0])
                top1[method][layer].append(out[1])
    layers = []
    for layer in range(L):
        row = {"layer": layer}
        for m in methods:
            a = answers[m][layer]
            row[m] = {
                "acc": accuracy(a, gold),
                "agree": agreement(a, full_answers),
                "kappa": cohen_kappa(a, full_answers),
                "top1_agree": agreement(top1[m][layer], full_top1),
            }
        layers.append(row)
    return {
        "model": rt.name,
        "data": str(data),
        "n": len(items),
        "n_layers": L,
        "tails": tails,
        "full": {
            "acc": accuracy(full_answers, gold),
            "constant_agreement": constant_agreement(full_answers),
            "answer_counts": _counts(full_answers, engine, bool(items and items[0].choices)),
        },
        "layers": layers,
    }


def _gold_token(engine, text: str | None) -> int | None:
    if text is None:
        return None
    toks = engine.tokenize(text, add_special=False, parse_special=False)
    return toks[0] if toks else None


def _counts(answers: list[int], engine, choices: bool) -> dict[str, int]:
    keys, counts = np.unique(answers, return_counts=True)
    name = (lambda k: "ABCDEFGH"[k] if k < 8 else str(k)) if choices else (lambda k: engine.token_text(int(k)))
    return {name(int(k)): int(c) for k, c in sorted(zip(keys, counts), key=lambda kc: -kc[1])}


def print_table(result: dict) -> None:
    methods = [m for m in result["layers"][0] if m != "layer"]
    full = result["full"]
    print(
        f"{result['model']} on {result['data']} (n={result['n']}): full-model accuracy {full['acc']:.3f}, "
        f"constant-answer agreement {full['constant_agreement']:.3f}, answers {full['answer_counts']}"
    )
    head = "layer " + " ".join(f"{m + ' acc/agree/kappa/top1':>36}" for m in methods)
    print(head)
    for row in result["layers"]:
        cells = [
            f"{row[m]['acc']:8.3f} {row[m]['agree']:8.3f} {row[m]['kappa']:8.3f} {row[m]['top1_agree']:8.3f}"
            for m in methods
        ]
        print(f"{row['layer']:>5} " + " ".join(f"{c:>36}" for c in cells))


def plot(result: dict, png: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    methods = [m for m in result["layers"][0] if m != "layer"]
    xs = [r["layer"] for r in result["layers"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        axes[0].plot(xs, [r[m]["agree"] for r in result["layers"]], marker="o", label=m)
        axes[1].plot(xs, [r[m]["top1_agree"] for r in result["layers"]], marker="o", label=m)
    axes[0].axhline(result["full"]["constant_agreement"], color="grey", ls="--", label="constant answer")
    axes[0].set_title("agreement with the full model (decision set)")
    axes[1].set_title("top-1 agreement over the vocabulary")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        ax.legend()
    fig.suptitle(f"{result['model']} - {Path(result['data']).name} (n={result['n']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    log.info("saved %s", png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="registry name or .gguf path (default model if omitted)")
    p.add_argument("--data", required=True, help="ARC/BoolQ/HEAD-QA/cloze file (relative to ../shared/data)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--tail", type=int, nargs="+", default=[1], help="SPADE tail widths to compare")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (a PNG is written beside it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = run(args.model, args.data, args.limit, args.tail, args.threads)
    print_table(result)
    if args.out:
        out = save_json(result, args.out)
        plot(result, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
