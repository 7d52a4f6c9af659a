"""Plans per prompt length: in which ranges of prompt length the exit checks pay.

A probe's tail costs about the same whatever the prompt's length (K+1 rows), while a full-depth
pass grows with it: the same rule saves time on long prompts and costs time on short ones. So
calibration measures, on this machine, the full-depth time at several prompt lengths (a line
through them) and what the checks cost, and for each length range asks the cost model whether
the held-out prompts' exits would pay; where they would not, the plan is "do not check".

Two variants per range: with tail models loaded (a process that answers many questions), and
with probe tails run on the whole model from a context made for the first probe (a one-question
`edge-spade ask`, which loads no tail model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge_spade.runtime import Runtime

# Upper ends of the prompt-length ranges (tokens); the last range is open.
LENGTH_EDGES = (16, 32, 64, 128, 256, 512)
MIN_PROMPTS_PER_RANGE = 30  # fewer held-out prompts in a range: the exit share of all of them


def measure_full_by_length(
    rt: Runtime,
    tokens: Sequence[int],
    ids: np.ndarray | None,
    lengths: Sequence[int] = (8, 32, 96, 256),
    repeats: int = 5,
) -> dict[str, float]:
    """A line through the full-depth time at several prompt lengths (`tokens` tiled to each length,
    the start token kept): {"full_ms_at_0", "full_ms_per_token"}, and the ms of making a context."""
    engine = rt.engine
    body = list(tokens[1:]) or list(tokens)
    measured = []
    for n in lengths:
        n = min(n, engine.n_ctx)
        prompt = [tokens[0], *(body * (n // len(body) + 1))[: n - 1]]
        engine.full(prompt, ids)  # warm-up: graphs for this shape
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.full(prompt, ids)
            times.append((time.perf_counter() - t0) * 1000)
        measured.append((n, float(np.median(times))))
    n, ms = np.array(measured).T
    slope, intercept = np.polyfit(n, ms, 1)
    return {
        "full_ms_at_0": round(float(max(intercept, 0.0)), 3),
        "full_ms_per_token": round(float(slope), 4),
        "context_ms": round(engine.new_context_ms(), 2),
    }


def expected_cost(
    full_ms: float,
    exits: Sequence[tuple[int, float]],
    layers: Sequence[int],
    n_layers: int,
    check_ms: Sequence[float],
    after_exit_ms: Sequence[float],
    first_ms: float = 0.0,
) -> float:
    """Expected ms of one answer under a rule, against `full_ms` at full depth.

    `exits`: (index into `layers`, share of prompts exiting there); the rest run to the end.
    A prompt that exits at layer l ran (l + 1) / n_layers of the pass, the checks up to it and
    what an exit adds (`after_exit_ms`: an L-SPADE exit's SPADE tail; a probe's exit adds
    nothing, its tail is the answer). `first_ms`: paid once by every checked prompt (a context).
    """
    spent = np.cumsum(check_ms)
    exited = sum(share for _, share in exits)
    cost = first_ms + (1.0 - exited) * (full_ms + spent[-1])
    for j, share in exits:
        cost += share * ((layers[j] + 1) / n_layers * full_ms + spent[j] + after_exit_ms[j])
    return float(cost)


def plans_by_length(
    fit: dict[str, float],
    exits: Sequence[tuple[int, float]],
    layers: Sequence[int],
    n_layers: int,
    check_ms: Sequence[float],
    after_exit_ms: Sequence[float],
    check_ms_whole: Sequence[float],
    after_exit_ms_whole: Sequence[float],
    margin: float = 0.02,
    edges: Sequence[int] = LENGTH_EDGES,
    exits_for: Callable[[int, int | None], tuple[Sequence[tuple[int, float]], int, dict]] | None = None,
) -> list[dict]:
    """One plan per prompt-length range: check or not, with tail models and without.

    A range checks when the modelled expected time, at the range's shortest prompt, is at most
    (1 - margin) of the full-depth time: the guard in the runtime judges the rest as answers come.
    `exits_for(lo, hi)`: the exits of the held-out prompts in that range, how many there were, and
    what the plan records of them (its own certified threshold); when too few, `exits`, those of
    all the held-out prompts, apply.
    """
    plans, lo = [], 1
    for hi in [*edges, None]:
        range_exits, n_seen, extra = exits_for(lo, hi) if exits_for else (exits, 0, {})
        own = n_seen >= MIN_PROMPTS_PER_RANGE
        here = range_exits if own else exits
        full = fit["full_ms_at_0"] + fit["full_ms_per_token"] * lo
        cut = expected_cost(full, here, layers, n_layers, check_ms, after_exit_ms)
        whole = expected_cost(
            full, here, layers, n_layers, check_ms_whole, after_exit_ms_whole, first_ms=fit["context_ms"]
        )
        plans.append(
            {
                "max_tokens": hi,
                "check": bool(cut <= (1 - margin) * full),
                "check_whole_model": bool(whole <= (1 - margin) * full),
                "exit_share": round(sum(share for _, share in here), 3),
                "heldout_prompts": n_seen if own else None,
                **(extra if own else {}),
                "speedup_model": round(full / cut, 3),
                "speedup_model_whole": round(full / whole, 3),
            }
        )
        lo = (hi or lo) + 1
    return plans


def plan_shipped_heads(model: str, heads_dir: Path, report_dir: Path) -> dict[str, list[dict]]:
    """Add plans by prompt length to heads calibrated before plans existed, without re-tracing:
    the full-depth time by length is measured here, the exit share of the default rule comes from
    the calibration report's held-out curve at the rule's threshold. Rewrites heads.json (the ONNX
    files are untouched) and records the new heads.json hash in the report."""
    import json

    from edge_spade.manifest import load_manifest
    from edge_spade.runtime import load_model

    from .costs import tail_costs
    from .heads_files import rewrite_manifest

    manifest = load_manifest(heads_dir)
    report = json.loads((report_dir / "report.json").read_text())
    rt = load_model(model, heads=False)
    out = {}
    try:
        for kind, head_set in manifest.sets.items():
            probes = head_set.signal == "spade"
            tau = head_set.thresholds["spade"] if probes else head_set.threshold
            layers = head_set.probe_layers if probes else head_set.eval_layers
            if tau < 0 or not layers:
                continue
            if len(layers) != 1:
                raise ValueError(f"{kind}: a report curve gives one exit share, {len(layers)} layers need traces")
            curve = report["sets"][kind]["curves"]["spade" if probes else "lspade"]
            point = min(curve, key=lambda p: abs(p["threshold"] - tau))
            prompt = rt.prompt(
                "The capital of France is" if kind == "free" else "Is the sky blue?",
                None if kind == "free" else ["yes", "no"],
            )
            fit = measure_full_by_length(rt, prompt.tokens, prompt.ids)
            costs = head_set.costs
            if probes:
                check, whole = list(tail_costs(costs, layers, manifest.n_layers) * costs["full_ms"]), [costs["tail_ms"]]
                after = after_whole = [0.0]
            else:
                check = whole = [costs.get("check_ms", 0.0)]
                after = after_whole = [costs["tail_ms"]]
            head_set.plans = plans_by_length(
                fit, [(0, point["exit_rate"])], layers, manifest.n_layers, check, after, whole, after_whole
            )
            head_set.costs["length_fit"] = {**fit, "exit_share_from": f"report curve at {point['threshold']:.4g}"}
            out[kind] = head_set.plans
    finally:
        rt.close()
    rewrite_manifest(heads_dir, report_dir, manifest)
    return out


if __name__ == "__main__":
    import argparse
    import json
    import logging

    parser = argparse.ArgumentParser(description=plan_shipped_heads.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", required=True, type=Path)
    parser.add_argument("--report", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    print(json.dumps(plan_shipped_heads(args.model, args.heads, args.report), indent=1))
