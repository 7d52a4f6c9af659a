"""Markdown tables from benchmark JSON files (for the README).

python -m benchmarks.report results/layerwise-*.json results/exit-*.json results/speed.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def layerwise(r: dict) -> str:
    full = r["full"]
    methods = [m for m in r["layers"][0] if m != "layer"]
    out = [
        f"**{r['model']}**, {r['data']}, n={r['n']}: full-model accuracy {full['acc']:.3f}, answers "
        f"{full['answer_counts']}, constant-answer agreement {full['constant_agreement']:.3f}",
        "",
    ]
    head = ["layer"] + [f"{m} {x}" for m in methods for x in ("acc", "agree", "kappa", "top-1")]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in r["layers"]:
        cells = [str(row["layer"])] + [
            f"{row[m][k]:.2f}" for m in methods for k in ("acc", "agree", "kappa", "top1_agree")
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def tails(r: dict, every: int | None = None) -> str:
    """Compact per-K view: agreement (kappa) with the full model by layer, one row per decoder."""
    full = r["full"]
    step = every or (1 if r["n_layers"] <= 18 else 2)
    rows = [row for row in r["layers"] if row["layer"] % step == 0 or row["layer"] == r["n_layers"] - 1]
    methods = [m for m in r["layers"][0] if m != "layer"]
    out = [
        f"**{r['model']}**, {Path(r['data']).name}, n={r['n']}: full accuracy {full['acc']:.2f}, "
        f"constant-answer agreement {full['constant_agreement']:.2f}; cells: agreement (kappa)",
        "",
        "| decoder | " + " | ".join(f"L{row['layer']}" for row in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for m in methods:
        name = {"spade": "SPADE K=1", "logit_lens": "logit lens"}.get(m, m.replace("spade_k", "SPADE K="))
        out.append(f"| {name} | " + " | ".join(f"{row[m]['agree']:.2f} ({row[m]['kappa']:.2f})" for row in rows) + " |")
    return "\n".join(out)


def exit_rows(r: dict) -> str:
    out = [
        f"**{r['model']}**: time with hooks and heads but no exit = x{r['overhead_no_exit']:.3f} of full depth",
        "",
        "| data | method | K | threshold | n | acc | agree | kappa | const. agree | mean exit layer | exits | "
        "median speedup | total speedup | oracle speedup | oracle exit layer |",
        "|" + "---|" * 15,
    ]
    for x in r["rows"]:
        out.append(
            f"| {Path(x['data']).name} | {x['method']} | {x.get('tail_k', 1)} | {x['threshold']:.3g} | "
            f"{x['n']} | {x['accuracy']:.3f} | {x['agreement']:.3f} | {x['kappa']:.3f} | "
            f"{x['constant_agreement']:.3f} | {x['mean_exit_layer']:.2f} | "
            f"{x.get('exit_rate', float('nan')):.2f} | "
            f"{x['speedup_median']:.2f} | {x.get('speedup_total', float('nan')):.2f} | "
            f"{x['oracle_speedup']:.2f} | {x['oracle_mean_exit_layer']:.2f} |"
        )
    return "\n".join(out)


def speed(r: dict) -> str:
    out = [
        f"{r['data']}, n={r['n']}",
        "",
        "| model | mode | median ms | median speedup | prompt tokens |",
        "|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        out.append(
            f"| {x['model']} | {x['mode']} | {x['median_ms']:.1f} | {x['median_speedup']:.2f} | "
            f"{x['median_prompt_tokens']:.0f} |"
        )
    return "\n".join(out)


def main(paths: list[str]) -> int:
    for path in paths:
        r = json.loads(Path(path).read_text())
        if "layers" in r:
            print(tails(r) if len(r.get("tails", [1])) > 2 else layerwise(r))
        else:
            print(exit_rows(r) if "overhead_no_exit" in r else speed(r))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
