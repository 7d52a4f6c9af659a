"""Which layers to check: L-SPADE evaluation layers that pay for their checks, SPADE probe layers
and their threshold, and the tail width whose probes pay best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .certify import agreement_bound, exit_curve, fact_index, keys_of, pick_threshold
from .costs import probe_cost, tail_costs
from .trace import Sample


def thin_layers(
    train: list[Sample],
    ent: np.ndarray,
    layers: list[int],
    n_layers: int,
    target: float,
    confidence: float,
    exit_cost: np.ndarray,
    check_cost: float,
    budget: float = math.inf,
    by_key: bool = True,
) -> list[int]:
    """The evaluation layers worth a check, judged on the training split at its own threshold.

    A check costs every prompt that reaches it `check_cost` (relative to a full answer, measured; for
    Gemma 3's free answers: observing the node, ONNX head, 2,486 candidate rows, top-k entropy); an
    exit at layer j saves 1 - exit_cost[j]. Kept: layers where the exits that happen there save
    more than the check costs, at most as many as fit in `budget` (what checks may add to a pass
    that does not exit; the best savers first, one at least). All layers when nothing exits (no
    hooks run then anyway); the threshold is then certified on the held-out split with the kept
    layers only.
    """
    full = np.array([s.answer(n_layers - 1) for s in train])
    answers = np.array([[s.answer(layer) for layer in layers] for s in train])
    curve = exit_curve(full, answers, ent, layers, n_layers, confidence, keys_of(train, by_key))
    tau = pick_threshold(curve, target)
    if tau < 0:
        return list(layers)
    exits = ent <= tau
    first = np.where(exits.any(axis=1), exits.argmax(axis=1), -1)
    saves = np.array([(first == j).mean() * (1.0 - exit_cost[j]) for j in range(len(layers))])
    kept = [j for j in np.argsort(-saves, kind="stable") if saves[j] > check_cost]
    if check_cost > 0 and math.isfinite(budget):
        kept = kept[: max(1, int(budget / check_cost + 1e-9))]
    return [layers[j] for j in sorted(kept)] or list(layers)


def free_candidates(train: list[Sample]) -> np.ndarray:
    """The tokens SPADE ranks in its top-k at any layer of the training prompts (sorted)."""
    return np.unique(np.concatenate([s.ids.ravel() for s in train]))


OBJECTIVES = ("median", "total")


def choose_probes(
    ent: np.ndarray,
    agree: np.ndarray,
    layers: list[int],
    n_layers: int,
    tail_cost: np.ndarray,
    target: float,
    keys: Sequence[str] | None = None,
    confidence: float = 0.95,
    objective: str = "median",
) -> tuple[list[int], float]:
    """Probe layers (one or two) and a threshold that maximise the speedup on the training split
    while keeping its agreement with the full answer at the target and the mean cost at or under
    a full answer's (no slower on average); ([], -1) if none pays.

    `objective`: "median" maximises the median per-prompt speedup (then the total), "total" the
    speedup of the summed time (then the median). They differ where about half the prompts exit:
    an early probe that exits 40% of prompts loses the median (a failed probe is slower than full
    depth) yet saves time in total.

    ent, agree: (N, len(layers)) SPADE's entropy and whether its answer equals the full one;
    tail_cost: (len(layers),) a probe's cost at each layer. With `keys`, agreement must reach the
    target as the held-out split will judge it (the lower bound over facts), not just on average:
    layers chosen on the empirical rate can lose most of their exits to the certificate.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    taus = np.unique(np.quantile(ent, np.linspace(0, 1, 41)))
    sets = [[j] for j in range(len(layers))] + [[i, j] for i in range(len(layers)) for j in range(i + 1, len(layers))]
    best, best_key = ([], -1.0), (1.0, 1.0)
    rows = np.arange(len(ent))
    facts = fact_index(keys)
    for idx in sets:
        probes = [layers[j] for j in idx]
        for tau in taus:
            first, cost = probe_cost(ent[:, idx], probes, tau, n_layers, tail_cost[idx])
            ok = np.where(first >= 0, agree[:, idx][rows, np.maximum(first, 0)], True)
            if cost.mean() > 1.0 or ok.mean() < target:
                continue
            if facts is not None and agreement_bound(ok, facts, confidence) < target:
                continue
            median, total = float(np.median(1 / cost)), float(1 / cost.mean())
            key = (median, total) if objective == "median" else (total, median)
            if key > best_key:
                best, best_key = (probes, float(tau)), key
    return best


def probe_plan(
    train: list[Sample],
    held: list[Sample],
    layers: list[int],
    n_layers: int,
    costs: dict[str, float],
    top_k: int,
    target: float,
    confidence: float,
    by_key: bool = True,
    objective: str = "median",
) -> dict:
    """SPADE probes for one tail width: layers chosen on the training split, threshold certified on
    the held-out one; `pays` when the cost model says they take less total time than full-depth
    answers on the held-out prompts (the median alone is fragile: it flips where about half exit)."""
    L = n_layers

    def table(ss: list[Sample], at: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        full = np.array([s.answer(L - 1) for s in ss])
        ent = np.array([[s.entropy(layer, top_k) for layer in at] for s in ss])
        answers = np.array([[s.answer(layer) for layer in at] for s in ss])
        return full, ent, answers

    full, ent, answers = table(train, layers)
    probes, _ = choose_probes(
        ent,
        answers == full[:, None],
        layers,
        L,
        tail_costs(costs, layers, L),
        target,
        keys_of(train, by_key),
        confidence,
        objective,
    )
    plan = {
        "probe_layers": probes,
        "threshold": -1.0,
        "pays": False,
        "costs": dict(costs),
        "curve": [],
        "objective": objective,
    }
    if probes:
        full, ent, answers = table(held, probes)
        curve = exit_curve(full, answers, ent, probes, L, confidence, keys_of(held, by_key))
        tau = pick_threshold(curve, target)
        plan.update(threshold=tau, curve=curve)
        if tau >= 0:
            first, cost = probe_cost(ent, probes, tau, L, tail_costs(costs, probes, L))
            plan["costs"].update(
                heldout_median_speedup_model=round(float(np.median(1 / cost)), 3),
                heldout_exit_rate=round(float((first >= 0).mean()), 3),
                heldout_mean_cost_model=round(float(cost.mean()), 3),
            )
            plan["pays"] = bool(cost.mean() < 1.0)  # faster in total: the median flips around a 50% exit rate
    return plan


def frontier_row(samples: list[Sample], layers: list[int], n_layers: int, plan: dict) -> dict:
    """What one tail width offers: SPADE's agreement with the full answer by layer, the oracle, the probes."""
    full = np.array([s.answer(n_layers - 1) for s in samples])
    agree = np.array([[s.answer(layer) for layer in layers] for s in samples]) == full[:, None]
    oracle = [layers[int(row.argmax())] if row.any() else n_layers - 1 for row in agree]  # first agreeing layer
    return {
        "agreement_by_layer": {str(layer): round(float(a), 4) for layer, a in zip(layers, agree.mean(0))},
        "mean_agreement": round(float(agree.mean()), 4),
        "oracle_mean_exit_layer": round(float(np.mean(oracle)), 2),
        "probe_layers": plan["probe_layers"],
        "probe_threshold": plan["threshold"],
        "probes_pay": plan["pays"],
        **plan["costs"],
    }


def choose_tail(frontier: dict[int, dict]) -> int:
    """The width whose probes pay best (lowest modelled held-out mean cost), else the one whose SPADE
    agrees best with the full answer over all layers (smaller on ties)."""
    paying = {k: r for k, r in frontier.items() if r["probes_pay"]}
    if paying:
        return min(paying, key=lambda k: (paying[k]["heldout_mean_cost_model"], k))
    return max(frontier, key=lambda k: (frontier[k]["mean_agreement"], -k))
