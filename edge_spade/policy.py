"""The SPADE-EXIT rule: at evaluation layers, stop when a confidence signal is low enough.

Three signals, one rule (entropy in nats <= threshold):
- "lspade" (the paper's): an L-SPADE head maps the answer position's hidden state to a normed
  vector, the decision-set rows of the output matrix turn it into logits. Cheap enough that
  every layer can be checked; the answer after an exit comes from SPADE at that layer.
- "spade" (a SPADE probe): at a few calibrated probe layers, the SPADE tail itself runs on a
  second llama context while the prompt pass waits inside its eval callback; its own entropy
  decides, and on an exit its logits are the answer. A probe costs a tail (the remaining
  layers for K+1 rows, on a tail model holding only them, plus the LM head for free answers),
  so only a few layers are probed.
- "cascade": L-SPADE checks at a few early layers, then SPADE probes at later ones for the
  prompts the heads did not let exit. A head is cheap but its entropy lets few prompts exit; a
  probe sees more but costs a tail, so it runs only where the heads left a prompt undecided. The
  two thresholds are certified together (convert/cascade.py). A cascade may also pick its probes by
  the heads' domain gate, whose verdict is known at the head layers, before any probe: prompts like
  the heads' calibration prompts ("inside") run their own probes and threshold, the other prompt
  formats the shared ones; each side's thresholds are certified on its own held-out prompts.
A negative threshold never exits; an infinite one exits at the first evaluation layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .answer import SIGNALS  # the CLI's --signal and heads.json's "signal" use the same words
from .engine import Engine, Readout, tail_positions
from .heads import FREE_TOP_K, OnnxHeads, entropy, topk_entropy
from .manifest import HeadsMismatchError
from .prompts import Prompt


@dataclass(frozen=True)
class ExitPolicy:
    threshold: float  # nats; exit when the head's entropy is at or below it
    eval_layers: tuple[int, ...]  # layers checked, in order
    head_index: dict[int, int]  # layer -> index of its head in the ONNX file
    top_k: int | None = None  # free answers: entropy over the top-k tokens...
    candidates: tuple[int, ...] | None = None  # ...among these ids (None: the whole vocabulary)
    signal: str = "lspade"  # "lspade": an L-SPADE head's entropy; "spade": the SPADE tail's own (a probe)
    probe_layers: tuple[int, ...] = ()  # "cascade": probes after the head checks at `eval_layers`...
    probe_threshold: float = -1.0  # ...exiting at or below this SPADE entropy (nats)
    screen_probes: bool = False  # free answers: probes screen with the candidates' logits first (probe_checks)
    # "cascade" by the gate's verdict: prompts the domain gate admits at every head layer probe here instead,
    # at or under `inside_probe_threshold`; None: every prompt runs `probe_layers`
    inside_probe_layers: tuple[int, ...] | None = None
    inside_probe_threshold: float = -1.0

    @classmethod
    def from_head_set(cls, head_set, threshold: float | None = None, signal: str | None = None) -> ExitPolicy:
        """The head set's default exit (its `signal`), or the one named: "lspade" or "spade" (probe)."""
        signal = signal or head_set.signal
        candidates = tuple(head_set.candidates) if head_set.candidates else None
        if signal == "spade":
            if not head_set.probe_layers:
                raise HeadsMismatchError(
                    f"the {head_set.kind} heads have no SPADE probe layers (calibration found "
                    "none that keep the target agreement); use --signal lspade"
                )
            tau = head_set.thresholds.get("spade", -1.0) if threshold is None else threshold
            return cls(
                tau,
                tuple(head_set.probe_layers),
                {},
                head_set.top_k or FREE_TOP_K,
                candidates,
                "spade",
                screen_probes=head_set.screen_probes,
            )
        if signal == "cascade":
            rule = head_set.cascade
            if not rule:
                raise HeadsMismatchError(
                    f"the {head_set.kind} heads have no cascade (calibrate one with convert/cascade.py); "
                    "use --signal lspade or spade"
                )
            inside = rule.get("inside")
            return cls(
                rule["threshold"] if threshold is None else threshold,
                tuple(rule["head_layers"]),
                head_set.head_index(),
                head_set.top_k or FREE_TOP_K,
                candidates,
                "cascade",
                tuple(rule["probe_layers"]),
                rule["probe_threshold"],
                head_set.screen_probes,
                tuple(inside["probe_layers"]) if inside is not None else None,
                inside["probe_threshold"] if inside is not None else -1.0,
            )
        tau = head_set.threshold if threshold is None else threshold
        return cls(tau, tuple(head_set.eval_layers), head_set.head_index(), head_set.top_k, candidates)

    @property
    def exits(self) -> bool:
        """Whether this rule can exit at all (one that cannot runs no checks: the plain pass)."""
        usable = [self.threshold]
        if self.signal == "cascade":
            usable += [self.probe_threshold, self.inside_probe_threshold]
        return any(tau >= 0 for tau in usable)

    @property
    def by_gate(self) -> bool:
        """Whether the probes depend on the domain gate's verdict at the head layers."""
        return self.signal == "cascade" and self.inside_probe_layers is not None

    def probes_for(self, inside: bool) -> tuple[tuple[int, ...], float]:
        """(probe layers, threshold) a cascade runs for a prompt on that side of the gate."""
        if self.by_gate and inside:
            return self.inside_probe_layers or (), self.inside_probe_threshold
        return self.probe_layers, self.probe_threshold

    def never(self) -> ExitPolicy:
        """This rule switched off: no checks, the plain full-depth pass."""
        return replace(self, threshold=-1.0, probe_threshold=-1.0, inside_probe_threshold=-1.0)

    def heads_only(self) -> ExitPolicy:
        """A cascade without its probes: what a one-question process runs, where a probe's context and
        whole-model tail cost more than its exits save (a rule of heads or of probes is unchanged)."""
        if self.signal != "cascade":
            return self
        return replace(self, probe_threshold=-1.0, inside_probe_threshold=-1.0)

    def with_own(self, own: dict[str, float]) -> ExitPolicy:
        """With a plan's own thresholds (certified on its prompt-length range), where it has them."""
        return replace(
            self,
            threshold=own.get("threshold", self.threshold),
            probe_threshold=own.get("probe_threshold", self.probe_threshold),
            inside_probe_threshold=own.get("inside_probe_threshold", self.inside_probe_threshold),
        )

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.signal == "spade":
            if not self.eval_layers and self.threshold >= 0:
                raise ValueError("a SPADE-probe exit needs probe layers")
            return
        missing = [layer for layer in self.eval_layers if layer not in self.head_index]
        if missing:
            raise ValueError(f"no head for evaluation layer(s) {missing}")
        probes = (*self.probe_layers, *(self.inside_probe_layers or ()))
        if self.signal == "cascade" and probes and min(probes) <= max(self.eval_layers, default=-1):
            raise ValueError(
                f"a cascade probes after its heads: probe layers {probes} must come after {self.eval_layers}"
            )
        if self.by_gate and not self.eval_layers:
            raise ValueError("a cascade that probes by the domain gate's verdict needs head layers to take it at")


@dataclass
class ExitTrace:
    """What the controller saw: entropy per evaluated layer and the time spent judging."""

    entropies: dict[int, float] = field(default_factory=dict)
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # the head's decision logits per layer
    check_ms: float = 0.0
    outside: list[int] = field(default_factory=list)  # head layers whose domain gate kept the head from deciding


def judge_logits(prompt: Prompt, logits: np.ndarray, top_k: int | None) -> float:
    """Entropy (nats) of decision logits: over the choices, or the top-k tokens of a free answer."""
    if prompt.ids is None:
        return topk_entropy(logits, top_k or logits.shape[0])
    return entropy(prompt.choice_logits(logits))


def probe_checks(
    engine: Engine,
    layers: Sequence[int],
    threshold: float,
    top_k: int | None,
    prompt: Prompt,
    seen: ExitTrace,
    tail: int,
    candidates: Sequence[int] | None = None,
) -> dict[int, Callable[[np.ndarray], bool]]:
    """Per probe layer: run the SPADE tail on the side context, exit if its own entropy is low.

    A free answer with `candidates` (and a tail model for the layer) is screened first: the top-k
    entropy over the candidates' logits, from the tail's normed row in numpy, instead of the whole
    vocabulary's LM head. Over the threshold, the probe does not exit; at or under it, the
    vocabulary's logits decide as always (and answer). Where the vocabulary's top k are all
    candidates, as calibration chose them to be, both entropies are the same; elsewhere the screen
    can only keep a prompt from exiting, never change an answer. Most probes do not exit: they
    skip the LM head."""
    tokens = [prompt.tokens[r] for r in tail_positions(len(prompt.tokens), tail)]
    screen = np.asarray(candidates) if prompt.ids is None and candidates is not None else None

    def check_at(layer: int) -> Callable[[np.ndarray], bool]:
        def check(states: np.ndarray) -> bool:
            t0 = time.perf_counter()
            try:
                rows = engine.spade_tail_normed(states, layer) if screen is not None else None
                if rows is not None:
                    h = judge_logits(prompt, engine.head.logits(rows[1], screen), top_k)
                    if h > threshold:  # not the vocabulary's entropy: it is recorded only when computed
                        return False
                    logits = engine.head_logits(rows[0])
                else:
                    logits = engine.spade_tail(states, layer, prompt.ids, tokens, side=True)
                h = judge_logits(prompt, logits, top_k)
                seen.entropies[layer], seen.logits[layer] = h, logits
                return h <= threshold
            finally:
                seen.check_ms += (time.perf_counter() - t0) * 1000.0

        return check

    return {layer: check_at(layer) for layer in layers}


def exit_checks(
    engine: Engine, heads: OnnxHeads, policy: ExitPolicy, prompt: Prompt, seen: ExitTrace
) -> dict[int, Callable[[np.ndarray], bool]]:
    """Per evaluation layer, the callback-side test: head -> decision logits -> entropy <= threshold.
    Where the heads carry a domain gate (edge_spade/domain.py), a state outside it does not exit there.
    A head under a negative threshold only takes the gate's verdict (a cascade probing by it)."""
    # Free answers: a full-vocabulary head is a whole LM head per layer (Gemma: 262,144 x 640), so the
    # entropy is taken over the calibration's candidate tokens; the answer still comes from SPADE.
    if prompt.ids is not None:
        rows = engine.head.rows(prompt.ids)
    elif policy.candidates is not None:
        rows = engine.head.rows(np.array(policy.candidates))
    else:
        rows = None

    def check_at(layer: int) -> Callable[[np.ndarray], bool]:
        index, gate = policy.head_index[layer], heads.domain.get(layer)

        def check(states: np.ndarray) -> bool:
            t0 = time.perf_counter()
            try:
                if gate is not None and not gate.admits(states[-1]):  # not a state the head was certified on
                    seen.outside.append(layer)
                    return False
                if policy.threshold < 0:
                    return False
                normed = heads.normed(states[-1], index)
                logits = engine.head.logits(normed, None) if rows is None else rows @ normed
                h = judge_logits(prompt, logits, policy.top_k)
                seen.entropies[layer] = h
                seen.logits[layer] = logits
                return h <= policy.threshold
            finally:
                seen.check_ms += (time.perf_counter() - t0) * 1000.0

        return check

    return {layer: check_at(layer) for layer in policy.eval_layers}


def _side_check(
    layer: int, by_side: dict[bool, dict[int, Callable[[np.ndarray], bool]]], seen: ExitTrace
) -> Callable[[np.ndarray], bool]:
    """The probe at `layer` for the prompt's side of the domain gate, taken at the head layers (all
    before any probe): inside where none found the state outside. None at this layer: no exit."""

    def check(states: np.ndarray) -> bool:
        own = by_side.get(not seen.outside, {}).get(layer)
        return own(states) if own is not None else False

    return check


def spade_exit(
    engine: Engine, heads: OnnxHeads, policy: ExitPolicy, prompt: Prompt, tail: int = 1, answer_from: str = "spade"
) -> tuple[Readout, ExitTrace]:
    """Answer `prompt` with SPADE-EXIT: one prompt pass, stopped at the first confident layer.

    `answer_from="head"` answers an exit with the head's own logits instead of SPADE's (the
    tuned-lens and logit-lens baselines). A probe policy already holds SPADE's logits.
    """
    seen = ExitTrace()
    probe = policy.signal == "spade"
    # NaN: never. A cascade probing by the gate's verdict takes it at the head layers in any case.
    head_checks = not probe and (policy.threshold >= 0 or (policy.by_gate and policy.exits))
    if probe:
        sides = {True: (policy.eval_layers, policy.threshold)}
    elif policy.signal == "cascade":  # by the gate's verdict: a rule per side; else one for every prompt
        sides = {inside: policy.probes_for(inside) for inside in ((False, True) if policy.by_gate else (True,))}
    else:
        sides = {}
    sides = {inside: rule for inside, rule in sides.items() if rule[0] and rule[1] >= 0}
    probes = sorted({layer for layers, _ in sides.values() for layer in layers})
    checks: dict[int, Callable[[np.ndarray], bool]] = {}  # none: no hooks at all, the plain full-depth pass
    if head_checks:
        checks.update(exit_checks(engine, heads, policy, prompt, seen))
    if probes:
        if engine.settings.tail_models:
            engine.use_tail_models(probes)  # once per layer: probes then skip the layers below
        screen = policy.candidates if policy.screen_probes else None
        by_side = {
            inside: probe_checks(engine, layers, tau, policy.top_k, prompt, seen, tail, screen)
            for inside, (layers, tau) in sides.items()
        }
        if policy.by_gate:  # the prompt's side is known once the head layers have run, before any probe
            checks.update({layer: _side_check(layer, by_side, seen) for layer in probes})
        else:
            checks.update(by_side[True])
    # After a head's exit SPADE runs from there (unless a lens baseline answers); a probe's tail is the answer.
    then_spade = frozenset(policy.eval_layers) if answer_from == "spade" and not probe else frozenset()
    readout = engine.early_exit(prompt.tokens, prompt.ids, checks, tail=tail, then_spade=then_spade)
    if readout.logits.size == 0:  # a probe's SPADE logits, or a lens baseline's own answer
        readout.logits = seen.logits[readout.layer]
        if (
            readout.layer not in probes and prompt.ids is None and policy.candidates is not None
        ):  # candidates -> vocabulary
            full = np.full(engine.n_vocab, -np.inf, np.float32)
            full[list(policy.candidates)] = readout.logits
            readout.logits = full
    return readout, seen
