"""`edge-spade calibrate`: L-SPADE heads and exit thresholds for one model, from unlabeled prompts.

1. Collect: one trace pass per prompt keeps the answer row after every layer; SPADE at every
   layer gives its logits (choice questions: over the decision set; free answers: the top-k
   tokens of the vocabulary). Each prompt is cached on disk (keyed by the model's output
   fingerprint, the tail width and the prompt), so an interrupted run resumes where it stopped.
2. Train per layer, in numpy: L-SPADE (target: SPADE's distribution at that layer) and the
   tuned lens (target: the full model's), over each prompt's own decision set (free answers:
   over every candidate token, SPADE's top-k carrying the target).
3. Pick each threshold on a held-out split: the largest whose agreement with the full model is
   at least the target with the requested confidence (one-sided Clopper-Pearson lower bound).
4. Export one head set per answer kind found in the data ("choice", "free"): ONNX files and
   `heads.json`, written to a temporary folder and swapped in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import Item
from .engine import tail_positions
from .errors import EdgeSpadeError
from .heads import FREE_TOP_K, ONNX_OPSET, LayerHead, entropy, export_onnx, topk_entropy, train_head
from .manifest import HEADS_FORMAT, HeadSet, HeadsManifest, HeadsMismatchError, load_manifest
from .prompts import choice_logits
from .runtime import Runtime
from .weights import cache_dir

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One calibration prompt: the answer row after every layer and SPADE's logits there.

    Choice prompts: `ids` (1, m) is the decision set, `groups` the choices. Free prompts: `ids`
    (n_layers, k) holds SPADE's top-k tokens at each layer. The last layer is the full model.
    """

    hidden: np.ndarray  # (n_layers, d)
    ids: np.ndarray  # (1, m) or (n_layers, k)
    logits: np.ndarray  # (n_layers, m or k)
    groups: tuple[tuple[int, ...], ...] = ()
    key: str = ""  # prompts with one key (variants of one fact) land on the same side of a split

    @property
    def free(self) -> bool:
        return not self.groups

    def layer_ids(self, layer: int) -> np.ndarray:
        return self.ids[0] if len(self.ids) == 1 else self.ids[layer]

    def choice(self, logits: np.ndarray) -> int:
        return int(np.argmax(choice_logits(logits, self.groups)))

    def entropy(self, layer: int, top_k: int) -> float:
        """SPADE's own entropy at `layer`, as a probe judges it (choices, or the top-k tokens)."""
        if self.free:
            return topk_entropy(self.logits[layer].astype(np.float64), top_k)
        return entropy(choice_logits(self.logits[layer], self.groups))

    def answer(self, layer: int) -> int:
        """SPADE's answer at `layer`: a choice index, or a token id for free prompts."""
        if self.free:
            return int(self.ids[layer][np.argmax(self.logits[layer])])
        return self.choice(self.logits[layer])


def collect(rt: Runtime, items: Iterable[Item], tail: int = 1, progress: Callable | None = None,
            top_k: int = FREE_TOP_K) -> list[Sample]:
    """Trace + SPADE at every layer for each prompt (cached per prompt)."""
    engine = rt.engine
    folder = cache_dir() / "calibration" / engine.head.fingerprint()[:16] / f"tail{tail}"
    folder.mkdir(parents=True, exist_ok=True)
    items = list(items)
    samples = []
    for item in progress(items) if progress else items:
        try:
            prompt = rt.prompt(item.question, item.choices)
        except EdgeSpadeError as exc:  # e.g. a data item with a too-long or malformed question
            log.warning("skipping %s: %s", item.id, exc)
            continue
        ids = prompt.ids.tolist() if prompt.ids is not None else f"top{top_k}"
        key = hashlib.sha256(json.dumps([prompt.tokens, ids]).encode()).hexdigest()[:24]
        path = folder / f"{key}.npz"
        if path.exists():
            data = dict(np.load(path))
        else:
            data = _trace_sample(engine, prompt, tail, top_k)
            tmp = folder / f"{key}.tmp{os.getpid()}.npz"
            np.savez(tmp, **data)
            tmp.replace(path)
        samples.append(Sample(data["hidden"].astype(np.float32), data["ids"], data["logits"].astype(np.float32),
                              prompt.groups, item.key or item.id))
    return samples


def _trace_sample(engine, prompt, tail: int, top_k: int) -> dict[str, np.ndarray]:
    trace = engine.trace(prompt.tokens, prompt.ids, tail=tail)
    tokens = [prompt.tokens[r] for r in trace.tail_rows]
    per_layer = [engine.spade_tail(trace.states[layer], layer, prompt.ids, tokens)
                 for layer in range(engine.n_layers - 1)] + [trace.full.logits]
    if prompt.ids is not None:
        return {"hidden": trace.last, "ids": prompt.ids[None], "logits": np.stack(per_layer)}
    top = [np.argsort(-logits)[:top_k] for logits in per_layer]
    return {"hidden": trace.last, "ids": np.stack(top), "logits": np.stack([lg[t] for lg, t in zip(per_layer, top)])}


def _batch(rt: Runtime, samples: list[Sample], layer: int, target_layer: int | None,
           candidates: np.ndarray | None = None):
    """Rows, mask and target logits for one layer (target_layer None: the layer itself).

    Free answers with `candidates`: every sample is scored over all candidate tokens, as the
    runtime scores them, the target putting SPADE's top-k distribution on its own tokens and
    nothing on the rest. Trained on the top-k rows alone, a head leaves the other candidates'
    logits free, and they end up above the top-k (measured: Gemma's free heads agreed with SPADE's
    answer on 0 of 160 held-out prompts at each of layers 1-8).
    """
    src = layer if target_layer is None else target_layer
    hidden = np.stack([s.hidden[layer] for s in samples])
    if candidates is not None and samples[0].free:
        logits = np.full((len(samples), len(candidates)), -np.inf, np.float32)
        for n, s in enumerate(samples):
            ids = s.layer_ids(src)
            pos = np.searchsorted(candidates, ids).clip(0, len(candidates) - 1)
            known = candidates[pos] == ids
            logits[n, pos[known]] = s.logits[src][known]
        return hidden, logits, np.ones(logits.shape, bool), rt.engine.head.rows(candidates)
    m = max(len(s.layer_ids(src)) for s in samples)
    d = rt.engine.n_embd
    rows = np.zeros((len(samples), m, d), np.float32)
    mask = np.zeros((len(samples), m), bool)
    logits = np.zeros((len(samples), m), np.float32)
    for n, s in enumerate(samples):
        ids = s.layer_ids(src)
        rows[n, : len(ids)] = rt.engine.head.rows(ids)
        mask[n, : len(ids)] = True
        logits[n, : len(ids)] = s.logits[src]
    return hidden, logits, mask, rows


def train_heads(rt: Runtime, samples: list[Sample], layers: list[int], target: str, rank: int, steps: int,
                lr: float, candidates: np.ndarray | None = None) -> list[LayerHead]:
    """One head per layer; target "spade" (L-SPADE) or "full" (tuned lens); free answers over `candidates`."""
    engine = rt.engine
    heads = []
    for layer in layers:
        hidden, logits, mask, rows = _batch(rt, samples, layer, None if target == "spade" else engine.n_layers - 1,
                                            candidates)
        head, losses = train_head(hidden, logits, mask, rows, engine.head.norm_weight, engine.index.rms_eps,
                                  rank=rank, steps=steps, lr=lr, seed=layer)
        log.info("%s head, layer %d: cross-entropy %.4f -> %.4f", target, layer, losses[0], losses[-1])
        heads.append(head)
    return heads


def judge(rt: Runtime, heads: list[LayerHead], layers: list[int], samples: list[Sample],
          top_k: int, candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, own answer) of each head on each sample, as the runtime computes them.

    Free answers: entropy over the head's top-k among `candidates`, and its own answer among them.
    """
    engine = rt.engine
    ent = np.zeros((len(samples), len(layers)))
    own = np.zeros((len(samples), len(layers)), np.int64)
    cand_rows = engine.head.rows(candidates) if candidates is not None else None
    for n, s in enumerate(samples):
        rows = None if s.free else engine.head.rows(s.ids[0])
        for j, (layer, head) in enumerate(zip(layers, heads)):
            normed = head.adjust(s.hidden[layer][None])[0]
            normed = engine.head.final_norm(normed)
            if s.free:
                logits = cand_rows @ normed
                ent[n, j], own[n, j] = topk_entropy(logits, top_k), int(candidates[np.argmax(logits)])
            else:
                choice = choice_logits(rows @ normed, s.groups)
                ent[n, j], own[n, j] = entropy(choice), int(np.argmax(choice))
    return ent, own


def clopper_pearson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on a binomial proportion (exact, by bisection)."""
    if n == 0 or successes == 0:
        return 0.0
    alpha = 1.0 - confidence
    if successes == n:
        return alpha ** (1.0 / n)

    def upper_tail(p: float) -> float:  # P(X >= successes | n, p)
        logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
                + (n - k) * math.log1p(-p) for k in range(successes, n + 1)]
        top = max(logs)
        return math.exp(top) * sum(math.exp(x - top) for x in logs)

    lo, hi = 0.0, successes / n
    for _ in range(100):
        mid = (lo + hi) / 2
        if upper_tail(mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def fact_index(keys: Sequence[str] | None) -> np.ndarray | None:
    """Each prompt's fact as an index 0..F-1 (None: every prompt counts on its own)."""
    return None if keys is None else np.unique(np.asarray(keys), return_inverse=True)[1]


def agreement_bound(ok: np.ndarray, facts: np.ndarray | None, confidence: float) -> float:
    """Lower confidence bound on agreement from per-prompt outcomes `ok`, counting facts when given:
    a fact agrees only when all its prompts do (see exit_curve)."""
    if facts is None:
        return clopper_pearson_lower(int(ok.sum()), len(ok), confidence)
    failed = np.bincount(facts, weights=~ok) > 0
    return clopper_pearson_lower(int(len(failed) - failed.sum()), len(failed), confidence)


@dataclass
class CurvePoint:
    threshold: float
    agreement: float
    lower_bound: float
    mean_exit_layer: float
    exit_rate: float


def exit_curve(full: np.ndarray, answers: np.ndarray, entropies: np.ndarray, layers: list[int], n_layers: int,
               confidence: float, keys: Sequence[str] | None = None) -> list[CurvePoint]:
    """Agreement with the full answer and mean exit layer at every useful threshold.

    full: (N,) full answers; answers: (N, len(layers)) the answer given on exiting at each layer.
    keys: the fact each prompt asks about. The lower bound then counts facts, not prompts: the
    few-shot variants of one fact fail together, so treating them as independent draws would
    overstate the evidence. A fact counts as agreeing only when all its prompts agree, which
    bounds the chance that a prompt about a new fact disagrees (it is at most the chance that
    some prompt of that fact does). With one prompt per key this is the per-prompt bound.
    """
    facts = fact_index(keys)
    candidates = np.unique(np.concatenate([[0.0], entropies.ravel()]))
    if len(candidates) > 300:
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, 300)))
    curve = []
    for tau in [*candidates, math.inf]:
        exits = entropies <= tau
        first = np.where(exits.any(axis=1), exits.argmax(axis=1), -1)
        idx = np.maximum(first, 0)
        answer = np.where(first >= 0, answers[np.arange(len(full)), idx], full)
        layer = np.where(first >= 0, np.array(layers)[idx], n_layers - 1)
        ok = answer == full
        curve.append(CurvePoint(float(tau), float(ok.mean()), agreement_bound(ok, facts, confidence),
                                float(layer.mean()), float((first >= 0).mean())))
    return curve


def keys_of(samples: list[Sample], by_key: bool = True) -> list[str] | None:
    """The fact each sample asks about (its item's key), the unit the threshold's bound counts;
    None (count prompts, as calibrations split by prompt did) when `by_key` is off. A sample
    without a key is a fact of its own."""
    return [s.key or f"#{i}" for i, s in enumerate(samples)] if by_key else None


def pick_threshold(curve: list[CurvePoint], target: float, min_exit_rate: float = 0.05) -> float:
    """The largest finite threshold whose lower bound reaches the target; -1 (never exit, and no
    hooks at all) when none does or when it would exit on fewer than `min_exit_rate` of the
    held-out prompts: checking every layer for almost no exits only costs time."""
    ok = [p for p in curve if p.lower_bound >= target and math.isfinite(p.threshold)]
    if not ok:
        return -1.0
    best = max(ok, key=lambda p: p.threshold)
    return best.threshold if best.exit_rate >= min_exit_rate else -1.0


def thin_layers(train: list[Sample], ent: np.ndarray, layers: list[int], n_layers: int, target: float,
                confidence: float, exit_cost: np.ndarray, check_cost: float, budget: float = math.inf,
                by_key: bool = True) -> list[int]:
    """The evaluation layers worth a check, judged on the training split at its own threshold.

    A check costs every prompt that reaches it `check_cost` (relative to a full answer; ~1.5 ms for
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


def _timing_items(items: list[Item], n: int) -> list[Item]:
    """A warm-up item, then `n` spread over the list: with several few-shot lengths (or data
    files) one after the other, the first `n` would all be of the first kind."""
    step = max(1, len(items) // n)
    return [items[0], *items[::step][:n]]


def measure_check_ms(rt: Runtime, items: list[Item], candidates: np.ndarray | None, rank: int, n: int = 5,
                     repeats: int = 3) -> tuple[float, float]:
    """(what one L-SPADE check adds to a prompt pass that does not exit, the full answer), in ms:
    full-depth answers against passes checking every layer with a threshold that never exits
    (heads of the trained rank and the same candidate rows, so the same work); the added time is
    divided by the layers checked. The overhead budget takes the ratio of the two, measured in the
    same interleaved runs: a full answer timed minutes apart can differ by 15% on a busy laptop."""
    from .heads import OnnxHeads
    from .policy import ExitPolicy, spade_exit

    engine = rt.engine
    layers = tuple(range(1, engine.n_layers - 1))
    if not layers:
        return 0.0, 0.0
    heads = OnnxHeads(export_onnx([LayerHead.identity(engine.n_embd, rank) for _ in layers],
                                  engine.head.norm_weight, engine.index.rms_eps))
    cands = tuple(int(c) for c in candidates) if candidates is not None else None
    policy = ExitPolicy(1e-12, layers, {layer: i for i, layer in enumerate(layers)},
                        FREE_TOP_K if cands else None, cands)
    full, never = [], []
    for i, item in enumerate(_timing_items(items, n)):  # a warm-up first, as in measure_costs
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
    for i, item in enumerate(_timing_items(items, n)):  # the first run is a warm-up (graphs, rows), not counted
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


def probe_cost(ent: np.ndarray, probes: list[int], tau: float, n_layers: int, tail_cost: np.ndarray
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


OBJECTIVES = ("median", "total")


def choose_probes(ent: np.ndarray, agree: np.ndarray, layers: list[int], n_layers: int, tail_cost: np.ndarray,
                  target: float, keys: Sequence[str] | None = None, confidence: float = 0.95,
                  objective: str = "median") -> tuple[list[int], float]:
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


def split(samples: list[Sample], holdout: float, seed: int, by_key: bool = True) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out), the same split for every tail width (samples come in item order).

    `by_key`: whole facts are held out, all their few-shot variants together, so no held-out
    prompt shares a fact with a training one. With one prompt per key (ARC, BoolQ) both ways
    give the same split.
    """
    n_hold = max(5, int(len(samples) * holdout))
    keys = keys_of(samples)  # the same facts the bound counts
    sizes = Counter(keys)  # prompts per key, keys in first-seen order
    if not by_key or len(sizes) == len(samples):
        order = np.random.default_rng(seed).permutation(len(samples))
        return [samples[i] for i in order[n_hold:]], [samples[i] for i in order[:n_hold]]
    distinct, held_keys, count = list(sizes), set(), 0
    for j in np.random.default_rng(seed).permutation(len(distinct)):
        if count >= n_hold:
            break
        held_keys.add(distinct[j])
        count += sizes[distinct[j]]
    held = [k in held_keys for k in keys]
    return [s for s, h in zip(samples, held) if not h], [s for s, h in zip(samples, held) if h]


def probe_plan(train: list[Sample], held: list[Sample], layers: list[int], n_layers: int, costs: dict[str, float],
               top_k: int, target: float, confidence: float, by_key: bool = True, objective: str = "median") -> dict:
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
    probes, _ = choose_probes(ent, answers == full[:, None], layers, L, tail_costs(costs, layers, L), target,
                              keys_of(train, by_key), confidence, objective)
    plan = {"probe_layers": probes, "threshold": -1.0, "pays": False, "costs": dict(costs), "curve": [],
            "objective": objective}
    if probes:
        full, ent, answers = table(held, probes)
        curve = exit_curve(full, answers, ent, probes, L, confidence, keys_of(held, by_key))
        tau = pick_threshold(curve, target)
        plan.update(threshold=tau, curve=curve)
        if tau >= 0:
            first, cost = probe_cost(ent, probes, tau, L, tail_costs(costs, probes, L))
            plan["costs"].update(heldout_median_speedup_model=round(float(np.median(1 / cost)), 3),
                                 heldout_exit_rate=round(float((first >= 0).mean()), 3),
                                 heldout_mean_cost_model=round(float(cost.mean()), 3))
            plan["pays"] = bool(cost.mean() < 1.0)  # faster in total: the median flips around a 50% exit rate
    return plan


def frontier_row(samples: list[Sample], layers: list[int], n_layers: int, plan: dict) -> dict:
    """What one tail width offers: SPADE's agreement with the full answer by layer, the oracle, the probes."""
    full = np.array([s.answer(n_layers - 1) for s in samples])
    agree = np.array([[s.answer(layer) for layer in layers] for s in samples]) == full[:, None]
    oracle = [layers[int(row.argmax())] if row.any() else n_layers - 1 for row in agree]  # first agreeing layer
    return {"agreement_by_layer": {str(layer): round(float(a), 4) for layer, a in zip(layers, agree.mean(0))},
            "mean_agreement": round(float(agree.mean()), 4),
            "oracle_mean_exit_layer": round(float(np.mean(oracle)), 2),
            "probe_layers": plan["probe_layers"], "probe_threshold": plan["threshold"], "probes_pay": plan["pays"],
            **plan["costs"]}


def choose_tail(frontier: dict[int, dict]) -> int:
    """The width whose probes pay best (lowest modelled held-out mean cost), else the one whose SPADE
    agrees best with the full answer over all layers (smaller on ties)."""
    paying = {k: r for k, r in frontier.items() if r["probes_pay"]}
    if paying:
        return min(paying, key=lambda k: (paying[k]["heldout_mean_cost_model"], k))
    return max(frontier, key=lambda k: (frontier[k]["mean_agreement"], -k))


def calibrate_set(rt: Runtime, samples: list[Sample], kind: str, layers: list[int], *, holdout: float,
                  target_agreement: float, confidence: float, rank: int, steps: int, lr: float, tail: int,
                  top_k: int, seed: int, data_names: list[str], plan: dict | None = None,
                  frontier: dict | None = None, max_overhead: float = 0.03, by_key: bool = True,
                  few_shot: Sequence[int] | None = None) -> tuple[HeadSet, dict[str, bytes]]:
    engine = rt.engine
    L = engine.n_layers
    plan = plan or {}
    train, held = split(samples, holdout, seed, by_key)
    t0 = time.perf_counter()
    candidates = free_candidates(train) if kind == "free" else None
    lspade = train_heads(rt, train, layers, "spade", rank, steps, lr, candidates)
    tuned = train_heads(rt, train, layers, "full", rank, steps, lr, candidates)
    identity = [LayerHead.identity(engine.n_embd, 1) for _ in layers]
    full = np.array([s.answer(L - 1) for s in held])
    spade_answers = np.array([[s.answer(layer) for layer in layers] for s in held])
    costs = dict(plan.get("costs", {}))
    train_ent, _ = judge(rt, lspade, layers, train, top_k, candidates)
    if "full_ms" in costs:  # an L-SPADE exit runs its tail on the whole model
        exit_cost = (np.array(layers) + 1) / L + costs["tail_ms"] / costs["full_ms"]
        eval_layers = thin_layers(train, train_ent, layers, L, target_agreement, confidence, exit_cost,
                                  costs.get("check_ms", 0.0) / costs.get("check_full_ms", costs["full_ms"]),
                                  max_overhead, by_key)
    else:
        eval_layers = list(layers)
    cols = [layers.index(layer) for layer in eval_layers]  # the lens baselines are judged on the same layers
    curves, thresholds, held_keys = {}, {}, keys_of(held, by_key)
    for name, heads in (("lspade", lspade), ("tuned", tuned), ("logit_lens", identity)):
        ent, own = judge(rt, heads, layers, held, top_k, candidates)
        answers = spade_answers if name == "lspade" else own  # lens baselines answer from their own head
        curves[name] = exit_curve(full, answers[:, cols], ent[:, cols], eval_layers, L, confidence, held_keys)
        thresholds[name] = pick_threshold(curves[name], target_agreement)
        if name == "lspade":
            layer_stats = [{"layer": layer, "spade_agree_full": float((spade_answers[:, j] == full).mean()),
                            "lspade_agree_spade": float((own[:, j] == spade_answers[:, j]).mean()),
                            "mean_entropy": float(ent[:, j].mean())} for j, layer in enumerate(layers)]
    if plan.get("curve"):
        curves["spade"] = plan["curve"]
    thresholds["spade"] = plan.get("threshold", -1.0)
    head_set = HeadSet(
        kind=kind, file=f"lspade-{kind}.onnx", tuned_file=f"tuned-{kind}.onnx", layers=layers, eval_layers=eval_layers,
        threshold=thresholds["lspade"], thresholds=thresholds, tail=tail, top_k=top_k if kind == "free" else None,
        candidates=candidates.tolist() if candidates is not None else None,
        calibration={
            "data": data_names, **({"few_shot": list(few_shot)} if few_shot and kind == "free" else {}),
            "n_prompts": len(samples), "n_train": len(train), "n_holdout": len(held),
            "holdout_by": "fact" if by_key else "prompt",
            "target": ("SPADE's distribution over each prompt's decision set" if kind == "choice" else
                       f"SPADE's distribution over its top-{top_k} tokens at the same layer, scored over every "
                       "candidate token"),
            "target_agreement": target_agreement, "confidence": confidence,
            "bound": ("Clopper-Pearson, one-sided, over held-out facts (a fact agrees when all its prompts do)"
                      if by_key else "Clopper-Pearson, one-sided, over held-out prompts"),
            "min_exit_rate": 0.05, "max_overhead": max_overhead, "probe_objective": plan.get("objective", "median"),
            "steps": steps, "lr": lr, "train_seconds": round(time.perf_counter() - t0, 1),
        },
        curves={k: [p.__dict__ for p in v] for k, v in curves.items()},
        layer_stats=layer_stats,
        signal="spade" if plan.get("pays") else "lspade",
        probe_layers=plan.get("probe_layers", []),
        costs=costs,
        tail_frontier=frontier or {},
    )
    norm, eps = engine.head.norm_weight, engine.index.rms_eps
    files = {head_set.file: export_onnx(lspade, norm, eps), head_set.tuned_file: export_onnx(tuned, norm, eps)}
    return head_set, files


def calibrate(
    rt: Runtime,
    items: list[Item],
    out_dir: str | Path,
    *,
    data_names: list[str],
    min_layer: int = 1,
    holdout: float = 0.3,
    target_agreement: float = 0.99,
    confidence: float = 0.95,
    rank: int = 64,
    steps: int = 300,
    lr: float = 5e-3,
    tail: int | Sequence[int] = 1,
    free_tail: int | Sequence[int] | None = None,
    top_k: int = FREE_TOP_K,
    seed: int = 0,
    max_overhead: float = 0.03,
    holdout_by: str = "fact",
    merge: bool = False,
    few_shot: Sequence[int] | None = None,
    objective: str = "median",
    progress: Callable | None = None,
) -> HeadsManifest:
    """Collect, train, pick thresholds and export every answer kind present in `items`.

    `tail` / `free_tail`: one SPADE tail width, or several to choose from per answer kind
    (choose_tail over the held-out frontier, recorded in the manifest). `holdout_by="fact"` holds
    out whole facts (all few-shot variants of one); "prompt" splits prompts as they come. `merge`: keep the answer
    kinds these items do not cover from the heads already in `out_dir` (same model, same rank).
    `few_shot`: the prefix lengths the cloze items were built with, recorded with the free set.
    `objective`: what SPADE probe layers are chosen to speed up (choose_probes): "median" or "total".
    """
    if holdout_by not in ("fact", "prompt"):
        raise ValueError(f"holdout_by must be 'fact' or 'prompt', got {holdout_by!r}")
    by_key = holdout_by == "fact"
    engine = rt.engine
    kinds = {"choice" if item.choices else "free" for item in items}
    kept_sets, kept_files = kept_heads(Path(out_dir), engine.head.fingerprint(), rank, kinds) if merge else ({}, {})
    layers = list(range(min_layer, engine.n_layers - 1))
    sets, files = {}, {}
    widths = {"choice": _widths(tail), "free": _widths(free_tail or tail)}
    by_kind = {"choice": [i for i in items if i.choices], "free": [i for i in items if not i.choices]}
    for kind, kind_items in by_kind.items():
        if not kind_items:
            continue
        if len(kind_items) < 10:
            raise ValueError(f"calibrating {kind} answers needs at least 10 prompts, got {len(kind_items)}")
        by_k, plans, frontier = {}, {}, {}
        for k in widths[kind]:
            t0 = time.perf_counter()
            by_k[k] = collect(rt, kind_items, tail=k, progress=progress, top_k=top_k)
            log.info("collected %d %s prompts (tail %d) in %.0f s", len(by_k[k]), kind, k, time.perf_counter() - t0)
            costs = measure_costs(rt, kind_items, k)
            log.info("%s, tail %d: full answer %.1f ms, SPADE tail %.1f ms on the whole model, %.1f ms above "
                     "layer %d", kind, k, costs["full_ms"], costs["tail_ms"], costs["tail_mid_ms"],
                     costs["tail_mid_layer"])
            train, held = split(by_k[k], holdout, seed, by_key)
            plans[k] = probe_plan(train, held, layers, engine.n_layers, costs, top_k, target_agreement, confidence,
                                  by_key, objective)
            frontier[k] = frontier_row(held, layers, engine.n_layers, plans[k])
        k = choose_tail(frontier)
        log.info("%s answers: tail width %d chosen from %s", kind, k, sorted(frontier))
        train, _ = split(by_k[k], holdout, seed, by_key)
        check_ms, check_full_ms = measure_check_ms(rt, kind_items, free_candidates(train) if kind == "free" else None,
                                                   rank)
        plans[k]["costs"].update(check_ms=check_ms, check_full_ms=check_full_ms)
        log.info("%s answers: one L-SPADE check costs %.2f ms inside the pass (full answer %.1f ms)", kind, check_ms,
                 check_full_ms)
        sets[kind], kind_files = calibrate_set(
            rt, by_k[k], kind, layers, holdout=holdout, target_agreement=target_agreement, confidence=confidence,
            rank=rank, steps=steps, lr=lr, tail=k, top_k=top_k, seed=seed, data_names=data_names, plan=plans[k],
            frontier={str(w): row for w, row in frontier.items()}, max_overhead=max_overhead, by_key=by_key,
            few_shot=few_shot)
        files.update(kind_files)
    manifest = HeadsManifest(
        format=HEADS_FORMAT, model=rt.name, model_file=engine.path.name, output_fingerprint=engine.head.fingerprint(),
        arch=engine.arch.name, n_layers=engine.n_layers, n_embd=engine.n_embd, rank=rank, onnx_opset=ONNX_OPSET,
        dtype="float16", sets={**kept_sets, **sets},
    )
    write_heads(Path(out_dir), manifest, {**kept_files, **files})
    return manifest


def _widths(tail: int | Sequence[int]) -> list[int]:
    return sorted({tail} if isinstance(tail, int) else set(tail))


def kept_heads(folder: Path, fingerprint: str, rank: int, replaced: set[str]
               ) -> tuple[dict[str, HeadSet], dict[str, bytes]]:
    """The head sets (and their ONNX files) of `folder` that a calibration of `replaced` kinds keeps.

    Checked before any work: the heads must be this model's (output fingerprint), of the same rank
    (the manifest records one), and their files must match their sha256.
    """
    if not (folder / "heads.json").exists():
        return {}, {}
    old = load_manifest(folder)
    if old.output_fingerprint != fingerprint:
        raise HeadsMismatchError(f"the heads in {folder} were made for another model's output matrix: "
                                 "merge only into this model's heads")
    if old.rank != rank:
        raise HeadsMismatchError(f"the heads in {folder} have rank {old.rank}: calibrate with --rank {old.rank} "
                                 "to merge into them")
    sets = {kind: head_set for kind, head_set in old.sets.items() if kind not in replaced}
    files = {}
    for head_set in sets.values():
        for name in (head_set.file, head_set.tuned_file):
            try:
                data = (folder / name).read_bytes()
            except OSError as exc:
                raise HeadsMismatchError(f"cannot read {folder / name}: {exc}") from None
            if hashlib.sha256(data).hexdigest() != old.hashes.get(name):
                raise HeadsMismatchError(f"{folder / name} does not match its sha256 in heads.json")
            files[name] = data
    return sets, files


def write_heads(out_dir: Path, manifest: HeadsManifest, files: dict[str, bytes]) -> Path:
    """Write into a temporary sibling folder, then swap it in: never a half-written heads folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        manifest.hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        (tmp / "heads.json").write_text(json.dumps(manifest.to_dict(), indent=1))
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        if out_dir.exists():
            out_dir.replace(old)
        tmp.chmod(0o755)
        tmp.replace(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote heads to %s", out_dir)
    return out_dir
