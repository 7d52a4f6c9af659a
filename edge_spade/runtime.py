"""The Python API: load a model once, ask it single-token questions.

    rt = load_model()                                  # the default model
    a = rt.ask("Is the sky blue?", ["yes", "no"])      # full depth
    a = rt.ask("The capital of France is", layer=12)   # SPADE at layer 12
    print(a.answer, a.probs, a.timings_ms)

`ask` reads top to bottom: validate and format the question, run one readout, turn the
decision-set logits into an Answer that carries its own measurements.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from .answer import Answer
from .engine import Engine, EngineSettings, Readout
from .errors import LayerError, ModelClosedError, SettingsError
from .guard import GuardDecision, SpeedGuard
from .heads import OnnxHeads
from .manifest import load_heads
from .policy import ExitPolicy, ExitTrace, spade_exit
from .prompts import Prompt, build_prompt
from .registry import resolve_model, shipped_heads

log = logging.getLogger(__name__)

Lens = Literal["spade", "logit"]
# With reuse_prefix, the default rule answers by a plain pass when the prompt repeats at least
# 1/REUSE_OVER_CHECKS of the last one's: on a kept cache that pass runs only the rest, at most about two
# thirds of a full one, and no shipped plan models a checked pass at more than 1.5x (the plans'
# speedup_model); after a pass that stopped early (and so kept nothing) it runs whole and keeps it.
REUSE_OVER_CHECKS = 3
_TOP_BLOCK = 512  # logits per block when cutting a large vocabulary to its top-k contenders


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()


def top_probs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely token ids (ties: the lower id first, as argmax) and their probabilities.

    A large vocabulary is cut to its few contenders first: the k-th largest block maximum is a
    lower bound on the k-th largest logit (k blocks each hold a value at least that large), so
    only the logits at or above it can be among the top k. One log-sum-exp normalises them:
    sorting, or a full partition of a 262,144-token distribution, costs more than the rest of
    the answer around the pass.
    """
    n = logits.shape[0]
    k = min(k, n)
    block = _TOP_BLOCK
    if n >= 4 * k * block:
        n_blocks = n // block
        maxima = logits[: n_blocks * block].reshape(n_blocks, block).max(axis=1)
        bound = np.partition(maxima, -k)[-k]
        top = np.flatnonzero(logits >= bound)
        if top.size > block:  # many ties at the bound (a vocabulary mostly at -inf): partition those
            top = top[np.argpartition(logits[top], -k)[-k:]]
    else:
        top = np.argpartition(logits, -k)[-k:]
    top = top[np.lexsort((top, -logits[top]))][:k]
    m = float(logits[top[0]])
    shifted = np.subtract(logits, m, dtype=np.float32)  # one temporary, exponentiated in place
    log_z = m + np.log(float(np.exp(shifted, out=shifted).sum()))  # pairwise float32 sum: ~1e-8 relative
    return top, np.exp(logits[top].astype(np.float64) - log_z)


class Runtime:
    """A loaded model ready for questions; create once, ask many times, from any thread.

    With calibrated heads for the question's kind (choice or free answer), questions are
    answered by SPADE-EXIT unless a layer or the full model is asked for. The default rule runs
    its checks only where its plan for the prompt's length says they pay, and where the speed
    guard has not seen them lose time on this machine. One llama context answers one question at
    a time: concurrent `ask` calls wait for each other (a lock); for parallel answers, load one
    Runtime per thread.
    """

    def __init__(
        self, engine: Engine, name: str, heads_dir: Path | None = None, guard: SpeedGuard | None = None
    ) -> None:
        self.engine = engine
        self.name = name
        self.heads_dir = heads_dir
        self.manifest = None
        self.heads: dict[str, OnnxHeads] = {}  # answer kind ("choice", "free") -> heads
        self.guard = guard if guard is not None else SpeedGuard()
        self._lock = threading.Lock()
        self._closed = False
        if heads_dir is not None:
            # a process that loads no tail models asks few questions: heads are checked when first run
            self.manifest, self.heads = load_heads(heads_dir, engine, check_now=engine.settings.tail_models)

    @property
    def n_layers(self) -> int:
        return self.engine.n_layers

    def prompt(self, question: str, choices: Sequence[str] | None = None, template: bool | None = None) -> Prompt:
        return build_prompt(self.engine, question, choices, template)

    def ask(
        self,
        question: str,
        choices: Sequence[str] | None = None,
        *,
        layer: int | None = None,
        lens: Lens = "spade",
        tail: int | None = None,
        template: bool | None = None,
        full: bool = False,
        threshold: float | None = None,
        signal: Literal["lspade", "spade", "cascade"] | None = None,
        top_k: int = 5,
    ) -> Answer:
        """Answer by SPADE-EXIT (with heads), at `layer` with SPADE or the logit lens, or at full depth.

        `signal` picks the exit rule (L-SPADE heads at the evaluation layers, or SPADE probes at the
        calibrated probe layers); None: the one calibration chose for this kind of question.
        Plans by prompt length and the speed guard apply to that default rule only: a threshold or
        signal given here is run as asked.
        """
        t0 = time.perf_counter()
        return self.ask_prompt(
            lambda: self.prompt(question, choices, template),
            t0=t0,
            layer=layer,
            lens=lens,
            tail=tail,
            full=full,
            threshold=threshold,
            signal=signal,
            top_k=top_k,
        )

    def ask_prompt(
        self,
        prompt: Prompt | Callable[[], Prompt],
        *,
        t0: float | None = None,
        layer: int | None = None,
        lens: Lens = "spade",
        tail: int | None = None,
        full: bool = False,
        threshold: float | None = None,
        signal: Literal["lspade", "spade", "cascade"] | None = None,
        top_k: int = 5,
    ) -> Answer:
        """`ask` for a prompt already built (the server's chat turns), or a function that builds it
        under the lock; the options are `ask`'s."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise SettingsError(f"top_k must be a positive integer, got {top_k!r}")
        if threshold is not None and (not isinstance(threshold, (int, float)) or math.isnan(threshold)):
            raise SettingsError(f"the threshold must be a number of nats (negative: never exit), got {threshold!r}")
        with self._lock:
            if self._closed:
                raise ModelClosedError(f"{self.name} was closed; load the model again to ask it")
            t0 = time.perf_counter() if t0 is None else t0
            prompt = prompt() if callable(prompt) else prompt
            if self.can_exit(prompt) and layer is None and lens == "spade" and not full:
                return self.ask_exit(prompt, t0, threshold=threshold, tail=tail, top_k=top_k, signal=signal)
            k = 1 if tail is None else tail
            readout, mode = self.readout(prompt, layer=None if full else layer, lens=lens, tail=k)
            return self.answer(prompt, readout, mode, t0, tail=k, top_k=top_k)

    @staticmethod
    def kind(prompt: Prompt) -> str:
        return "free" if prompt.ids is None else "choice"

    def can_exit(self, prompt: Prompt) -> bool:
        return self.kind(prompt) in self.heads

    def ask_exit(
        self,
        prompt: Prompt,
        t0: float,
        *,
        threshold: float | None = None,
        tail: int | None = None,
        top_k: int = 5,
        signal: str | None = None,
    ) -> Answer:
        """SPADE-EXIT: one prompt pass stopped at the first layer whose confidence signal is low enough.

        The default rule (no `threshold`, no `signal`) first asks its plan for this prompt length
        and the speed guard whether checking pays; if not, the answer is the plain full-depth pass.
        """
        kind = self.kind(prompt)
        head_set = self.manifest.sets[kind]
        policy = ExitPolicy.from_head_set(head_set, threshold, signal)
        k = head_set.tail if tail is None else tail
        plan, decision = None, None
        if threshold is None and signal is None and policy.exits:  # a rule that never exits runs no checks
            plan, planned, own = head_set.plan_for(len(prompt.tokens), self.engine.settings.tail_models)
            if REUSE_OVER_CHECKS * self.engine.repeats(prompt.tokens) >= len(prompt.tokens):
                decision = GuardDecision(False, "prefix")  # a plain pass: it reuses the kept prefix, or keeps it
            else:
                decision = self.guard.decide(plan) if planned else GuardDecision(False, "plan")
            if not decision.check:
                policy = policy.never()  # no hooks at all: the plain full-depth pass
            else:
                policy = policy.with_own(own)  # certified on this length range's held-out prompts
                if not self.engine.settings.tail_models:  # one question: its plans model the heads alone
                    policy = policy.heads_only()
        readout, seen = spade_exit(self.engine, self.heads[kind], policy, prompt, tail=k)
        answer = self.answer(prompt, readout, "spade-exit", t0, tail=k, top_k=top_k)
        exited = readout.layer < self.engine.n_layers - 1
        answer.exit_layer = readout.layer if exited else None
        answer.entropy = {layer: round(h, 5) for layer, h in seen.entropies.items()}
        probes, probe_tau = policy.probes_for(not seen.outside)
        at_probe = policy.signal == "cascade" and answer.exit_layer in probes
        answer.threshold = probe_tau if at_probe else policy.threshold  # the one that decided
        answer.outside_domain = seen.outside or None
        answer.timings_ms["heads"] = round(seen.check_ms, 3)
        if decision is not None:
            answer.plan, answer.guard = plan, decision.reason
            self._record(plan, decision, prompt, readout, seen, exited)
        return answer

    def _record(
        self, plan: str, decision: GuardDecision, prompt: Prompt, readout: Readout, seen: ExitTrace, exited: bool
    ) -> None:
        """Tell the guard what this answer's passes cost: a full-depth pass, or checks that exited or not."""
        n = len(prompt.tokens)
        if not decision.check:
            if decision.reason not in ("plan", "prefix"):  # a reused prefix's pass is no full pass's cost
                self.guard.record_full(plan, n, readout.prefill_ms)
            return
        self.guard.record_checked(
            plan,
            n,
            readout.prefill_ms + readout.tail_ms,
            seen.check_ms,
            exited,
            prefix_ms=readout.prefill_ms - seen.check_ms,
            fraction=(readout.layer + 1) / self.engine.n_layers,
        )

    def readout(self, prompt: Prompt, *, layer: int | None, lens: Lens = "spade", tail: int = 1) -> tuple[Readout, str]:
        if layer is None:
            if lens != "spade":
                raise LayerError("the logit lens needs a layer (--layer)")
            return self.engine.full(prompt.tokens, prompt.ids), "full"
        if lens == "logit":
            return self.engine.logit_lens(prompt.tokens, layer, prompt.ids), "logit-lens"
        if lens != "spade":
            raise LayerError(f"unknown lens {lens!r}; use 'spade' or 'logit'")
        return self.engine.spade(prompt.tokens, layer, prompt.ids, tail=tail), "spade"

    def answer(
        self, prompt: Prompt, readout: Readout, mode: str, t0: float, *, tail: int = 1, top_k: int = 5
    ) -> Answer:
        """Turn decision-set logits into an Answer."""
        if prompt.kind == "free":
            top, p_top = top_probs(readout.logits, top_k)
            token = int(top[0])
            probs: dict[str, float] = {}
            for i, p_i in zip(top, p_top):
                probs.setdefault(self.engine.token_text(int(i)), float(p_i))
            text, index, label = self.engine.token_text(token), None, None
        else:
            p = softmax(prompt.choice_logits(readout.logits))
            index = int(np.argmax(p))
            group = list(prompt.groups[index])
            token = int(prompt.ids[group[int(np.argmax(readout.logits[group]))]])
            probs = {c: float(x) for c, x in zip(prompt.choices, p)}
            text, label = prompt.choices[index], prompt.labels[index]
        total = (time.perf_counter() - t0) * 1000.0
        timings = {"total": round(total, 3), "prefill": round(readout.prefill_ms, 3), "tail": round(readout.tail_ms, 3)}
        return Answer(
            text,
            index,
            label,
            probs,
            mode,
            readout.layer,
            self.engine.n_layers,
            len(prompt.tokens),
            timings,
            self.name,
            token,
            tail if mode in ("spade", "spade-exit") else 1,
            reused_tokens=readout.reused,
        )

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the model and its contexts; later questions raise ModelClosedError."""
        with self._lock:
            self._closed = True
            self.engine.close()


def load_model(
    model: str | Path | None = None,
    *,
    threads: int | None = None,
    gpu_layers: int = 0,
    n_ctx: int = 2048,
    kv_type: Literal["f16", "f32"] = "f16",
    heads: str | Path | None | Literal[False] = None,
    tail_models: bool = True,
    speed_guard: bool = True,
    allow_unverified: bool = False,
    share_with: Runtime | None = None,
    reuse_prefix: bool = False,
) -> Runtime:
    """A registry name, a bundle folder or a GGUF path (None: the default model), loaded and ready.

    `heads`: a folder made by `edge-spade calibrate`; None uses the bundle's heads or those
    shipped for a registry model (if any); False loads none (full depth and fixed-layer modes only).
    `tail_models=False`: SPADE probes run their tails on the whole model (same answers), which
    saves loading a tail model and the head model (see tailmodel) where few questions are asked;
    L-SPADE heads (and onnxruntime) are then also loaded only when a question first runs one.
    `speed_guard=False`: the default rule checks wherever its plans say, whatever it has cost so
    far (reproducible benchmarks); see guard.SpeedGuard. `allow_unverified`: use a downloaded
    file whose sha256 cannot be checked (none pinned, the hub unreachable) instead of refusing it.
    `share_with`: a loaded Runtime of the same model whose weights this one uses too (its own
    context and guard: one more answer at a time, for little more memory). `reuse_prefix`: keep the
    cache of each completed pass and run only what the next prompt adds to the prefix it shares, as
    llama-cpp-python's completions do (questions behind one fixed few-shot prefix, a chat's system
    prompt); the default rule then answers those by a plain pass (EngineSettings.reuse_prefix).
    """
    resolved = resolve_model(model, allow_unverified=allow_unverified)
    settings = EngineSettings(
        n_ctx=n_ctx,
        n_threads=threads,
        n_gpu_layers=gpu_layers,
        kv_type=kv_type,
        tail_models=tail_models,
        reuse_prefix=reuse_prefix,
    )
    if heads is False:
        heads_dir = None
    elif heads is not None:
        heads_dir = Path(heads)
    else:  # a bundle's own heads, or those shipped for a registry model
        heads_dir = resolved.heads or (shipped_heads(resolved.name) if resolved.entry else None)
    engine = Engine(resolved.path, settings, share=share_with.engine if share_with is not None else None)
    try:
        return Runtime(engine, resolved.name, heads_dir, SpeedGuard(enabled=speed_guard))
    except Exception:
        engine.close()
        raise


_loaded: dict[tuple, Runtime] = {}


def ask(question: str, choices: Sequence[str] | None = None, *, model: str | Path | None = None, **kwargs) -> Answer:
    """One-call convenience: loads `model` once per process and asks."""
    key = (str(model),)
    if key not in _loaded:
        _loaded[key] = load_model(model)
    return _loaded[key].ask(question, choices, **kwargs)
