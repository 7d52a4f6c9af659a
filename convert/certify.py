"""The certificate: thresholds whose agreement with the full model is bounded from below on
held-out data (one-sided Clopper-Pearson), counted over facts rather than prompts, and the
train / held-out split that keeps the facts apart.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .trace import Sample


@functools.lru_cache(maxsize=65536)  # a cascade's choice asks the same few counts thousands of times
def clopper_pearson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on a binomial proportion (exact, by bisection)."""
    if n == 0 or successes == 0:
        return 0.0
    alpha = 1.0 - confidence
    if successes == n:
        return alpha ** (1.0 / n)
    k = np.arange(successes, n + 1)
    log_choose = math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])

    def upper_tail(p: float) -> float:  # P(X >= successes | n, p)
        logs = log_choose + k * math.log(p) + (n - k) * math.log1p(-p)
        top = logs.max()
        return float(math.exp(top) * np.exp(logs - top).sum())

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


def exit_curve(
    full: np.ndarray,
    answers: np.ndarray,
    entropies: np.ndarray,
    layers: list[int],
    n_layers: int,
    confidence: float,
    keys: Sequence[str] | None = None,
) -> list[CurvePoint]:
    """Agreement with the full answer and mean exit layer at every useful threshold.

    full: (N,) full answers; answers: (N, len(layers)) the answer given on exiting at each layer.
    keys: the fact each prompt asks about. The lower bound then counts facts, not prompts: the
    few-shot variants of one fact fail together, so treating them as independent draws would
    overstate the evidence. A fact counts as agreeing only when all its prompts agree, which
    bounds the chance that a prompt about a new fact disagrees (it is at most the chance that
    some prompt of that fact does). With one prompt per key this is the per-prompt bound.
    """
    facts = fact_index(keys)
    decides = np.isfinite(entropies)  # infinite: outside the head's domain gate, which never exits there
    candidates = np.unique(np.concatenate([[0.0], entropies[decides]]))
    if len(candidates) > 300:
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, 300)))
    curve = []
    for tau in [*candidates, math.inf]:
        exits = (entropies <= tau) & decides
        first = np.where(exits.any(axis=1), exits.argmax(axis=1), -1)
        idx = np.maximum(first, 0)
        answer = np.where(first >= 0, answers[np.arange(len(full)), idx], full)
        layer = np.where(first >= 0, np.array(layers)[idx], n_layers - 1)
        ok = answer == full
        curve.append(
            CurvePoint(
                float(tau),
                float(ok.mean()),
                agreement_bound(ok, facts, confidence),
                float(layer.mean()),
                float((first >= 0).mean()),
            )
        )
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
