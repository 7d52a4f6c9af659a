"""How many held-out prompts any confidence signal can let exit at the certified agreement.

    python -m benchmarks.signal_frontier --model gemma3-270m --layers 1 4 8 12 \
        --out benchmarks/results/signal-frontier-gemma3-270m.json

A median speedup needs more than half of the prompts to exit: the median prompt is otherwise one
that ran to full depth. This measures, on the calibration's own held-out facts (the same traces,
split and bound as `edge-spade calibrate`; nothing here touches a test split), the share of
prompts each signal lets exit at one layer with the target agreement certified, per prompt-length
range:
- `lspade`: the shipped L-SPADE head's entropy over its candidate tokens (the default rule's signal);
- `spade`: SPADE's own top-k entropy at that layer (a probe: it needs the tail before deciding);
- `gate`: a signal fitted for this question alone, a logistic regression from the answer row's
  hidden state to "SPADE here agrees with the full model", trained on the calibration's training
  facts (ridge, Newton steps);
- `oracle`: every prompt whose SPADE answer agrees exits (an upper bound no signal can pass).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import progress, save_json
from edge_spade import load_model
from edge_spade.convert.certify import exit_curve, keys_of, pick_threshold, split
from edge_spade.convert.cloze import broad
from edge_spade.convert.datasets import load_items
from edge_spade.convert.trace import Sample, collect
from edge_spade.heads import topk_entropy

log = logging.getLogger("benchmarks.signal_frontier")
PER_CATEGORY = 120  # `python -m edge_spade.convert.cloze.broad --per-category 120`: the shipped heads' data
RANGES = [(1, 16), (17, 32), (33, 64), (65, 128), (129, None)]


def fit_gate(x: np.ndarray, agree: np.ndarray, ridge: float = 10.0, steps: int = 30) -> tuple[np.ndarray, float]:
    """Logistic regression (standardised features, ridge, Newton steps): weights and bias on raw `x`."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = ridge * np.eye(z.shape[1])
    penalty[-1, -1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        step = np.linalg.solve((z * (p * (1 - p))[:, None]).T @ z + penalty, z.T @ (p - agree) + penalty @ w)
        w -= step
        if np.abs(step).max() < 1e-7:
            break
    return w[:-1] / sd, float(w[-1] - (mu / sd) @ w[:-1])


def lspade_entropy(rt, samples: list[Sample], layer: int) -> np.ndarray:
    """The shipped free-answer head's entropy at `layer`, as the runtime's check computes it."""
    head_set, heads = rt.manifest.sets["free"], rt.heads["free"]
    rows = rt.engine.head.rows(np.array(head_set.candidates))
    index = head_set.head_index()[layer]
    top_k = head_set.top_k
    return np.array([topk_entropy(rows @ heads.normed(s.hidden[layer], index), top_k) for s in samples])


def certified_share(full, answers, signal, layer, n_layers, keys, target, confidence) -> float:
    """The exit share at the largest certified threshold on these prompts (0 when none certifies)."""
    curve = exit_curve(full, answers[:, None], signal[:, None], [layer], n_layers, confidence, keys)
    tau = pick_threshold(curve, target, min_exit_rate=0.0)
    return round(next((p.exit_rate for p in curve if p.threshold == tau), 0.0), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument(
        "--data",
        help="the cloze file the free heads were calibrated on (default: the shipped heads' own, the broad "
        f"corpus at {PER_CATEGORY} facts per category)",
    )
    ap.add_argument("--few-shot", type=int, nargs="+", default=[0, 3, 8])
    ap.add_argument("--layers", type=int, nargs="+", help="layers to judge (default: the heads' layers)")
    ap.add_argument("--holdout", type=float, default=0.5, help="as given to `edge-spade calibrate`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    rt = load_model(args.model, threads=args.threads)
    head_set = rt.manifest.sets["free"]
    cal = head_set.calibration
    if args.data is None:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "broad-capped.jsonl"
            data.write_text(broad.per_category(PER_CATEGORY))
            items = load_items(data, few_shot=args.few_shot, variants=1)
    else:
        items = load_items(args.data, few_shot=args.few_shot, variants=1)
    samples = collect(rt, items, tail=head_set.tail, progress=lambda it: progress(it, len(items), "traces"))
    by_key = cal.get("holdout_by", "fact") == "fact"
    train, held = split(samples, args.holdout, 0, by_key)
    n_layers = rt.n_layers
    full = np.array([s.answer(n_layers - 1) for s in held])
    lengths = np.array([s.n_tokens for s in held])
    keys = np.array(keys_of(held, True))
    target, confidence = cal["target_agreement"], cal["confidence"]
    rows = []
    for layer in args.layers or head_set.layers:
        answers = np.array([s.answer(layer) for s in held])
        agree_train = np.array([s.answer(layer) == s.answer(n_layers - 1) for s in train], float)
        w, b = fit_gate(np.stack([s.hidden[layer] for s in train]).astype(np.float64), agree_train)
        gate_score = np.stack([s.hidden[layer] for s in held]).astype(np.float64) @ w + b
        signals = {
            "lspade": lspade_entropy(rt, held, layer),
            "spade": np.array([s.entropy(layer, head_set.top_k) for s in held]),
            "gate": 1.0 / (1.0 + np.exp(gate_score)),  # the risk of disagreeing
        }
        for lo, hi in RANGES:
            mask = (lengths >= lo) & (lengths <= (hi or 10**9))
            if mask.sum() < 50:
                continue
            row = {"layer": layer, "tokens": f"{lo}-{hi or ''}", "prompts": int(mask.sum())}
            row["oracle"] = round(float((answers[mask] == full[mask]).mean()), 4)
            for name, value in signals.items():
                row[name] = certified_share(
                    full[mask], answers[mask], value[mask], layer, n_layers, list(keys[mask]), target, confidence
                )
            log.info("%s", row)
            rows.append(row)
    save_json(
        {
            "model": args.model,
            "data": args.data or f"cloze-broad.jsonl, {PER_CATEGORY} facts per category",
            "few_shot": args.few_shot,
            "target_agreement": target,
            "confidence": confidence,
            "heldout_prompts": len(held),
            "rows": rows,
        },
        args.out,
        runtimes=[rt],
    )
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
