"""SPADE-EXIT against the full-depth answer: fidelity, exit layers and wall-clock speedup.

    python -m benchmarks.exit --model gemma3-270m --limit 100 --out benchmarks/results/exit-gemma3-270m.json

For each question every configuration runs once in one process with the same threads, after an
untimed full-depth pass, in an order rotated from question to question (so load drift and cache
effects hit all alike): the full-depth answer; `spade-exit`, the default
rule as the runtime runs it (its plan for the prompt's length decides whether it checks; the
speed guard is off, for reproducible figures); the same rule without plans (`spade-probe` or
`lspade-exit`); L-SPADE at a sweep of thresholds; a never-exiting threshold (the cost of hooks
and heads); the tuned-lens and logit-lens exits at their own calibrated thresholds; and SPADE at
the oracle layer (the earliest layer whose SPADE answer equals the full answer; its tail on a
tail model, as probes run). Speedups are medians of per-question ratios full / configuration,
and the ratio of summed times. Choice sets use the "choice" head set,
the cloze facts (free answers, with a few-shot prefix) the "free" one.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CALIBRATION, data_path, progress, pyplot, save_json
from benchmarks.metrics import accuracy, agreement, cohen_kappa, constant_agreement
from edge_spade import load_model
from edge_spade.convert.datasets import load_items
from edge_spade.convert.heads_files import REPORT_JSON, default_report_dir
from edge_spade.convert.heads_train import LayerHead
from edge_spade.convert.onnx_export import export_onnx
from edge_spade.convert.trace import collect
from edge_spade.heads import FREE_TOP_K, OnnxHeads
from edge_spade.policy import ExitPolicy, spade_exit

log = logging.getLogger("benchmarks.exit")
DATASETS = [
    "cloze/facts.jsonl",
    "arc/ARC-Easy-Test.jsonl",
    "arc/ARC-Challenge-Test.jsonl",
    "boolq/dev.jsonl",
    "headqa/dev_HEAD_EN.json",
]
NEVER = 1e-12  # entropy is never at or below this: hooks and heads run, nothing exits


def load_report(rt, folder: str | None) -> tuple[dict, dict[str, OnnxHeads]]:
    """The calibration report of `rt`'s heads (curves, lens baselines) and its tuned-lens heads per kind:
    `folder`, else benchmarks/calibration/<model> for shipped heads, else the one beside the heads."""
    candidates = [Path(folder)] if folder else [CALIBRATION / rt.name, default_report_dir(Path(rt.heads_dir))]
    path = next((c for c in candidates if (c / REPORT_JSON).is_file()), None)
    if path is None:
        raise SystemExit(f"no calibration report ({REPORT_JSON}) in {', '.join(map(str, candidates))}; pass --report")
    report = json.loads((path / REPORT_JSON).read_text())
    if report["heads_hashes"] != rt.manifest.hashes:
        raise SystemExit(f"the calibration report in {path} belongs to other heads than {rt.heads_dir}")
    tuned = {kind: OnnxHeads((path / entry["tuned_file"]).read_bytes()) for kind, entry in report["sets"].items()}
    return report, tuned


def configurations(
    rt, kind: str, report: dict, tuned, sweep: list[float], tails: list[int], probe_sweep: list[float]
) -> dict[str, tuple]:
    """name -> (heads, policy, answer_from, tail K)."""
    head_set = rt.manifest.sets[kind]
    baselines = report["sets"][kind]["thresholds"]
    k = head_set.tail
    identity = OnnxHeads(
        export_onnx(
            [LayerHead.identity(rt.engine.n_embd, 1) for _ in head_set.layers],
            rt.engine.head.norm_weight,
            rt.engine.index.rms_eps,
        )
    )
    lspade = rt.heads[kind]

    def head(tau: float) -> ExitPolicy:
        return ExitPolicy.from_head_set(head_set, tau, signal="lspade")

    configs = {
        "spade-exit": (lspade, ExitPolicy.from_head_set(head_set), "spade", k),
        "never-exit": (lspade, head(NEVER), "spade", k),
        "lspade-exit": (lspade, head(head_set.thresholds.get("lspade", -1.0)), "spade", k),
        "tuned-lens-exit": (tuned[kind], head(baselines.get("tuned", -1.0)), "head", k),
        "logit-lens-exit": (identity, head(baselines.get("logit_lens", -1.0)), "head", k),
    }
    for tau in sweep:
        configs[f"lspade-exit@{tau:.3g}"] = (lspade, head(tau), "spade", k)
    if head_set.probe_layers:
        probe = ExitPolicy.from_head_set(head_set, signal="spade")
        configs["spade-probe"] = (lspade, probe, "spade", k)
    else:  # calibration found no probe layers: sweep probes at a third and half of the depth
        L = rt.engine.n_layers
        probe = ExitPolicy(-1.0, (L // 3, L // 2), {}, head_set.top_k or FREE_TOP_K, signal="spade")
    for width in tails:
        for tau in probe_sweep:
            configs[f"spade-probe@{tau:.3g}/K{width}"] = (lspade, replace(probe, threshold=tau), "spade", width)
    return configs


def default_sweep(report_set: dict, n: int = 5) -> list[float]:
    """Thresholds spread over the calibration curve's range of mean exit layers."""
    curve = [c for c in report_set["curves"]["lspade"] if np.isfinite(c["threshold"])]
    return sorted({round(curve[int(i)]["threshold"], 4) for i in np.linspace(1, len(curve) - 1, n)})


def run_dataset(
    rt,
    data: str,
    limit: int | None,
    sweep: list[float] | None,
    report: dict,
    tuned,
    tails: list[int],
    probe_sweep: list[float],
    few_shot: int = 3,
    only: list[str] | None = None,
    oracle: bool = True,
) -> tuple[list[dict], list[float]]:
    engine, m = rt.engine, rt.manifest
    items = load_items(data_path(data), few_shot=few_shot)
    if limit and limit < len(items):
        items = spread_sample(items, limit)
    kind = "choice" if items[0].choices else "free"
    if kind not in m.sets:
        log.warning("no %s heads for %s: skipping %s", kind, rt.name, data)
        return [], []
    head_set = m.sets[kind]
    tails = sorted({head_set.tail, *tails})
    configs = configurations(
        rt, kind, report, tuned, default_sweep(report["sets"][kind]) if sweep is None else sweep, tails, probe_sweep
    )
    if only:
        configs = {name: c for name, c in configs.items() if name in {*only, "never-exit"}}
    tails = tails if oracle else []
    answers = {name: [] for name in configs}
    exit_layers = {name: [] for name in configs}
    oracle_names = [f"oracle/K{k}" for k in tails]
    times = {name: [] for name in [*configs, "full", *oracle_names]}
    full_answers, gold = [], []
    oracle_layers = {k: [] for k in tails}
    for i, item in enumerate(progress(items, len(items), f"exit {rt.name} {Path(data).stem}")):
        prompt = rt.prompt(item.question, item.choices)
        full_answer = prompt.decide(engine.full(prompt.tokens, prompt.ids).logits)  # untimed: also a warm-up
        full_answers.append(full_answer)
        gold.append(item.gold if item.choices else _first_token(engine, item.gold))
        runs = {"full": lambda p=prompt: engine.full(p.tokens, p.ids)}
        for k in tails:  # SPADE-K at every layer (cached): the earliest layer that agrees
            sample = collect(rt, [item], tail=k, top_k=head_set.top_k or FREE_TOP_K)[0]
            oracle = next(layer for layer in range(engine.n_layers) if sample.answer(layer) == full_answer)
            oracle_layers[k].append(oracle)
            engine.use_tail_models([oracle])  # as probes run: only the layers above (written once, untimed)
            runs[f"oracle/K{k}"] = lambda p=prompt, layer=oracle, k=k: engine.spade(p.tokens, layer, p.ids, tail=k)
        _, planned, own = head_set.plan_for(len(prompt.tokens), engine.settings.tail_models)
        for name, (heads, policy, source, k) in configs.items():
            if name == "spade-exit":  # the default rule, as the runtime runs it (guard off)
                policy = policy.with_own(own) if planned else policy.never()
            runs[name] = lambda p=prompt, h=heads, pol=policy, src=source, k=k: spade_exit(
                engine, h, pol, p, tail=k, answer_from=src
            )[0]
        if i == 0:  # warm-up: graphs, the probes' context and tail models are made before any timing
            for run in runs.values():
                run()
        order = list(runs)
        order = order[i % len(order) :] + order[: i % len(order)]  # rotated: no configuration always runs first
        for name in order:
            t0 = time.perf_counter()
            readout = runs[name]()
            times[name].append(time.perf_counter() - t0)
            if name in configs:
                answers[name].append(prompt.decide(readout.logits))
                exit_layers[name].append(readout.layer)
    full_t = np.array(times["full"])
    prompt_tokens = float(np.median([len(rt.prompt(i.question, i.choices).tokens) for i in items]))
    rows = []
    for name, (_, policy, _, k) in configs.items():
        t = np.array(times[name])
        rows.append(
            {
                "data": data,
                "method": name,
                "threshold": policy.threshold,
                "n": len(items),
                "tail_k": k,
                "few_shot": few_shot,
                "prompt_tokens_median": prompt_tokens,
                "signal": policy.signal,
                "eval_layers": list(policy.eval_layers),
                "probe_layers": list(policy.probe_layers),  # a cascade's, after its heads at `eval_layers`
                "probe_threshold": policy.probe_threshold,
                "accuracy": accuracy(answers[name], gold),
                "agreement": agreement(answers[name], full_answers),
                "kappa": cohen_kappa(answers[name], full_answers),
                "constant_agreement": constant_agreement(full_answers),
                "nonconstant_agreement": nonconstant_agreement(answers[name], full_answers),
                "full_accuracy": accuracy(full_answers, gold),
                "mean_exit_layer": float(np.mean(exit_layers[name])),
                "exit_rate": float(np.mean(np.array(exit_layers[name]) < engine.n_layers - 1)),
                "speedup_median": float(np.median(full_t / t)),
                "speedup_total": float(full_t.sum() / t.sum()),
                "time_median_ms": float(np.median(t) * 1000),
                "full_median_ms": float(np.median(full_t) * 1000),
                "time_total_s": float(t.sum()),
                "full_total_s": float(full_t.sum()),
                "oracle_speedup": float(np.median(full_t / np.array(times[f"oracle/K{k}"]))) if k in tails else None,
                "oracle_mean_exit_layer": float(np.mean(oracle_layers[k])) if k in tails else None,
            }
        )
    overhead = list(np.array(times["never-exit"]) / full_t)
    return rows, overhead


def spread_sample(items: list, n: int) -> list:
    """`n` items, as many from each group (cloze category, data set) as the groups allow, evenly
    spaced within each: a file where one category dominates (arithmetic) does not dominate the sample."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    quota, left = {}, n
    for g in sorted(groups, key=lambda g: len(groups[g])):  # small groups first: what they cannot use goes on
        quota[g] = min(len(groups[g]), left // (len(groups) - len(quota)))
        left -= quota[g]
    return [groups[g][int(i)] for g in groups for i in np.linspace(0, len(groups[g]) - 1, quota[g]) if quota[g]]


def nonconstant_agreement(answers: list, full: list) -> float | None:
    """Agreement on the prompts whose full answer is not the most common one (a constant answer gets 0 here)."""
    common = max(set(full), key=full.count) if full else None
    pairs = [(a, f) for a, f in zip(answers, full) if f != common]
    return sum(a == f for a, f in pairs) / len(pairs) if pairs else None


def _first_token(engine, text: str) -> int | None:
    toks = engine.tokenize(text, add_special=False, parse_special=False)
    return toks[0] if toks else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="registry name (default: the default model and its shipped heads)")
    p.add_argument("--heads", default=None, help="heads folder (default: the shipped heads)")
    p.add_argument(
        "--report",
        default=None,
        help="the heads' calibration report folder (default: benchmarks/calibration/<model>, else <heads>-calibration)",
    )
    p.add_argument("--data", nargs="+", default=DATASETS)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--sweep", type=float, nargs="*", default=None, help="extra thresholds (default: from the curve)")
    p.add_argument(
        "--tail",
        type=int,
        nargs="*",
        default=[],
        help="extra SPADE tail widths K for the probe sweep and the oracle (rows carry tail_k)",
    )
    p.add_argument(
        "--probe-sweep",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 1.0, 2.0],
        help="probe thresholds (nats) tried at every tail width",
    )
    p.add_argument("--few-shot", type=int, default=3, help="cloze facts: solved examples before each fact")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="run only these configurations (and never-exit), e.g. spade-exit spade-probe",
    )
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle (it traces every prompt at every layer)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rt = load_model(args.model, threads=args.threads, heads=args.heads)
    if not rt.heads:
        p.error(f"{rt.name} has no heads: run edge-spade calibrate first, or pass --heads")
    report, tuned = load_report(rt, args.report)
    rows, overhead, by_data = [], [], {}
    for data in args.data:
        r, o = run_dataset(
            rt,
            data,
            args.limit,
            args.sweep,
            report,
            tuned,
            args.tail,
            args.probe_sweep,
            args.few_shot,
            args.only,
            not args.no_oracle,
        )
        rows += r
        overhead += o
        if o:
            by_data[data] = float(statistics.median(o))
    result = {
        "model": rt.name,
        "rows": rows,
        "overhead_no_exit": float(statistics.median(overhead)),
        "overhead_no_exit_by_data": by_data,
    }  # choice and free checks differ: one figure would hide that
    print(
        f"{rt.name}: overhead with hooks and heads but no exit: x{result['overhead_no_exit']:.3f} "
        f"({', '.join(f'{Path(d).stem} x{v:.3f}' for d, v in by_data.items())})"
    )
    print(
        f"{'data':<26}{'method':<26}{'K':>3}{'thr':>7}{'n':>5}{'acc':>7}{'agree':>7}{'kappa':>7}{'const':>7}"
        f"{'exit L':>7}{'exits':>6}{'median':>8}{'total':>7}{'oracle':>8}"
    )
    for r in rows:
        print(
            f"{r['data']:<26}{r['method']:<26}{r['tail_k']:>3}{r['threshold']:>7.3g}{r['n']:>5}"
            f"{r['accuracy']:>7.3f}{r['agreement']:>7.3f}{r['kappa']:>7.3f}{r['constant_agreement']:>7.3f}"
            f"{r['mean_exit_layer']:>7.2f}{r['exit_rate']:>6.2f}{r['speedup_median']:>8.2f}"
            f"{r['speedup_total']:>7.2f}{r['oracle_speedup'] or float('nan'):>8.2f}"
        )
    if args.out:
        out = save_json(result, args.out, [rt])
        if not args.only:  # the plot draws the sweeps: nothing to draw without them
            plot(result, out.with_suffix(".png"))
    return 0


def plot(result: dict, png: Path) -> None:
    """Agreement against median speedup: one line per data set and rule family (L-SPADE sweep,
    probes of each tail width), the calibrated rules as labelled points."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    rows = result["rows"]
    for data in dict.fromkeys(r["data"] for r in rows):
        name = Path(data).stem
        families = {"L-SPADE sweep": [r for r in rows if r["data"] == data and r["method"].startswith("lspade-exit@")]}
        for k in sorted({r["tail_k"] for r in rows if r["method"].startswith("spade-probe@")}):
            families[f"probes K={k}"] = [
                r for r in rows if r["data"] == data and r["method"].startswith("spade-probe@") and r["tail_k"] == k
            ]
        for family, members in families.items():
            if members:
                pts = sorted((r["speedup_median"], r["agreement"]) for r in members)
                ax.plot(*zip(*pts), marker="o", alpha=0.8, label=f"{name}: {family}")
        for r in rows:
            if r["data"] == data and r["method"] in ("spade-exit", "lspade-exit", "tuned-lens-exit", "logit-lens-exit"):
                ax.scatter(r["speedup_median"], r["agreement"], marker="*", s=120, zorder=3)
                ax.annotate(
                    r["method"],
                    (r["speedup_median"], r["agreement"]),
                    fontsize=7,
                    xytext=(4, -10),
                    textcoords="offset points",
                )
    ax.axhline(0.98, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("median wall-clock speedup vs full depth")
    ax.set_ylabel("agreement with the full model")
    ax.set_title(f"SPADE-EXIT frontier - {result['model']} (dashed: 98%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
