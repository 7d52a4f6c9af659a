"""A cascade for a calibrated free-answer head set: L-SPADE checks first, then SPADE probes.

An L-SPADE check is cheap (a head on one row) but its entropy lets few prompts exit; a probe's
own entropy lets more exit, but a probe costs a SPADE tail. A cascade runs the heads at their
early layers and, for the prompts they did not let exit, one or two probes later on (sharing a
threshold): the easy prompts leave at the heads' layer, the middling ones at a probe, and only
the rest pay for all of them.

This adds a cascade to heads already calibrated (the ONNX heads are not retrained): on the
calibration's own prompts and train / held-out split (the same data, seed and fraction as its
`calibration` record), it measures per prompt the shipped head's entropy at its layers and
SPADE-K's answer and entropy at the candidate probe layers (cached per prompt, so a run can stop
and resume); picks the probe layers and the ratio of the two thresholds on the training facts
(the modelled speedup, agreement bounded at the target); then scales both thresholds together
and keeps the largest scale whose agreement is certified on the held-out facts, per prompt-length
range (the same bound as `edge-spade calibrate`), with the heads' domain gate refitted on the training
prompts and in place (convert/domain_gates.py). With `formats`, the same facts written as `Q: A:`
pairs or arrows join the choice and the certificate (each on its fact's side of the split): the
heads' gate keeps them from the heads, so the probes' threshold is certified on them too. Prompts up
to `min_tokens` are not measured: there a check costs more than the pass it could cut (the set's
plans say so), and their plans do not check. With `--by-gate`, where the heads' gate keeps prompts
from them (other formats), each side of the gate gets its own probes and thresholds if that models
faster than one rule for all (choose_by_gate): prompts like the calibration's can exit earlier than
the other formats (not shipped: on the test facts it exited less than on the held-out ones;
CHANGELOG). The cascade becomes the set's default rule when it models faster than the rule in force
on the held-out prompts, or is certified on more formats than that rule.

    python -m edge_spade.convert.cascade --model gemma3-270m --heads models/gemma3-270m \
        --report benchmarks/calibration/gemma3-270m --max-probes 2 --formats Q/A arrow
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_spade.cache import cache_dir
from edge_spade.domain import gates_to_bytes
from edge_spade.errors import EdgeSpadeError
from edge_spade.heads import FREE_TOP_K, topk_entropy
from edge_spade.runtime import Runtime

from . import domain_gates
from .certify import agreement_bound, fact_index, split
from .costs import tail_costs
from .datasets import CLOZE_FORMATS, Item
from .heads_files import rewrite_manifest
from .length_plans import LENGTH_EDGES, MIN_PROMPTS_PER_RANGE
from .trace import load_or_make

log = logging.getLogger(__name__)
SCALES = np.linspace(0.0, 2.0, 81)  # the held-out path: both thresholds times each scale
SCREEN_MIN_MS = 1.0  # probes screen (HeadSet.screen_probes) where that saves at least this much
ROBUST_QUANTILE = 0.4  # the "robust" objective: the speedup 60% of the training prompts reach, at least


class NoCascadeError(ValueError):
    """These heads or prompts cannot carry a cascade (no certified head threshold, no long prompts)."""


@dataclass
class Signals:
    """One prompt's view of the cascade: head entropies, SPADE's answers and entropies, the full answer."""

    key: str
    n_tokens: int
    head_ent: np.ndarray | None = None  # (len(head layers),)
    spade_answer: np.ndarray | None = None  # (len(spade layers),): head layers, then probe candidates
    spade_ent: np.ndarray | None = None
    full: int = -1
    shots: int = 0  # the few-shot count of its prompt, and the prompt's format (datasets.Item)
    form: str = "cloze"


def measure(
    rt: Runtime,
    prompts: list[tuple[Signals, list[int]]],
    head_layers: Sequence[int],
    probe_layers: Sequence[int],
    progress: Callable | None = None,
) -> int:
    """Fill each prompt's signals from one traced pass and SPADE tails at the layers (cached per
    prompt); returns how many prompts were traced now (the rest came from the cache)."""
    engine, head_set, heads = rt.engine, rt.manifest.sets["free"], rt.heads["free"]
    k, top_k = head_set.tail, head_set.top_k or FREE_TOP_K
    spade_layers = [*head_layers, *probe_layers]
    engine.use_tail_models(spade_layers)  # tails skip the layers below (the same answers, faster)
    rows = engine.head.rows(np.array(head_set.candidates))
    index = head_set.head_index()
    tag = json.dumps([list(head_layers), list(probe_layers), k, top_k, rt.manifest.hashes.get(head_set.file)])
    folder = cache_dir() / "calibration" / "cascade" / engine.head.fingerprint()[:16]  # `edge-spade cache` lists it
    folder.mkdir(parents=True, exist_ok=True)

    def signals_of(tokens: list[int]) -> dict[str, np.ndarray]:
        trace = engine.trace(tokens, None, tail=k)
        tail_tokens = [tokens[r] for r in trace.tail_rows]
        spade = [engine.spade_tail(trace.states[layer], layer, None, tail_tokens) for layer in spade_layers]
        return {
            "head_ent": np.array(
                [topk_entropy(rows @ heads.normed(trace.states[h][-1], index[h]), top_k) for h in head_layers]
            ),
            "spade_answer": np.array([int(np.argmax(lg)) for lg in spade]),
            "spade_ent": np.array([topk_entropy(lg, top_k) for lg in spade]),
            "full": np.array(int(np.argmax(trace.full.logits))),
        }

    traced = 0
    for signals, tokens in progress(prompts) if progress else prompts:
        key = hashlib.sha256(json.dumps([tokens, tag]).encode()).hexdigest()[:24]
        data, made = load_or_make(folder / f"{key}.npz", lambda tokens=tokens: signals_of(tokens))
        traced += made
        signals.head_ent, signals.spade_answer = data["head_ent"], data["spade_answer"]
        signals.spade_ent, signals.full = data["spade_ent"], int(data["full"])
    return traced


def domain_states(
    rt: Runtime, prompts: list[tuple[Signals, list[int]]], layers: Sequence[int]
) -> dict[int, np.ndarray]:
    """Per prompt (by its Signals' id): the last row after each head layer (cached per
    prompt; a pass stopped after the deepest head, a small share of a full one)."""
    engine = rt.engine
    folder = cache_dir() / "calibration" / "cascade" / engine.head.fingerprint()[:16] / "domain"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for signals, tokens in prompts:
        key = hashlib.sha256(json.dumps([tokens, list(layers)]).encode()).hexdigest()[:24]
        data, _ = load_or_make(folder / f"{key}.npz", lambda tokens=tokens: {"rows": engine.last_rows(tokens, layers)})
        out[id(signals)] = data["rows"]
    return out


def gate_heads(
    train: Sequence[Signals],
    measured: Sequence[Signals],
    states: dict[int, np.ndarray],
    heads: Sequence[int],
    quantile: float,
    own: Sequence[Signals] | None = None,
) -> tuple[bytes, dict[str, float]]:
    """Fit a domain gate per head layer on the training prompts' states; every measured prompt outside
    a layer's gate gets an infinite head entropy there (its head cannot let it exit, as at run time).
    Returns the domain file and the shares of training and held-out prompts every gate admits,
    among `own` (the calibration's own format; default: every measured prompt)."""
    gates = domain_gates.fit_gates(np.stack([states[id(s)] for s in train]), heads, quantile)
    admitted = domain_gates.inside(gates, np.stack([states[id(s)] for s in measured]), heads)
    for s, ok in zip(measured, admitted):
        s.head_ent = np.where(ok, s.head_ent, np.inf)
    train_ids = {id(t) for t in train}
    own_ids = {id(s) for s in (measured if own is None else own)}
    kept = np.array([id(s) in own_ids for s in measured])
    others = admitted[~kept]
    admitted, in_train = admitted[kept], np.array([id(s) in train_ids for s in measured])[kept]
    shares = {
        "train": round(float(admitted[in_train].all(1).mean()), 4),
        "held_out": round(float(admitted[~in_train].all(1).mean()) if (~in_train).any() else 0.0, 4),
    }
    if len(others):  # the other prompt formats' prompts, which the heads were not trained on
        shares["other_formats"] = round(float(others.all(1).mean()), 4)
    return gates_to_bytes(gates), shares


@dataclass
class CostModel:
    """What a cascade costs one prompt, in ms, from the set's measured costs (`HeadSet.costs`)."""

    full_at_0: float
    full_per_token: float
    check_ms: float  # one L-SPADE check inside the pass
    after_head_ms: float  # the SPADE tail after a head's exit (whole model, main context)
    probe_ms: dict[int, float]  # a probe's tail per layer, on a tail model
    probe_whole_ms: float  # ...on the whole model, from a context made for it (a one-question process)
    context_ms: float
    n_layers: int
    heads_load_ms: float = 0.0  # importing onnxruntime and making the heads' session: once per process
    screen_ms: float = 0.0  # what a probe on a tail model that does not exit saves by screening (probe_checks)

    @classmethod
    def of(
        cls, costs: dict, layers: Sequence[int], n_layers: int, heads_load_ms: float = 0.0, screen_ms: float = 0.0
    ) -> CostModel:
        fit = costs["length_fit"]
        probe = tail_costs(costs, layers, n_layers) * costs["full_ms"]
        return cls(
            fit["full_ms_at_0"],
            fit["full_ms_per_token"],
            costs.get("check_ms", 0.0),
            costs["tail_ms"],
            {layer: float(ms) for layer, ms in zip(layers, probe)},
            costs["tail_ms"],
            fit["context_ms"],
            n_layers,
            heads_load_ms,
            screen_ms,
        )

    def full(self, n_tokens: np.ndarray) -> np.ndarray:
        return self.full_at_0 + self.full_per_token * np.asarray(n_tokens, float)

    def cost(
        self,
        stage: np.ndarray,
        n_tokens: np.ndarray,
        heads: Sequence[int],
        probes: Sequence[int] = (),
        whole: bool = False,
        checked: bool = True,
    ) -> np.ndarray:
        """Per prompt: `stage` j < len(heads) exits at heads[j], len(heads) + i at probes[i], -1 not at all.
        `checked=False`: the heads do not run (a cascade without its head stage); no probes: none runs.
        A probe that does not exit costs its tail less what screening saves; one that exits, its tail."""
        full = self.full(n_tokens)
        probe_ms = np.array([self.probe_whole_ms if whole else self.probe_ms[p] for p in probes], float)
        # a probe passed by, not exiting; screening cannot save more than the tail it skips
        missed = np.maximum(probe_ms - (0.0 if whole else self.screen_ms), 0.0)
        # A one-question process (`whole`) pays once for what a resident one has made already: the
        # probes' context, and onnxruntime with the heads' session.
        first = (self.context_ms if whole and len(probes) else 0.0) + (self.heads_load_ms if whole and checked else 0.0)
        layers = np.array([*heads, *probes, self.n_layers - 1], float)
        checks = self.check_ms * np.minimum(np.where(stage < 0, len(heads), stage + 1), len(heads)) * checked
        at = (layers[np.where(stage < 0, len(layers) - 1, stage)] + 1) / self.n_layers * full
        nth = np.clip(stage - len(heads), 0, len(probes))  # probes passed before the one that exits
        before = np.concatenate([[0.0], np.cumsum(missed)])
        exit_probe = at + before[nth] + np.append(probe_ms, 0.0)[nth]
        none = full + before[-1]
        exit_head = at + self.after_head_ms
        return first + checks + np.where(stage < 0, none, np.where(stage < len(heads), exit_head, exit_probe))


def measure_screen_ms(
    rt: Runtime,
    prompts: Sequence[tuple[Signals, list[int]]],
    layer: int,
    k: int,
    candidates: Sequence[int],
    n: int = 12,
) -> float:
    """What screening saves a free-answer probe at `layer` that does not exit (policy.probe_checks), in
    ms: its tail with the vocabulary's LM head minus its tail with the candidates' logits, each timed
    right after a prompt pass (which leaves the caches as a probe finds them); the median over the
    first `n` prompts. 0 where the layer has no tail model (whole-model tails are not screened)."""
    if not candidates:
        return 0.0
    engine, ids, saved = rt.engine, np.asarray(candidates), []
    engine.use_tail_models([layer])
    for _, tokens in prompts[:n]:
        states = engine.trace(tokens, None, tail=k).states[layer]
        t0 = time.perf_counter()
        engine.spade_tail(states, layer, None)
        plain = time.perf_counter() - t0
        engine.full(tokens, None)
        t0 = time.perf_counter()
        rows = engine.spade_tail_normed(states, layer)
        if rows is None:
            return 0.0
        engine.head.logits(rows[1], ids)
        saved.append((plain - (time.perf_counter() - t0)) * 1000)
    return round(float(np.median(saved)), 2) if saved else 0.0


def measure_heads_load_ms(onnx_file: Path, repeats: int = 3) -> float:
    """What a one-question process pays before its first L-SPADE check: importing onnxruntime and
    making the heads' session, each in a fresh Python (the median of `repeats`), in ms."""
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from edge_spade.heads import OnnxHeads; "
        "t = time.perf_counter(); OnnxHeads(Path(sys.argv[1]).read_bytes()).session; "
        "print((time.perf_counter() - t) * 1000)"
    )
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code, str(onnx_file)], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    return round(float(np.median(runs)), 1)


@dataclass
class Table:
    """Many prompts' signals as arrays, stacked once: the choice evaluates thousands of rules on them."""

    head_ent: np.ndarray  # (prompts, head layers)
    spade_answer: np.ndarray  # (prompts, spade layers)
    spade_ent: np.ndarray
    full: np.ndarray  # (prompts,)

    def rows(self, mask: np.ndarray) -> Table:
        return Table(self.head_ent[mask], self.spade_answer[mask], self.spade_ent[mask], self.full[mask])

    @classmethod
    def of(cls, s: Sequence[Signals]) -> Table:
        return cls(
            np.stack([x.head_ent for x in s]),
            np.stack([x.spade_answer for x in s]),
            np.stack([x.spade_ent for x in s]),
            np.array([x.full for x in s]),
        )


def probe_columns(heads: Sequence[int], probes: Sequence[int], layers: Sequence[int]) -> list[int]:
    """The signals' columns (Signals.spade_ent, spade_answer) of probe `layers`, among the measured
    `probes`: after one column per head layer."""
    return [len(heads) + list(probes).index(p) for p in layers]


def outcome(
    s: Sequence[Signals] | Table, n_heads: int, probe_cols: Sequence[int], tau_head: float, tau_probe: float
) -> tuple[np.ndarray, np.ndarray]:
    """(stage per prompt as CostModel.cost takes it, whether its answer equals the full model's).
    `probe_cols`: the probes' columns in the signals, in layer order, sharing `tau_probe`."""
    t = s if isinstance(s, Table) else Table.of(s)
    head_ent = t.head_ent[:, :n_heads]
    exits = head_ent <= tau_head if tau_head >= 0 else np.zeros_like(head_ent, bool)
    stage = np.where(exits.any(axis=1), exits.argmax(axis=1), -1)
    cols = np.array([*range(n_heads), *probe_cols] or [0])
    if len(probe_cols) and tau_probe >= 0:
        probed = t.spade_ent[:, list(probe_cols)] <= tau_probe
        stage = np.where((stage < 0) & probed.any(axis=1), n_heads + probed.argmax(axis=1), stage)
    given = np.where(stage < 0, t.full, t.spade_answer[np.arange(len(t.full)), cols[np.maximum(stage, 0)]])
    return stage, given == t.full


def threshold_grid(
    table: Table, cols: Sequence[int], head_stage: bool = True, points: int = 31
) -> tuple[list[float], list[float]]:
    """The thresholds a choice tries for the heads and for the probes at `cols`: -1 (that stage never
    exits), then `points` quantiles of its entropies (a head's outside its domain gate are infinite,
    never a threshold)."""
    head_ent = table.head_ent[np.isfinite(table.head_ent)]
    head_taus = [-1.0]
    if head_stage and head_ent.size:
        head_taus += list(np.unique(np.quantile(head_ent, np.linspace(0, 1, points))))
    probe_taus = [-1.0]
    if len(cols):
        probe_taus += list(np.unique(np.quantile(table.spade_ent[:, list(cols)], np.linspace(0, 1, points))))
    return head_taus, probe_taus


def choose(
    train: list[Signals],
    heads: Sequence[int],
    probes: Sequence[int],
    model: CostModel,
    target: float,
    confidence: float,
    objective: str,
    by_key: bool = True,
    head_stage: bool = True,
    min_probe_layer: int = 0,
    max_probes: int = 1,
    combos: Sequence[tuple[int, ...]] | None = None,
) -> dict:
    """The probe layers (up to `max_probes`, sharing one threshold) and both thresholds that speed the
    training prompts up most (`objective`: "total" or "median" speedup over full depth, "geomean", or
    "robust": the speedup at the 40th percentile, a median with a margin, then the total. A median chosen
    on the training prompts often rests on just over half of them exiting; the held-out certificate then
    scales the thresholds back and the median falls to 1x; the margin keeps the choice off that edge.
    Where no rule lifts the 40th percentile above 1x, the total decides)
    with their agreement bounded at the target. `head_stage=False`: the heads never exit (probes
    alone); probes below `min_probe_layer` are not chosen. `combos`: only these sets of probe layers."""
    n = np.array([x.n_tokens for x in train])
    full = model.full(n)
    facts = fact_index([x.key for x in train]) if by_key else None
    best, best_key = {"probe_layers": [], "threshold": -1.0, "probe_threshold": -1.0}, (1.0, 1.0)
    speed = {"train_speedup_total": 1.0, "train_speedup_median": 1.0}
    allowed = [p for p in probes if p >= min_probe_layer]
    table = Table.of(train)
    if combos is None:
        combos = [()] + [c for r in range(1, max_probes + 1) for c in itertools.combinations(allowed, r)]
    for chosen in combos:
        cols = probe_columns(heads, probes, chosen)
        head_taus, probe_taus = threshold_grid(table, cols, head_stage)
        for tau_head in head_taus:
            for tau_probe in probe_taus:
                stage, ok = outcome(table, len(heads), cols, tau_head, tau_probe)
                if agreement_bound(ok, facts, confidence) < target:
                    continue
                cost = model.cost(stage, n, heads, chosen if tau_probe >= 0 else (), checked=tau_head >= 0)
                total, median = float(full.sum() / cost.sum()), float(np.median(full / cost))
                key = _key(objective, full / cost, total, median)
                if key > best_key:
                    best_key = key
                    best = {
                        "probe_layers": list(chosen),
                        "threshold": float(tau_head),
                        "probe_threshold": float(tau_probe),
                    }
                    speed = {"train_speedup_total": round(total, 4), "train_speedup_median": round(median, 4)}
    return {**best, **speed}


def _key(objective: str, speedup: np.ndarray, total: float, median: float) -> tuple[float, float]:
    """What `choose` maximises: the objective's figure, then the total speedup (the median for "total")."""
    if objective == "total":
        return total, median
    if objective == "median":
        return median, total
    if objective == "geomean":
        return float(np.exp(np.mean(np.log(speedup)))), total
    if objective == "robust":
        return max(float(np.quantile(speedup, ROBUST_QUANTILE)), 1.0), total
    raise ValueError(f"unknown objective {objective!r}")


def certify(
    held: list[Signals],
    heads: Sequence[int],
    cols: Sequence[int],
    rule: dict,
    target: float,
    confidence: float,
    by_key: bool,
) -> tuple[float, float, int] | None:
    """The rule's thresholds at the largest scale certified on `held` (None: no scale certifies an exit)."""
    facts = fact_index([x.key for x in held]) if by_key else None
    table = Table.of(held)
    for scale in SCALES[::-1]:
        tau_head = rule["threshold"] * scale if rule["threshold"] >= 0 else -1.0
        tau_probe = rule["probe_threshold"] * scale if rule["probe_threshold"] >= 0 else -1.0
        stage, ok = outcome(table, len(heads), cols, tau_head, tau_probe)
        if (stage >= 0).any() and agreement_bound(ok, facts, confidence) >= target:
            return tau_head, tau_probe, int((stage >= 0).sum())
    return None


def cascade_plans(
    held: list[Signals],
    heads: Sequence[int],
    cols: Sequence[int],
    probes: Sequence[int],
    rule: dict,
    model: CostModel,
    target: float,
    confidence: float,
    min_tokens: int,
    by_key: bool = True,
    margin: float = 0.02,
    whole_margin: float = 0.10,
    one_question_checks: bool = False,
) -> tuple[dict, list[dict]]:
    """The set-level thresholds (certified on every measured held-out prompt) and one plan per range.

    A range checks where the modelled time is under (1 - `margin`) of full depth. A one-question
    process (whole-model tails) runs the heads alone, and only with `one_question_checks`, where
    the model promises (1 - `whole_margin`): its first check pays for importing onnxruntime and the
    heads' session, every question that does not exit loses that, and no speed guard sees enough
    answers there to correct a cost model measured on another machine. On the few-shot prompts of
    benchmarks/one_question.py such checks cost more than they saved (CHANGELOG,
    cascades), so by default a one-question `ask` answers at full depth."""
    every = certify(held, heads, cols, rule, target, confidence, by_key)
    overall = (
        {"threshold": -1.0, "probe_threshold": -1.0}
        if every is None
        else {"threshold": every[0], "probe_threshold": every[1]}
    )
    lengths = np.array([x.n_tokens for x in held])
    plans, lo = [], 1
    for hi in [*LENGTH_EDGES, None]:
        top = hi if hi is not None else 10**9
        if top <= min_tokens:
            plans.append(
                {"max_tokens": hi, "check": False, "check_whole_model": False, "heldout_prompts": 0, "measured": False}
            )
            lo = hi + 1
            continue
        mask = (lengths >= lo) & (lengths <= top)
        own = mask.sum() >= MIN_PROMPTS_PER_RANGE
        here = [x for x, m in zip(held, mask) if m] if own else held
        taus = certify(here, heads, cols, rule, target, confidence, by_key) if own else every
        plan: dict = {"max_tokens": hi, "heldout_prompts": int(mask.sum()) if own else None}
        if taus is None:
            plan.update(check=False, check_whole_model=False, exit_share=0.0)
        else:
            stage, _ = outcome(here, len(heads), cols, taus[0], taus[1])
            used = probes if taus[1] >= 0 else ()
            n = np.full(len(here), lo)
            full = float(model.full(np.array([lo]))[0])
            cut = float(model.cost(stage, n, heads, used, checked=taus[0] >= 0).mean())
            # A one-question process runs the heads alone (ExitPolicy.heads_only): no probe context or tail.
            heads_alone, _ = outcome(here, len(heads), cols, taus[0], -1.0)
            whole = float(model.cost(heads_alone, n, heads, (), whole=True, checked=taus[0] >= 0).mean())
            if taus[0] < 0:
                whole = math.inf  # nothing to check without the probe
            plan.update(
                check=cut <= (1 - margin) * full,
                check_whole_model=one_question_checks and whole <= (1 - whole_margin) * full,
                exit_share=round(float((stage >= 0).mean()), 3),
                head_exit_share=round(float(((stage >= 0) & (stage < len(heads))).mean()), 3),
                speedup_model=round(full / cut, 3),
                speedup_model_whole=round(full / whole, 3),  # the heads alone
            )
            if own:
                plan.update(threshold=taus[0], probe_threshold=taus[1])
        plans.append(plan)
        lo = (hi or lo) + 1
    return overall, plans


def inside_gate(s: Signals) -> bool:
    """Whether the heads' domain gate admitted the prompt at every head layer (gate_heads makes a head's
    entropy infinite where it did not)."""
    return bool(np.isfinite(s.head_ent).all())


@dataclass
class GateSide:
    """One side of the domain gate: its prompts, the rule chosen on its training ones, and that rule's
    thresholds and plans certified on its held-out ones."""

    train: list[Signals]
    held: list[Signals]
    heads: list[int]
    probes: list[int]  # every candidate probe layer (the signals' columns)
    rule: dict
    overall: dict
    plans: list[dict]

    @property
    def cols(self) -> list[int]:
        return probe_columns(self.heads, self.probes, self.rule["probe_layers"])

    def spent(self, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
        return _rule_spent(self.held, self.heads, self.cols, self.rule["probe_layers"], self.plans, self.overall, cost)


def choose_by_gate(
    g: Gathered,
    target: float,
    confidence: float,
    objective: str,
    head_stage: bool,
    min_probe_layer: int,
    max_probes: int,
    min_tokens: int,
) -> dict[bool, GateSide] | None:
    """A rule per side of the domain gate (True: inside, where the heads may decide; False: the prompts it
    keeps from them, which only probes can let exit), each chosen on its side's training prompts and
    certified, per length range, on its side's held-out prompts: a claim per side, as per range. Prompts
    like the heads' calibration prompts and other formats differ in how early SPADE is sure; one rule for
    both settles for the later probe. None where a side has no prompts on either side of the split."""
    sides = {}
    for inside in (True, False):
        train = [s for s in g.train if inside_gate(s) == inside]
        held = [s for s in g.held if inside_gate(s) == inside]
        if not train or not held:
            return None
        rule = choose(
            train, g.heads, g.probes, g.cost, target, confidence, objective, g.by_key, head_stage and inside,
            min_probe_layer, max_probes,
        )  # fmt: skip
        cols = probe_columns(g.heads, g.probes, rule["probe_layers"])
        overall, plans = cascade_plans(
            held, g.heads, cols, rule["probe_layers"], rule, g.cost, target, confidence, min_tokens, g.by_key
        )
        sides[inside] = GateSide(train, held, g.heads, g.probes, rule, overall, plans)
    return sides


def merge_plans(inside: GateSide, outside: GateSide) -> list[dict]:
    """One plan per length range from the two sides' plans: it checks where either side's does, each side
    with its own thresholds (-1 where its own plan does not check: that side answers at full depth)."""

    def own(plan: dict, side: GateSide, key: str) -> float:
        return plan.get(key, side.overall[key]) if plan["check"] else -1.0

    def detail(plan: dict) -> dict:  # what the side's plan measured, its thresholds being merged above
        return {k: v for k, v in plan.items() if k not in ("max_tokens", "threshold", "probe_threshold")}

    merged = []
    for a, b in zip(inside.plans, outside.plans, strict=True):
        if not a.get("measured", True):  # under min_tokens: neither side checks
            merged.append(a)
            continue
        merged.append(
            {
                "max_tokens": a["max_tokens"],
                "check": a["check"] or b["check"],
                "check_whole_model": a["check_whole_model"] or b["check_whole_model"],
                "threshold": own(a, inside, "threshold"),
                "inside_probe_threshold": own(a, inside, "probe_threshold"),
                "probe_threshold": own(b, outside, "probe_threshold"),
                "inside": detail(a),
                "outside": detail(b),
            }
        )
    return merged


def cascade_rule(heads: list[int], overall: dict, chosen: list[int], sides: dict[bool, GateSide] | None) -> dict:
    """The set's `cascade` entry (HeadSet.cascade): the heads, the shared probes and, with a rule per
    side of the gate, the inside side's probes; thresholds certified over every length range."""
    rule = {
        "head_layers": heads,
        "threshold": overall["threshold"],
        "probe_layers": chosen,
        "probe_threshold": overall["probe_threshold"] if chosen else -1.0,
    }
    if sides is not None:
        inside = sides[True]
        rule["inside"] = {
            "probe_layers": inside.rule["probe_layers"],
            "probe_threshold": inside.overall["probe_threshold"] if inside.rule["probe_layers"] else -1.0,
        }
    return rule


def add_cascade(
    model: str,
    heads_dir: Path,
    report_dir: Path,
    data: str | None = None,
    holdout: float = 0.5,
    variants: int = 1,
    probe_layers: Sequence[int] | None = None,
    min_tokens: int = 32,
    objective: str | None = None,
    threads: int | None = None,
    progress: Callable | None = None,
    items: Sequence[Item] | None = None,
    head_stage: bool = True,
    min_probe_layer: int = 0,
    domain_quantile: float | None = domain_gates.QUANTILE,
    max_probes: int = 2,
    formats: Sequence[str] = (),
    by_gate: bool = False,
) -> dict:
    """Measure, choose, certify and write the cascade into `heads_dir`/heads.json (see the module).

    `items`: the calibration's own items in its order (`edge-spade calibrate --cascade` passes them);
    otherwise they are rebuilt from `data` or the heads' calibration record. `head_stage=False`: the
    heads never exit, a probe alone decides (where the heads' certificate does not carry over to the
    prompt formats users write: benchmarks/formats.py); it replaces a rule in force that runs heads.
    `min_probe_layer`: the earliest probe chosen (all candidates are still measured, so the cache holds).
    `domain_quantile`: the heads decide only on states like the training prompts' (edge_spade/domain.py),
    a gate admitting this share of them, fitted and certified with the cascade; None: no gate.
    `max_probes`: probes after the heads, sharing one threshold. `formats`: prompt formats besides the
    calibration's (convert/datasets.CLOZE_FORMATS) whose prompts of the same facts join the choice and
    the certificate, each on its fact's side of the split; the gate is fitted on the calibration's
    own format (the heads' training prompts), so the others reach the probes."""
    from edge_spade.runtime import load_model

    rt = load_model(model, heads=heads_dir, threads=threads)
    try:
        head_set = rt.manifest.sets.get("free")
        if head_set is not None and (
            head_set.threshold < 0 or head_set.signal not in ("lspade", "spade") or len(head_set.probe_layers) > 1
        ):
            raise NoCascadeError(
                f"a cascade is added to a set with a certified L-SPADE threshold whose rule is L-SPADE or one "
                f"SPADE probe (this one: {head_set.signal!r}, threshold {head_set.threshold}, probes "
                f"{head_set.probe_layers})"
            )
        g = gather(
            rt, heads_dir, data, holdout, variants, probe_layers, min_tokens, progress, items, head_stage,
            domain_quantile=domain_quantile, formats=formats,
        )  # fmt: skip
        head_set = rt.manifest.sets["free"]
        heads, probes, cost, train, held = g.heads, g.probes, g.cost, g.train, g.held
        cal = head_set.calibration
        target, confidence = cal["target_agreement"], cal["confidence"]
        objective = objective or cal.get("probe_objective", "total")
        rule = choose(
            train, heads, probes, cost, target, confidence, objective, g.by_key, head_stage, min_probe_layer, max_probes
        )
        chosen = rule["probe_layers"]
        cols = probe_columns(heads, probes, chosen)
        overall, plans = cascade_plans(held, heads, cols, chosen, rule, cost, target, confidence, min_tokens, g.by_key)
        after = one_rule = _rule_cost(held, heads, cols, chosen, plans, overall, cost)
        before = _modelled(held, head_set, heads, probes, cost)
        sides = (
            choose_by_gate(g, target, confidence, objective, head_stage, min_probe_layer, max_probes, min_tokens)
            if by_gate and g.gate is not None
            else None
        )
        if sides is not None:  # a rule per side of the gate, where it models better than one for every prompt
            inside, outside = sides[True], sides[False]
            split_cost = _speedups(*(np.concatenate(x) for x in zip(inside.spent(cost), outside.spent(cost))))
            if better(objective, split_cost, one_rule):
                rule = {"inside": inside.rule, "outside": outside.rule}
                overall = {**outside.overall, "threshold": inside.overall["threshold"]}
                plans, after, chosen = merge_plans(inside, outside), split_cost, outside.rule["probe_layers"]
            else:
                log.info("one rule for both sides of the gate models better (%s vs %s)", one_rule, split_cost)
                sides = None
        record = {
            "data": cal["data"],
            "measured_prompts": g.measured,
            "min_tokens": min_tokens,
            "n_train": len(train),
            "n_holdout": len(held),
            "candidate_probe_layers": probes,
            "objective": objective,
            "head_stage": head_stage,
            "min_probe_layer": min_probe_layer,
            "max_probes": max_probes,
            "formats": ["calibration's own", *formats],
            "by_gate": sides is not None,
            "chosen_on_train": rule,
            "scales": [float(SCALES[0]), float(SCALES[-1]), len(SCALES)],
            "heldout_speedup_model": {"rule_in_force": before, "cascade": after, "one_rule": one_rule},
            "heads_load_ms": cost.heads_load_ms,  # charged once to a one-question process whose heads run
            "screen_ms": g.screened,  # what screening saved a probe that did not exit (median; >= 1 ms: probes screen)
            "measure_seconds": round(g.seconds, 1),  # of this run: prompts cached by an earlier one cost nothing
            "traced_now": g.traced,
        }
        if g.gate is not None:
            record["domain"] = domain_gates.entry(f"domain-{head_set.kind}.npz", heads, domain_quantile, g.admitted)
        log.info("cascade: %s", json.dumps(record))
        head_set.cascade = cascade_rule(heads, overall, chosen, sides)
        if sides is not None:
            record["gate_sides"] = {
                side: {"n_train": len(x.train), "n_holdout": len(x.held)}
                for side, x in (("inside", sides[True]), ("outside", sides[False]))
            }
        head_set.calibration["cascade"] = record
        head_set.screen_probes = cost.screen_ms > 0
        _set_domain(heads_dir, rt.manifest, head_set, g.gate, record.get("domain"))
        replaces_heads = not head_stage and head_set.runs_heads
        # the rule in force (calibrate's) is certified on the calibration's own format alone: where the
        # cascade is certified on more formats, it replaces that rule whatever their modelled speeds
        if (better(objective, after, before) or replaces_heads or formats) and any(p["check"] for p in plans):
            head_set.signal, head_set.plans = "cascade", plans
        else:
            log.warning(
                "the cascade models no faster than the rule in force (%s vs %s): kept as an option", after, before
            )
        rewrite_manifest(heads_dir, report_dir, rt.manifest)
        return record
    finally:
        rt.close()


@dataclass
class Gathered:
    """What a cascade is chosen from: the measured prompts of a free-answer head set's calibration
    facts, split as the calibration split them, and what checks and tails cost."""

    train: list[Signals]  # over `min_tokens`: shorter prompts are not measured
    held: list[Signals]
    heads: list[int]
    probes: list[int]  # candidate probe layers
    cost: CostModel
    by_key: bool  # held out by fact
    measured: int
    traced: int  # measured now (the rest came from the cache)
    seconds: float
    screened: float  # what screening saved a probe that did not exit, in ms (CostModel.screen_ms: 0 under 1 ms)
    gate: bytes | None  # the heads' domain gate, refitted on the training prompts of the heads' own format
    admitted: dict[str, float] | None


def gather(
    rt: Runtime,
    heads_dir: Path,
    data: str | None = None,
    holdout: float = 0.5,
    variants: int = 1,
    probe_layers: Sequence[int] | None = None,
    min_tokens: int = 32,
    progress: Callable | None = None,
    items: Sequence[Item] | None = None,
    head_stage: bool = True,
    domain_quantile: float | None = domain_gates.QUANTILE,
    formats: Sequence[str] = (),
) -> Gathered:
    """Measure (or read from the cache) the signals of the calibration's prompts over `min_tokens`,
    in its format and in `formats`, gate the heads, and measure the costs (see add_cascade)."""
    from .cloze import broad
    from .datasets import load_items

    if "free" not in rt.manifest.sets:
        raise NoCascadeError(f"the heads in {heads_dir} have no free-answer set: a cascade is for free answers")
    head_set = rt.manifest.sets["free"]
    cal = head_set.calibration
    L = rt.n_layers
    heads = list(head_set.eval_layers)
    probes = sorted({*(probe_layers or range(max(heads) + 1, 2 * L // 3 + 1, 2)), *head_set.probe_layers})
    if formats and items is not None:
        raise ValueError("other prompt formats are built from the calibration's data: give `data`, not `items`")
    if items is None:
        items = _calibration_items(cal, data, variants, broad, load_items)
    measured: list[tuple[Signals, list[int]]] = []

    def signals(items: Sequence[Item]) -> list[Signals]:
        out = []
        for item in items:
            if item.choices:  # the free set's prompts, as calibrate splits them
                continue
            try:
                prompt = rt.prompt(item.question, item.choices)
            except EdgeSpadeError:  # skipped by calibration too (trace.collect)
                continue
            out.append(Signals(item.key or item.id, len(prompt.tokens), shots=item.shots, form=item.form))
            if out[-1].n_tokens > min_tokens:
                measured.append((out[-1], prompt.tokens))
        return out

    every = signals(items)
    by_key = cal.get("holdout_by", "fact") == "fact"
    own_train, held = split(every, holdout, 0, by_key)
    if len(held) != cal["n_holdout"]:
        raise ValueError(
            f"the split holds out {len(held)} prompts, the calibration {cal['n_holdout']}: other data or --holdout?"
        )
    held_keys = {s.key for s in held}
    for form in formats:
        other = signals(_calibration_items(cal, data, variants, broad, load_items, form))
        held += [s for s in other if s.key in held_keys]
        own_train += [s for s in other if s.key not in held_keys]
    own = {id(s) for s in every}
    train = [s for s in own_train if s.n_tokens > min_tokens]
    held = [s for s in held if s.n_tokens > min_tokens]
    if not train or not held:
        raise NoCascadeError(
            f"no prompt over {min_tokens} tokens on both sides of the split ({len(train)} training, {len(held)} "
            "held out): shorter prompts do not check, so there is nothing to calibrate a cascade on"
        )
    t0 = time.perf_counter()
    traced = measure(rt, measured, heads, probes, progress)
    gate, admitted = None, None
    if head_stage and domain_quantile is not None:
        states = domain_states(rt, measured, heads)  # train holds the prompts over min_tokens only
        gate_train = [s for s in train if id(s) in own]  # the heads' own format
        gate, admitted = gate_heads(gate_train, [s for s, _ in measured], states, heads, domain_quantile, every)
    seconds = time.perf_counter() - t0
    screened = measure_screen_ms(rt, measured, probes[len(probes) // 2], head_set.tail, head_set.candidates or [])
    screen_ms = screened if screened >= SCREEN_MIN_MS else 0.0
    cost = CostModel.of(head_set.costs, probes, L, measure_heads_load_ms(heads_dir / head_set.file), screen_ms)
    return Gathered(train, held, heads, probes, cost, by_key, len(measured), traced, seconds, screened, gate, admitted)


def _set_domain(heads_dir: Path, manifest, head_set, gate: bytes | None, entry: dict | None) -> None:
    """Write the set's domain file beside its heads (hashed in the manifest), or drop an old one."""
    old = head_set.domain.get("file")
    if old:
        manifest.hashes.pop(old, None)
        (heads_dir / old).unlink(missing_ok=True)
    head_set.domain = {}
    if gate is not None and entry is not None:
        (heads_dir / entry["file"]).write_bytes(gate)
        manifest.hashes[entry["file"]] = hashlib.sha256(gate).hexdigest()
        head_set.domain = entry


def _calibration_items(
    cal: dict, data: str | None, variants: int, broad, load_items, form: str = "cloze"
) -> list[Item]:
    """The calibration's prompts: `data`, or the broad corpus capped as its record says, in `form`."""
    import tempfile

    if data is not None:
        return load_items(data, variants=variants, few_shot=cal.get("few_shot") or (3,), form=form)
    if cal["data"] != ["broad-capped.jsonl"]:
        raise ValueError(f"these heads were calibrated on {cal['data']}: give that file as --data")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "broad-capped.jsonl"
        path.write_text(broad.per_category(120))
        return load_items(path, variants=1, few_shot=cal["few_shot"], form=form)


def _modelled(
    held: list[Signals], head_set, heads: Sequence[int], probes: Sequence[int], cost: CostModel
) -> dict[str, float]:
    """The rule in force on the measured held-out prompts, as modelled: its L-SPADE checks, or its
    probe (a cascade without heads, the plans' own thresholds being the probe's)."""
    if head_set.signal == "lspade":
        rule = {"threshold": head_set.threshold, "probe_threshold": -1.0}
        return _rule_cost(held, heads, [], (), head_set.plans, rule, cost)
    own = list(head_set.probe_layers)
    rule = {"threshold": -1.0, "probe_threshold": head_set.thresholds["spade"]}
    plans = [
        {**p, "threshold": -1.0, "probe_threshold": p["threshold"]} if "threshold" in p else p for p in head_set.plans
    ]
    return _rule_cost(held, heads, probe_columns(heads, probes, own), own, plans, rule, cost)


def _rule_cost(held, heads, cols, chosen, plans, overall, cost: CostModel) -> dict[str, float]:
    """Modelled speedups on `held` when each prompt follows its range's plan (_speedups)."""
    return _speedups(*_rule_spent(held, heads, cols, chosen, plans, overall, cost))


def _speedups(full: np.ndarray, spent: np.ndarray) -> dict[str, float]:
    """Total, median and robust (ROBUST_QUANTILE) speedups of prompts costing `spent` against `full`."""
    speedup = full / spent
    return {
        "total": round(float(full.sum() / spent.sum()), 4),
        "median": round(float(np.median(speedup)), 4),
        "robust": round(float(np.quantile(speedup, ROBUST_QUANTILE)), 4),
    }


def better(objective: str, after: dict[str, float], before: dict[str, float]) -> bool:
    """Whether modelled speedups `after` beat `before`: by the total (the speed a rule must not lose),
    or for the robust objective as `choose` ranks its rules, the 40th percentile over 1x first."""
    if objective != "robust":
        return after["total"] > before["total"]
    return (max(after["robust"], 1.0), after["total"]) > (max(before["robust"], 1.0), before["total"])


def _rule_spent(held, heads, cols, chosen, plans, overall, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """(full-depth cost, modelled cost) per prompt of `held` when each follows its range's plan."""
    if not held:
        return np.zeros(0), np.zeros(0)
    n = np.array([x.n_tokens for x in held])
    full = cost.full(n)
    spent = full.copy()  # as is for the prompts whose plan does not check
    table = Table.of(held)
    in_plan = [_plan_of(plans, int(k)) for k in n]
    for plan in [None, *plans]:
        mask = np.array([p is plan for p in in_plan])
        if not mask.any() or (plan is not None and not plan["check"]):
            continue
        tau_head = (plan or {}).get("threshold", overall["threshold"])
        tau_probe = (plan or {}).get("probe_threshold", overall.get("probe_threshold", -1.0))
        stage, _ = outcome(table.rows(mask), len(heads), cols, tau_head, tau_probe)
        probes = chosen if tau_probe >= 0 else ()
        spent[mask] = cost.cost(stage, n[mask], heads, probes, checked=tau_head >= 0)
    return full, spent


def _plan_of(plans: list[dict], n_tokens: int) -> dict | None:
    for plan in plans:
        if plan["max_tokens"] is None or n_tokens <= plan["max_tokens"]:
            return plan
    return None


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", required=True, type=Path)
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--data", help="the file the free heads were calibrated on (default: from their record)")
    parser.add_argument("--holdout", type=float, default=0.5, help="as given to `edge-spade calibrate`")
    parser.add_argument("--variants", type=int, default=1, help="as given to `edge-spade calibrate` (with --data)")
    parser.add_argument(
        "--probe-layers",
        type=int,
        nargs="+",
        help="candidates (default: every other layer after the heads' up to 2/3 of the depth)",
    )
    parser.add_argument("--min-tokens", type=int, default=32)
    parser.add_argument("--objective", choices=("total", "median", "robust"))
    parser.add_argument(
        "--no-heads", action="store_true", help="a probe alone: the heads never exit (see benchmarks/formats.py)"
    )
    parser.add_argument("--min-probe-layer", type=int, default=0, help="the earliest probe layer to choose")
    parser.add_argument(
        "--domain-quantile",
        type=float,
        default=domain_gates.QUANTILE,
        help="the heads' domain gate admits this share of the training prompts (edge_spade/domain.py)",
    )
    parser.add_argument("--no-domain-gate", action="store_true", help="the heads decide on every prompt")
    parser.add_argument("--max-probes", type=int, default=2, help="probes after the heads (one shared threshold)")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=[],
        choices=[f for f in CLOZE_FORMATS if f != "cloze"],
        help="prompt formats of the same facts that join the choice and the certificate (cloze data)",
    )
    parser.add_argument(
        "--by-gate",
        action="store_true",
        help="also try a probe rule per side of the heads' domain gate, kept where it models faster (choose_by_gate)",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    def show(items):
        items = list(items)
        for i, item in enumerate(items):
            if i % 100 == 0:
                log.info("measured %d / %d prompts", i, len(items))
            yield item

    print(
        json.dumps(
            add_cascade(
                args.model,
                args.heads,
                args.report,
                data=args.data,
                holdout=args.holdout,
                variants=args.variants,
                probe_layers=args.probe_layers,
                min_tokens=args.min_tokens,
                objective=args.objective,
                threads=args.threads,
                progress=show,
                head_stage=not args.no_heads,
                min_probe_layer=args.min_probe_layer,
                domain_quantile=None if args.no_domain_gate else args.domain_quantile,
                max_probes=args.max_probes,
                formats=args.formats,
                by_gate=args.by_gate,
            ),
            indent=1,
        )
    )
