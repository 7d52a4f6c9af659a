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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .engine import Engine, EngineSettings, Readout
from .errors import LayerError
from .heads import OnnxHeads
from .manifest import load_heads
from .policy import ExitPolicy, spade_exit
from .prompts import Prompt, build_prompt
from .registry import resolve_model, shipped_heads

log = logging.getLogger(__name__)

Lens = Literal["spade", "logit"]


@dataclass
class Answer:
    """One answer and how it was reached."""

    answer: str  # the chosen choice's text, or the next token's text
    choice_index: int | None  # None for a free answer
    label: str | None  # how the choice was named in the prompt ("B", "yes"); None for free answers
    probs: dict[str, float]  # choice -> probability (free answers: the top tokens)
    mode: str  # "full" | "spade" | "logit-lens"
    layer: int  # the layer whose state decided (n_layers - 1 for full depth)
    n_layers: int
    prompt_tokens: int
    timings_ms: dict[str, float]  # total, prefill, tail
    model: str
    token: int  # the winning token id (free answers) or the label's most likely token
    tail: int = 1  # SPADE tail width (prompt rows forwarded besides the start token)
    exit_layer: int | None = None  # spade-exit: the layer it stopped at (None: no exit, full answer)
    entropy: dict[int, float] | None = None  # spade-exit: head entropy (nats) at each evaluated layer
    threshold: float | None = None  # spade-exit: the threshold in force

    def to_dict(self) -> dict:
        return asdict(self)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()


class Runtime:
    """A loaded model ready for questions; create once, ask many times (not thread-safe).

    With calibrated heads for the question's kind (choice or free answer), questions are
    answered by SPADE-EXIT unless a layer or the full model is asked for.
    """

    def __init__(self, engine: Engine, name: str, heads_dir: Path | None = None) -> None:
        self.engine = engine
        self.name = name
        self.heads_dir = heads_dir
        self.manifest = None
        self.heads: dict[str, OnnxHeads] = {}  # answer kind ("choice", "free") -> heads
        if heads_dir is not None:
            self.manifest, self.heads = load_heads(heads_dir, engine)

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
        signal: Literal["lspade", "spade"] | None = None,
        top_k: int = 5,
    ) -> Answer:
        """Answer by SPADE-EXIT (with heads), at `layer` with SPADE or the logit lens, or at full depth.

        `signal` picks the exit rule (L-SPADE heads at the evaluation layers, or SPADE probes at the
        calibrated probe layers); None: the one calibration chose for this kind of question.
        """
        t0 = time.perf_counter()
        prompt = self.prompt(question, choices, template)
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
        """SPADE-EXIT: one prompt pass stopped at the first layer whose confidence signal is low enough."""
        kind = self.kind(prompt)
        head_set = self.manifest.sets[kind]
        policy = ExitPolicy.from_head_set(head_set, threshold, signal)
        tau = policy.threshold
        k = head_set.tail if tail is None else tail
        readout, seen = spade_exit(self.engine, self.heads[kind], policy, prompt, tail=k)
        answer = self.answer(prompt, readout, "spade-exit", t0, tail=k, top_k=top_k)
        exited = readout.layer < self.engine.n_layers - 1
        answer.exit_layer = readout.layer if exited else None
        answer.entropy = {layer: round(h, 5) for layer, h in seen.entropies.items()}
        answer.threshold = tau
        answer.timings_ms["heads"] = round(seen.check_ms, 3)
        return answer

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
            p = softmax(readout.logits.astype(np.float64))
            top = np.argsort(-p)[:top_k]
            token = int(top[0])
            probs: dict[str, float] = {}
            for i in top:
                probs.setdefault(self.engine.token_text(int(i)), float(p[i]))
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
        )

    def close(self) -> None:
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
) -> Runtime:
    """A registry name, a bundle folder or a GGUF path (None: the default model), loaded and ready.

    `heads`: a folder made by `edge-spade calibrate`; None uses the bundle's heads or those
    shipped for a registry model (if any); False loads none (full depth and fixed-layer modes only).
    `tail_models=False`: SPADE probes run their tails on the whole model (same answers), which
    saves loading a tail model (about as long as loading the model) where few questions are asked.
    """
    resolved = resolve_model(model)
    settings = EngineSettings(
        n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers, kv_type=kv_type, tail_models=tail_models
    )
    if heads is False:
        heads_dir = None
    elif heads is not None:
        heads_dir = Path(heads)
    else:  # a bundle's own heads, or those shipped for a registry model
        heads_dir = resolved.heads or (shipped_heads(resolved.name) if resolved.entry else None)
    engine = Engine(resolved.path, settings)
    try:
        return Runtime(engine, resolved.name, heads_dir)
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
