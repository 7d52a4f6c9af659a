"""The SPADE-EXIT rule: at evaluation layers, stop when the L-SPADE head is confident enough.

At each evaluation layer the head maps the answer position's hidden state to a normed vector,
the decision-set rows of the output matrix turn it into logits, and the entropy (nats) of the
choice distribution is compared with the threshold. A negative threshold never exits; an
infinite one exits at the first evaluation layer. The answer after an exit comes from SPADE
at that layer (Engine.early_exit), never from the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine, Readout
from .heads import OnnxHeads, entropy, topk_entropy
from .prompts import Prompt


@dataclass(frozen=True)
class ExitPolicy:
    threshold: float  # nats; exit when the head's entropy is at or below it
    eval_layers: tuple[int, ...]  # layers checked, in order
    head_index: dict[int, int]  # layer -> index of its head in the ONNX file
    top_k: int | None = None  # free answers: entropy over the head's top-k tokens...
    candidates: tuple[int, ...] | None = None  # ...among these ids (None: the whole vocabulary)

    @classmethod
    def from_head_set(cls, head_set, threshold: float | None = None) -> ExitPolicy:
        tau = head_set.threshold if threshold is None else threshold
        candidates = tuple(head_set.candidates) if head_set.candidates else None
        return cls(tau, tuple(head_set.eval_layers), head_set.head_index(), head_set.top_k, candidates)

    def __post_init__(self) -> None:
        missing = [layer for layer in self.eval_layers if layer not in self.head_index]
        if missing:
            raise ValueError(f"no head for evaluation layer(s) {missing}")


@dataclass
class ExitTrace:
    """What the controller saw: entropy per evaluated layer and the time spent judging."""

    entropies: dict[int, float] = field(default_factory=dict)
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # the head's decision logits per layer
    check_ms: float = 0.0


def exit_checks(engine: Engine, heads: OnnxHeads, policy: ExitPolicy, prompt: Prompt,
                seen: ExitTrace) -> dict[int, Callable[[np.ndarray], bool]]:
    """Per evaluation layer, the callback-side test: head -> decision logits -> entropy <= threshold."""
    # Free answers: a full-vocabulary head costs ~10 ms per layer for Gemma (262,144 x 640), so the
    # entropy is taken over the calibration's candidate tokens; the answer still comes from SPADE.
    if prompt.ids is not None:
        rows = engine.head.rows(prompt.ids)
    elif policy.candidates is not None:
        rows = engine.head.rows(np.array(policy.candidates))
    else:
        rows = None

    def check_at(layer: int) -> Callable[[np.ndarray], bool]:
        index = policy.head_index[layer]

        def check(states: np.ndarray) -> bool:
            t0 = time.perf_counter()
            normed = heads.normed(states[-1], index)
            logits = engine.head.logits(normed, None) if rows is None else rows @ normed
            if prompt.ids is None:
                h = topk_entropy(logits, policy.top_k or logits.shape[0])
            else:
                h = entropy(prompt.choice_logits(logits))
            seen.entropies[layer] = h
            seen.logits[layer] = logits
            seen.check_ms += (time.perf_counter() - t0) * 1000.0
            return h <= policy.threshold

        return check

    return {layer: check_at(layer) for layer in policy.eval_layers}


def spade_exit(engine: Engine, heads: OnnxHeads, policy: ExitPolicy, prompt: Prompt,
               tail: int = 1, answer_from: str = "spade") -> tuple[Readout, ExitTrace]:
    """Answer `prompt` with SPADE-EXIT: one prompt pass, stopped at the first confident layer.

    `answer_from="head"` answers an exit with the head's own logits instead of SPADE's (the
    tuned-lens and logit-lens baselines).
    """
    seen = ExitTrace()
    if policy.threshold < 0 or math.isnan(policy.threshold):
        checks = {}  # never exits: no hooks at all, the plain full-depth pass
    else:
        checks = exit_checks(engine, heads, policy, prompt, seen)
    readout = engine.early_exit(prompt.tokens, prompt.ids, checks, tail=tail, then_spade=answer_from == "spade")
    if readout.logits.size == 0:  # a lens baseline's own answer
        readout.logits = seen.logits[readout.layer]
        if prompt.ids is None and policy.candidates is not None:  # candidate logits -> vocabulary-sized
            full = np.full(engine.n_vocab, -np.inf, np.float32)
            full[list(policy.candidates)] = readout.logits
            readout.logits = full
    return readout, seen
