"""The cost model, measured on the machine that calibrates: what a full answer, a SPADE tail and
an L-SPADE check cost, and what a probe plan costs each prompt relative to a full answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from edge_spade.engine import tail_positions
from edge_spade.heads import FREE_TOP_K, OnnxHeads
from edge_spade.policy import ExitPolicy, spade_exit
from edge_spade.runtime import Runtime

from .datasets import Item
from .heads_train import LayerHead
from .onnx_export import export_onnx


def timing_items(items: list[Item], n: int) -> list[Item]:
    """A warm-up item, then `n` spread over the list: with several few-shot lengths (or data
    files) one after the other, the first `n` would all be of the first kind."""
    step = max(1, len(items) // n)
    return [items[0], *items[::step][:n]]


def measure_check_ms(
    rt: Runtime, items: list[Item], candidates: np.ndarray | None, rank: int, n: int = 5, repeats: int = 3
) -> tuple[float, float]:
    """(what one L-SPADE check adds to a prompt pass that does not exit, the full answer), in ms:
    full-depth answers against passes checking every layer with a threshold that never exits
    (heads of the trained rank and the same candidate rows, so the same work); the added time is
    divided by the layers checked. The overhead budget takes the ratio of the two, measured in the
    same interleaved runs: a full answer timed minutes apart can differ by 15% on a busy laptop."""
    engine = rt.engine
    layers = tuple(range(1, engine.n_layers - 1))
    if not layers:
        return 0.0, 0.0
    heads = OnnxHeads(
        export_onnx(
            [LayerHead.identity(engine.n_embd, rank) for _ in layers], engine.head.norm_weight, engine.index.rms_eps
        )
    )
    cands = tuple(int(c) for c in candidates) if candidates is not None else None
    policy = ExitPolicy(
        1e-12, layers, {layer: i for i, layer in enumerate(layers)}, FREE_TOP_K if cands else None, cands
    )
    full, never = [], []
    for i, item in enumerate(timing_items(items, n)):  # a warm-up first, as in measure_costs
        prompt = rt.prompt(item.question, item.choices)
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.full(prompt.tokens, prompt.ids)
            t1 = time.perf_counter()
            spade_exit(engine, heads, policy, prompt)
            t2 = time.perf_counter()
            if i:
                full.append(t1 - t0)
                never.append(t2 - t1)
    per_check = max(0.0, float(np.median(never) - np.median(full)) * 1000 / len(layers))
    return round(per_check, 3), round(float(np.median(full)) * 1000, 2)


def measure_costs(rt: Runtime, items: list[Item], tail: int, n: int = 5, repeats: int = 3) -> dict[str, float]:
    """The probe cost model, measured on this machine: median ms of a full-depth answer, of a SPADE
    tail run on the whole model (`tail_ms`: it recomputes every layer) and of one run on the tail
    model above mid-depth (`tail_mid_ms`); a tail model's cost is linear in the layers it holds."""
    engine = rt.engine
    mid = engine.n_layers // 2
    engine.use_tail_models([mid])
    full, whole, cut = [], [], []
    for i, item in enumerate(timing_items(items, n)):  # the first run is a warm-up (graphs, rows), not counted
        prompt = rt.prompt(item.question, item.choices)
        rows = tail_positions(len(prompt.tokens), tail)
        states = np.zeros((len(rows), engine.n_embd), np.float32)  # the content does not change the cost
        tokens = [prompt.tokens[r] for r in rows]
        for _ in range(repeats):  # interleaved; the median over prompts and repeats
            t0 = time.perf_counter()
            engine.full(prompt.tokens, prompt.ids)
            t1 = time.perf_counter()
            engine.spade_tail(states, mid, prompt.ids, tokens, side=True, tail_model=False)
            t2 = time.perf_counter()
            engine.spade_tail(states, mid, prompt.ids, tokens, side=True)
            t3 = time.perf_counter()
            if i:
                full.append(t1 - t0)
                whole.append(t2 - t1)
                cut.append(t3 - t2)
    ms = {"full_ms": full, "tail_ms": whole, "tail_mid_ms": cut}
    return {**{k: round(float(np.median(v)) * 1000, 2) for k, v in ms.items()}, "tail_mid_layer": mid}


def tail_costs(costs: dict[str, float], layers: Sequence[int], n_layers: int) -> np.ndarray:
    """Each layer's probe cost relative to a full answer: a tail model holding the layers above it.

    Linear in the layers run, through the two measured points: all `n_layers` (the whole-model
    tail) and the `n_layers - 1 - mid` above the mid-depth tail model. Costs measured before tail
    models existed (no `tail_mid_ms`) are the whole-model tail's at every layer.
    """
    whole = costs["tail_ms"]
    if "tail_mid_ms" not in costs:
        return np.full(len(layers), whole / costs["full_ms"])
    held = n_layers - 1 - costs["tail_mid_layer"]
    per_layer = max(0.0, (whole - costs["tail_mid_ms"]) / (n_layers - held))
    fixed = whole - per_layer * n_layers
    return np.array([fixed + per_layer * (n_layers - 1 - layer) for layer in layers]) / costs["full_ms"]


def probe_cost(
    ent: np.ndarray, probes: list[int], tau: float, n_layers: int, tail_cost: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (index of the exit probe or -1, cost relative to the full answer).

    ent: (N, len(probes)) SPADE entropies at the probe layers; tail_cost: each probe's cost.
    Cost model: the prompt pass up to layer l costs (l + 1) / n_layers of a full answer, and
    every probe run on the way its tail.
    """
    exits = ent <= tau
    first = np.where(exits.any(axis=1), exits.argmax(axis=1), -1)
    prefix = (np.array(probes) + 1) / n_layers
    spent = np.cumsum(tail_cost)
    cost = np.where(first >= 0, prefix[np.maximum(first, 0)] + spent[np.maximum(first, 0)], 1.0 + spent[-1])
    return first, cost
