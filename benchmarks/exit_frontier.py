"""The best median speedup a head-and-probe rule could reach, per few-shot count: where a target stops.

    python -m benchmarks.exit_frontier --model gemma3-270m --out benchmarks/results/exit-frontier-gemma3-270m.json

A prompt that leaves at layer l costs the pass up to l, the heads' check and SPADE's tail from l
(the cascade's cost model, convert/cascade.CostModel). A median speedup of x needs more than half
of the prompts to leave where that cost is under full depth / x, with their answers still agreeing.
This reads the shipped cascade's measured signals of its calibration facts (the cascade tool's
per-prompt cache: seconds once `python -m edge_spade.convert.cascade` has run for these heads;
no test split is read) and, for each few-shot count and candidate probe layer, tries every pair
of thresholds (the head at its layer, then the probe) on the held-out facts themselves, so each
figure is an upper bound for rules of that shape (pairs of probes sharing a threshold, the other
shape the runtime runs, on a coarser grid); over the formats the cascade was certified on, and
over the cloze prompts alone (what benchmarks/exit.py times):
- `certified`: the rule with the best median whose agreement is certified as calibration
  certifies it (Clopper-Pearson over facts, a fact agreeing when all its prompts do), and the
  largest exit share any such rule reaches (`max_exit_share`: a median needs more than half);
- `loose`: the same at the plain agreement at the target, no confidence margin;
- `oracle`: the share of prompts whose SPADE answer at that layer agrees with full depth;
- `chosen`: what the cascade tool would make of that probe alone for this view, no longer a bound:
  thresholds chosen on the training facts' prompts of the view for the best median, then scaled
  until certified on the held-out ones, judged there. Its exit share says how far the median sits
  from the edge: just over half, and a few prompts more or less decide it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_json
from edge_spade import load_model
from edge_spade.convert.cascade import Table, certify, choose, gather, outcome, probe_columns, threshold_grid
from edge_spade.convert.certify import agreement_bound, fact_index

log = logging.getLogger("benchmarks.exit_frontier")
GRID = 41  # thresholds per stage: quantiles of the signal on these prompts
PAIR_GRID = 21  # ...for two probes, which are many more rules


def best_rules(held, heads, probes, cols, cost, target, confidence, grid: int = GRID) -> dict:
    """The rules of the head, then the probes at `probes` (their columns `cols`, one shared threshold)
    with the best median speedup: certified and loose."""
    t = Table.of(held)
    n = np.array([s.n_tokens for s in held])
    full = cost.full(n)
    facts = fact_index([s.key for s in held])
    head_taus, probe_taus = threshold_grid(t, cols, points=grid)
    best = {"certified": None, "loose": None}
    for tau_head in head_taus:
        for tau_probe in probe_taus:
            stage, ok = outcome(t, len(heads), cols, tau_head, tau_probe)
            spent = cost.cost(stage, n, heads, probes if tau_probe >= 0 else (), checked=tau_head >= 0)
            rule = {
                "median": round(float(np.median(full / spent)), 3),
                "total": round(float(full.sum() / spent.sum()), 3),
                "exit_share": round(float((stage >= 0).mean()), 3),
                "head_exit_share": round(float(((stage >= 0) & (stage < len(heads))).mean()), 3),
                "agreement": round(float(ok.mean()), 4),
            }
            kinds = ["loose"] if ok.mean() >= target else []
            # answering everything at full depth counts as certified: no exit changes an answer
            if kinds and ((stage < 0).all() or agreement_bound(ok, facts, confidence) >= target):
                kinds.append("certified")
            for kind in kinds:
                if best[kind] is None or (rule["median"], rule["total"]) > (best[kind]["median"], best[kind]["total"]):
                    best[kind] = {**rule, "max_exit_share": best[kind]["max_exit_share"] if best[kind] else 0.0}
                best[kind]["max_exit_share"] = max(best[kind]["max_exit_share"], rule["exit_share"])
    return best


def chosen_rule(train, held, heads, probes, probe, cost, target, confidence) -> dict:
    """The probe at `probe` alone, as the cascade tool makes a rule: both thresholds chosen on `train`
    (the best median with the agreement bounded at the target), scaled until certified on `held`;
    its modelled speedups and agreement on `held`."""
    rule = choose(train, heads, probes, cost, target, confidence, "median", combos=[(probe,)])
    cols = probe_columns(heads, probes, rule["probe_layers"])
    taus = certify(held, heads, cols, rule, target, confidence, True) if cols else None
    tau_head, tau_probe = (taus[0], taus[1]) if taus else (-1.0, -1.0)
    stage, ok = outcome(held, len(heads), cols, tau_head, tau_probe)
    n = np.array([s.n_tokens for s in held])
    full = cost.full(n)
    spent = cost.cost(stage, n, heads, rule["probe_layers"] if tau_probe >= 0 else (), checked=tau_head >= 0)
    return {
        "median": round(float(np.median(full / spent)), 3),
        "total": round(float(full.sum() / spent.sum()), 3),
        "exit_share": round(float((stage >= 0).mean()), 3),
        "agreement": round(float(ok.mean()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    rt = load_model(args.model, threads=args.threads)
    try:
        head_set = rt.manifest.sets["free"]
        cal = head_set.calibration
        record = cal.get("cascade")
        if not record:
            log.error("the %s heads carry no cascade record: run edge_spade.convert.cascade first", args.model)
            return 2
        g = gather(
            rt,
            rt.heads_dir,
            probe_layers=record["candidate_probe_layers"],
            min_tokens=record["min_tokens"],
            formats=record.get("formats", [])[1:],  # the first names the calibration's own
        )
        target, confidence = cal["target_agreement"], cal["confidence"]
        rows, pairs = [], []
        views = [(shots, form) for shots in sorted({s.shots for s in g.held}) for form in ("every", "cloze")]
        for shots, form in views:  # the formats mixed as calibrated, and the cloze prompts benchmarks/exit.py times
            held = [s for s in g.held if s.shots == shots and form in ("every", s.form)]
            train = [s for s in g.train if s.shots == shots and form in ("every", s.form)]
            n = np.array([s.n_tokens for s in held])
            for probe in g.probes:
                (col,) = probe_columns(g.heads, g.probes, [probe])
                at = cost_at(g.cost, g.heads, probe, float(np.median(n)))
                row = {
                    "shots": shots,
                    "formats": form,
                    "probe_layer": probe,
                    "prompts": len(held),
                    "prompt_tokens_median": float(np.median(n)),
                    "exit_speedup": at,  # a prompt of the median length leaving at the probe
                    "oracle": round(float(np.mean([s.spade_answer[col] == s.full for s in held])), 3),
                    **best_rules(held, g.heads, [probe], [col], g.cost, target, confidence),
                    "chosen": chosen_rule(train, held, g.heads, g.probes, probe, g.cost, target, confidence),
                }
                log.info("%s", row)
                rows.append(row)
            for pair in itertools.combinations(g.probes, 2):  # two probes sharing a threshold (--max-probes 2)
                cols = probe_columns(g.heads, g.probes, pair)
                row = {"shots": shots, "formats": form, "probe_layers": list(pair), "prompts": len(held)}
                row.update(best_rules(held, g.heads, list(pair), cols, g.cost, target, confidence, PAIR_GRID))
                log.info("%s", row)
                pairs.append(row)
        save_json(
            {
                "model": args.model,
                "data": f"the cascade's calibration facts, held-out side ({', '.join(record.get('formats', []))})",
                "head_layers": g.heads,
                "target_agreement": target,
                "confidence": confidence,
                "heldout_prompts": len(g.held),
                "rows": rows,
                "pairs": pairs,
            },
            args.out,
            runtimes=[rt],
        )
    finally:
        rt.close()
    return 0


def cost_at(cost, heads, probe: int, n_tokens: float) -> float:
    """Full depth over the cost of a prompt of `n_tokens` that the heads pass and the probe lets exit."""
    full = cost.full(np.array([n_tokens]))
    spent = cost.cost(np.array([len(heads)]), np.array([n_tokens]), heads, [probe])
    return round(float(full[0] / spent[0]), 3)


if __name__ == "__main__":
    sys.exit(main())
