"""What a SPADE tail costs: on the whole model (layers below l recomputed) vs on a tail model.

    python -m benchmarks.tailcost --model gemma3-270m --widths 1 4 8 --repeat 15 \
        --out benchmarks/results/tailcost-gemma3-270m.json

For each layer and tail width K, in one process and interleaved: the (K+1)-row tail on the whole
model (`tail_model=False`) and on the tail model above that layer, over the vocabulary (free
answers: llama.cpp's LM head) and over a 4-token decision set (the graph ends at result_norm).
Also the full-depth answer of a cloze-length prompt both ways, for scale. Medians in ms.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import progress, pyplot, save_json
from edge_spade import load_model

PROMPT = (
    "Paris is the capital of France. Rome is the capital of Italy. Madrid is the capital of Spain. "
    "Berlin is the capital of"
)


def medians_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms of each function, run round robin (load drift hits all alike) after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeat + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms graphs and dequantized rows
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def run(model: str | None, widths: list[int], layers: list[int] | None, repeat: int, threads: int | None) -> dict:
    rt = load_model(model, threads=threads, heads=False)
    engine = rt.engine
    tokens = rt.prompt(PROMPT, None, template=False).tokens
    ids = np.array(tokens[-4:])  # any four ids: the cost does not depend on which
    layers = layers or list(range(0, engine.n_layers - 1, max(1, engine.n_layers // 6)))
    engine.use_tail_models(layers)
    rows = []
    for layer in progress(layers, len(layers), f"tail cost {rt.name}"):
        for k in widths:
            states = np.zeros((k + 1, engine.n_embd), np.float32)
            row = {"layer": layer, "tail_k": k, "tail_model": layer in engine.tail_model_layers}
            runs = {
                f"{way}_{label}_ms": partial(
                    engine.spade_tail, states, layer, decision, side=True, tail_model=way == "cut"
                )
                for label, decision in (("vocab", None), ("choice", ids))
                for way in ("whole", "cut")
            }
            row.update(medians_ms(runs, repeat))
            rows.append(row)
            logging.getLogger("benchmarks").info("%s", row)
    full = {
        "prompt_tokens": len(tokens),
        **medians_ms(
            {"full_vocab_ms": lambda: engine.full(tokens, None), "full_choice_ms": lambda: engine.full(tokens, ids)},
            repeat,
        ),
    }
    return {
        "model": rt.name,
        "n_layers": engine.n_layers,
        "threads": engine.threads,
        "repeat": repeat,
        "full": full,
        "rows": rows,
    }


def report(result: dict) -> None:
    f = result["full"]
    print(
        f"**{result['model']}** ({result['n_layers']} layers, {result['threads']} threads): full answer of a "
        f"{f['prompt_tokens']}-token prompt {f['full_vocab_ms']} ms over the vocabulary, "
        f"{f['full_choice_ms']} ms over a decision set\n"
    )
    print("| layer | K | whole model, vocab | tail model, vocab | whole model, choice | tail model, choice |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        mark = "" if r["tail_model"] else " (none)"
        print(
            f"| {r['layer']} | {r['tail_k']} | {r['whole_vocab_ms']} | {r['cut_vocab_ms']}{mark} | "
            f"{r['whole_choice_ms']} | {r['cut_choice_ms']}{mark} |"
        )


def plot(result: dict, png: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in sorted({r["tail_k"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["tail_k"] == k]
        (line,) = ax.plot([r["layer"] for r in rs], [r["whole_vocab_ms"] for r in rs], "--", label=f"K={k} whole model")
        ax.plot(
            [r["layer"] for r in rs],
            [r["cut_vocab_ms"] for r in rs],
            "-",
            color=line.get_color(),
            label=f"K={k} tail model",
        )
    ax.axhline(result["full"]["full_vocab_ms"], color="gray", lw=0.8, label="full answer")
    ax.set_xlabel("tail starts after layer")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"SPADE tail cost, {result['model']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--widths", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args.model, args.widths, args.layers, args.repeat, args.threads)
    report(result)
    if args.out:
        out = save_json(result, args.out)
        plot(result, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
